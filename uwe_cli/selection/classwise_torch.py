"""The torch engine for class-wise (detection) embeddings: the same exact distances as `ClasswiseTracker`,
as tensor operations, so `--device cuda` runs detection selection on the GPU (and tests run it on the CPU).

For a new centre c and every image i, the squared distance is summed from non-negative float64 terms
only (no ‖x‖² + ‖y‖² − 2x·y cancellation): the norms of i's blocks whose class c lacks, the norms of
c's blocks whose class i lacks, and ‖i_k − c_k‖² by direct differences for the classes both have.
Every distance is computed (no pruning): on a GPU a full pass is cheap, and it keeps this engine an
independent check of the pruned CPU one.
"""

from __future__ import annotations

import numpy as np

from uwe_cli.selection.classwise import ClasswiseEmbedding, ClasswiseTracker, check_image_indices
from uwe_cli.selection.torch_backend import CHUNK_ELEMENTS, torch_device
from uwe_cli.selection.tracker import Tracker


class TorchClasswiseTracker(Tracker):
    """ClasswiseTracker's semantics (positions index `candidates`, ties to the earliest) in torch."""

    _check_candidates = ClasswiseTracker._check_candidates

    def _setup(self, embedding: ClasswiseEmbedding, device: str) -> None:
        import torch

        emb = self.emb = embedding
        self.width = emb.num_classes * emb.dim
        cand = self.candidates
        self.device = torch_device(device)
        dev = self.device
        counts = np.diff(emb.offsets)
        self._block_image = torch.from_numpy(np.repeat(np.arange(emb.num_images), counts)).to(dev)
        self._block_class = torch.from_numpy(emb.block_class.astype(np.int64)).to(dev)
        self._block_src = torch.from_numpy(emb.block_src.astype(np.int64)).to(dev)
        self._block_row = torch.from_numpy(emb.block_row).to(dev)
        self._block_scale = torch.from_numpy(emb.block_scale).to(dev)
        self._block_norm2 = torch.from_numpy(emb.block_norm2).to(dev)
        self._features = torch.from_numpy(emb.features).to(dev)
        self._means = torch.from_numpy(emb.means).to(dev)
        self._cand = torch.from_numpy(cand).to(dev)
        self._D = torch.full((len(cand),), float("inf"), dtype=torch.float64, device=dev)
        self.taken = 0

    def _vectors(self, blocks):
        """float64 (len(blocks), d) block vectors: scale · feature row, or a row of class means."""
        import torch

        out = torch.empty((blocks.numel(), self.emb.dim), dtype=torch.float64, device=self.device)
        is_feature = self._block_src[blocks] == 0
        fb = blocks[is_feature]
        out[is_feature] = self._block_scale[fb][:, None] * self._features[self._block_row[fb]].to(
            torch.float64
        )
        mb = blocks[~is_feature]
        if mb.numel():
            out[~is_feature] = self._means[self._block_row[mb]]
        return out

    def _sq_dist_to(self, c: int):
        """Squared distance of every image to image c (float64, direct differences)."""
        import torch

        emb = self.emb
        n = emb.num_images
        start, stop = int(emb.offsets[c]), int(emb.offsets[c + 1])
        c_blocks = torch.arange(start, stop, device=self.device)
        c_classes = self._block_class[c_blocks]
        c_norm2 = self._block_norm2[c_blocks]
        shared = torch.isin(self._block_class, c_classes)
        # i's blocks of classes c lacks
        total = torch.zeros(n, dtype=torch.float64, device=self.device)
        total.index_add_(0, self._block_image[~shared], self._block_norm2[~shared])
        # c's blocks of classes i lacks, and the shared classes by direct differences
        c_vectors = self._vectors(c_blocks)
        chunk = max(1, CHUNK_ELEMENTS // max(1, emb.dim))
        for j in range(c_blocks.numel()):
            of_class = torch.nonzero(self._block_class == c_classes[j]).flatten()
            has_class = torch.zeros(n, dtype=torch.bool, device=self.device)
            has_class[self._block_image[of_class]] = True
            total += torch.where(has_class, 0.0, c_norm2[j])
            for s in range(0, of_class.numel(), chunk):
                blocks = of_class[s : s + chunk]
                diff = self._vectors(blocks) - c_vectors[j]
                total.index_add_(0, self._block_image[blocks], (diff * diff).sum(dim=1))
        return total

    def init_centres(self, rows: np.ndarray) -> None:
        for c in check_image_indices(rows, self.emb, "labeled images"):
            self._lower(int(c))
            self.stats.possible += len(self.candidates)

    def _lower(self, c: int) -> None:
        import torch

        d = self._sq_dist_to(c)[self._cand]
        live = self._D >= 0
        self._D = torch.where(live, torch.minimum(self._D, d), self._D)
        self.stats.evaluated += len(self.candidates) - self.taken

    def largest_norm(self) -> tuple[int, float]:
        norms = self.emb.image_norm2[self.candidates]
        p = int(np.argmax(norms))
        return p, float(norms[p])

    def add(self, row: int, max_d: float | None = None) -> None:
        check_image_indices(np.array([row]), self.emb, "centre")
        self._lower(row)
        self.stats.possible += len(self.candidates) - self.taken

    def argmax(self) -> tuple[int, float]:
        import torch

        top = torch.max(self._D)
        tied = torch.nonzero(top == self._D).flatten()
        return int(tied.min()), float(top)

    def take(self, position: int) -> None:
        self._D[position] = -1.0
        self.taken += 1

    def distances(self) -> np.ndarray:
        return self._D.cpu().numpy().copy()

    def square_norms(self) -> np.ndarray:
        return self.emb.image_norm2[self.candidates]
