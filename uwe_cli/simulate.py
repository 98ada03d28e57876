"""`uwe simulate` as a library call: replay active learning on a labeled pool with a linear probe.

Which strategy and which tau work on a team's own data? With ground-truth labels for a pool, each
cycle of Algorithm 1 can be replayed cheaply: a linear probe (`probe.py`) stands in for the model,
its class probabilities give the uncertainty (and BADGE's gradient embedding), and the next batch is
chosen by `select_loaded`, the code `uwe select` runs. A stratified held-out split is never selected
and measures the probe's accuracy and macro-F1 after every cycle.

Everything is a function of the inputs and the seeds: the held-out split (seeded 0, the same for every
seed, so the spread measures selection and not the test set), the first budget (the `random`
strategy's draw with the seed, shared by every strategy, as in Algorithm 1), the probe (full-batch
L-BFGS from zeros on the sorted labeled rows), and the selection seed of each later cycle (recorded,
so any cycle can be replayed with `uwe select --seed`). `results.json` of the same command is
byte-identical across runs.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from uwe_cli import storage
from uwe_cli.embedding import check_selection_options
from uwe_cli.errors import LabelError, SelectionError
from uwe_cli.outputs import Output, open_output, resolve_output
from uwe_cli.pool import PoolSource, UnitPool, open_pool
from uwe_cli.pool.files import read_column
from uwe_cli.probe import Probe, fit_probe
from uwe_cli.select import select_loaded
from uwe_cli.selection.request import check_memory, resolve_device, split_rows
from uwe_cli.selection.strategies import STRATEGIES, get_strategy
from uwe_cli.selection.tracker import Progress

UNCERTAINTIES = ("entropy", "bvsb", "least_confidence")
DEFAULT_STRATEGIES = ("uwe", "coreset", "uncertainty", "random", "badge")
SPLIT_SEED = 0
FLOAT_DIGITS = 6
FILES = {"json": "results.json", "csv": "results.csv", "plot": "curves.png"}


# --------------------------------------------------------------------------------------------------
# Options


def _parse_list(text: str, option: str, kind: Callable[[str], Any], what: str) -> list[Any]:
    try:
        return [kind(t.strip()) for t in str(text).split(",")]
    except ValueError:
        raise SelectionError(f"{option}: cannot read '{text}' (give {what} separated by commas)") from None


def parse_int_list(text: str, option: str) -> list[int]:
    """'100,200,400' → [100, 200, 400]; one-line SelectionError naming the option otherwise."""
    return _parse_list(text, option, int, "integers")


def parse_float_list(text: str, option: str) -> list[float]:
    return _parse_list(text, option, float, "numbers")


def check_budgets(budgets: Sequence[int]) -> list[int]:
    """Cumulative labeled counts: at least two, positive and strictly increasing."""
    budgets = list(budgets)
    if len(budgets) < 2:
        raise SelectionError(
            f"--budgets needs at least two labeled counts (the random start and one selection), got {budgets}"
        )
    if budgets[0] < 1:
        raise SelectionError(f"--budgets must be positive, got {budgets[0]}")
    for a, b in itertools.pairwise(budgets):
        if b <= a:
            raise SelectionError(f"--budgets must increase (cumulative labeled counts): {a} then {b}")
    return budgets


@dataclass(frozen=True)
class Curve:
    """One learning curve: a strategy, with tau for strategies that embed u^tau · f."""

    strategy: str
    tau: float | None

    @property
    def name(self) -> str:
        return self.strategy if self.tau is None else f"{self.strategy} tau={self.tau:g}"


def curves_for(strategies: Sequence[str], taus: Sequence[float]) -> list[Curve]:
    """One curve per strategy, or per (strategy, tau) for strategies whose embedding uses tau."""
    if not strategies:
        raise SelectionError("--strategies is empty")
    if len(set(strategies)) != len(strategies):
        raise SelectionError(f"--strategies lists a strategy twice: {','.join(strategies)}")
    if len(set(taus)) != len(taus):
        raise SelectionError(f"--tau lists a value twice: {','.join(f'{t:g}' for t in taus)}")
    for tau in taus:
        check_selection_options(tau, "minmax")
    curves = []
    for name in strategies:
        strategy = get_strategy(name, "unit")
        if strategy.embedding == "uwe":
            curves += [Curve(name, float(tau)) for tau in taus]
        else:
            curves.append(Curve(name, None))
    return curves


# --------------------------------------------------------------------------------------------------
# Labels


@dataclass
class Labels:
    """Class index per pool row (-1: no label) and the class names, in index order."""

    y: np.ndarray
    classes: list[str]
    warnings: list[str] = field(default_factory=list)


def _class_order(values: Sequence[str]) -> list[str]:
    """Class names sorted numerically when every name is an integer, else as strings."""
    unique = sorted(set(values))
    try:
        return sorted(unique, key=int)
    except ValueError:
        return unique


def _index_labels(n: int, rows: np.ndarray, values: list[str], source: str) -> Labels:
    classes = _class_order(values)
    if not classes:
        raise LabelError(f"{source}: no unit of the pool has a label")
    if len(classes) == 1:
        raise LabelError(
            f"{source}: every labeled unit has the class '{classes[0]}'; a simulation needs two classes or more"
        )
    lookup = {c: i for i, c in enumerate(classes)}
    y = np.full(n, -1, dtype=np.int64)
    y[rows] = [lookup[v] for v in values]
    warnings = []
    missing = int((y < 0).sum())
    if missing:
        warnings.append(f"{missing:,} of {n:,} pool units have no label and take no part in the simulation")
    return Labels(y, classes, warnings)


def read_labels_csv(path: str | Path, pool_ids: pa.Array) -> Labels:
    """Labels from a CSV with `id` and `label` columns; every ID must be in the pool, once."""
    option = f"--labels {path}"
    rows = storage.csv_rows(storage.read_text_file(path, "--labels file", LabelError), option, LabelError)
    header = [h.strip() for h in rows[0]] if rows else []
    if "id" not in header or "label" not in header:
        raise LabelError(
            f"{option}: needs a header with 'id' and 'label' columns (found: {','.join(header)})"
        )
    i_id, i_label = header.index("id"), header.index("label")
    ids: list[str] = []
    values: list[str] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if max(i_id, i_label) >= len(row):
            raise LabelError(f"{option}: line {line} has no value in the 'id' or 'label' column")
        label = row[i_label].strip()
        if label == "":
            raise LabelError(f"{option}: line {line}: empty label for id '{row[i_id]}'")
        ids.append(row[i_id])
        values.append(label)
    if not ids:
        raise LabelError(f"{option}: no labels (only a header)")
    id_array = pa.array(ids, type=pa.string())
    if pc.count_distinct(id_array).as_py() != len(ids):
        seen: set[str] = set()
        for unit_id in ids:
            if unit_id in seen:
                raise LabelError(f"{option}: id '{unit_id}' appears more than once")
            seen.add(unit_id)
    index = pc.index_in(id_array, value_set=pool_ids)
    if index.null_count:
        first = ids[int(np.flatnonzero(np.asarray(index.is_null()))[0])]
        raise LabelError(
            f"{option}: {index.null_count:,} IDs are not in the pool (first: '{first}'); "
            "labels must name pool units"
        )
    rows_idx = index.to_numpy(zero_copy_only=False).astype(np.int64)
    return _index_labels(len(pool_ids), rows_idx, values, option)


def read_label_column(source: PoolSource, column: str) -> Labels:
    """Labels from a column of the pool (integer or string; null = no label), in pool row order."""
    option = f"--label-column {column}"
    chunks = []
    for f, pf in zip(source.files, source.parquet, strict=True):
        names = pf.schema_arrow.names
        if column not in names:
            raise LabelError(f"{f}: {option}: no such column (columns: {', '.join(names)})")
        kind = pf.schema_arrow.field(column).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)):
            raise LabelError(f"{f}: {option} must hold integers or strings, found {kind}")
        chunks.append(read_column(pf, f, column).cast(pa.string()))
    values = pa.chunked_array(chunks, type=pa.string()).combine_chunks()
    valid = np.asarray(values.is_valid())
    rows = np.flatnonzero(valid)
    texts = [v.strip() for v in values.filter(pa.array(valid)).to_pylist()]
    if any(t == "" for t in texts):
        raise LabelError(f"{option}: empty label in the pool")
    return _index_labels(len(values), rows, texts, option)


def stratified_split(y: np.ndarray, fraction: float, seed: int = SPLIT_SEED) -> np.ndarray:
    """Held-out rows: round(fraction · n_c) random rows of every class c (rows with y < 0 never), sorted."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y[y >= 0]):
        rows = np.flatnonzero(y == c)
        k = math.floor(fraction * rows.size + 0.5)
        test.append(np.sort(rng.permutation(rows)[:k]))
    return np.sort(np.concatenate(test)) if test else np.empty(0, dtype=np.int64)


# --------------------------------------------------------------------------------------------------
# Metrics


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean F1 over the classes present in truth or prediction (scikit-learn's macro average; 0/0 = 0)."""
    classes = np.union1d(y_true, y_pred)
    scores = []
    for c in classes:
        tp = float(np.sum((y_pred == c) & (y_true == c)))
        fp = float(np.sum((y_pred == c) & (y_true != c)))
        fn = float(np.sum((y_pred != c) & (y_true == c)))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def curve_auc(counts: Sequence[int], values: Sequence[float]) -> float:
    """Area under the learning curve (trapezoids over labeled counts) divided by its width: a mean accuracy."""
    x = np.asarray(counts, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    return float(np.sum(np.diff(x) * (v[1:] + v[:-1]) / 2) / (x[-1] - x[0]))


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation across seeds (0 for one seed)."""
    return float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def cycle_seed(seed: int, cycle: int) -> int:
    """The selection seed of `cycle` (≥ 1) of run `seed`; cycle 0 (the random start) uses `seed` itself."""
    return int(np.random.SeedSequence([seed, cycle]).generate_state(1)[0])


def uncertainty_of(probs: np.ndarray, measure: str) -> np.ndarray:
    """The probe's uncertainty per unit, with the extractor's measures (uwe_cli.uncertainty)."""
    import torch

    from uwe_cli import uncertainty

    func = getattr(uncertainty, measure)  # checked against UNCERTAINTIES
    return func(torch.from_numpy(probs), dim=1).numpy().astype(np.float64)


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class SeedRun:
    """One curve under one seed: accuracy and macro-F1 per budget, and what each cycle selected."""

    accuracy: list[float]
    macro_f1: list[float]
    selected: list[list[str]]  # IDs added at cycles 1..T-1, in pick order
    selection_seeds: list[int]


@dataclass
class SimulationResult:
    config: dict[str, Any]
    pool: dict[str, Any]
    budgets: list[int]
    seeds: list[int]
    curves: list[Curve]
    runs: dict[Curve, list[SeedRun]]
    initial: list[list[str]]  # per seed, the random start's IDs
    held_out: list[str]
    no_label: list[str]
    warnings: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def auc(self, curve: Curve, metric: str = "accuracy") -> list[float]:
        return [curve_auc(self.budgets, getattr(run, metric)) for run in self.runs[curve]]

    def ranking(self) -> list[tuple[Curve, float, float]]:
        """(curve, mean AUC, std AUC), best first; ties keep the order the curves were asked for."""
        rows = [(c, float(np.mean(self.auc(c))), _std(self.auc(c))) for c in self.curves]
        return sorted(rows, key=lambda r: -_rounded(r[1]))

    def recommendation(self) -> dict[str, Any]:
        """The best curve by mean AUC, its margin over the runner-up, and whether the margin beats the spread."""
        ranked = self.ranking()
        best, best_auc, best_std = ranked[0]
        out: dict[str, Any] = {
            "strategy": best.strategy,
            "tau": best.tau,
            "curve": best.name,
            "auc": _rounded(best_auc),
            "auc_std": _rounded(best_std),
        }
        if len(ranked) == 1:
            out["text"] = f"only {best.name} was simulated: area under the curve {best_auc:.4f}"
            return out
        second, second_auc, second_std = ranked[1]
        margin = best_auc - second_auc
        spread = max(best_std, second_std)
        exceeds = len(self.seeds) > 1 and margin > spread
        out.update(
            runner_up=second.name,
            runner_up_auc=_rounded(second_auc),
            margin=_rounded(margin),
            seed_spread=_rounded(spread),
            exceeds_spread=exceeds,
        )
        what = f"{best.strategy}" + (f" with --tau {best.tau:g}" if best.tau is not None else "")
        head = (
            f"use {what}: area under the accuracy curve {best_auc:.4f} ± {best_std:.4f}, "
            f"{margin:+.4f} over {second.name} ({second_auc:.4f} ± {second_std:.4f})"
        )
        if len(self.seeds) == 1:
            tail = "; one seed, so no spread to judge the margin by (run --seeds 3 or more)"
        elif exceeds:
            tail = f"; the margin exceeds the seed spread ({spread:.4f})"
        else:
            tail = (
                f"; the margin is within the seed spread ({spread:.4f}): not a clear winner, run more --seeds"
            )
        out["text"] = head + tail
        return out


def _rounded(value: float) -> float:
    return round(float(value), FLOAT_DIGITS)


@dataclass
class _Replay:
    """One loaded pool with its ground truth, and the three steps every cycle takes: fit, evaluate, select."""

    pool: UnitPool
    y: np.ndarray
    num_classes: int
    excluded: np.ndarray  # held out + no label: never selected, not in play for normalisation
    held_out: np.ndarray
    uncertainty: str
    normalize: str
    probe_c: float
    backend: str
    device: str
    timing: dict[str, float] = field(default_factory=lambda: {"probe_fit": 0.0, "probe_predict": 0.0})
    warnings: list[str] = field(default_factory=list)

    def ids_of(self, rows: np.ndarray) -> list[str]:
        return self.pool.ids.take(pa.array(rows)).to_pylist()

    def random_start(self, size: int, seed: int) -> np.ndarray:
        """The first labeled set: `uwe select --strategy random --seed seed` with the excluded units excluded."""
        split = split_rows(self.pool.size, np.empty(0, np.int64), self.excluded, size)
        result = select_loaded(self._pool_with(None, None), split, size, "random", seed=seed)
        assert result.rows is not None
        return result.rows

    def fit(self, rows: np.ndarray) -> Probe:
        """The probe on the labeled rows, sorted, so it depends on the set and not on the pick order."""
        t = time.perf_counter()
        rows = np.sort(rows)
        probe = fit_probe(self.pool.features[rows], self.y[rows], self.num_classes, C=self.probe_c)
        self.timing["probe_fit"] += time.perf_counter() - t
        return probe

    def evaluate(self, probe: Probe) -> tuple[float, float]:
        """Accuracy and macro-F1 on the held-out units."""
        pred = probe.predict(self.pool.features[self.held_out])
        truth = self.y[self.held_out]
        return float(np.mean(pred == truth)), macro_f1(truth, pred)

    def select(self, curve: Curve, probe: Probe, labeled: np.ndarray, step: int, seed: int) -> np.ndarray:
        """The next `step` rows by `select_loaded`, the probe's probabilities standing in for the model's."""
        strategy = STRATEGIES[curve.strategy]
        u = probs = None
        if strategy.needs_uncertainty or strategy.needs_probs:
            t = time.perf_counter()
            probs = probe.predict_proba(self.pool.features)
            u = uncertainty_of(probs, self.uncertainty) if strategy.needs_uncertainty else None
            self.timing["probe_predict"] += time.perf_counter() - t
        t = time.perf_counter()
        result = select_loaded(
            self._pool_with(u, probs),
            split_rows(self.pool.size, labeled, self.excluded, step),
            step,
            strategy=curve.strategy,
            tau=1.0 if curve.tau is None else curve.tau,
            normalize=self.normalize,
            seed=seed,
            backend=self.backend,
            device=self.device,
        )
        key = f"select_{curve.strategy}"
        self.timing[key] = self.timing.get(key, 0.0) + time.perf_counter() - t
        self.warnings += [w for w in result.warnings if w not in self.warnings]
        assert result.rows is not None
        return result.rows

    def _pool_with(self, u: np.ndarray | None, probs: np.ndarray | None) -> UnitPool:
        column = None if u is None else f"{self.uncertainty} (probe)"
        return UnitPool(
            self.pool.ids, self.pool.features, u, column, probs=probs, metadata=self.pool.metadata
        )


def run_simulation(
    pools: Sequence[str | Path] | str | Path,
    budgets: Sequence[int],
    strategies: Sequence[str] = DEFAULT_STRATEGIES,
    taus: Sequence[float] = (1.0,),
    seeds: int = 3,
    labels: str | Path | None = None,
    label_column: str | None = None,
    test_fraction: float = 0.2,
    uncertainty: str = "entropy",
    normalize: str = "minmax",
    probe_c: float = 1.0,
    device: str = "auto",
    max_memory: int | None = None,
    progress: Progress | None = None,
) -> SimulationResult:
    """Replay `len(budgets) - 1` selection cycles per curve and seed; UweError for any bad input, first."""
    started = time.perf_counter()
    budgets = check_budgets(budgets)
    curves = curves_for(list(strategies), list(taus))
    if seeds < 1:
        raise SelectionError(f"--seeds must be at least 1, got {seeds}")
    if not 0 < test_fraction < 1:
        raise SelectionError(f"--test-fraction must be between 0 and 1, got {test_fraction}")
    if uncertainty not in UNCERTAINTIES:
        raise SelectionError(
            f"unknown --uncertainty '{uncertainty}' (choose from {', '.join(UNCERTAINTIES)})"
        )
    check_selection_options(1.0, normalize)
    if not (math.isfinite(probe_c) and probe_c > 0):
        raise SelectionError(f"--probe-c must be a positive number, got {probe_c}")
    if (labels is None) == (label_column is None):
        raise LabelError(
            "give the ground truth with --labels FILE (a CSV with id,label) or --label-column COLUMN"
            if labels is None
            else "give --labels or --label-column, not both"
        )
    backend, device = resolve_device(device)
    source = open_pool(pools)
    if source.kind != "unit":
        raise SelectionError(
            f"{source.files[0]} is a detection pool (one row per box); uwe simulate needs a unit pool "
            "with one feature per image or region"
        )
    check_memory(source, max_memory)
    # A label column is checked before the features are loaded; a labels file needs the pool's IDs.
    from_column = read_label_column(source, label_column) if label_column is not None else None
    pool = source.read(need_uncertainty=False)
    truth = from_column if from_column is not None else read_labels_csv(str(labels), pool.ids)
    y, K, n = truth.y, len(truth.classes), pool.size

    held_out = stratified_split(y, test_fraction)
    no_label = np.flatnonzero(y < 0)
    excluded = np.union1d(held_out, no_label)
    available = n - excluded.size
    if held_out.size == 0:
        raise SelectionError(f"--test-fraction {test_fraction:g} leaves no labeled unit for testing")
    if budgets[-1] > available:
        raise SelectionError(
            f"--budgets {budgets[-1]} is larger than the {available:,} units that can be selected "
            f"({n - no_label.size:,} labeled units, {held_out.size:,} held out for testing)"
        )
    replay = _Replay(pool, y, K, excluded, held_out, uncertainty, normalize, probe_c, backend, device)
    steps = [b - a for a, b in itertools.pairwise(budgets)]
    total = seeds * (1 + len(curves) * len(steps))
    done = 0
    runs: dict[Curve, list[SeedRun]] = {c: [] for c in curves}
    initial_ids: list[list[str]] = []
    for seed in range(seeds):
        start = replay.random_start(budgets[0], seed)
        initial_ids.append(replay.ids_of(start))
        first_probe = replay.fit(start)
        first_scores = replay.evaluate(first_probe)
        done += 1
        if progress is not None:
            progress(done, total)
        for curve in curves:
            labeled, probe = start, first_probe
            run = SeedRun([first_scores[0]], [first_scores[1]], [], [])
            for cycle, step in enumerate(steps, start=1):
                picked = replay.select(curve, probe, labeled, step, cycle_seed(seed, cycle))
                labeled = np.concatenate([labeled, picked])
                probe = replay.fit(labeled)
                accuracy, f1 = replay.evaluate(probe)
                run.accuracy.append(accuracy)
                run.macro_f1.append(f1)
                run.selected.append(replay.ids_of(picked))
                run.selection_seeds.append(cycle_seed(seed, cycle))
                done += 1
                if progress is not None:
                    progress(done, total)
            runs[curve].append(run)

    timing = replay.timing
    timing["total"] = time.perf_counter() - started
    config = {
        "pools": [str(p) for p in ([pools] if isinstance(pools, (str, Path)) else pools)],
        "labels": None if labels is None else str(labels),
        "label_column": label_column,
        "budgets": budgets,
        "strategies": list(strategies),
        "taus": [float(t) for t in taus],
        "seeds": seeds,
        "test_fraction": test_fraction,
        "uncertainty": uncertainty,
        "normalize": normalize,
        "probe": {"model": "multinomial logistic regression (L2)", "C": probe_c},
    }
    pool_info = {
        "units": n,
        "feature_dim": pool.dim,
        "classes": truth.classes,
        "labeled_units": int(n - no_label.size),
        "held_out": int(held_out.size),
        "selectable": int(available),
    }
    ids = pool.ids
    return SimulationResult(
        config=config,
        pool=pool_info,
        budgets=budgets,
        seeds=list(range(seeds)),
        curves=curves,
        runs=runs,
        initial=initial_ids,
        held_out=ids.take(pa.array(held_out)).to_pylist(),
        no_label=ids.take(pa.array(no_label)).to_pylist(),
        warnings=truth.warnings + replay.warnings,
        timing={k: round(v, 3) for k, v in timing.items()},
    )


# --------------------------------------------------------------------------------------------------
# Outputs


def curve_summary(result: SimulationResult, curve: Curve) -> dict[str, Any]:
    runs = result.runs[curve]
    out: dict[str, Any] = {"curve": curve.name, "strategy": curve.strategy, "tau": curve.tau}
    for metric in ("accuracy", "macro_f1"):
        table = np.array([getattr(r, metric) for r in runs])
        aucs = result.auc(curve, metric)
        out[metric] = {
            "mean": [_rounded(v) for v in table.mean(axis=0)],
            "std": [_rounded(_std(table[:, i])) for i in range(table.shape[1])],
            "auc_mean": _rounded(np.mean(aucs)),
            "auc_std": _rounded(_std(aucs)),
        }
    return out


def results_document(result: SimulationResult) -> dict[str, Any]:
    """Everything of the run that does not depend on the clock: options, pool, every curve and seed."""
    curves = []
    for curve in result.curves:
        entry = curve_summary(result, curve)
        entry["seeds"] = [
            {
                "seed": seed,
                "accuracy": [_rounded(v) for v in run.accuracy],
                "macro_f1": [_rounded(v) for v in run.macro_f1],
                "auc": _rounded(curve_auc(result.budgets, run.accuracy)),
                "selection_seeds": run.selection_seeds,
                "selected": run.selected,
            }
            for seed, run in zip(result.seeds, result.runs[curve], strict=True)
        ]
        curves.append(entry)
    return {
        "uwe_simulate": 1,
        "config": result.config,
        "pool": result.pool,
        "budgets": result.budgets,
        "seeds": result.seeds,
        "curves": curves,
        "recommendation": result.recommendation(),
        "initial": [{"seed": s, "ids": ids} for s, ids in zip(result.seeds, result.initial, strict=True)],
        "held_out": result.held_out,
        "no_label": result.no_label,
    }


def results_json(result: SimulationResult) -> str:
    return json.dumps(results_document(result), sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def results_csv(result: SimulationResult) -> str:
    """One row per curve, seed and cycle (a tidy table for pandas or a spreadsheet)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["curve", "strategy", "tau", "seed", "cycle", "labeled", "accuracy", "macro_f1"])
    for curve in result.curves:
        tau = "" if curve.tau is None else f"{curve.tau:g}"
        for seed, run in zip(result.seeds, result.runs[curve], strict=True):
            for cycle, labeled in enumerate(result.budgets):
                writer.writerow(
                    [
                        curve.name,
                        curve.strategy,
                        tau,
                        seed,
                        cycle,
                        labeled,
                        f"{run.accuracy[cycle]:.{FLOAT_DIGITS}f}",
                        f"{run.macro_f1[cycle]:.{FLOAT_DIGITS}f}",
                    ]
                )
    return buf.getvalue()


def plot_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def plot_curves(result: SimulationResult, path: str | Path) -> None:
    """Accuracy against labeled count: one line per curve (mean over seeds) with a ±1 std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8), dpi=120)
    try:
        x = np.asarray(result.budgets)
        for curve in result.curves:
            table = np.array([r.accuracy for r in result.runs[curve]])
            mean = table.mean(axis=0)
            std = np.array([_std(table[:, i]) for i in range(table.shape[1])])
            auc = float(np.mean(result.auc(curve)))
            (line,) = ax.plot(x, mean, marker="o", markersize=3, label=f"{curve.name} (AUC {auc:.3f})")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xscale("log" if x[-1] / x[0] >= 8 else "linear")
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
        ax.set_xlabel("labeled units")
        ax.set_ylabel(f"probe accuracy on {result.pool['held_out']:,} held-out units")
        ax.set_title(f"uwe simulate: {len(result.seeds)} seed(s), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


def output_files(out_dir: Output, inputs: Sequence[str | Path]) -> dict[str, Output]:
    """The files written into DIR, each checked before any work (not a directory, not an input)."""
    assert out_dir.path is not None
    return {
        key: resolve_output(storage.join(out_dir.path, name), "--out", inputs=inputs, allow_stdout=False)
        for key, name in FILES.items()
    }


def write_results(result: SimulationResult, files: dict[str, Output], plot: bool = True) -> list[str]:
    """Write results.json, results.csv and (when asked and matplotlib is there) the plot, each atomically."""
    written = []
    with open_output(files["json"]) as fh:
        fh.write(results_json(result))
    written.append(str(files["json"]))
    with open_output(files["csv"]) as fh:
        fh.write(results_csv(result))
    written.append(str(files["csv"]))
    if plot:
        import tempfile

        with tempfile.TemporaryDirectory(
            prefix="uwe-plot-"
        ) as folder:  # drawn here, then written as any file
            png = Path(folder) / "curves.png"
            plot_curves(result, png)
            with open_output(files["plot"], binary=True) as fh:
                fh.write(png.read_bytes())
        written.append(str(files["plot"]))
    return written
