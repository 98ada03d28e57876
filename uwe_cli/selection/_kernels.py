"""Numba kernels for exact distance-based selection.

An embedding row is the outer product ``G[r] ⊗ F[r]`` of a float64 weight vector (K values) and the
float32 feature row (d values), flattened to K·d. UWE and CoreSet use K = 1 (G = u^tau, or 1);
BADGE uses K classes (G = p − onehot(ŷ)). The embedding is computed on the fly in float64, so no
n × K·d matrix is ever stored and every distance equals the float64 reference bit for bit up to the
order of summation. Distances are squared Euclidean, summed as direct differences (no
‖x‖² + ‖y‖² − 2x·y cancellation).

Layout used by `dense.CentreTracker`:

- *rows*: the candidates' feature rows `X` (float32) and weights `g` (float64), regrouped rarely (a
  pass over the matrix).
- *slots*: one record per candidate (D, nearest centre `near`, embedding norm, position `orig` in the
  caller's candidate array, feature row `xrow`, and the int8 screen row `Q` with its scale `qa` and
  error bound `qr`), kept in *buckets*: bucket a (centre a) is the slot range
  ``start[a] : start[a] + count[a]``, sorted by D, largest first. Candidates that a new centre improves
  are copied to the end (its new bucket); the slot they leave is dead (D = -1) until the slots are
  compacted. A scan over a bucket, screen included, is therefore a sequential read (screen rows kept
  by feature row instead, read through `xrow`, made the ReLU benchmark 2× slower).
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir as _ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

# A new centre c cannot improve candidate i whose nearest centre is a when ‖c − a‖ ≥ 2·√D(i)
# (triangle inequality). On squared float64 values with relative error ~1e-13, this margin keeps
# the test conservative: a candidate is skipped only when the bound holds with room to spare.
PRUNE_MARGIN = 1.0 + 1e-9
# Relative slack on |‖x‖ − ‖c‖|² for the norm bound: norms carry float64 rounding too.
NORM_SLACK = 1e-12
# Every float64 sum that becomes a distance runs in an order written out in the code (`_lanes`: eight
# running lanes combined pairwise, then the tail), with no `fastmath`: with reassociation LLVM chose the
# order, and a parallel kernel loaded from numba's cache summed differently from the same kernel freshly
# compiled (last-bit differences between two runs of one command). The lanes keep the sums vectorisable.
# Only the int8 screen, whose certified bound holds for any order and which decides no value (just whether
# the exact distance is needed), may reassociate.
FASTMATH = {"reassoc", "nsz"}
# Distances are checked against their limit between blocks of this many features: the pass is
# memory-bound, so finer checks only add branch misses. Fixed trip counts let LLVM vectorise.
ABANDON_BLOCK = 128
# The int8 screen: each candidate's embedding as a32·q (q int8, one float32 scale a32 per row) with a
# float32 upper bound r on ‖x − a32·q‖. A float32 distance to the centre, with the rounding bound in
# `_screened_out`, proves most candidates out of reach from one byte per feature; exact float64 decides
# the rest. Rows whose values could overflow float32 squares get r = ∞ (never decided by the screen).
SCREEN_MAX_ABS = 1e15
F32_EPS = 2.0**-24
F32_TINY = 2.0**-126


# Rows an exact pass asks the memory for ahead of the one it computes. A bucket's slots point to feature
# rows scattered over the matrix (candidates moved there since the last regrouping); fetched on demand,
# each row costs a memory round trip, and the pass on 2M × 128 in random row order took 0.55 s instead
# of 0.10 s in order. Asked for 8 rows ahead: 0.27 s. Only the first block of a row is requested (the
# sum may stop there).
PREFETCH_AHEAD = 8
_PREFETCH = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 16 else "llvm.prefetch.p0i8"


@intrinsic
def _prefetch(typingctx, arr, i, j):  # pragma: no cover - compiled
    """Hint that A[i, j] will be read soon (LLVM's prefetch: read, high locality, data cache)."""
    sig = types.void(arr, i, j)

    def codegen(context, builder, signature, args):
        aryty = signature.args[0]
        ary = context.make_array(aryty)(context, builder, args[0])
        pairs = zip(args[1:], signature.args[1:], strict=True)
        index = [context.cast(builder, v, t, types.intp) for v, t in pairs]
        ptr = cgutils.get_item_pointer(context, builder, aryty, ary, index, wraparound=False)
        i8p, i32 = _ir.IntType(8).as_pointer(), _ir.IntType(32)
        fn = cgutils.get_or_insert_function(
            builder.module, _ir.FunctionType(_ir.VoidType(), [i8p, i32, i32, i32]), _PREFETCH
        )
        builder.call(fn, [builder.bitcast(ptr, i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, inline="always")
def _prefetch_slot(X, xrow, todo, q, m):  # pragma: no cover - compiled
    """Ask for the first block of the feature row of todo[q + PREFETCH_AHEAD], one cache line at a time."""
    if q + PREFETCH_AHEAD < m:
        r = xrow[todo[q + PREFETCH_AHEAD]]
        for j in range(0, min(X.shape[1], ABANDON_BLOCK), 16):
            _prefetch(X, r, j)


@njit(cache=True, inline="always")
def _lanes(ga, A, ra, gb, B, rb, j0, j1):  # pragma: no cover - compiled
    """Σ_{j0≤j<j1} (ga·A[ra, j] − gb·B[rb, j])² in a fixed order (gb·B[rb, j] is the centre's float64
    embedding value, the same product whether it is stored or formed here)."""
    a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
    j = j0
    while j + 8 <= j1:
        t0 = ga * A[ra, j] - gb * B[rb, j]
        t1 = ga * A[ra, j + 1] - gb * B[rb, j + 1]
        t2 = ga * A[ra, j + 2] - gb * B[rb, j + 2]
        t3 = ga * A[ra, j + 3] - gb * B[rb, j + 3]
        t4 = ga * A[ra, j + 4] - gb * B[rb, j + 4]
        t5 = ga * A[ra, j + 5] - gb * B[rb, j + 5]
        t6 = ga * A[ra, j + 6] - gb * B[rb, j + 6]
        t7 = ga * A[ra, j + 7] - gb * B[rb, j + 7]
        a0 += t0 * t0
        a1 += t1 * t1
        a2 += t2 * t2
        a3 += t3 * t3
        a4 += t4 * t4
        a5 += t5 * t5
        a6 += t6 * t6
        a7 += t7 * t7
        j += 8
    s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
    while j < j1:
        t = ga * A[ra, j] - gb * B[rb, j]
        s += t * t
        j += 1
    return s


@njit(cache=True, inline="always")
def _sq_dist(G, F, r, E, limit):  # pragma: no cover - compiled
    """‖G[r]⊗F[r] − E‖², stopping early once it reaches `limit` (the value is then only a lower bound).
    E is a K × d float64 embedding, seen as K rows with weight 1."""
    d = F.shape[1]
    s = 0.0
    for k in range(G.shape[1]):
        for j0 in range(0, d, ABANDON_BLOCK):
            s += _lanes(G[r, k], F, r, 1.0, E, k, j0, min(j0 + ABANDON_BLOCK, d))
            if s >= limit:
                return s
    return s


@njit(cache=True, inline="always")
def _sq_dist_centre(g, X, r, Cg, CX, a, limit):  # pragma: no cover - compiled
    """‖g[r]⊗X[r] − Cg[a]⊗CX[a]‖², summed exactly as `_sq_dist` with E = embed(Cg[a], CX[a]) (same
    products, same order, bit for bit), stopping once it reaches `limit`."""
    d = X.shape[1]
    s = 0.0
    for k in range(g.shape[1]):
        for j0 in range(0, d, ABANDON_BLOCK):
            s += _lanes(g[r, k], X, r, Cg[a, k], CX, a, j0, min(j0 + ABANDON_BLOCK, d))
            if s >= limit:
                return s
    return s


@njit(parallel=True, cache=True)
def sq_norms(G, F, rows):  # pragma: no cover - compiled
    """‖G[r]⊗F[r]‖² for each row (the distance to a zero centre, summed as every other distance)."""
    out = np.empty(rows.size, dtype=np.float64)
    zero = np.zeros((G.shape[1], F.shape[1]), dtype=np.float64)
    for t in prange(rows.size):
        if t + PREFETCH_AHEAD < rows.size:  # rows may be scattered (a compaction's moved slots)
            _prefetch(F, rows[t + PREFETCH_AHEAD], 0)
        out[t] = _sq_dist(G, F, rows[t], zero, np.inf)
    return out


@njit(cache=True)
def embed(g, f):
    """The float64 embedding g ⊗ f of one row as a K × d matrix."""
    E = np.empty((g.size, f.size), dtype=np.float64)
    for k in range(g.size):
        for j in range(f.size):
            E[k, j] = g[k] * f[j]
    return E


@njit(cache=True)
def permute_rows(A, perm, done):
    """A[i] = A_old[perm[i]] for i < perm.size, in place, following cycles with one row of scratch."""
    n = perm.size
    done[:n] = False
    tmp = np.empty(A.shape[1], dtype=A.dtype)
    for i in range(n):
        if done[i] or perm[i] == i:
            done[i] = True
            continue
        tmp[:] = A[i]
        j = i
        while True:
            k = perm[j]
            done[j] = True
            if k == i:
                A[j] = tmp
                break
            A[j] = A[k]
            j = k


@njit(parallel=True, cache=True)
def gather_scaled(g, src, rows, out):
    """out[i] = float32(g[rows[i], 0]) · src[rows[i]] in float32: the K = 1 embeddings FAISS searches."""
    d = src.shape[1]
    for i in prange(rows.size):
        r = rows[i]
        w = np.float32(g[r, 0])
        for j in range(d):
            out[i, j] = w * src[r, j]


@njit(parallel=True, cache=True)
def gather_rows(src, rows, out):
    """out[i] = src[rows[i]] (float32 rows), without numpy's temporary."""
    d = src.shape[1]
    for i in prange(rows.size):
        r = rows[i]
        for j in range(d):
            out[i, j] = src[r, j]


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def build_screen(g, X, Q, qa, qr):
    """Quantise every row's embedding g·x (K = 1) to int8 with a per-row scale and a certified error."""
    d = X.shape[1]
    for r in prange(X.shape[0]):
        w = g[r, 0]
        top = 0.0
        for j in range(d):
            v = abs(w * X[r, j])
            if v > top:
                top = v
        a = np.float32(top / 127.0)
        if top == 0.0 or top > SCREEN_MAX_ABS or a == 0.0:
            for j in range(d):
                Q[r, j] = 0
            qa[r] = 0.0
            qr[r] = 0.0 if top == 0.0 else np.inf
            continue
        a64 = np.float64(a)
        inv = 1.0 / a64
        err = 0.0
        for j in range(d):
            e = w * X[r, j]
            q = min(max(np.round(e * inv), -127.0), 127.0)
            Q[r, j] = np.int8(q)
            diff = e - a64 * q  # a64·q is exact in float64 (24 + 8 significant bits)
            err += diff * diff
        bound = np.sqrt(err) * (1.0 + 1e-9) + 1e-300
        r32 = np.float32(bound)
        if np.float64(r32) < bound:
            r32 = np.nextafter(r32, np.float32(np.inf))
        qa[r] = a
        qr[r] = r32


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _screen_sq(Q, qa, s, c32):
    """Σ (a32·q_j − c_j)² in float32 for slot s."""
    a = qa[s]
    q = Q[s]
    t = np.float32(0.0)
    for j in range(q.size):
        diff = a * np.float32(q[j]) - c32[j]
        t += diff * diff
    return t


def screen_constants(dim: int) -> tuple[float, float, float]:
    """(γ, A, η√d) of `_screened_out` for `dim` features: the relative error of a float32 sum of dim + 2
    rounded terms, and the absolute errors a float32 result near zero can carry (2^-126 per operation,
    which holds with gradual underflow and with flush-to-zero alike) in the sum and in the difference
    vector."""
    terms = dim + 2
    gamma = terms * F32_EPS / (1.0 - terms * F32_EPS)
    return gamma, (2 * dim + 2) * F32_TINY, 3.0 * F32_TINY * np.sqrt(dim)


@njit(cache=True, inline="always")
def _screened_out(t, d, norm_s, r_s, rc, bound):
    """True when the float32 screen value t proves ‖x − c‖² ≥ d (with the pruning margin).

    Float32 operations err by at most ε·|result| + η (ε = 2^-24, η = 2^-126). So the computed
    t ≤ (1 + γ)(‖δ‖² + A), δ being the computed difference vector, and
    ‖δ − (a·q − c32)‖ ≤ ε′(‖a·q‖ + ‖a·q − c32‖) + η√d with ε′ = ε(1 + ε) and ‖a·q‖ ≤ ‖x‖ + r. With
    ‖x − c‖ ≥ ‖a·q − c32‖ − r − ‖c − c32‖, ‖x − c‖ ≥ √(d·margin) holds when t ≥ (1 + γ)(B² + A) with
    B = (1 + ε′)(√(d·margin) + r + rc) + ε′(‖x‖ + r) + η√d. No division on the hot path.
    """
    gamma, tiny_sum, tiny_vec = bound
    eps1 = F32_EPS * (1.0 + F32_EPS)
    B = (1.0 + eps1) * (np.sqrt(d * PRUNE_MARGIN) + r_s + rc) + eps1 * (norm_s + r_s) + tiny_vec
    return np.float64(t) >= (1.0 + gamma) * (B * B + tiny_sum)


@njit(cache=True, inline="always")
def _bucket_cc(Cg, CX, Cnorm, a, E, cnorm, count, maxD, prune):
    """‖c − a‖² when bucket a is in reach of the new centre c, else -1."""
    if count[a] == 0:
        return -1.0
    md = maxD[a]
    if md <= 0.0:  # every live member sits on its centre (or none is live): nothing to improve
        return -1.0
    if not prune:
        return 0.0
    limit = 4.0 * md * PRUNE_MARGIN
    gap = Cnorm[a] - cnorm
    slack = NORM_SLACK * (Cnorm[a] + cnorm) * (Cnorm[a] + cnorm)
    if gap * gap >= limit + slack:
        return -1.0
    cc = _sq_dist(Cg, CX, a, E, limit)
    return -1.0 if cc >= limit else cc


@njit(cache=True)
def _gather_reach(cc_all, k, count, orphan, out_b, out_cc):
    m = 0
    if count[orphan] > 0:
        out_b[m] = orphan
        out_cc[m] = 0.0
        m += 1
    for a in range(k):
        if cc_all[a] >= 0.0:
            out_b[m] = a
            out_cc[m] = cc_all[a]
            m += 1
    return m


@njit(cache=True)
def reach(Cg, CX, Cnorm, k, E, cnorm, count, maxD, prune, orphan, out_b, out_cc, cc_all):
    """Buckets a new centre (embedding E, norm `cnorm`) might touch, with ‖c − a‖² for each.

    Bucket a is out of reach when ‖c − a‖ ≥ 2·√max D(a): by the triangle inequality no member can get
    closer to c than to a. The norm bound |‖c‖ − ‖a‖| ≤ ‖c − a‖ avoids most distance computations;
    distances are abandoned as soon as they clear the bound. The orphan bucket (candidates without a
    centre yet, D = ∞) is always in reach, with ‖c − a‖ = 0 (no pruning). `cc_all`: scratch, k long.
    """
    for a in range(k):
        cc_all[a] = _bucket_cc(Cg, CX, Cnorm, a, E, cnorm, count, maxD, prune)
    return _gather_reach(cc_all, k, count, orphan, out_b, out_cc)


@njit(parallel=True, cache=True)
def reach_parallel(Cg, CX, Cnorm, k, E, cnorm, count, maxD, prune, orphan, out_b, out_cc, cc_all):
    """As `reach`, across all threads."""
    for a in prange(k):
        cc_all[a] = _bucket_cc(Cg, CX, Cnorm, a, E, cnorm, count, maxD, prune)
    return _gather_reach(cc_all, k, count, orphan, out_b, out_cc)


@njit(cache=True)
def collect(start, count, buckets, nb, cc_of, D, todo):
    """The live slots of the buckets in reach that the new centre might improve.

    Buckets are sorted by D, largest first, so the triangle test ‖c − a‖² ≥ 4·D(i) holds for every
    member after the first one it holds for: the scan of a bucket stops there.
    """
    q = 0
    for r in range(nb):
        a = buckets[r]
        limit = cc_of[a]
        for s in range(start[a], start[a] + count[a]):
            d = D[s]
            if d < 0.0:  # dead slot
                continue
            if limit >= 4.0 * d * PRUNE_MARGIN:
                break
            todo[q] = s
            q += 1
    return q


@njit(cache=True, inline="always", fastmath=FASTMATH)
def _triage(norms, D, near, cc_of, s, cnorm, prune, Q, qa, qr, c32, rc, bound, screen):
    """0: a bound proves the new centre cannot improve slot s; 1: the int8 screen proves it; 2: only an
    exact distance can tell. `cc_of[a]` is ‖c − a‖² for the bucket a the slot belongs to (0 for the
    orphan bucket: no pruning)."""
    d = D[s]
    if d <= 0.0:  # on a centre already
        return 0
    if not prune:
        return 2
    a = near[s]
    cc = cc_of[a] if a >= 0 else 0.0
    if cc >= 4.0 * d * PRUNE_MARGIN:
        return 0
    gap = norms[s] - cnorm
    slack = NORM_SLACK * (norms[s] + cnorm) * (norms[s] + cnorm)
    if gap * gap >= d * PRUNE_MARGIN + slack:
        return 0
    if screen and _screened_out(_screen_sq(Q, qa, s, c32), d, norms[s], np.float64(qr[s]), rc, bound):
        return 1
    return 2


@njit(cache=True, fastmath=FASTMATH)
def triage(norms, D, near, cc_of, todo, m, cnorm, prune, Q, qa, qr, c32, rc, bound, screen, flags):
    """flags[q] = `_triage` of slot todo[q] (one thread). Kept apart from the exact distances: a loop
    holding both compiles to slower code for each."""
    for q in range(m):
        flags[q] = _triage(norms, D, near, cc_of, todo[q], cnorm, prune, Q, qa, qr, c32, rc, bound, screen)


@njit(parallel=True, cache=True, fastmath=FASTMATH)
def triage_parallel(norms, D, near, cc_of, todo, m, cnorm, prune, Q, qa, qr, c32, rc, bound, screen, flags):
    """As `triage`, across all threads."""
    for q in prange(m):
        flags[q] = _triage(norms, D, near, cc_of, todo[q], cnorm, prune, Q, qa, qr, c32, rc, bound, screen)


@njit(cache=True)
def keep_exact(todo, m, flags):
    """Move the slots flagged 2 to the front of `todo`; returns (how many, how many the screen decided)."""
    w = 0
    screened = 0
    for q in range(m):
        f = flags[q]
        if f == 2:
            todo[w] = todo[q]
            w += 1
        elif f == 1:
            screened += 1
    return w, screened


# Outer-product rows (BADGE, K > 1): ‖a − b‖² = ‖a‖² + ‖b‖² − 2(g_a·g_b)(f_a·f_b) costs K + d instead of
# K·d. The form cancels, so it serves only as a lower bound, lowered by this fraction of ‖a‖² + ‖b‖² (its
# rounding is ~1e-13 of it): a candidate it clears is skipped, any other gets the exact distance.
OUTER_SLACK = 1e-9


@njit(cache=True, inline="always")
def _outer_cleared(g, X, r, cg, cx, nr, csq, d):  # pragma: no cover - compiled
    """True when the O(K + d) bound proves ‖g[r]⊗X[r] − cg⊗cx‖² ≥ d (nr: the row's norm, csq: the
    centre's squared norm). Decides no value, only whether the exact distance is needed."""
    gg = 0.0
    for k in range(g.shape[1]):
        gg += g[r, k] * cg[k]
    ff = 0.0
    for j in range(X.shape[1]):
        ff += np.float64(X[r, j]) * np.float64(cx[j])
    nsq = nr * nr + csq
    return nsq - 2.0 * gg * ff - OUTER_SLACK * nsq >= d


@njit(cache=True, inline="always")
def _lower_slot(g, X, xrow, D, near, s, E, new_id, norms, cg, cx, csq):  # pragma: no cover - compiled
    """D[s] = min(D[s], exact float64 distance to E); 1 when it improved. For K > 1 a slot the
    outer-product bound clears is skipped (its D cannot change)."""
    d = D[s]
    r = xrow[s]
    if g.shape[1] > 1 and _outer_cleared(g, X, r, cg, cx, norms[s], csq, d):
        return 0
    v = _sq_dist(g, X, r, E, d)
    if v < d:
        D[s] = v
        near[s] = new_id
        return 1
    return 0


@njit(cache=True)
def lower_exact(g, X, xrow, D, near, todo, m, E, new_id, norms, cg, cx, csq):  # pragma: no cover - compiled
    """`_lower_slot` for the listed slots (one thread); returns how many improved."""
    improved = 0
    for q in range(m):
        _prefetch_slot(X, xrow, todo, q, m)
        improved += _lower_slot(g, X, xrow, D, near, todo[q], E, new_id, norms, cg, cx, csq)
    return improved


@njit(parallel=True, cache=True)
def lower_exact_parallel(g, X, xrow, D, near, todo, m, E, new_id, norms, cg, cx, csq):  # pragma: no cover
    """As `lower_exact`, across all threads (slots are distinct, so writes never collide)."""
    improved = 0
    for q in prange(m):
        _prefetch_slot(X, xrow, todo, q, m)
        improved += _lower_slot(g, X, xrow, D, near, todo[q], E, new_id, norms, cg, cx, csq)
    return improved


@njit(cache=True, inline="always")
def _better(d, s, best, bs, orig):
    """Is slot s (distance d) a better argmax than bs (distance best)? Ties go to the earlier candidate."""
    return d > best or (d == best and bs >= 0 and orig[s] < orig[bs])


@njit(cache=True)
def bucket_top(start, count, maxD, argslot, orig, D, a):
    """Drop bucket a's leading dead slots; its largest live D is then its first live slot (among ties:
    the earliest candidate)."""
    while count[a] > 0 and D[start[a]] < 0.0:
        start[a] += 1
        count[a] -= 1
    best = -1.0
    bs = -1
    for s in range(start[a], start[a] + count[a]):
        d = D[s]
        if d < 0.0:
            continue
        if bs >= 0 and d < best:
            break
        if _better(d, s, best, bs, orig):
            best = d
            bs = s
    maxD[a] = best
    argslot[a] = bs


@njit(cache=True, inline="always")
def _move(D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, src, dst):
    """Copy slot src's record to slot dst."""
    D[dst] = D[src]
    near[dst] = near[src]
    norms[dst] = norms[src]
    orig[dst] = orig[src]
    xrow[dst] = xrow[src]
    slot_of[orig[src]] = dst
    if screen:
        Q[dst] = Q[src]
        qa[dst] = qa[src]
        qr[dst] = qr[src]


@njit(cache=True)
def _sort_range(D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, lo, hi):
    """Sort the records of slots lo:hi by D, largest first (dead slots last)."""
    size = hi - lo
    keys = np.empty(size, dtype=np.float64)
    for j in range(size):
        keys[j] = -D[lo + j]
    order = np.argsort(keys)
    D[lo:hi] = D[lo:hi][order]
    near[lo:hi] = near[lo:hi][order]
    norms[lo:hi] = norms[lo:hi][order]
    orig[lo:hi] = orig[lo:hi][order]
    xrow[lo:hi] = xrow[lo:hi][order]
    for j in range(lo, hi):
        if D[j] >= 0.0:  # the orphan range may hold picked (dead) slots
            slot_of[orig[j]] = j
    if screen:
        permute_rows(Q[lo:hi], order, np.empty(size, dtype=np.bool_))
        qa[lo:hi] = qa[lo:hi][order]
        qr[lo:hi] = qr[lo:hi][order]


@njit(cache=True)
def apply(
    start,
    count,
    maxD,
    argslot,
    D,
    near,
    norms,
    orig,
    xrow,
    slot_of,
    Q,
    qa,
    qr,
    screen,
    buckets,
    nb,
    todo,
    m,
    used,
    new_id,
    orphan,
):
    """Move the slots the new centre improved to its bucket (appended at `used`, sorted by D) and mark the
    slots they leave dead; recompute the largest D of every bucket touched. Returns the new end."""
    end = used
    if nb == 1 and buckets[0] == orphan:
        # The first centre takes every candidate: relabel the orphan range in place.
        used = start[orphan]
        tail = used + count[orphan]
        count[orphan] = 0
    else:
        tail = used
        for q in range(m):
            s = todo[q]
            if near[s] == new_id:
                _move(D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, s, tail)
                D[s] = -1.0
                tail += 1
        end = tail
    if tail - used > 1:
        _sort_range(D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, used, tail)
    start[new_id] = used
    count[new_id] = tail - used
    for r in range(nb):
        bucket_top(start, count, maxD, argslot, orig, D, buckets[r])
    bucket_top(start, count, maxD, argslot, orig, D, new_id)
    return end


@njit(cache=True)
def best_bucket(maxD, argslot, count, orig, k, orphan):
    """The slot of largest D over all buckets (ties: the earliest candidate); -1 when none is live."""
    best = -1.0
    bs = -1
    for a in range(k):
        if count[a] > 0 and argslot[a] >= 0 and _better(maxD[a], argslot[a], best, bs, orig):
            best = maxD[a]
            bs = argslot[a]
    if count[orphan] > 0 and argslot[orphan] >= 0 and _better(maxD[orphan], argslot[orphan], best, bs, orig):
        bs = argslot[orphan]
    return bs


@njit(cache=True)
def earliest_at_least(maxD, start, count, D, orig, threshold):  # pragma: no cover
    """(position, D) of the earliest candidate whose live D ≥ threshold, (-1, -1) when none. Only
    buckets whose largest D reaches the threshold are read, each up to its first live D below it
    (live slots of a bucket are in descending D)."""
    best = -1
    best_d = -1.0
    for a in range(maxD.size):
        if maxD[a] < threshold:
            continue
        for s in range(start[a], start[a] + count[a]):
            d = D[s]
            if d < 0.0:
                continue
            if d < threshold:
                break
            if best < 0 or orig[s] < best:
                best = orig[s]
                best_d = d
    return best, best_d


@njit(cache=True)
def compact(
    start, count, maxD, argslot, D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, nbuckets, new_id
):
    """Squeeze the dead slots out, keeping every bucket's order. Buckets are taken in the order they sit
    in, so every live slot moves left (never over one not yet moved).

    With new_id ≥ 0, the slots a new centre improved (near == new_id, still in their old buckets) are set
    aside and appended after the others as bucket new_id, sorted by D: the way to apply a centre that
    moves more candidates than the spare room holds. Their norms are not set aside: the caller recomputes
    them (`sq_norms`). Returns the new end.
    """
    ids = np.empty(nbuckets, dtype=np.int64)
    m = 0
    for a in range(nbuckets):
        if count[a] > 0 and a != new_id:
            ids[m] = a
            m += 1
    starts = np.empty(m, dtype=np.int64)
    for i in range(m):
        starts[i] = start[ids[i]]
    by_pos = ids[:m][np.argsort(starts)]
    moved = 0
    if new_id >= 0:
        for a in by_pos:
            for s in range(start[a], start[a] + count[a]):
                if D[s] >= 0.0 and near[s] == new_id:
                    moved += 1
    # Set aside: 16 bytes a slot, 8 more for the sort (plus the screen's row). The second centre often
    # moves nearly the whole pool, so this is the peak of a run: nothing is kept that can be recomputed
    # (near is new_id for all of them, the norms come from the rows).
    aD = np.empty(moved)
    aorig = np.empty(moved, dtype=orig.dtype)
    axrow = np.empty(moved, dtype=xrow.dtype)
    held = moved if screen else 0
    aQ = np.empty((held, Q.shape[1]), dtype=Q.dtype)
    aqa = np.empty(held, dtype=qa.dtype)
    aqr = np.empty(held, dtype=qr.dtype)
    w = 0
    j = 0
    for a in by_pos:
        first = w
        for s in range(start[a], start[a] + count[a]):
            if D[s] < 0.0:
                continue
            if new_id >= 0 and near[s] == new_id:
                aD[j] = -D[s]  # negated: argsort below then gives the largest D first, in place
                aorig[j] = orig[s]
                axrow[j] = xrow[s]
                if screen:
                    aQ[j] = Q[s]
                    aqa[j] = qa[s]
                    aqr[j] = qr[s]
                j += 1
                continue
            if s != w:
                _move(D, near, norms, orig, xrow, slot_of, Q, qa, qr, screen, s, w)
            w += 1
        start[a] = first
        count[a] = w - first
        bucket_top(start, count, maxD, argslot, orig, D, a)
    if new_id >= 0:
        first = w
        for i in np.argsort(aD):
            D[w] = -aD[i]
            near[w] = new_id
            orig[w] = aorig[i]
            xrow[w] = axrow[i]
            slot_of[aorig[i]] = w
            if screen:
                Q[w] = aQ[i]
                qa[w] = aqa[i]
                qr[w] = aqr[i]
            w += 1
        start[new_id] = first
        count[new_id] = w - first
        bucket_top(start, count, maxD, argslot, orig, D, new_id)
    return w


@njit(parallel=True, cache=True)
def refine_knn(g, X, rows, Cg, CX, knn_idx, knn_sq32, tol, D, near, unsure):
    """Exact float64 nearest centre among FAISS's k float32 neighbours of each row; flag rows where a
    centre beyond them could be nearer.

    Neighbours come sorted by float32 distance and every float32 value is within `tol[t]` of the true one,
    so the scan stops at the first neighbour whose float32 distance minus tol exceeds the exact best so far.
    Centres outside the k returned have float32 squared distance ≥ knn_sq32[t, -1]; when that minus tol
    does not clear the exact best, the row is flagged for a full exact scan.
    """
    kk = knn_idx.shape[1]
    full = kk >= CX.shape[0]
    for t in prange(rows.size):
        r = rows[t]
        best = np.inf
        arg = -1
        for q in range(kk):
            a = knn_idx[t, q]
            if a < 0 or knn_sq32[t, q] - tol[t] > best:
                break
            s = _sq_dist_centre(g, X, r, Cg, CX, a, np.inf)
            if s < best or (s == best and a < arg):
                best = s
                arg = a
        D[t] = best
        near[t] = arg
        unsure[t] = (not full) and (knn_sq32[t, kk - 1] - tol[t] <= best)


@njit(parallel=True, cache=True)
def nearest_centre(g, X, rows, Cg, CX, D, near):
    """Exact nearest centre of each row by a full scan over the centres (ties: the lower centre index)."""
    for t in prange(rows.size):
        r = rows[t]
        best = np.inf
        arg = -1
        for a in range(CX.shape[0]):
            s = _sq_dist_centre(g, X, r, Cg, CX, a, best)
            if s < best:
                best = s
                arg = a
        D[t] = best
        near[t] = arg


@njit(cache=True)
def install(start, count, maxD, argslot, orig, D, nbuckets):
    """Bucket ranges and tops once slots are grouped by nearest centre (the labeled init)."""
    for a in range(nbuckets):
        bucket_top(start, count, maxD, argslot, orig, D, a)
