"""The report's 2-D map of the pool: a subsample (every picked and labeled unit kept) projected by PCA
of the embeddings selection uses (u^tau · f; class-wise for detection pools), or by UMAP.

PCA is randomized (a range finder with power iterations) and touches the embedding only through
products with thin matrices, so the block-sparse class-wise embedding of a detection pool (K × d
columns, almost all zero) is never made dense. Results are deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uwe_cli.errors import ExportError

MAP_METHODS = ("pca", "umap")
UMAP_INPUT_DIMS = 50  # UMAP runs on the top PCA components, the usual practice for wide features

MatMul = Callable[[np.ndarray], np.ndarray]


@dataclass
class LinearOperator:
    """An m × n matrix known through X @ A (`matmul`) and Xᵀ @ B (`rmatmul`), already centred."""

    shape: tuple[int, int]
    matmul: MatMul
    rmatmul: MatMul


def subsample(n: int, keep: np.ndarray, max_points: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted row indices: every row of `keep`, plus random others up to `max_points` in all."""
    keep = np.unique(np.asarray(keep, dtype=np.int64))
    room = max_points - keep.size
    if room >= n - keep.size:
        return np.arange(n, dtype=np.int64)
    if room <= 0:
        return keep
    others = np.setdiff1d(np.arange(n, dtype=np.int64), keep, assume_unique=True)
    return np.sort(np.concatenate([keep, rng.choice(others, size=room, replace=False)]))


def dense_operator(x: np.ndarray) -> LinearOperator:
    """Centred products with a dense (m, d) float32 matrix."""
    mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)

    def matmul(a: np.ndarray) -> np.ndarray:
        a = a.astype(np.float32)
        return (x @ a - mean @ a).astype(np.float64)

    def rmatmul(b: np.ndarray) -> np.ndarray:
        b32 = b.astype(np.float32)
        return (x.T @ b32).astype(np.float64) - np.outer(mean, b.sum(axis=0))

    return LinearOperator(x.shape, matmul, rmatmul)


def classwise_operator(emb, images: np.ndarray) -> LinearOperator:
    """Centred products with the class-wise embedding rows of `images` (a `ClasswiseEmbedding`).

    Column block c (d wide) holds class c's vector; an image has at most one block per class, so
    per class the rows can be gathered, multiplied and scattered without collisions.
    """
    from uwe_cli.selection.classwise import SRC_FEATURE

    m, d, k = len(images), emb.dim, emb.num_classes
    starts, stops = emb.offsets[images], emb.offsets[images + 1]
    counts = stops - starts
    block = np.concatenate([np.arange(a, b) for a, b in zip(starts, stops, strict=True)]) if m else []
    block = np.asarray(block, dtype=np.int64)
    local = np.repeat(np.arange(m, dtype=np.int64), counts)
    classes = emb.block_class[block]
    by_class = {int(c): np.flatnonzero(classes == c) for c in np.unique(classes)}

    def vectors(idx: np.ndarray) -> np.ndarray:
        b = block[idx]
        out = np.empty((len(b), d), dtype=np.float32)
        feat = emb.block_src[b] == SRC_FEATURE
        out[feat] = emb.features[emb.block_row[b[feat]]] * emb.block_scale[b[feat], None].astype(np.float32)
        out[~feat] = emb.means[emb.block_row[b[~feat]]]
        return out

    mean = np.zeros(k * d, dtype=np.float64)
    for c, idx in by_class.items():
        mean[c * d : (c + 1) * d] = vectors(idx).sum(axis=0, dtype=np.float64) / max(m, 1)

    def matmul(a: np.ndarray) -> np.ndarray:
        out = np.zeros((m, a.shape[1]), dtype=np.float64)
        for c, idx in by_class.items():
            out[local[idx]] += vectors(idx) @ a[c * d : (c + 1) * d].astype(np.float32)
        return out - mean @ a

    def rmatmul(b: np.ndarray) -> np.ndarray:
        out = np.zeros((k * d, b.shape[1]), dtype=np.float64)
        for c, idx in by_class.items():
            out[c * d : (c + 1) * d] = vectors(idx).T @ b[local[idx]].astype(np.float32)
        return out - np.outer(mean, b.sum(axis=0))

    return LinearOperator((m, k * d), matmul, rmatmul)


def randomized_pca(
    op: LinearOperator, components: int, seed: int = 0, power_iterations: int = 4
) -> np.ndarray:
    """(m, components) principal component scores of a centred operator (Halko et al., Alg. 4.4)."""
    m, n = op.shape
    components = max(1, min(components, m, n))
    width = min(components + 10, m, n)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(op.matmul(rng.standard_normal((n, width))))
    for _ in range(power_iterations):
        z, _ = np.linalg.qr(op.rmatmul(q))
        q, _ = np.linalg.qr(op.matmul(z))
    u_small, s, _ = np.linalg.svd(op.rmatmul(q).T, full_matrices=False)
    scores = (q @ u_small[:, :components]) * s[:components]
    # Fix each component's sign (SVD signs are arbitrary): the largest |score| is positive.
    signs = np.sign(scores[np.abs(scores).argmax(axis=0), np.arange(scores.shape[1])])
    return scores * np.where(signs == 0, 1.0, signs)


def umap_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("umap") is not None


def project(op: LinearOperator, method: str, seed: int = 0) -> np.ndarray:
    """(m, 2) map coordinates by PCA, or by UMAP on the top PCA components."""
    if method not in MAP_METHODS:
        raise ExportError(f"unknown --map '{method}' (choose from {', '.join(MAP_METHODS)})")
    m = op.shape[0]
    if method == "pca" or m < 4:
        coords = randomized_pca(op, 2, seed)
    else:
        if not umap_available():
            raise ExportError("--map umap needs the umap-learn package: pip install 'uwe-cli[umap]'")
        import warnings

        import umap

        x = randomized_pca(op, UMAP_INPUT_DIMS, seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state": determinism wanted
            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, m - 1))
            coords = np.asarray(reducer.fit_transform(x), dtype=np.float64)
    if coords.shape[1] < 2:
        coords = np.column_stack([coords, np.zeros(m)])
    return coords
