"""`uwe select` / `uwe inspect` through the CLI: results, files, determinism and every bad input."""

from __future__ import annotations

import csv
import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import fixed_list, write_pool
from reference import dense_embeddings, kcg_reference, minmax
from typer.testing import CliRunner

from uwe_cli.cli import app
from uwe_cli.select import run_select

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def read_batch(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def pool(tmp_path, rng):
    n, d = 300, 16
    centres = rng.gamma(2.0, 1.0, (5, d))
    F = np.maximum(centres[rng.integers(0, 5, n)] + 0.5 * rng.standard_normal((n, d)), 0).astype(np.float32)
    u = rng.random(n).astype(np.float32)
    probs = rng.dirichlet(np.ones(4), n).astype(np.float32)
    path = write_pool(tmp_path / "pool.parquet", F, u, probs=probs)
    return path, F, u


@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("n_labeled", [0, 40])
def test_select_matches_algorithm_1(tmp_path, pool, tau, n_labeled):
    path, F, u = pool
    labeled_rows = np.arange(0, 3 * n_labeled, 3)
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("".join(f"s{i:05d}\n" for i in labeled_rows))
    out = tmp_path / "batch.csv"
    r = invoke("select", path, "--budget", 25, "--tau", tau, "--labeled", labeled, "--out", out)
    assert r.exit_code == 0, r.output
    rows = read_batch(out)
    cand = np.setdiff1d(np.arange(len(u)), labeled_rows)
    u_norm = minmax(u.astype(np.float64), np.ones(len(u), bool))
    w = np.ones_like(u_norm) if tau == 0 else u_norm**tau
    picks, dists = kcg_reference(dense_embeddings(F, w), cand, labeled_rows, 25)
    assert [r["id"] for r in rows] == [f"s{i:05d}" for i in cand[picks]]
    assert [int(r["rank"]) for r in rows] == list(range(1, 26))
    np.testing.assert_allclose([float(r["distance"]) for r in rows], dists, rtol=1e-12)
    np.testing.assert_allclose([float(r["uncertainty"]) for r in rows], u_norm[cand[picks]], rtol=1e-12)


def test_coreset_and_directory_of_parts(tmp_path, pool):
    path, F, u = pool
    parts = tmp_path / "parts"
    parts.mkdir()
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 100), parts / "part-0.parquet")
    pq.write_table(table.slice(100), parts / "part-1.parquet")
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    assert invoke("select", path, "--budget", 10, "--strategy", "coreset", "--out", a).exit_code == 0
    assert invoke("select", parts, "--budget", 10, "--strategy", "coreset", "--out", b).exit_code == 0
    assert a.read_bytes() == b.read_bytes()
    picks, _ = kcg_reference(dense_embeddings(F, None), np.arange(len(u)), np.empty(0, int), 10)
    assert [r["id"] for r in read_batch(a)] == [f"s{i:05d}" for i in picks]


def test_same_command_twice_is_byte_identical(tmp_path, pool):
    path, _, _ = pool
    for strategy in ("uwe", "kmeanspp", "random", "badge", "uncertainty"):
        outs = []
        for k in range(2):
            out = tmp_path / f"{strategy}{k}.csv"
            r = invoke("select", path, "--budget", 12, "--strategy", strategy, "--seed", 4, "--out", out)
            assert r.exit_code == 0, r.output
            outs.append(out.read_bytes())
        assert outs[0] == outs[1]


def test_uncertainty_strategy_is_top_k(tmp_path, pool):
    path, _, u = pool
    out = tmp_path / "b.csv"
    assert invoke("select", path, "--budget", 7, "--strategy", "uncertainty", "--out", out).exit_code == 0
    expected = np.argsort(-u.astype(np.float64), kind="stable")[:7]
    assert [r["id"] for r in read_batch(out)] == [f"s{i:05d}" for i in expected]
    assert all(r["distance"] == "" for r in read_batch(out))


def test_random_depends_on_seed(tmp_path, pool):
    path, _, _ = pool
    ids = []
    for seed in (1, 2):
        out = tmp_path / f"r{seed}.csv"
        assert (
            invoke(
                "select", path, "--budget", 20, "--strategy", "random", "--seed", seed, "--out", out
            ).exit_code
            == 0
        )
        ids.append([r["id"] for r in read_batch(out)])
    assert ids[0] != ids[1]
    assert len(set(ids[0])) == 20


def test_stdout_and_json(tmp_path, pool):
    path, _, _ = pool
    r = invoke("select", path, "--budget", 3, "--out", "-", "--quiet")
    assert r.exit_code == 0
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "rank,id,uncertainty,distance" and len(lines) == 4
    out = tmp_path / "b.csv"
    r = invoke("select", path, "--budget", 3, "--out", out, "--json", "--quiet")
    summary = json.loads(r.stdout)
    assert summary["strategy"] == "uwe" and summary["budget"] == 3 and summary["pool_size"] == 300
    assert summary["labeled"] == 0 and summary["seconds"] >= 0


def test_the_process_ends_with_everything_delivered(tmp_path, pool):
    """`uwe` ends without the interpreter's teardown (`cli.main`): stdout, stderr, files and the exit
    code must all be complete, through a pipe that is closed early too."""
    path, _, _ = pool
    cmd = [sys.executable, "-m", "uwe_cli.cli", "select", str(path), "--budget", "120", "--quiet"]
    proc = subprocess.run([*cmd, "--out", "-"], capture_output=True, text=True, timeout=120)
    rows = list(csv.DictReader(io.StringIO(proc.stdout)))
    assert proc.returncode == 0 and len(rows) == 120 and rows[-1]["rank"] == "120", proc.stderr
    out = tmp_path / "b.csv"
    proc = subprocess.run([*cmd, "--out", str(out), "--json"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["budget"] == 120
    assert len(read_batch(out)) == 120
    proc = subprocess.run(
        [*cmd, "--out", str(out), "--tau", "-1"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stderr.startswith("error:") and len(read_batch(out)) == 120
    head = subprocess.run(
        f"{shlex.join([*cmd, '--out', '-'])} | head -2", shell=True, capture_output=True, text=True
    )
    assert (
        head.stdout.splitlines()[0] == "rank,id,uncertainty,distance" and len(head.stdout.splitlines()) == 2
    )
    # A reader that closes the pipe unread: a quiet exit 141 (as under SIGPIPE), not an error line.
    inspect = [sys.executable, "-m", "uwe_cli.cli", "inspect", str(path)]
    for args in (
        [*cmd, "--out", "-"],
        [*cmd, "--out", "/dev/stdout"],
        [*cmd, "--out", str(out), "--json"],
        inspect,
        [*inspect, "--json"],
    ):
        closed = subprocess.run(
            f"{shlex.join(args)} | true; exit ${{PIPESTATUS[0]}}",
            shell=True,
            executable="/bin/bash",
            capture_output=True,
            text=True,
        )
        assert closed.returncode == 141 and closed.stderr == "", (args, closed.stderr)
    # stdout named by path is stdout too: the JSON line would land in the batch
    proc = subprocess.run(
        [*cmd, "--out", "/dev/stdout", "--json"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: --json and --out /dev/stdout both write to stdout"), proc.stderr


def test_labeled_previous_batch_and_exclude(tmp_path, pool):
    path, _, _ = pool
    first = tmp_path / "first.csv"
    assert invoke("select", path, "--budget", 10, "--out", first).exit_code == 0
    excl = tmp_path / "exclude.txt"
    excl.write_text("s00001\ns00002\nnot-in-pool\n")
    second = tmp_path / "second.csv"
    r = invoke("select", path, "--budget", 10, "--labeled", first, "--exclude", excl, "--out", second)
    assert r.exit_code == 0, r.output
    got = {row["id"] for row in read_batch(second)}
    assert not got & {row["id"] for row in read_batch(first)}
    assert not got & {"s00001", "s00002"}
    assert "1 excluded IDs are not in the pool" in r.stderr


def test_missing_labeled_ids_warned_with_count(tmp_path, pool):
    path, _, _ = pool
    lab = tmp_path / "lab.csv"
    lab.write_text("id,note\ns00000,a\nghost1,b\nghost2,c\n")
    r = invoke("select", path, "--budget", 2, "--labeled", lab, "--out", tmp_path / "b.csv")
    assert r.exit_code == 0
    assert "2 labeled IDs are not in the pool" in r.stderr


def test_region_and_source_columns_pass_through(tmp_path, rng):
    n = 20
    extra = {
        "source": pa.array([f"/data/{i // 4}.png" for i in range(n)]),
        "image_id": pa.array([f"{i // 4}.png" for i in range(n)]),
        "x": pa.array([(i % 2) * 64 for i in range(n)], pa.int32()),
        "y": pa.array([(i % 4 // 2) * 64 for i in range(n)], pa.int32()),
        "width": pa.array([64] * n, pa.int32()),
        "height": pa.array([64] * n, pa.int32()),
    }
    path = write_pool(tmp_path / "r.parquet", rng.random((n, 4)), rng.random(n), extra=extra)
    out = tmp_path / "b.csv"
    assert invoke("select", path, "--budget", 3, "--out", out).exit_code == 0
    rows = read_batch(out)
    assert list(rows[0]) == [
        "rank",
        "id",
        "uncertainty",
        "distance",
        "source",
        "image_id",
        "x",
        "y",
        "width",
        "height",
    ]
    i = int(rows[0]["id"][1:])
    assert rows[0]["image_id"] == f"{i // 4}.png" and rows[0]["x"] == str((i % 2) * 64)


def test_list_features_float16_and_other_uncertainty_column(tmp_path, rng):
    n, d = 50, 6
    F = rng.random((n, d)).astype(np.float16)
    table = pa.table(
        {
            "id": pa.array([f"a{i}" for i in range(n)]),
            "feature": pa.array([list(r) for r in F], type=pa.list_(pa.float16())),
            "my_score": pa.array(rng.random(n)),
        }
    )
    path = tmp_path / "p.parquet"
    pq.write_table(table, path)
    out = tmp_path / "b.csv"
    r = invoke("select", path, "--budget", 5, "--uncertainty", "my_score", "--out", out)
    assert r.exit_code == 0, r.output
    u = table.column("my_score").to_numpy()
    w = minmax(u, np.ones(n, bool))
    picks, _ = kcg_reference(dense_embeddings(F.astype(np.float32), w), np.arange(n), np.empty(0, int), 5)
    assert [row["id"] for row in read_batch(out)] == [f"a{i}" for i in picks]


def test_library_call_equals_cli(tmp_path, pool):
    path, _, _ = pool
    res = run_select([path], 8, tau=0.5)
    out = tmp_path / "b.csv"
    assert invoke("select", path, "--budget", 8, "--tau", 0.5, "--out", out).exit_code == 0
    assert res.batch.ids == [r["id"] for r in read_batch(out)]


def _bad_pools(tmp_path: Path, rng) -> dict[str, tuple[list[str], str]]:
    """name → (extra CLI args incl. pool path, expected fragment of the one-line error)."""
    F = rng.random((10, 3)).astype(np.float32)
    u = rng.random(10)
    cases: dict[str, tuple[list[str], str]] = {}

    def pool(name, **kw):
        return str(write_pool(tmp_path / f"{name}.parquet", kw.pop("F", F), kw.pop("u", u), **kw))

    cases["missing file"] = ([str(tmp_path / "nope.parquet")], "pool not found")
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet at all")
    cases["not parquet"] = ([str(junk)], "not a Parquet file")
    no_id = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"feature": fixed_list(F), "entropy": pa.array(u)}), no_id)
    cases["no id"] = ([str(no_id)], "no 'id' column")
    no_feat = tmp_path / "nofeat.parquet"
    pq.write_table(pa.table({"id": pa.array([str(i) for i in range(10)]), "entropy": pa.array(u)}), no_feat)
    cases["no feature"] = ([str(no_feat)], "no 'feature' column")
    cases["uncertainty absent"] = (
        [pool("unc"), "--uncertainty", "bvsb"],
        "uncertainty column 'bvsb' not found",
    )
    mixed = tmp_path / "mixed.parquet"
    pq.write_table(
        pa.table(
            {
                "id": pa.array(["a", "b"]),
                "feature": pa.array([[1.0, 2.0], [1.0]], pa.list_(pa.float32())),
                "entropy": pa.array([0.1, 0.2]),
            }
        ),
        mixed,
    )
    cases["mixed lengths"] = ([str(mixed)], "feature lengths differ")
    F_nan = F.copy()
    F_nan[4, 1] = np.nan
    cases["nan feature"] = ([pool("nanf", F=F_nan)], "NaN or Inf in 'feature' of id 's00004'")
    u_inf = u.copy()
    u_inf[2] = np.inf
    cases["inf uncertainty"] = ([pool("infu", u=u_inf)], "NaN or Inf in 'entropy' of id 's00002'")
    u_neg = u.copy()
    u_neg[3] = -0.5
    cases["negative uncertainty"] = ([pool("negu", u=u_neg)], "negative 'entropy'")
    cases["duplicate ids"] = (
        [pool("dup", ids=[f"x{i % 9}" for i in range(10)])],
        "duplicate id in pool: 'x0'",
    )
    # IDs are read and checked before anything else: the duplicate wins over an earlier NaN feature
    cases["ids checked first"] = (
        [pool("dupnan", F=F_nan, ids=[f"x{i % 9}" for i in range(10)])],
        "duplicate id in pool: 'x0'",
    )
    other = pool("other", ids=[f"y{i}" for i in range(9)] + ["s00004"])
    cases["duplicate id across files"] = (
        [pool("ok0"), other],
        f"duplicate id in pool: 's00004' at {tmp_path / 'ok0.parquet'} row 4 and {other} row 9",
    )
    cases["a file twice"] = (
        [other, str(tmp_path / "." / "other.parquet")],
        "the same pool file is given twice",
    )
    empty = tmp_path / "empty.parquet"
    write_pool(empty, np.zeros((0, 3), np.float32), np.zeros(0))
    cases["empty pool"] = ([str(empty)], "pool is empty")
    ok = pool("ok")
    cases["budget too large"] = ([ok, "--budget", "11"], "larger than the 10 candidates")
    cases["budget zero"] = ([ok, "--budget", "0"], "--budget must be at least 1")
    cases["badge without probs"] = ([ok, "--strategy", "badge"], "no 'probs' column")
    cases["unknown strategy"] = ([ok, "--strategy", "magic"], "unknown strategy 'magic'")
    cases["negative tau"] = ([ok, "--tau", "-1"], "--tau must be")
    cases["labeled file missing"] = (
        [ok, "--labeled", str(tmp_path / "none.txt")],
        "--labeled file not found",
    )
    cases["memory limit"] = ([ok, "--max-memory", "10"], "pool needs about")
    cases["workers without ray"] = ([ok, "--workers", "3"], "--workers applies with --ray only")
    cases["address without ray"] = ([ok, "--ray-address", "h:1"], "--ray-address applies with --ray only")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("name,score\na,1\n")
    cases["labeled csv without id"] = ([ok, "--labeled", str(bad_csv)], "needs an 'id' column")
    return cases


def test_bad_inputs_exit_2_with_one_line_and_no_output(tmp_path, rng):
    for name, (args, fragment) in _bad_pools(tmp_path, rng).items():
        out = tmp_path / f"out-{name.replace(' ', '_')}.csv"
        if "--budget" not in args:
            args = [*args, "--budget", "3"]
        r = invoke("select", *args, "--out", out)
        assert r.exit_code == 2, (name, r.output)
        lines = [line for line in r.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, r.stderr)
        assert fragment in " ".join(r.stderr.split()), (name, r.stderr)
        assert not out.exists(), name
        assert not list(tmp_path.glob(f".out-{name.replace(' ', '_')}*")), name


def test_json_with_stdout_batch_is_refused(pool):
    path, _, _ = pool
    r = invoke("select", path, "--budget", 2, "--out", "-", "--json")
    assert r.exit_code == 2 and "both write to stdout" in r.stderr


def test_inspect(pool):
    path, _, u = pool
    r = invoke("inspect", path, "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    assert info["rows"] == 300 and info["feature_dim"] == 16 and info["task"] == "classification"
    assert info["uncertainty"]["entropy"]["max"] == pytest.approx(float(u.max()))
    assert info["uncertainty"]["entropy"]["mean"] == pytest.approx(
        float(u.astype(np.float64).mean()), rel=1e-6
    )
    r = invoke("inspect", path)
    assert r.exit_code == 0 and "entropy" in r.stdout
    assert invoke("inspect", Path("/nonexistent.parquet")).exit_code == 2


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_detection_pool_select_equals_dense_reference(tmp_path, rng, aggregate):
    """Class-wise UWE (Eq. 9 / A.2) built densely by hand here; `uwe select` must give the same order."""
    n_img, K, d = 40, 3, 4
    ids, labels, feats, unc = [], [], [], []
    for i in range(n_img):
        for _ in range(int(rng.integers(0, 4))):
            ids.append(f"im{i:03d}")
            labels.append(int(rng.integers(0, K)))
            feats.append(rng.random(d))
            unc.append(float(rng.random()))
        if not ids or ids[-1] != f"im{i:03d}":
            ids.append(f"im{i:03d}")
            labels.append(None)
            feats.append(None)
            unc.append(None)
    table = pa.table(
        {
            "id": pa.array(ids),
            "label": pa.array(labels, pa.int32()),
            "score": pa.array([0.5] * len(ids), pa.float32()),
            "box": pa.array([[0.0, 0.0, 1.0, 1.0]] * len(ids), pa.list_(pa.float32(), 4)),
            "bvsb": pa.array(unc, pa.float32()),
            "feature": pa.array([None if f is None else list(f) for f in feats], pa.list_(pa.float32(), d)),
        }
    )
    path = tmp_path / "det.parquet"
    pq.write_table(
        table.replace_schema_metadata({b"uwe": json.dumps({"task": "detection", "num_classes": K})}), path
    )
    labeled = tmp_path / "lab.txt"
    labeled.write_text("im000\nim005\n")
    out = tmp_path / "b.csv"
    r = invoke("select", path, "--budget", 8, "--aggregate", aggregate, "--labeled", labeled, "--out", out)
    assert r.exit_code == 0, r.output

    u_raw = np.array([np.nan if v is None else np.float32(v) for v in unc], dtype=np.float64)
    u = (u_raw - np.nanmin(u_raw)) / (np.nanmax(u_raw) - np.nanmin(u_raw))
    E = np.zeros((n_img, K * d))
    for k in range(K):
        for i in range(n_img):
            rows = [j for j in range(len(ids)) if ids[j] == f"im{i:03d}" and labels[j] == k]
            if not rows:
                continue
            embs = [u[j] * np.asarray(feats[j], dtype=np.float32).astype(np.float64) for j in rows]
            if aggregate == "max":
                best = max(rows, key=lambda j: (u[j], -j))
                E[i, k * d : (k + 1) * d] = u[best] * np.asarray(feats[best], np.float32).astype(np.float64)
            else:
                E[i, k * d : (k + 1) * d] = np.mean(embs, axis=0)
    lab = np.array([0, 5])
    cand = np.setdiff1d(np.arange(n_img), lab)
    picks, dists = kcg_reference(E, cand, lab, 8)
    got = read_batch(out)
    assert [row["id"] for row in got] == [f"im{i:03d}" for i in cand[picks]]
    np.testing.assert_allclose([float(row["distance"]) for row in got], dists, rtol=1e-9)


def test_named_uncertainty_is_reported_by_strategies_that_do_not_use_it(tmp_path, pool):
    path, _, u = pool
    out = tmp_path / "b.csv"
    r = invoke(
        "select", path, "--budget", 4, "--strategy", "coreset", "--uncertainty", "entropy", "--out", out
    )
    assert r.exit_code == 0, r.output
    u_norm = minmax(u.astype(np.float64), np.ones(len(u), bool))
    rows = read_batch(out)
    np.testing.assert_allclose(
        [float(x["uncertainty"]) for x in rows], [u_norm[int(x["id"][1:])] for x in rows]
    )
    r = invoke("select", path, "--budget", 4, "--strategy", "coreset", "--uncertainty", "nope", "--out", out)
    assert r.exit_code == 2 and "uncertainty column 'nope' not found" in r.stderr


def test_a_larger_budget_only_adds_picks_at_the_end(tmp_path):
    """Grid features under weights √⅓ and √⅔: many distances tie in exact arithmetic and are rounded
    apart differently by the numpy engine (small budgets) and the compiled one (large budgets)."""
    from uwe_cli.selection.small import is_small

    rng = np.random.default_rng(13)
    n, d = 800, 300
    F = rng.integers(0, 3, (n, d)).astype(np.float32)
    F[400:500] = F[:100]
    path = write_pool(tmp_path / "tie.parquet", F, rng.integers(0, 4, n) / 3)
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("".join(f"s{i:05d}\n" for i in range(0, n, 7)))
    L = len(range(0, n, 7))
    assert is_small(n, d, L + 480) and not is_small(n, d, L + 600)
    batches = {}
    for budget in (480, 600):
        out = tmp_path / f"b{budget}.csv"
        r = invoke("select", path, "--budget", budget, "--tau", 0.5, "--labeled", labeled, "--out", out, "-q")
        assert r.exit_code == 0, r.output
        batches[budget] = [row["id"] for row in read_batch(out)]
    assert batches[600][:480] == batches[480]
    cand = np.setdiff1d(np.arange(n), np.arange(0, n, 7))
    u = pq.read_table(path).column("entropy").to_numpy().astype(np.float64)
    w = minmax(u, np.ones(n, bool)) ** 0.5
    picks, _ = kcg_reference(dense_embeddings(F, w), cand, np.arange(0, n, 7), 600)
    assert batches[600] == [f"s{i:05d}" for i in cand[picks]]
