"""The torch backend of the nearest-centre tracker: the same exact float64 updates as the numba kernels,
as tensor operations, so they run on a CUDA device when there is one (and on the CPU in tests).

Initial distances to a labeled set come from the shared CPU path (FAISS + exact refinement); each
added centre is then applied on the device with the same triangle-inequality pruning.
"""

from __future__ import annotations

import numpy as np

from uwe_cli.errors import ResourceError
from uwe_cli.selection._kernels import PRUNE_MARGIN
from uwe_cli.selection.dense import CentreTracker, DenseEmbedding

CHUNK_ELEMENTS = 1 << 24  # float64 elements per distance block (128 MB)


def torch_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ResourceError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


class TorchCentreTracker(CentreTracker):
    """CentreTracker whose per-centre update runs in torch on `device`."""

    def __init__(
        self,
        embedding: DenseEmbedding,
        candidates: np.ndarray,
        capacity: int,
        prune: bool = True,
        device: str = "cpu",
    ) -> None:
        import torch

        self.device = torch_device(device)
        super().__init__(embedding, candidates, capacity, prune)
        self._F = torch.from_numpy(self.F).to(self.device)
        self._G = torch.from_numpy(self.G).to(self.device)
        self._cand = torch.from_numpy(self.cand).to(self.device)
        self._D = None
        self._near = None
        self._centre_rows = torch.empty(self.centre_rows.size, dtype=torch.int64, device=self.device)

    def _sync_in(self) -> None:
        import torch

        if self._D is None:
            self._D = torch.from_numpy(self.D).to(self.device)
            self._near = torch.from_numpy(self.near.astype(np.int64)).to(self.device)
            self._centre_rows[: self.k] = torch.from_numpy(self.centre_rows[: self.k]).to(self.device)

    def _sq_dist(self, rows, E):
        """‖G[r]⊗F[r] − E‖² in float64 for a tensor of pool rows, in bounded chunks."""
        import torch

        out = torch.empty(rows.numel(), dtype=torch.float64, device=self.device)
        per_row = E.numel()
        step = max(1, CHUNK_ELEMENTS // per_row)
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            emb = self._G[r][:, :, None] * self._F[r].to(torch.float64)[:, None, :]
            diff = emb - E
            out[s : s + step] = (diff * diff).sum(dim=(1, 2))
        return out

    def add(self, row: int, max_d: float | None = None) -> None:
        import torch

        self._sync_in()
        E = self._G[row][:, None] * self._F[row].to(torch.float64)[None, :]
        self._centre_rows[self.k] = row
        live = self._D > 0
        if self.prune and self.k:
            has_centre = self._near >= 0
            needed = torch.unique(self._near[live & has_centre])
            cc2 = torch.full((self.k,), float("inf"), dtype=torch.float64, device=self.device)
            if needed.numel():
                cc2[needed] = self._sq_dist(self._centre_rows[needed], E)
            bound = torch.where(has_centre, cc2[self._near.clamp(min=0)], torch.zeros_like(self._D))
            todo = live & ~(has_centre & (bound >= 4.0 * self._D * PRUNE_MARGIN))
        else:
            todo = live
        idx = torch.nonzero(todo).flatten()
        if idx.numel():
            d = self._sq_dist(self._cand[idx], E)
            better = d < self._D[idx]
            upd = idx[better]
            self._D[upd] = d[better]
            self._near[upd] = self.k
        self.stats.evaluated += int(idx.numel())
        self.stats.possible += self.cand.size - self.taken
        self.k += 1

    def take(self, t: int) -> None:
        self._sync_in()
        self._D[int(self._pos[t])] = -1.0
        self.taken += 1

    def distances(self) -> np.ndarray:
        self._sync_in()
        return self._D.cpu().numpy()[self._pos]

    def argmax(self) -> tuple[int, float]:
        """As CentreTracker.argmax: ties go to the earliest candidate in the caller's order."""
        import torch

        self._sync_in()
        top = torch.max(self._D)
        tied = torch.nonzero(top == self._D).flatten().cpu().numpy()
        return int(self._orig[tied].min()), float(top)
