"""Class-wise UWE for detection pools (paper Eq. 9, Appendix A.2) and exact K-Center-Greedy on it.

An image embeds as the concatenation over K classes of one d-vector per class, zero for absent
classes. With ≤ a few boxes per image that K×d vector is almost all zeros (100,000 × 80 × 1,024
would be 33 GB in float32), so it is kept block-sparse: per image, CSR offsets into a list of
(class, block) pairs. A block is either `scale · feature_row` (one box: the max box, or a class
with a single box under `mean`), which reuses the pool's float32 box features without a copy, or a
row of a float64 matrix of class means. Distances touch only the classes present in either image
and are summed in float64 from direct differences, so they match a dense float64 computation to
rounding, and the greedy picks match it exactly.

KCG follows Algorithm 1. Images sharing no class are at ‖x‖² + ‖y‖² without reading a feature,
which also lets the labeled set initialise D through a class → centres index instead of visiting
every (candidate, labeled) pair. Each candidate remembers its nearest centre; a new centre c can
only improve candidate i if |‖c‖ − ‖i‖| < D(i), ‖c − centre(i)‖ < 2·D(i) (triangle inequality) and
the block-norm bound stays below D(i)², and a distance sum stops once it reaches D(i)². The bounds
carry a safety margin far above float64 rounding and the early exit is exact (sums of non-negative
terms never decrease), so none of this changes D: the result is the brute-force result.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
from numba import njit, prange

from uwe_cli.embedding import check_selection_options, normalize_uncertainty, uwe_weights
from uwe_cli.errors import SelectionError
from uwe_cli.pool.detection import DetectionPool
from uwe_cli.selection.greedy import k_center_greedy
from uwe_cli.selection.tracker import Progress, Tracker

SRC_FEATURE = 0  # block = scale * box_features[row]
SRC_MEAN = 1  # block = means[row]

# Pruning skips a centre only if its lower bound beats D(i) by this relative margin plus an
# absolute margin scaled by the norms involved: float64 sums of ≤ K·d terms err by ~1e-13 of that.
_REL_MARGIN = 1e-9
_ABS_MARGIN = 1e-11
# Below this many candidates a pick costs well under a millisecond and a parallel region's start and
# barrier cost more than they save (far more when the cores are shared), so run on one thread.
_PARALLEL_MIN_CANDIDATES = 20_000


@dataclass
class ClasswiseEmbedding:
    """Block-sparse class-wise image embeddings (CSR over images; blocks sorted by class per image)."""

    num_images: int
    num_classes: int
    dim: int
    offsets: np.ndarray  # int64 (n+1,): blocks of image i are offsets[i]:offsets[i+1]
    block_class: np.ndarray  # int32 (n_blocks,)
    block_src: np.ndarray  # int8 (n_blocks,): SRC_FEATURE or SRC_MEAN
    block_row: np.ndarray  # int64 (n_blocks,): row of `features` or `means`
    block_scale: np.ndarray  # float64 (n_blocks,): u^tau for SRC_FEATURE blocks, 1 otherwise
    block_norm2: np.ndarray  # float64 (n_blocks,): squared norm of the block
    image_norm2: np.ndarray  # float64 (n,): squared norm of the image embedding
    class_mask: np.ndarray  # uint64 (n, ceil(K/64)): bit c set when the image has a class-c block
    features: np.ndarray  # float32 (n_boxes, d): the pool's box features (shared, not copied)
    means: np.ndarray  # float64 (n_mean_blocks, d)
    in_play: np.ndarray  # bool (n,): images whose embedding was built
    image_uncertainty: np.ndarray  # float64 (n,): max normalised box u; 0 without boxes; NaN out of play
    tau: float
    normalize: str
    aggregate: str

    @property
    def num_blocks(self) -> int:
        return len(self.block_class)

    @property
    def nbytes(self) -> int:
        """Bytes held by the embedding itself (the shared box features excluded)."""
        arrays = (self.offsets, self.block_class, self.block_src, self.block_row, self.block_scale)
        arrays += (self.block_norm2, self.image_norm2, self.class_mask, self.means, self.in_play)
        arrays += (self.image_uncertainty,)
        return sum(a.nbytes for a in arrays)


@njit(parallel=True, cache=True)
def _mean_blocks(features, box_order, box_scale, group_start, group_stop, out):  # pragma: no cover
    """out[g] = mean over boxes box_order[group_start[g]:group_stop[g]] of scale·feature (row order)."""
    d = features.shape[1]
    for g in prange(len(group_start)):
        acc = out[g]
        for k in range(d):
            acc[k] = 0.0
        for j in range(group_start[g], group_stop[g]):
            r = box_order[j]
            s = box_scale[r]
            f = features[r]
            for k in range(d):
                acc[k] += s * f[k]
        count = group_stop[g] - group_start[g]
        for k in range(d):
            acc[k] = acc[k] / count


@njit(parallel=True, cache=True)
def _block_norm2(features, means, block_src, block_row, block_scale, out):  # pragma: no cover
    d = features.shape[1]
    for b in prange(len(block_src)):
        acc = 0.0
        r = block_row[b]
        if block_src[b] == 0:
            s = block_scale[b]
            f = features[r]
            for k in range(d):
                v = s * f[k]
                acc += v * v
        else:
            m = means[r]
            for k in range(d):
                acc += m[k] * m[k]
        out[b] = acc


def box_weights(
    pool: DetectionPool,
    in_play: np.ndarray,
    normalize: str,
    tau: float,
    bounds: tuple[float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes of the images in play in row order, their normalised u, u^tau): u is normalised over
    exactly these boxes (or with the given global `bounds`), so it must be known before aggregating."""
    boxes = np.flatnonzero(in_play[pool.box_image])
    u_norm = normalize_uncertainty(pool.box_uncertainty[boxes], None, normalize, bounds)
    return boxes, u_norm, uwe_weights(u_norm, float(tau))


def image_uncertainty(
    pool: DetectionPool,
    in_play: np.ndarray,
    normalize: str = "minmax",
    bounds: tuple[float, float] | None = None,
) -> np.ndarray:
    """The batch file's per-image uncertainty: the largest normalised u of its boxes (0 without boxes,
    NaN out of play)."""
    boxes, u_norm, _ = box_weights(pool, in_play, normalize, 0.0, bounds)
    out = np.where(in_play, 0.0, np.nan)
    np.maximum.at(out, pool.box_image[boxes], u_norm)
    return out


def build_classwise(
    pool: DetectionPool,
    in_play: np.ndarray | None = None,
    tau: float = 1.0,
    normalize: str = "minmax",
    aggregate: str = "max",
    bounds: tuple[float, float] | None = None,
) -> ClasswiseEmbedding:
    """Image embeddings u^tau·f aggregated per class, for the images in play (labeled + candidates).

    u is normalised over all boxes of the images in play, so it must be known before aggregating.
    `max` keeps per (image, class) the box of largest normalised u (ties: the earlier row); `mean`
    averages the boxes' embeddings. Images without boxes, and images out of play, have no blocks.
    """
    check_selection_options(tau, normalize, aggregate)
    n = pool.num_images
    in_play = np.ones(n, dtype=bool) if in_play is None else np.asarray(in_play, dtype=bool)
    if in_play.shape != (n,):
        raise SelectionError(f"in_play mask has shape {in_play.shape}, expected ({n},)")

    boxes, u_norm, scale = box_weights(
        pool, in_play, normalize, tau, bounds
    )  # tau = 0 is CoreSet on features
    image = pool.box_image[boxes]
    label = pool.box_label[boxes].astype(np.int64)

    # Sort boxes by (image, class, -u, row): the first box of each group is the max box.
    order = np.lexsort((boxes, -u_norm, label, image))
    key = image[order] * max(pool.num_classes, 1) + label[order]
    first = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(order) else np.zeros(0, np.int64)
    stop = np.append(first[1:], len(order)).astype(np.int64) if len(order) else first
    counts = stop - first
    block_image = image[order[first]]
    block_class = label[order[first]].astype(np.int32)

    d = pool.dim
    block_src = np.zeros(len(first), dtype=np.int8)
    block_row = boxes[order[first]].astype(np.int64)
    block_scale = scale[order[first]].astype(np.float64)
    means = np.zeros((0, d), dtype=np.float64)
    if aggregate == "mean":
        multi = np.flatnonzero(counts > 1)
        if len(multi):
            # Within a group the boxes must be summed in row order: re-sort by (group, row).
            group_of = np.repeat(np.arange(len(first)), counts)
            by_row = np.lexsort((boxes[order], group_of))
            box_order = boxes[order][by_row].astype(np.int64)
            full_scale = np.zeros(pool.num_boxes, dtype=np.float64)
            full_scale[boxes] = scale
            means = np.empty((len(multi), d), dtype=np.float64)
            _mean_blocks(pool.box_features, box_order, full_scale, first[multi], stop[multi], means)
            block_src[multi] = SRC_MEAN
            block_row[multi] = np.arange(len(multi))
            block_scale[multi] = 1.0

    block_norm2 = np.empty(len(first), dtype=np.float64)
    _block_norm2(pool.box_features, means, block_src, block_row, block_scale, block_norm2)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(block_image, minlength=n), out=offsets[1:])
    image_norm2 = np.zeros(n, dtype=np.float64)
    np.add.at(image_norm2, block_image, block_norm2)
    class_mask = np.zeros((n, max(1, -(-pool.num_classes // 64))), dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), (block_class % 64).astype(np.uint64))
    np.bitwise_or.at(class_mask, (block_image, block_class // 64), bits)

    return ClasswiseEmbedding(
        num_images=n,
        num_classes=pool.num_classes,
        dim=d,
        offsets=offsets,
        block_class=block_class,
        block_src=block_src,
        block_row=block_row,
        block_scale=block_scale,
        block_norm2=block_norm2,
        image_norm2=image_norm2,
        class_mask=class_mask,
        features=pool.box_features,
        means=means,
        in_play=in_play,
        image_uncertainty=image_uncertainty(pool, in_play, normalize, bounds),
        tau=float(tau),
        normalize=normalize,
        aggregate=aggregate,
    )


def to_dense(emb: ClasswiseEmbedding, images: np.ndarray | None = None) -> np.ndarray:
    """The dense float64 (n, K·d) embeddings: for tests and small subsets only."""
    images = np.arange(emb.num_images) if images is None else np.asarray(images, dtype=np.int64)
    d = emb.dim
    out = np.zeros((len(images), emb.num_classes * d), dtype=np.float64)
    for j, i in enumerate(images):
        for b in range(emb.offsets[i], emb.offsets[i + 1]):
            c = int(emb.block_class[b])
            if emb.block_src[b] == SRC_FEATURE:
                block = emb.block_scale[b] * emb.features[emb.block_row[b]].astype(np.float64)
            else:
                block = emb.means[emb.block_row[b]]
            out[j, c * d : (c + 1) * d] = block
    return out


# ---------------------------------------------------------------------------------------------
# Distance kernels over the CSR structure


_CHUNK = 128  # elements between early-exit checks inside a block


@njit(inline="always")
def _block_sqdiff(features, means, src_a, row_a, s_a, src_b, row_b, s_b, base, limit):  # pragma: no cover
    """‖a − b‖² for two blocks of the same class, by direct differences in float64.

    Stops early, returning a partial sum, once base + partial >= limit: a sum of non-negative
    float64 terms never decreases, so the full distance could not get below the limit either.
    """
    d = features.shape[1]
    acc = 0.0
    k = 0
    while k < d:
        stop = min(k + _CHUNK, d)
        if src_a == 0 and src_b == 0:
            fa = features[row_a]
            fb = features[row_b]
            for j in range(k, stop):
                t = s_a * fa[j] - s_b * fb[j]
                acc += t * t
        elif src_a == 0:
            fa = features[row_a]
            mb = means[row_b]
            for j in range(k, stop):
                t = s_a * fa[j] - mb[j]
                acc += t * t
        elif src_b == 0:
            ma = means[row_a]
            fb = features[row_b]
            for j in range(k, stop):
                t = ma[j] - s_b * fb[j]
                acc += t * t
        else:
            ma = means[row_a]
            mb = means[row_b]
            for j in range(k, stop):
                t = ma[j] - mb[j]
                acc += t * t
        if base + acc >= limit:
            return acc
        k = stop
    return acc


@njit(cache=True)
def _image_d2(
    a, b, limit, bound, offsets, bclass, bsrc, brow, bscale, bnorm2, features, means, class_mask, image_norm2
):  # pragma: no cover
    """Squared distance of images a and b, or any value >= limit once it cannot be below limit.

    Classes in one image only add their block's norm²; shared classes are differenced. The sum is
    always taken in the same order (unshared classes, then shared ones, each by class), so a
    pruned and an unpruned run produce bitwise identical distances. If `bound` is positive and the
    block-norm lower bound Σ unshared ‖·‖² + Σ shared (‖a_c‖ − ‖b_c‖)² reaches `bound`, no feature
    is read at all (`bound` carries the safety margin, as it is computed differently).
    """
    shared = False
    for w in range(class_mask.shape[1]):
        if class_mask[a, w] & class_mask[b, w]:
            shared = True
            break
    if not shared:  # the common case: no class in common, no feature read
        return image_norm2[a] + image_norm2[b]
    sa = offsets[a]
    ea = offsets[a + 1]
    sb = offsets[b]
    eb = offsets[b + 1]
    unshared = 0.0
    lower = 0.0
    ia = sa
    ib = sb
    while ia < ea or ib < eb:
        if ib == eb or (ia < ea and bclass[ia] < bclass[ib]):
            unshared += bnorm2[ia]
            ia += 1
        elif ia == ea or bclass[ib] < bclass[ia]:
            unshared += bnorm2[ib]
            ib += 1
        else:
            t = math.sqrt(bnorm2[ia]) - math.sqrt(bnorm2[ib])
            lower += t * t
            ia += 1
            ib += 1
    if bound > 0.0 and unshared + lower >= bound:
        return math.inf
    acc = unshared
    if acc >= limit:
        return acc
    ia = sa
    ib = sb
    while ia < ea and ib < eb:
        ca = bclass[ia]
        cb = bclass[ib]
        if ca == cb:
            acc += _block_sqdiff(
                features, means, bsrc[ia], brow[ia], bscale[ia], bsrc[ib], brow[ib], bscale[ib], acc, limit
            )
            if acc >= limit:
                return acc
            ia += 1
            ib += 1
        elif ca < cb:
            ia += 1
        else:
            ib += 1
    return acc


@njit(parallel=True, cache=True)
def _add_centre(
    c,  # image index of the new centre
    cid,  # its centre id (position in centre_image)
    cand,  # int64 (m,): candidate image indices
    active,  # bool (m,): not yet picked
    min_d2,  # float64 (m,): squared distance to the nearest centre (inf: none yet)
    nearest,  # int64 (m,): centre id of the nearest centre (-1: none yet)
    centre_image,  # int64 (>= cid+1,): image index per centre id
    needed,  # bool scratch (>= cid+1,)
    centre_dist,  # float64 scratch (>= cid+1,): ‖c − centre‖ for needed centres
    image_norm,  # float64 (n,)
    prune,
    *csr,  # offsets, block_class, block_src, block_row, block_scale, block_norm2, features, means, ...
):  # pragma: no cover
    """Fold a new centre into min_d2 / nearest; returns how many image distances it computed."""
    m = len(cand)
    norm_c = image_norm[c]
    n_needed = 0
    if prune:
        for j in range(cid):
            needed[j] = False
        for p in range(m):
            if active[p] and min_d2[p] > 0.0 and nearest[p] >= 0:
                needed[nearest[p]] = True
        ids = np.empty(cid, dtype=np.int64)
        for j in range(cid):
            if needed[j]:
                ids[n_needed] = j
                n_needed += 1
        for q in prange(n_needed):
            j = ids[q]
            d2 = _image_d2(c, centre_image[j], math.inf, 0.0, *csr)
            centre_dist[j] = math.sqrt(d2)
    computed = np.zeros(m, dtype=np.int64)
    for p in prange(m):
        if not active[p] or min_d2[p] == 0.0:
            continue
        i = cand[p]
        if prune and nearest[p] >= 0:
            dist = math.sqrt(min_d2[p])
            norm_i = image_norm[i]
            slack = _ABS_MARGIN * (norm_c + norm_i)
            if abs(norm_c - norm_i) >= dist * (1.0 + _REL_MARGIN) + slack:
                continue
            j = nearest[p]
            slack = _ABS_MARGIN * (norm_c + norm_i + image_norm[centre_image[j]])
            if centre_dist[j] >= 2.0 * dist * (1.0 + _REL_MARGIN) + slack:
                continue
            bound = min_d2[p] * (1.0 + _REL_MARGIN) + _ABS_MARGIN * (norm_c + norm_i) ** 2
            d2 = _image_d2(i, c, min_d2[p], bound, *csr)
        else:
            d2 = _image_d2(i, c, math.inf, 0.0, *csr)
        if d2 == math.inf:  # ruled out by the block-norm bound
            continue
        computed[p] = 1
        if d2 < min_d2[p]:
            min_d2[p] = d2
            nearest[p] = cid
    return n_needed + computed.sum()


@njit(parallel=True, cache=True)
def _init_from_centres(
    cand,  # int64 (m,): candidate image indices
    centre_image,  # int64 (nc,): labeled images
    by_norm,  # int64 (nc,): centre ids by ascending image norm² (stable)
    class_ptr,  # int64 (K+1,): centres having class c are class_centres[class_ptr[c]:class_ptr[c+1]]
    class_centres,  # int64: centre ids, grouped by class
    min_d2,  # out float64 (m,)
    nearest,  # out int64 (m,)
    image_norm,  # float64 (n,)
    *csr,
):  # pragma: no cover
    """D(i) to the labeled set without visiting every (candidate, centre) pair.

    A centre sharing no class with i is at ‖i‖² + ‖c‖², so the nearest of those is the first one in
    ascending norm that shares nothing with i; only centres sharing a class (found through the
    class → centres index) need their distance computed, each once, against the running minimum.
    """
    offsets = csr[0]
    bclass = csr[1]
    class_mask = csr[8]
    image_norm2 = csr[9]
    words = class_mask.shape[1]
    evaluated = np.zeros(len(cand), dtype=np.int64)
    for p in prange(len(cand)):
        i = cand[p]
        best = math.inf
        best_id = -1
        for q in range(len(by_norm)):
            c = centre_image[by_norm[q]]
            shares = False
            for w in range(words):
                if class_mask[i, w] & class_mask[c, w]:
                    shares = True
                    break
            if not shares:
                best = image_norm2[i] + image_norm2[c]
                best_id = by_norm[q]
                break
        for b in range(offsets[i], offsets[i + 1]):
            k = bclass[b]
            for q in range(class_ptr[k], class_ptr[k + 1]):
                j = class_centres[q]
                c = centre_image[j]
                # Visit a centre at its lowest class shared with i only.
                earlier = False
                for w in range(words):
                    below = class_mask[i, w] & class_mask[c, w]
                    if w == k // 64:
                        below &= (np.uint64(1) << np.uint64(k % 64)) - np.uint64(1)
                    elif w > k // 64:
                        below = np.uint64(0)
                    if below:
                        earlier = True
                        break
                if earlier:
                    continue
                if best < math.inf:
                    slack = _ABS_MARGIN * (image_norm[i] + image_norm[c]) ** 2
                    d2 = _image_d2(i, c, best, best * (1.0 + _REL_MARGIN) + slack, *csr)
                else:
                    d2 = _image_d2(i, c, math.inf, 0.0, *csr)
                if d2 == math.inf:
                    continue
                evaluated[p] += 1
                if d2 < best:
                    best = d2
                    best_id = j
        min_d2[p] = best
        nearest[p] = best_id
    return evaluated.sum()


@njit(cache=True)
def _argmax_active(min_d2, active):  # pragma: no cover
    """First position of the largest min_d2 among active candidates (ties: the earlier image)."""
    best = -1
    best_v = -1.0
    for p in range(len(min_d2)):
        if active[p] and (best < 0 or min_d2[p] > best_v):
            best = p
            best_v = min_d2[p]
    return best


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    previous = numba.get_num_threads()
    numba.set_num_threads(min(n, previous))
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _class_index(emb: ClasswiseEmbedding, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre ids by ascending norm², and a class → centre ids index (CSR) over the centres' blocks."""
    by_norm = np.argsort(emb.image_norm2[centres], kind="stable").astype(np.int64)
    counts = emb.offsets[centres + 1] - emb.offsets[centres]
    owner = np.repeat(np.arange(len(centres), dtype=np.int64), counts)
    starts = np.repeat(emb.offsets[centres] - np.cumsum(counts) + counts, counts)
    blocks = starts + np.arange(counts.sum())
    classes = emb.block_class[blocks].astype(np.int64)
    order = np.lexsort((owner, classes))
    class_ptr = np.zeros(emb.num_classes + 1, dtype=np.int64)
    np.cumsum(np.bincount(classes, minlength=emb.num_classes), out=class_ptr[1:])
    return by_norm, class_ptr, owner[order]


def check_image_indices(
    values: np.ndarray, emb: ClasswiseEmbedding, what: str, ascending: bool = False
) -> np.ndarray:
    values = np.asarray(values, dtype=np.int64).ravel()
    if len(values) and (values.min() < 0 or values.max() >= emb.num_images):
        raise SelectionError(f"{what} image index out of range [0, {emb.num_images})")
    if not emb.in_play[values].all():
        raise SelectionError(f"{what} include images left out of play when the embedding was built")
    if ascending and len(values) > 1 and (np.diff(values) <= 0).any():
        raise SelectionError(f"{what} must be unique image indices in ascending order")
    return values


def _grow(array: np.ndarray, extra: Any) -> np.ndarray:
    """`array` with `extra` appended along axis 0, reusing spare capacity of its base buffer (doubling)."""
    extra = np.asarray(extra, dtype=array.dtype).reshape((-1, *array.shape[1:]))
    n, m = len(array), len(extra)
    base = array.base if isinstance(array.base, np.ndarray) and array.base.ndim == array.ndim else None
    prefix = base is not None and base.ctypes.data == array.ctypes.data and base.flags.c_contiguous
    if base is None or not prefix or len(base) < n + m:
        base = np.empty((max(2 * (n + m), 16), *array.shape[1:]), dtype=array.dtype)
        base[:n] = array
    base[n : n + m] = extra
    return base[: n + m]


class ClasswiseTracker(Tracker):
    """Exact nearest-centre distances over class-wise image embeddings (positions index `candidates`).

    Images sharing no class are at ‖x‖² + ‖y‖² without reading a feature, which also lets the labeled
    set initialise D through a class → centres index instead of visiting every (candidate, labeled)
    pair. The pruning bounds are described in the module docstring.
    """

    def _check_candidates(self, embedding: ClasswiseEmbedding, candidates: np.ndarray) -> np.ndarray:
        return check_image_indices(candidates, embedding, "candidates", ascending=True)

    def _setup(self, embedding: ClasswiseEmbedding, device: str) -> None:
        self.emb = embedding
        self.width = embedding.num_classes * embedding.dim
        self._refresh()
        m = len(self.candidates)
        size = self.capacity
        self.active = np.ones(m, dtype=bool)
        self.min_d2 = np.full(m, np.inf)
        self.nearest = np.full(m, -1, dtype=np.int64)
        self.centre_image = np.empty(size, dtype=np.int64)
        self.needed = np.zeros(size, dtype=bool)
        self.centre_dist = np.zeros(size, dtype=np.float64)
        self.k = 0
        self.taken = 0
        self.threads = 1 if m < _PARALLEL_MIN_CANDIDATES else numba.get_num_threads()

    def _refresh(self) -> None:
        emb = self.emb
        self.csr = (
            emb.offsets,
            emb.block_class,
            emb.block_src,
            emb.block_row,
            emb.block_scale,
            emb.block_norm2,
            emb.features,
            emb.means,
            emb.class_mask,
            emb.image_norm2,
        )
        self.image_norm = np.sqrt(emb.image_norm2)

    def blocks(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """(classes, float64 block vectors) of an image: what another shard needs to use it as a centre."""
        emb = self.emb
        start, stop = int(emb.offsets[image]), int(emb.offsets[image + 1])
        vectors = np.empty((stop - start, emb.dim), dtype=np.float64)
        for j, b in enumerate(range(start, stop)):
            if emb.block_src[b] == SRC_FEATURE:
                vectors[j] = emb.block_scale[b] * emb.features[emb.block_row[b]].astype(np.float64)
            else:
                vectors[j] = emb.means[emb.block_row[b]]
        return emb.block_class[start:stop].copy(), vectors

    def append_image(self, classes: np.ndarray, vectors: np.ndarray) -> int:
        """Add an image given by its blocks (from `blocks` on another shard) and return its index.

        The blocks are stored as float64 rows whose values equal scale·feature exactly, and norms are
        summed in the same order, so distances to it equal those to the original image bit for bit.
        Arrays grow by doubling, so appending a centre per pick stays cheap.
        """
        emb = self.emb
        vectors = np.ascontiguousarray(vectors, dtype=np.float64).reshape(len(classes), emb.dim)
        nb = len(classes)
        norm2 = np.empty(nb, dtype=np.float64)
        _block_norm2(emb.features, vectors, np.ones(nb, np.int8), np.arange(nb), np.ones(nb), norm2)
        total = 0.0
        for v in norm2:  # the order np.add.at uses when the embedding is built
            total += v
        mask = np.zeros((1, emb.class_mask.shape[1]), dtype=np.uint64)
        for c in classes:
            mask[0, int(c) // 64] |= np.uint64(1) << np.uint64(int(c) % 64)
        first_mean = len(emb.means)
        grow = _grow
        emb.offsets = grow(emb.offsets, [emb.offsets[-1] + nb])
        emb.block_class = grow(emb.block_class, np.asarray(classes, dtype=np.int32))
        emb.block_src = grow(emb.block_src, np.full(nb, SRC_MEAN, dtype=np.int8))
        emb.block_row = grow(emb.block_row, np.arange(first_mean, first_mean + nb, dtype=np.int64))
        emb.block_scale = grow(emb.block_scale, np.ones(nb))
        emb.block_norm2 = grow(emb.block_norm2, norm2)
        emb.means = grow(emb.means, vectors)
        emb.image_norm2 = grow(emb.image_norm2, [total])
        emb.class_mask = grow(emb.class_mask, mask)
        emb.in_play = grow(emb.in_play, [True])
        emb.image_uncertainty = grow(emb.image_uncertainty, [0.0])
        emb.num_images += 1
        self._refresh()
        return emb.num_images - 1

    def init_centres(self, rows: np.ndarray) -> None:
        centres = check_image_indices(rows, self.emb, "labeled images")
        m = len(self.candidates)
        with _threads(self.threads):
            if self.prune and len(centres):
                self.centre_image[: len(centres)] = centres
                self.k = len(centres)
                index = _class_index(self.emb, centres)
                self.stats.evaluated += int(
                    _init_from_centres(
                        self.candidates,
                        centres,
                        *index,
                        self.min_d2,
                        self.nearest,
                        self.image_norm,
                        *self.csr,
                    )
                )
                self.stats.possible += len(centres) * m
            else:
                for c in centres:
                    self._add(int(c))
                    self.stats.possible += m

    def largest_norm(self) -> tuple[int, float]:
        p = int(np.argmax(self.emb.image_norm2[self.candidates]))  # first maximum: the earlier image
        return p, float(self.emb.image_norm2[self.candidates[p]])

    def _add(self, row: int) -> None:
        self.centre_image[self.k] = row
        self.stats.evaluated += int(
            _add_centre(
                row,
                self.k,
                self.candidates,
                self.active,
                self.min_d2,
                self.nearest,
                self.centre_image,
                self.needed,
                self.centre_dist,
                self.image_norm,
                self.prune,
                *self.csr,
            )
        )
        self.k += 1

    def add(self, row: int, max_d: float | None = None) -> None:
        check_image_indices(np.array([row]), self.emb, "centre")
        with _threads(self.threads):
            self._add(row)
        self.stats.possible += len(self.candidates) - self.taken

    def argmax(self) -> tuple[int, float]:
        p = int(_argmax_active(self.min_d2, self.active))
        return p, float(self.min_d2[p])

    def take(self, position: int) -> None:
        self.active[position] = False
        self.taken += 1

    def distances(self) -> np.ndarray:
        return np.where(self.active, self.min_d2, -1.0)

    def square_norms(self) -> np.ndarray:
        return self.emb.image_norm2[self.candidates]


def classwise_kcg(
    emb: ClasswiseEmbedding,
    candidates: np.ndarray,
    centres: np.ndarray,
    budget: int,
    progress: Progress | None = None,
    prune: bool = True,
    stats: dict[str, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact K-Center-Greedy (Algorithm 1) on class-wise embeddings.

    `candidates` are image indices in ascending (pool) order, `centres` the labeled images. Returns
    the picked image indices in pick order and each pick's Euclidean distance to the nearest centre
    at pick time (its norm for the first pick when there are no centres). `prune=False` computes
    every distance (for testing the pruning); `stats`, if given, receives the number of image
    distances computed (`distances`) and of those brute force would compute (`distances_unpruned`).
    """
    if budget < 0:
        raise SelectionError(f"--budget must be >= 0, not {budget}")
    centres = np.asarray(centres, dtype=np.int64)
    tracker = ClasswiseTracker(emb, candidates, len(centres) + budget, prune=prune)
    if budget > len(tracker.candidates):
        raise SelectionError(f"--budget {budget} exceeds the {len(tracker.candidates)} candidate images")
    result = k_center_greedy(tracker, centres, budget, progress)
    if stats is not None:
        stats["distances"] = tracker.stats.evaluated
        stats["distances_unpruned"] = tracker.stats.possible
    return tracker.candidates[result.positions], result.distances
