"""One peer K-Center-Greedy call in its own process (run by `peers.py` with the benchmark environment).

    python peer_runner.py PEER MATRIX.npy BUDGET START OUT.npy [LABELED.npy]

Loads the float32 matrix, imports the peer (and builds any JIT extension) outside the timing, then times
only the peer's own call and prints one JSON line: seconds, CPU seconds, VmHWM of this process. Every
peer starts from row START (the largest-norm row) or, given LABELED.npy, from that labeled set; each
returns BUDGET picks (a peer that needs a labeled set gets START as its one labeled row and is asked for
BUDGET - 1 picks, START first). This file imports nothing from uwe: the benchmark environment does not
have it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

Select = Callable[[np.ndarray, int, int, np.ndarray | None], np.ndarray]


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return -1


def prepare(peer: str) -> Select:
    """Import the peer (warming any JIT build) and return select(x, budget, start, labeled) -> picks."""
    if peer == "torch-fps":
        import torch
        import torch_fps
        from torch_fps import _cpu

        _cpu.get_module()  # C++ built on first use (cached in TORCH_EXTENSIONS_DIR), not timed

        def run_torch_fps(x, budget, start, labeled):
            pts = torch.from_numpy(x).unsqueeze(0)
            mask = torch.ones(1, x.shape[0], dtype=torch.bool)
            idx = torch_fps.farthest_point_sampling(pts, mask, budget, start_idx=torch.tensor([start]))
            return idx[0].numpy()

        return run_torch_fps

    if peer == "torch-quickfps":
        import torch
        import torch_quickfps

        def run_quickfps(x, budget, start, labeled):
            return torch_quickfps.sample_idx(torch.from_numpy(x), budget, start_idx=start).numpy()

        return run_quickfps

    if peer == "fpsample":
        import fpsample

        def run_fpsample(x, budget, start, labeled):
            return fpsample.fps_sampling(x, budget, start_idx=start)

        return run_fpsample

    if peer == "bmdal-reg":
        if not hasattr(np, "Inf"):  # bmdal-reg 3.0.2 still uses np.Inf, removed in numpy 2.0
            np.Inf = np.inf  # type: ignore[attr-defined]
        import torch
        from bmdal_reg.bmdal.algorithms import select_batch
        from bmdal_reg.bmdal.feature_data import TensorFeatureData

        def run_bmdal(x, budget, start, labeled):
            t = torch.from_numpy(x)
            data = {"train": TensorFeatureData(t[start : start + 1]), "pool": TensorFeatureData(t)}
            idx, _ = select_batch(
                budget - 1,
                [torch.nn.Identity()],
                data,
                None,
                base_kernel="linear",
                kernel_transforms=[],
                selection_method="maxdist",
                verbosity=0,
            )
            return np.concatenate([[start], idx.numpy()])

        return run_bmdal

    if peer == "scikit-activeml":
        from skactiveml.pool import CoreSet

        def run_skactiveml(x, budget, start, labeled):
            y = np.full(x.shape[0], np.nan)
            y[start] = 0.0
            picks = CoreSet(random_state=0).query(x, y, batch_size=budget - 1)
            return np.concatenate([[start], picks])

        return run_skactiveml

    if peer == "torch-fullpass":
        import torch

        def run_fullpass(x, budget, start, labeled):
            """The plain algorithm in torch float32, as fast as torch makes it: distances to the labeled set
            by blocked cdist, then one GEMV pass a pick (‖x‖² − 2x·c + ‖c‖², as bmdal-reg's MaxDist)."""
            X = torch.from_numpy(x)
            n = X.shape[0]
            sq = X.square().sum(dim=1)
            if labeled is not None and labeled.size:
                lab = X[torch.from_numpy(labeled)]
                D = torch.empty(n)
                for s in range(0, n, 16384):
                    D[s : s + 16384] = torch.cdist(X[s : s + 16384], lab).square().min(dim=1).values
                D[torch.from_numpy(labeled)] = -1.0
                t = int(torch.argmax(D))
            else:
                D = torch.full((n,), float("inf"))
                t = start
            picks = []
            for _ in range(budget):
                picks.append(t)
                d = torch.addmv(sq, X, X[t], alpha=-2.0).add_(sq[t])
                torch.minimum(D, d, out=D)
                D[t] = -1.0
                t = int(torch.argmax(D))
            return np.array(picks)

        return run_fullpass

    raise SystemExit(f"unknown peer {peer!r}")


def main() -> None:
    peer, matrix, budget, start, out = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    labeled = np.load(sys.argv[6]) if len(sys.argv) > 6 else None
    x = np.ascontiguousarray(np.load(matrix), dtype=np.float32)
    select = prepare(peer)
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    picks = np.asarray(select(x, budget, start, labeled), dtype=np.int64)
    seconds = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    np.save(out, picks)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": status_kb("VmHWM") / 1024}))


if __name__ == "__main__":
    main()
