"""`uwe simulate`: the probe against scikit-learn, selection identical to `uwe select`, determinism, bad input.

The pool is real: scikit-learn's 8×8 digits, pixels as features (a small labelled image set that
ships with a package, no download).
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import assert_one_line_error, fixed_list, write_pool
from reference import dense_embeddings, kcg_reference, minmax
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from typer.testing import CliRunner

from uwe_cli.cli import app
from uwe_cli.probe import fit_probe
from uwe_cli.simulate import (
    Curve,
    SeedRun,
    SimulationResult,
    curve_auc,
    cycle_seed,
    macro_f1,
    run_simulation,
    stratified_split,
    uncertainty_of,
)

runner = CliRunner()
N_UNITS = 600


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y


def ids_for(n: int) -> list[str]:
    return [f"s{i:05d}" for i in range(n)]


@pytest.fixture
def digit_pool(tmp_path, digits):
    """(pool path, labels CSV, features, labels) for the first N_UNITS digits."""
    X, y = digits[0][:N_UNITS], digits[1][:N_UNITS]
    pool = write_pool(tmp_path / "pool.parquet", X)
    labels = tmp_path / "labels.csv"
    with labels.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows(zip(ids_for(N_UNITS), y.tolist(), strict=True))
    return pool, labels, X, y


def read_ids(path: Path) -> list[str]:
    with open(path, newline="") as fh:
        return [row["id"] for row in csv.DictReader(fh)]


def write_ids(path: Path, ids: list[str]) -> Path:
    path.write_text("".join(f"{i}\n" for i in ids))
    return path


# --------------------------------------------------------------------------------------------------
# The probe


def converged_sklearn(X: np.ndarray, y: np.ndarray, C: float = 1.0) -> LogisticRegression:
    """scikit-learn's own Newton-CG solver, run to convergence.

    Its default L-BFGS stops on a relative-reduction test well short of the optimum on unscaled pixels
    (probabilities off by up to 0.18 here), so it is compared by objective value instead.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Line Search failed" once at the optimum
        return LogisticRegression(C=C, solver="newton-cg", tol=1e-10, max_iter=10_000).fit(X, y)


def objective(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray, C: float) -> float:
    """scikit-learn's objective: C · Σ cross-entropy + ½‖W‖² (W: d × classes seen)."""
    index = np.searchsorted(np.unique(y), y)
    z = X.astype(np.float64) @ W + b
    z -= z.max(axis=1, keepdims=True)
    return float(
        C * (np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), index]).sum() + 0.5 * (W * W).sum()
    )


@pytest.mark.parametrize("n_labeled", [30, 150, 600])
@pytest.mark.parametrize("C", [1.0, 0.05])
def test_probe_accuracy_equals_scikit_learn(digits, n_labeled, C):
    X, y = digits
    rng = np.random.default_rng(n_labeled)
    order = rng.permutation(len(y))
    test, train = order[:500], order[500 : 500 + n_labeled]
    probe = fit_probe(X[train], y[train], 10, C=C)
    reference = converged_sklearn(X[train], y[train], C)
    ours = float(np.mean(probe.predict(X[test]) == y[test]))
    theirs = float(np.mean(reference.predict(X[test]) == y[test]))
    assert abs(ours - theirs) <= 1e-3
    probs = probe.predict_proba(X[test])
    np.testing.assert_allclose(probs[:, reference.classes_], reference.predict_proba(X[test]), atol=1e-4)
    absent = np.setdiff1d(np.arange(10), reference.classes_)
    assert not probs[:, absent].any()
    default = LogisticRegression(C=C, max_iter=1000).fit(X[train], y[train])
    ours_f = objective(probe.weights, probe.bias, X[train], y[train], C)
    assert ours_f <= objective(default.coef_.T, default.intercept_, X[train], y[train], C) + 1e-9 * abs(
        ours_f
    )


def test_probe_two_classes_is_binary_logistic_regression(digits):
    X, y = digits
    rows = np.flatnonzero((y == 3) | (y == 8))
    train, test = rows[:80], rows[80:]
    probe = fit_probe(X[train], y[train], 10)
    reference = converged_sklearn(X[train], y[train])
    np.testing.assert_allclose(
        probe.predict_proba(X[test])[:, [3, 8]], reference.predict_proba(X[test]), atol=1e-4
    )


def test_probe_with_one_class_is_certain(digits):
    X, y = digits
    rows = np.flatnonzero(y == 4)[:5]
    probs = fit_probe(X[rows], y[rows], 10).predict_proba(X[:7])
    assert (probs[:, 4] == 1).all() and probs.sum() == 7


def test_metrics_and_split_helpers(rng):
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.7, y_true, rng.integers(0, 6, 300))
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)
    assert curve_auc([10, 20, 40], [0.5, 0.7, 0.9]) == pytest.approx((10 * 0.6 + 20 * 0.8) / 30)
    y = np.repeat(np.arange(4), [50, 30, 11, 2])
    y = np.concatenate([y, [-1, -1]])
    test = stratified_split(y, 0.2)
    assert [int((y[test] == c).sum()) for c in range(4)] == [10, 6, 2, 0]
    assert (y[test] >= 0).all()
    np.testing.assert_array_equal(test, stratified_split(y, 0.2))


def _result(aucs: dict[str, list[float]]) -> SimulationResult:
    curves = [Curve(name, None) for name in aucs]
    runs = {c: [SeedRun([a, a], [a, a], [[]], [0]) for a in aucs[c.strategy]] for c in curves}
    seeds = list(range(len(next(iter(aucs.values())))))
    return SimulationResult({}, {}, [10, 20], seeds, curves, runs, [[] for _ in seeds], [], [])


def test_recommendation_judges_the_margin_by_the_seed_spread():
    clear = _result({"random": [0.70, 0.71, 0.72], "uwe": [0.80, 0.81, 0.79]}).recommendation()
    assert clear["strategy"] == "uwe" and clear["runner_up"] == "random" and clear["exceeds_spread"]
    assert clear["margin"] == pytest.approx(0.09) and "exceeds the seed spread" in clear["text"]
    close = _result({"coreset": [0.80, 0.70, 0.75], "uwe": [0.76, 0.77, 0.75]}).recommendation()
    assert (
        close["strategy"] == "uwe"
        and not close["exceeds_spread"]
        and "within the seed spread" in close["text"]
    )
    single = _result({"coreset": [0.7], "uwe": [0.8]}).recommendation()
    assert not single["exceeds_spread"] and "one seed" in single["text"]


# --------------------------------------------------------------------------------------------------
# Same selection code as `uwe select`


def test_random_and_coreset_cycles_are_uwe_select_runs(tmp_path, digit_pool):
    """Every cycle of random and coreset equals `uwe select` given the same labeled and held-out IDs."""
    pool, labels, _, _ = digit_pool
    out = tmp_path / "sim"
    r = invoke(
        "simulate", pool, "--labels", labels, "--budgets", "10,25,45", "--strategies", "random,coreset",
        "--seeds", 2, "--out", out, "--quiet", "--no-plot",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    held_out = write_ids(tmp_path / "held_out.txt", doc["held_out"])
    assert len(doc["held_out"]) == 120
    budgets = doc["budgets"]
    for start in doc["initial"]:
        batch = tmp_path / "start.csv"
        args = [
            "--strategy",
            "random",
            "--seed",
            start["seed"],
            "--exclude",
            held_out,
            "--budget",
            budgets[0],
        ]
        assert invoke("select", pool, *args, "--out", batch, "--quiet").exit_code == 0
        assert read_ids(batch) == start["ids"]
    for curve in doc["curves"]:
        for run in curve["seeds"]:
            labeled = list(doc["initial"][run["seed"]]["ids"])
            assert run["selection_seeds"] == [cycle_seed(run["seed"], t) for t in (1, 2)]
            for cycle, picked in enumerate(run["selected"], start=1):
                step = budgets[cycle] - budgets[cycle - 1]
                lab = write_ids(tmp_path / "labeled.txt", labeled)
                batch = tmp_path / "batch.csv"
                args = ["--strategy", curve["strategy"], "--seed", run["selection_seeds"][cycle - 1]]
                args += ["--labeled", lab, "--exclude", held_out, "--budget", step, "--out", batch, "--quiet"]
                result = invoke("select", pool, *args)
                assert result.exit_code == 0, result.output
                assert read_ids(batch) == picked
                labeled += picked
    random_runs = next(c for c in doc["curves"] if c["strategy"] == "random")["seeds"]
    assert random_runs[0]["selected"] != random_runs[1]["selected"]


def test_uwe_cycle_is_kcg_on_the_probe_uncertainty(digit_pool):
    """A uwe cycle equals the brute-force reference on u^tau·f with u the probe's entropy (Algorithm 1)."""
    pool, labels, X, y = digit_pool
    tau = 0.5
    result = run_simulation([pool], [15, 35], strategies=["uwe"], taus=[tau], seeds=1, labels=labels)
    ids = ids_for(N_UNITS)
    row = {i: k for k, i in enumerate(ids)}
    start = np.array([row[i] for i in result.initial[0]])
    held_out = np.array([row[i] for i in result.held_out])
    probe = fit_probe(X[np.sort(start)], y[np.sort(start)], 10)
    u = uncertainty_of(probe.predict_proba(X), "entropy")
    in_play = np.ones(N_UNITS, dtype=bool)
    in_play[held_out] = False
    weights = minmax(u, in_play) ** tau
    candidates = np.setdiff1d(np.flatnonzero(in_play), start)
    picks, _ = kcg_reference(dense_embeddings(X, weights), candidates, np.sort(start), 20)
    (run,) = result.runs[Curve("uwe", tau)]
    assert run.selected[0] == [ids[i] for i in candidates[picks]]
    labeled = np.sort(np.concatenate([start, candidates[picks]]))
    after = fit_probe(X[labeled], y[labeled], 10)
    assert run.accuracy[1] == float(np.mean(after.predict(X[held_out]) == y[held_out]))


# --------------------------------------------------------------------------------------------------
# Outputs and determinism


def test_outputs_and_byte_identical_results(tmp_path, digit_pool):
    pool, labels, _, _ = digit_pool
    common = ["--labels", labels, "--budgets", "10,20,40", "--tau", "0.5,1", "--seeds", 2, "--json"]
    common += ["--strategies", "uwe,coreset,uncertainty,random,badge,kmeanspp"]
    first = invoke("simulate", pool, *common, "--out", tmp_path / "a")
    second = invoke("simulate", pool, *common, "--out", tmp_path / "b", "--no-plot")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    a, b = tmp_path / "a", tmp_path / "b"
    assert (a / "results.json").read_bytes() == (b / "results.json").read_bytes()
    assert (a / "results.csv").read_bytes() == (b / "results.csv").read_bytes()
    assert (a / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (b / "curves.png").exists()
    doc = json.loads((a / "results.json").read_text())
    names = [c["curve"] for c in doc["curves"]]
    assert names == [
        "uwe tau=0.5", "uwe tau=1", "coreset", "uncertainty", "random", "badge", "kmeanspp tau=0.5", "kmeanspp tau=1"
    ]  # fmt: skip
    for curve in doc["curves"]:
        first_points = {run["accuracy"][0] for run in curve["seeds"]}
        assert len(curve["seeds"]) == 2 and all(len(run["accuracy"]) == 3 for run in curve["seeds"])
        assert [len(s) for s in curve["seeds"][0]["selected"]] == [10, 20]
        assert all(len(set(run["selected"][0] + run["selected"][1])) == 30 for run in curve["seeds"])
        assert not set(doc["held_out"]) & {i for run in curve["seeds"] for s in run["selected"] for i in s}
        assert curve["accuracy"]["mean"][0] == pytest.approx(np.mean(sorted(first_points)))
    # the random start is shared: every curve has the same first accuracy for a seed
    assert len({c["seeds"][0]["accuracy"][0] for c in doc["curves"]}) == 1
    with open(a / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 8 * 2 * 3 and rows[0]["curve"] == "uwe tau=0.5" and rows[0]["tau"] == "0.5"
    summary = json.loads(first.stdout)
    assert summary["recommendation"] == doc["recommendation"]
    assert summary["curves"][0]["curve"] == doc["recommendation"]["curve"]
    assert "recommendation: use " in first.stderr and "AUC" in first.stderr


def test_label_column_and_units_without_labels(tmp_path, digits):
    X, y = digits[0][:300], digits[1][:300]
    classes = pa.array([None if i % 10 == 0 else int(v) for i, v in enumerate(y)], type=pa.int32())
    pool = write_pool(tmp_path / "pool.parquet", X, extra={"digit": classes})
    out = tmp_path / "sim"
    r = invoke(
        "simulate", pool, "--label-column", "digit", "--budgets", "10,30", "--strategies", "coreset",
        "--seeds", 1, "--out", out, "--no-plot",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "30 of 300 pool units have no label" in " ".join(r.stderr.split())
    doc = json.loads((out / "results.json").read_text())
    assert doc["no_label"] == [f"s{i:05d}" for i in range(0, 300, 10)]
    picked = set(doc["initial"][0]["ids"]) | set(doc["curves"][0]["seeds"][0]["selected"][0])
    assert not picked & set(doc["no_label"])
    assert doc["pool"]["classes"] == [str(c) for c in range(10)] and doc["pool"]["held_out"] == 55


# --------------------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing written


def _bad_labels(tmp_path: Path, name: str, rows: list[tuple[str, str]], header=("id", "label")) -> Path:
    path = tmp_path / name
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, digit_pool, rng):
    pool, labels, X, _ = digit_pool
    ids = ids_for(N_UNITS)
    unknown = _bad_labels(tmp_path, "unknown.csv", [(ids[0], "1"), ("nope", "2"), ("nada", "3")])
    one_class = _bad_labels(tmp_path, "one.csv", [(i, "7") for i in ids])
    duplicate = _bad_labels(tmp_path, "dup.csv", [(ids[0], "1"), (ids[1], "2"), (ids[0], "3")])
    no_header = _bad_labels(tmp_path, "hdr.csv", [(ids[0], "1")], header=("image", "class"))
    empty_label = _bad_labels(tmp_path, "empty.csv", [(ids[0], "1"), (ids[1], "")])
    det = tmp_path / "detection.parquet"
    table = pa.table(
        {"id": ["a", "a", "b"], "label": pa.array([0, 1, None], pa.int32()), "bvsb": [0.1, 0.2, 0.0]}
    )
    feats = fixed_list(rng.random((3, 4)).astype(np.float32))
    import pyarrow.parquet as pq

    pq.write_table(table.append_column("feature", feats), det)
    base = ["--budgets", "10,20", "--seeds", 1]
    cases = [
        ((pool, *base), "give the ground truth with --labels"),
        ((pool, *base, "--labels", unknown), "2 IDs are not in the pool (first: 'nope')"),
        ((pool, *base, "--labels", one_class), "every labeled unit has the class '7'"),
        ((pool, "--labels", labels, "--budgets", "10,500"), "--budgets 500 is larger than the 480 units"),
        ((pool, *base, "--labels", duplicate), f"id '{ids[0]}' appears more than once"),
        ((pool, *base, "--labels", no_header), "needs a header with 'id' and 'label'"),
        ((pool, *base, "--labels", empty_label), "empty label for id"),
        ((pool, *base, "--labels", tmp_path / "missing.csv"), "--labels file not found"),
        ((pool, *base, "--label-column", "digit"), "no such column"),
        ((pool, *base, "--labels", labels, "--label-column", "x"), "not both"),
        ((det, *base, "--labels", labels), "is a detection pool"),
        ((pool, "--labels", labels, "--budgets", "20,10"), "must increase"),
        ((pool, "--labels", labels, "--budgets", "20"), "at least two"),
        ((pool, "--labels", labels, "--budgets", "10,x"), "--budgets: cannot read"),
        ((pool, *base, "--labels", labels, "--strategies", "uwe,magic"), "unknown strategy 'magic'"),
        ((pool, *base, "--labels", labels, "--strategies", "uwe,uwe"), "lists a strategy twice"),
        ((pool, *base, "--labels", labels, "--tau", "1,-1"), "--tau must be a finite number >= 0"),
        (
            (pool, *base, "--labels", labels, "--test-fraction", "1"),
            "--test-fraction must be between 0 and 1",
        ),
        (
            (pool, *base, "--labels", labels, "--test-fraction", "0.0001"),
            "leaves no labeled unit for testing",
        ),
        ((pool, *base, "--labels", labels, "--uncertainty", "bald"), "unknown --uncertainty 'bald'"),
        ((pool, *base, "--labels", labels, "--seeds", 0), "--seeds must be at least 1"),
        ((pool, *base, "--labels", labels, "--probe-c", 0), "--probe-c must be a positive number"),
    ]
    for args, needle in cases:
        out = tmp_path / "out"
        result = invoke("simulate", *args, "--out", out)
        assert_one_line_error(result, needle, out)
    file_out = tmp_path / "taken.txt"
    file_out.write_text("x")
    assert_one_line_error(invoke("simulate", pool, *base, "--labels", labels, "--out", file_out), "is a file")
    inside = tmp_path / "pooldir"
    inside.mkdir()
    write_pool(inside / "part.parquet", X)
    assert_one_line_error(
        invoke("simulate", inside, *base, "--labels", labels, "--out", inside / "sim"),
        "inside the input folder",
    )
    assert_one_line_error(invoke("simulate", pool, *base, "--labels", labels, "--out", "-"), "stdout")
    assert not [p for p in tmp_path.rglob(".*")]


def test_without_matplotlib_the_rest_is_written(tmp_path, digit_pool, monkeypatch):
    import uwe_cli.simulate as simulate

    pool, labels, _, _ = digit_pool
    monkeypatch.setattr(simulate, "plot_available", lambda: False)
    out = tmp_path / "sim"
    r = invoke(
        "simulate", pool, "--labels", labels, "--budgets", "10,20", "--strategies", "random", "--out", out
    )
    assert r.exit_code == 0, r.output
    assert "matplotlib is not installed" in r.stderr and "uwe-cli[plot]" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["results.csv", "results.json"]
