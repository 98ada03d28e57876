"""The torch backend of the nearest-centre tracker: the same exact float64 distances as the numba engine,
as tensor operations, so they run on a CUDA device when there is one (and on the CPU in tests).

Each added centre is applied to every live candidate at once (the shape a GPU wants): the triangle
inequality through each candidate's nearest centre and a norm bound skip what they can, a float32 screen
with a certified error bound proves most of the rest out of reach, and exact float64 distances are
computed only where the screen cannot decide. Labeled centres are added the same way, one by one.
"""

from __future__ import annotations

import numpy as np

from uwe_cli.errors import ResourceError
from uwe_cli.selection._kernels import F32_EPS, NORM_SLACK, PRUNE_MARGIN, SCREEN_MAX_ABS, screen_constants
from uwe_cli.selection.dense import DenseEmbedding, as_weights
from uwe_cli.selection.tracker import Tracker

CHUNK_ELEMENTS = 1 << 24  # float64 elements per distance block (128 MB)


def torch_device(name: str):
    import torch

    if name == "cuda" and not torch.cuda.is_available():
        raise ResourceError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    return torch.device(name)


class TorchCentreTracker(Tracker):
    """Nearest-centre distances in float64 on `device`; candidates stay in the caller's order."""

    def _setup(self, embedding: DenseEmbedding, device: str) -> None:
        import torch

        self.device = torch_device(device)
        F = np.ascontiguousarray(embedding.features, dtype=np.float32)
        G = as_weights(embedding.weights, F.shape[0])
        self._F = torch.from_numpy(F).to(self.device)
        self._G = torch.from_numpy(G).to(self.device)
        self._cand = torch.from_numpy(self.candidates).to(self.device)
        n = self.candidates.size
        self.n = n
        self.width = G.shape[1] * F.shape[1]
        self._D = torch.full((n,), float("inf"), dtype=torch.float64, device=self.device)
        self._near = torch.full((n,), -1, dtype=torch.int64, device=self.device)
        self._norms = self._sq_dist(self._cand, None).sqrt()
        self._centre_rows = torch.empty(self.capacity, dtype=torch.int64, device=self.device)
        self.k = 0
        self.taken = 0
        # The float32 screen needs K = 1 (the embedding is g·f) and values whose squares fit in float32.
        self.screen = self.prune and G.shape[1] == 1
        if self.screen:
            top = np.empty(n, dtype=np.float64)
            for s in range(0, n, 65_536):
                rows = self.candidates[s : s + 65_536]
                top[s : s + rows.size] = np.abs(G[rows, 0]) * np.abs(F[rows]).max(axis=1, initial=0.0)
            g = np.abs(G[self.candidates, 0])
            # No float32 overflow in the squares, and weights that float32 holds to relative precision.
            ok = (top <= SCREEN_MAX_ABS) & ((g == 0) | (g >= 2.0**-100))
            self._screenable = torch.from_numpy(ok).to(self.device)
        self._bound = screen_constants(F.shape[1])

    def _sq_dist(self, rows, E):
        """‖G[r]⊗F[r] − E‖² in float64 for a tensor of pool rows (E None: the squared norm), in chunks."""
        import torch

        out = torch.empty(rows.numel(), dtype=torch.float64, device=self.device)
        per_row = self._G.shape[1] * self._F.shape[1]
        step = max(1, CHUNK_ELEMENTS // per_row)
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            emb = self._G[r][:, :, None] * self._F[r].to(torch.float64)[:, None, :]
            diff = emb if E is None else emb - E
            out[s : s + step] = (diff * diff).sum(dim=(1, 2))
        return out

    def _screened_out(self, rows, norms, D, E):
        """Which rows float32 arithmetic proves at least √D away from the centre E (see
        _kernels._screened_out for the bound).

        Here x̂ = fl32(g)·f stands for the embedding: ‖fl64(g·f) − x̂‖ ≤ (ε32 + ε64)‖x‖ (g is a normal
        float32 number or 0 for screenable rows), and c32 = fl32(c) with ‖c − c32‖ computed in float64.
        """
        import torch

        gamma, tiny_sum, tiny_vec = self._bound
        c64 = E[0, :]
        c32 = c64.to(torch.float32)
        rc = float(torch.linalg.vector_norm(c64 - c32.to(torch.float64))) * (1 + 1e-6)
        eps1 = F32_EPS * (1 + F32_EPS)
        out = torch.empty(rows.numel(), dtype=torch.bool, device=self.device)
        step = max(1, CHUNK_ELEMENTS // self._F.shape[1])
        g32 = self._G[:, 0].to(torch.float32)
        for s in range(0, rows.numel(), step):
            r = rows[s : s + step]
            diff = g32[r][:, None] * self._F[r] - c32
            t = (diff * diff).sum(dim=1).to(torch.float64)
            norm = norms[s : s + step]
            r_s = (F32_EPS + 2.0**-53) * norm * (1 + 1e-6)
            B = (1 + eps1) * ((D[s : s + step] * PRUNE_MARGIN).sqrt() + r_s + rc)
            B = B + eps1 * (norm + 2 * r_s) + tiny_vec
            out[s : s + step] = t >= (1 + gamma) * (B.square() + tiny_sum)
        return out

    def largest_norm(self) -> tuple[int, float]:
        sq = self._norms.square()
        top = sq.max()
        t = int(torch_first(sq == top))
        return t, float(sq[t])

    def init_centres(self, rows: np.ndarray) -> None:
        """Start from a set of centres (the labeled rows), added one by one."""
        for row in np.asarray(rows, dtype=np.int64):
            self.add(int(row))

    def add(self, row: int, max_d: float | None = None) -> None:
        import torch

        E = self._G[row][:, None] * self._F[row].to(torch.float64)[None, :]
        cnorm = float(torch.linalg.vector_norm(E))
        self._centre_rows[self.k] = row
        live = self._D > 0
        todo = live
        if self.prune and self.k:
            has_centre = self._near >= 0
            needed = torch.unique(self._near[live & has_centre])
            cc2 = torch.full((self.k,), float("inf"), dtype=torch.float64, device=self.device)
            if needed.numel():
                cc2[needed] = self._sq_dist(self._centre_rows[needed], E)
            bound = torch.where(has_centre, cc2[self._near.clamp(min=0)], torch.zeros_like(self._D))
            todo = todo & ~(has_centre & (bound >= 4.0 * self._D * PRUNE_MARGIN))
        if self.prune:
            gap2 = (self._norms - cnorm).square()
            slack = NORM_SLACK * (self._norms + cnorm).square()
            todo = todo & ~(gap2 >= self._D * PRUNE_MARGIN + slack)
        idx = torch.nonzero(todo).flatten()
        if idx.numel() and self.screen and float(E.abs().max()) <= SCREEN_MAX_ABS:
            out = self._screened_out(self._cand[idx], self._norms[idx], self._D[idx], E)
            out &= self._screenable[idx]
            self.stats.screened += int(out.sum())
            idx = idx[~out]
        if idx.numel():
            d = self._sq_dist(self._cand[idx], E)
            better = d < self._D[idx]
            upd = idx[better]
            self._D[upd] = d[better]
            self._near[upd] = self.k
        self.stats.evaluated += int(idx.numel())
        self.stats.possible += self.n - self.taken
        self.k += 1

    def take(self, t: int) -> None:
        self._D[t] = -1.0
        self.taken += 1

    def distances(self) -> np.ndarray:
        return self._D.cpu().numpy()

    def earliest_at_least(self, threshold: float) -> tuple[int, float]:
        near = self._D.ge(threshold).nonzero()
        if not near.numel():
            return -1, -1.0
        t = int(near[0, 0])
        return t, float(self._D[t])

    def square_norms(self) -> np.ndarray:
        return self._norms.square().cpu().numpy()

    def argmax(self) -> tuple[int, float]:
        """The live candidate of largest D; ties go to the earliest candidate in the caller's order."""
        top = self._D.max()
        t = int(torch_first(top == self._D))
        return t, float(top)


def torch_first(mask) -> int:
    """Index of the first True in a boolean tensor."""
    return int(mask.nonzero()[0, 0])
