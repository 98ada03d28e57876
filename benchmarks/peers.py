"""`uwe select` against the fastest K-Center-Greedy implementations we know, on the same matrix.

    make bench-peers                                   # every case (about 2 hours on 2 cores)
    .venv/bin/python benchmarks/peers.py --cases blobs-20k relu-200k
    .venv/bin/python benchmarks/peers.py --cases 1M --peers none

For each case the pool is generated once (bench-out/peers/: a Parquet pool for `uwe select`, the same
matrix as .npy for the peers) and its exact order is computed once by a float64 brute force (numpy,
direct differences, ties to the lower row) and cached. Then, each in its own process:

- `uwe select` as a user runs it, the whole command in a fresh interpreter (start-up, Parquet reading,
  labeled set, selection, batch file): wall seconds and peak RSS (VmHWM), after one untimed run with a
  budget of 2 that brings the files into the page cache;
- each peer (`peer_runner.py`, run with the benchmark environment's python, .venv-bench): its own
  k-center / farthest-point function called on the matrix already in memory, only the call timed.

Picks are compared with the float64 order: "exact prefix" is how many leading picks equal it.
Reported ratios are peer seconds / uwe seconds, measured in the same run.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = ROOT / "bench-out" / "peers"
BENCH_PY = Path(os.environ.get("UWE_BENCH_PYTHON", ROOT / ".venv-bench" / "bin" / "python"))
ALL_PEERS = ("torch-fps", "bmdal-reg", "torch-quickfps", "fpsample", "scikit-activeml")
FAST_PEERS = ("torch-fps", "bmdal-reg")


@dataclass
class Case:
    kind: str  # blobs | relu | synthetic | fashion
    rows: int
    dim: int
    budget: int
    labeled: int = 0
    peers: tuple[str, ...] = ALL_PEERS
    strategy: str = "coreset"
    check: int | None = None  # picks compared with the float64 order (None: all)
    note: str = ""
    uwe_args: tuple[str, ...] = ()  # more `uwe select` options


CASES: dict[str, Case] = {
    "blobs-200k": Case(
        "blobs", 200_000, 512, 2_000, note="well-separated Gaussian blobs (64, varied spread)"
    ),
    "blobs-20k": Case("blobs", 20_000, 512, 2_000, note="same kind of blobs, budget = 10% of the pool"),
    "relu-200k": Case(
        "relu", 200_000, 512, 2_000, peers=FAST_PEERS, note="ReLU'd isotropic noise (64 centres)"
    ),
    "labeled-200k": Case(
        "synthetic",
        200_000,
        512,
        2_000,
        labeled=2_000,
        peers=("torch-fullpass",),
        strategy="uwe",
        note="clustered pool with entropy, 2,000 labeled, uwe strategy (u·f)",
    ),
    "fashion-500": Case(
        "fashion", 70_000, 512, 500, peers=FAST_PEERS, strategy="uwe", note="real features, budget 500"
    ),
    "fashion-2000": Case(
        "fashion", 70_000, 512, 2_000, peers=FAST_PEERS, strategy="uwe", note="real features, budget 2,000"
    ),
    "1M": Case("synthetic", 1_000_000, 512, 10_000, peers=(), strategy="uwe", check=200, note="uwe only"),
    "1M-lean": Case(
        "synthetic",
        1_000_000,
        512,
        10_000,
        peers=(),
        strategy="uwe",
        check=200,
        uwe_args=("--max-memory", "3G"),
        note="uwe only, memory capped: no int8 copy",
    ),
    "10M": Case("synthetic", 10_000_000, 128, 1_000, peers=(), strategy="uwe", check=100, note="uwe only"),
}


# ---------------------------------------------------------------------------------------------- pools


def gen_blobs(n: int, d: int, k: int = 64, seed: int = 0) -> np.ndarray:
    """Well-separated Gaussian blobs: k centres N(0, 4²), per-cluster sigma log-uniform in [0.25, 1.5]."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 4.0, size=(k, d))
    sigmas = np.exp(rng.uniform(np.log(0.25), np.log(1.5), size=k))
    labels = rng.integers(0, k, size=n)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 16384):
        lab = labels[a : a + 16384]
        out[a : a + 16384] = centres[lab] + sigmas[lab, None] * rng.standard_normal((lab.size, d))
    return out


def gen_relu(n: int, d: int, k: int = 64, seed: int = 0) -> np.ndarray:
    """ReLU'd isotropic noise as large as the centres' spread: distances concentrate, pruning has no grip."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, size=(k, d))
    labels = rng.integers(0, k, size=n)
    out = np.empty((n, d), dtype=np.float32)
    for a in range(0, n, 16384):
        lab = labels[a : a + 16384]
        out[a : a + 16384] = np.maximum(centres[lab] + rng.standard_normal((lab.size, d)), 0.0)
    return out


def write_matrix_pool(path: Path, X: np.ndarray) -> None:
    """A unit pool with only id and feature (CoreSet needs no uncertainty)."""
    tmp = path.with_suffix(".tmp")
    writer = None
    for s in range(0, X.shape[0], 65_536):
        blk = np.ascontiguousarray(X[s : s + 65_536])
        table = pa.table(
            {
                "id": pa.array([f"r{i:08d}" for i in range(s, s + blk.shape[0])]),
                "feature": pa.FixedSizeListArray.from_arrays(pa.array(blk.reshape(-1)), X.shape[1]),
            }
        )
        writer = writer or pq.ParquetWriter(tmp, table.schema)
        writer.write_table(table)
    assert writer is not None
    writer.close()
    tmp.rename(path)


def pool_paths(name: str, case: Case) -> tuple[Path, Path]:
    """(Parquet pool for uwe, .npy matrix for the peers), created if missing."""
    if case.kind in ("blobs", "relu"):
        stem = OUT / f"{case.kind}-{case.rows}x{case.dim}"
        pool, npy = stem.with_suffix(".parquet"), stem.with_suffix(".npy")
        if not npy.exists():
            X = (gen_blobs if case.kind == "blobs" else gen_relu)(case.rows, case.dim)
            np.save(npy, X)
        if not pool.exists():
            write_matrix_pool(pool, np.load(npy, mmap_mode="r"))
        return pool, npy
    if case.kind == "synthetic":
        from synthetic import write_unit_pool

        pool = OUT / f"synthetic-{case.rows}x{case.dim}.parquet"
        if not pool.exists():
            t = time.perf_counter()
            write_unit_pool(pool, case.rows, case.dim, clusters=50, with_probs=False)
            print(f"  generated {pool.name} in {time.perf_counter() - t:.0f} s", flush=True)
        return pool, pool.with_suffix(".uwe.npy")
    if case.kind == "fashion":
        pool = OUT / "fashion-pool.parquet"
        if not pool.exists():
            subprocess.run([sys.executable, str(HERE / "real_pool.py"), "--out", str(pool)], check=True)
        return pool, pool.with_suffix(".uwe.npy")
    raise SystemExit(f"unknown pool kind {case.kind}")


# ------------------------------------------------------------------------------ matrix and reference


def embedding(pool: Path, strategy: str) -> tuple[np.ndarray, np.ndarray | None, pa.Array]:
    """(float32 features, float64 weights or None, ids) exactly as `uwe select` builds them."""
    from uwe_cli.embedding import normalize_uncertainty, uwe_weights
    from uwe_cli.pool import read_pool

    p = read_pool([pool], need_uncertainty=strategy == "uwe")
    w = None
    if strategy == "uwe":
        w = uwe_weights(normalize_uncertainty(p.uncertainty, np.ones(p.size, dtype=bool), "minmax"), 1.0)
    return p.features, w, p.ids


def reference_order(F: np.ndarray, w: np.ndarray | None, labeled: np.ndarray, picks: int) -> np.ndarray:
    """Exact K-Center-Greedy in float64 (direct differences, ties to the lower row), chunked over rows."""
    n = F.shape[0]
    chunk = max(1024, (1 << 22) // F.shape[1])
    bounds = [(a, min(a + chunk, n)) for a in range(0, n, chunk)]
    D = np.full(n, np.inf)

    def emb(a: int, b: int) -> np.ndarray:
        x = F[a:b].astype(np.float64)
        return x if w is None else x * w[a:b, None]

    def lower(c: np.ndarray) -> None:
        def part(ab: tuple[int, int]) -> None:
            diff = emb(*ab) - c
            np.minimum(D[ab[0] : ab[1]], np.einsum("ij,ij->i", diff, diff), out=D[ab[0] : ab[1]])

        with ThreadPoolExecutor(2) as ex:
            list(ex.map(part, bounds))

    for r in labeled:
        lower(emb(int(r), int(r) + 1)[0])
    order = np.empty(picks, dtype=np.int64)
    if labeled.size:
        D[labeled] = -1.0
        t = int(np.argmax(D))
    else:
        norms = np.concatenate([np.einsum("ij,ij->i", emb(a, b), emb(a, b)) for a, b in bounds])
        t = int(np.argmax(norms))
    for i in range(picks):
        order[i] = t
        if i + 1 == picks:
            break
        lower(emb(t, t + 1)[0])
        D[t] = -1.0
        t = int(np.argmax(D))
    return order


def labeled_rows(case: Case) -> np.ndarray:
    if not case.labeled:
        return np.empty(0, dtype=np.int64)
    return np.arange(0, case.rows, case.rows // case.labeled)[: case.labeled].astype(np.int64)


def prepare_case(name: str, case: Case) -> dict:
    """Pool, peer matrix, labeled file, ids and the cached float64 order for one case."""
    OUT.mkdir(parents=True, exist_ok=True)
    pool, npy = pool_paths(name, case)
    lab = labeled_rows(case)
    checked = case.budget if case.check is None else min(case.check, case.budget)
    ref_path = OUT / f"{name}.ref{checked}.npy"
    ids_path = OUT / f"{pool.stem}.ids.parquet"
    need_matrix = (case.peers and not npy.exists()) or not ref_path.exists() or not ids_path.exists()
    if need_matrix:
        F, w, ids = embedding(pool, case.strategy)
        pq.write_table(pa.table({"id": ids}), ids_path)
        del ids
        if case.peers and not npy.exists():
            np.save(npy, (F if w is None else F * w[:, None]).astype(np.float32))
        if not ref_path.exists():
            t = time.perf_counter()
            np.save(ref_path, reference_order(F, w, lab, checked))
            print(f"  float64 reference, {checked} picks: {time.perf_counter() - t:.0f} s", flush=True)
        del F, w
    labeled_file = None
    if lab.size:
        ids = pq.read_table(ids_path).column("id").combine_chunks()
        labeled_file = OUT / f"{name}.labeled.txt"
        labeled_file.write_text("".join(i + "\n" for i in ids.take(pa.array(lab)).to_pylist()))
        np.save(OUT / f"{name}.labeled.npy", lab)
    return {
        "pool": pool,
        "npy": npy,
        "ref": np.load(ref_path),
        "ids": ids_path,
        "labeled_file": labeled_file,
        "labeled_npy": OUT / f"{name}.labeled.npy" if lab.size else None,
    }


# -------------------------------------------------------------------------------------------- runs


UWE_CHILD = """
import atexit, json, sys
def _peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return -1.0
_out = sys.argv[1]
atexit.register(lambda: open(_out, "w").write(json.dumps({"peak_rss_mb": _peak()})))
sys.argv = ["uwe", *sys.argv[2:]]
from uwe_cli.cli import main
sys.exit(main())
"""


def leading_equal(a: np.ndarray, b: np.ndarray) -> int:
    m = min(a.size, b.size)
    diff = np.flatnonzero(a[:m] != b[:m])
    return int(diff[0]) if diff.size else m


def run_uwe(name: str, case: Case, prep: dict) -> dict:
    out = OUT / f"{name}.batch.csv"
    rss = OUT / f"{name}.rss.json"

    def command(budget: int, dest: Path) -> list[str]:
        args = [str(prep["pool"]), "--budget", str(budget), "--strategy", case.strategy, "--out", str(dest)]
        args += ["--quiet", "--json", *case.uwe_args]
        if prep["labeled_file"] is not None:
            args += ["--labeled", str(prep["labeled_file"])]
        return [sys.executable, "-c", UWE_CHILD, str(rss), "select", *args]

    # One untimed run with a budget of 2 first: the same code paths, so the interpreter, the compiled
    # kernels and the pool file are in the page cache, as the peers' imports and matrix are (their
    # loading is not timed at all). Without it the first case after a cold cache pays ~1 s of disk reads.
    warm = OUT / f"{name}.warmup.csv"
    proc = subprocess.run(command(2, warm), capture_output=True, text=True)
    if proc.returncode:
        return {"impl": "uwe select", "status": f"warm-up failed: {proc.stderr.strip()[-200:]}"}
    warm.unlink(missing_ok=True)
    out.unlink(missing_ok=True)
    rss.unlink(missing_ok=True)  # the timed run writes its own peak
    t = time.perf_counter()
    proc = subprocess.run(command(case.budget, out), capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode:
        return {"impl": "uwe select", "status": f"failed: {proc.stderr.strip()[-200:]}"}
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    with open(out, newline="") as fh:
        got = pa.array([r["id"] for r in csv.DictReader(fh)])
    ids = pq.read_table(prep["ids"]).column("id").combine_chunks()
    picks = pc.index_in(got, value_set=ids).to_numpy(zero_copy_only=False).astype(np.int64)
    return {
        "impl": "uwe select (whole command)",
        "status": "ok",
        "seconds": seconds,
        "peak_rss_mb": json.loads(rss.read_text())["peak_rss_mb"],
        "exact": leading_equal(picks, prep["ref"]),
        "skipped": summary.get("skipped_distance_fraction"),
    }


def run_peer(peer: str, name: str, case: Case, prep: dict, timeout: float) -> dict:
    out = OUT / f"{name}.{peer}.npy"
    start = int(prep["ref"][0]) if prep["labeled_npy"] is None else -1
    cmd = [str(BENCH_PY), str(HERE / "peer_runner.py"), peer, str(prep["npy"]), str(case.budget), str(start)]
    cmd += [str(out)]
    if prep["labeled_npy"] is not None:
        cmd.append(str(prep["labeled_npy"]))
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(BENCH_PY.parent.parent / "torch_extensions")}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"impl": peer, "status": f"timeout > {timeout:.0f} s"}
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"impl": peer, "status": f"failed: {tail[:160]}"}
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"impl": peer, "status": "ok", **res, "exact": leading_equal(np.load(out), prep["ref"])}


def fmt_row(r: dict, uwe_s: float | None, checked: int) -> str:
    if r["status"] != "ok":
        return f"| {r['impl']} | – | – | – | – | {r['status']} |"
    ratio = "" if uwe_s is None or r["impl"].startswith("uwe") else f"{r['seconds'] / uwe_s:.1f}×"
    exact = f"{r['exact']:,} / {checked:,}"
    return f"| {r['impl']} | {r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {exact} | {ratio} | ok |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--peers", nargs="*", default=None, help="only these peers ('none' for uwe only)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per peer run")
    ap.add_argument("--json", type=Path, help="append every row as JSON lines here")
    a = ap.parse_args()
    print(f"machine: {os.cpu_count()} cores; load {os.getloadavg()[0]:.1f}", flush=True)
    for name in a.cases:
        case = CASES[name]
        print(
            f"\n### {name}: {case.rows:,} × {case.dim}, budget {case.budget:,}, labeled {case.labeled:,}",
            flush=True,
        )
        print(f"{case.note}", flush=True)
        prep = prepare_case(name, case)
        checked = prep["ref"].size
        peers = case.peers if a.peers is None else tuple(p for p in case.peers if p in a.peers)
        load0 = os.getloadavg()[0]
        rows = [run_uwe(name, case, prep)]
        for peer in peers:
            rows.append(run_peer(peer, name, case, prep, a.timeout))
            print(
                f"  {peer}: {rows[-1]['status']} {rows[-1].get('seconds', 0):.1f} s",
                file=sys.stderr,
                flush=True,
            )
        uwe_s = rows[0].get("seconds") if rows[0]["status"] == "ok" else None
        print(f"load average at start / end: {load0:.1f} / {os.getloadavg()[0]:.1f}")
        print("| implementation | seconds | peak RSS MB | picks = float64 order | peer s / uwe s | status |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            print(fmt_row(r, uwe_s, checked), flush=True)
        if rows[0]["status"] == "ok" and rows[0].get("skipped") is not None:
            print(f"distance work skipped by uwe: {rows[0]['skipped']:.1%}")
        if a.json:
            with open(a.json, "a") as fh:
                for r in rows:
                    fh.write(json.dumps({"case": name, "load": load0, **r}) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    main()
