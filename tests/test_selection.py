"""Selection engines against brute-force float64 references: exact picks, every engine, adversarial pools."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from naive import k_center_greedy_naive
from reference import dense_embeddings, kcg_reference, kmeanspp_reference

from uwe_cli.embedding import normalize_uncertainty, uwe_weights
from uwe_cli.selection import dense as engine
from uwe_cli.selection.dense import CentreTracker, DenseEmbedding, as_weights
from uwe_cli.selection.dense import dense_kcg as k_center_greedy
from uwe_cli.selection.dense import dense_kmeanspp as kmeanspp_seeding
from uwe_cli.selection.strategies import badge_weights


def clustered(rng, n, d, k=6):
    centres = rng.gamma(2.0, 1.0, size=(k, d))
    return np.maximum(centres[rng.integers(0, k, n)] + 0.4 * rng.standard_normal((n, d)), 0).astype(
        np.float32
    )


def split(rng, n, n_labeled):
    perm = rng.permutation(n)
    return np.sort(perm[n_labeled:]), np.sort(perm[:n_labeled])


ENGINES = {
    "pruned": lambda F, w, c, lab, b: k_center_greedy(F, w, c, lab, b, prune=True),
    "unpruned": lambda F, w, c, lab, b: k_center_greedy(F, w, c, lab, b, prune=False),
    "no-faiss": lambda F, w, c, lab, b: k_center_greedy(F, w, c, lab, b, use_faiss=False),
    "naive": lambda F, w, c, lab, b: k_center_greedy_naive(F, w, c, lab, b, chunk_rows=97),
}


@pytest.mark.parametrize("engine_name", list(ENGINES))
@pytest.mark.parametrize("n_labeled", [0, 5, 60])
@pytest.mark.parametrize("tau", [0.0, 0.1, 1.0, 2.0])
def test_kcg_equals_reference(rng, engine_name, n_labeled, tau):
    n, d, budget = 700, 24, 40
    F = clustered(rng, n, d)
    u = rng.random(n)
    cand, lab = split(rng, n, n_labeled)
    w = uwe_weights(normalize_uncertainty(u, None, "minmax"), tau)
    ref_picks, ref_dist = kcg_reference(dense_embeddings(F, w), cand, lab, budget)
    res = ENGINES[engine_name](F, w, cand, lab, budget)
    np.testing.assert_array_equal(res.positions, ref_picks)
    np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12)


@pytest.mark.parametrize("engine_name", list(ENGINES))
def test_coreset_unweighted_equals_reference(rng, engine_name):
    F = clustered(rng, 500, 16)
    cand, lab = split(rng, 500, 30)
    ref_picks, _ = kcg_reference(dense_embeddings(F, None), cand, lab, 50)
    np.testing.assert_array_equal(ENGINES[engine_name](F, None, cand, lab, 50).positions, ref_picks)


def adversarial_pools(rng):
    n, d = 400, 8
    base = clustered(rng, 40, d)
    dup = base[rng.integers(0, 40, n)]  # every point has exact duplicates
    yield "duplicates", dup, rng.random(n)
    yield "equal-uncertainty", clustered(rng, n, d), np.full(n, 0.3)
    zeros = clustered(rng, n, d)
    zeros[::3] = 0.0
    yield "zero-vectors", zeros, rng.random(n)
    yield "zero-uncertainty-half", clustered(rng, n, d), np.where(rng.random(n) < 0.5, 0.0, rng.random(n))
    grid = rng.integers(0, 3, size=(n, d)).astype(np.float32)  # many exact distance ties
    yield "integer-grid", grid, rng.integers(0, 3, n).astype(float)


@pytest.mark.parametrize("engine_name", list(ENGINES))
@pytest.mark.parametrize("n_labeled", [0, 25])
@pytest.mark.parametrize("tau", [0.0, 1.0])
def test_adversarial_pools(engine_name, n_labeled, tau):
    rng = np.random.default_rng(7)
    for name, F, u in adversarial_pools(rng):
        cand, lab = split(rng, F.shape[0], n_labeled)
        w = uwe_weights(normalize_uncertainty(u, None, "minmax"), tau)
        budget = min(60, cand.size)
        ref_picks, ref_dist = kcg_reference(dense_embeddings(F, w), cand, lab, budget)
        res = ENGINES[engine_name](F, w, cand, lab, budget)
        np.testing.assert_array_equal(res.positions, ref_picks, err_msg=name)
        np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12, atol=1e-12, err_msg=name)


def test_budget_exhausts_all_candidates(rng):
    F = clustered(rng, 60, 4)
    F[10:20] = F[0]  # duplicates of a centre → D = 0, picked last in row order
    cand, lab = split(rng, 60, 5)
    ref_picks, _ = kcg_reference(dense_embeddings(F, None), cand, lab, cand.size)
    res = k_center_greedy(F, None, cand, lab, cand.size)
    np.testing.assert_array_equal(res.positions, ref_picks)
    assert sorted(res.positions) == list(range(cand.size))


def test_faiss_refinement_falls_back_to_full_scan(rng, monkeypatch):
    """When float32 k-NN cannot certify the nearest labeled centre, the exact full scan decides."""
    F = clustered(rng, 600, 12)
    F[100:200] = F[:100]  # every labeled point has an exact twin: k=2 neighbours tie and cannot certify
    cand, lab = np.arange(200, 600), np.arange(200)
    monkeypatch.setattr(engine, "KNN_NEIGHBOURS", 2)
    tracker = CentreTracker(DenseEmbedding(F, as_weights(None, 600)), cand, 200)
    tracker.init_centres(lab)
    E = dense_embeddings(F, None)
    expected = np.min(((E[cand][:, None, :] - E[lab][None, :, :]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(tracker.distances(), expected, rtol=1e-12, atol=1e-12)
    assert tracker.stats.unsure_rows > 0


def test_pruning_skips_work_but_not_results(rng):
    F = clustered(rng, 3000, 32, k=12)
    w = rng.random(3000)
    pruned = k_center_greedy(F, w, np.arange(3000), np.empty(0, np.int64), 200)
    full = k_center_greedy(F, w, np.arange(3000), np.empty(0, np.int64), 200, prune=False)
    np.testing.assert_array_equal(pruned.positions, full.positions)
    assert pruned.stats.skipped_fraction > 0.5
    assert full.stats.skipped_fraction == 0.0


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    n=st.integers(2, 80),
    d=st.integers(1, 6),
    n_labeled=st.integers(0, 20),
    n_excluded=st.integers(0, 10),
    budget_frac=st.floats(0.01, 1.0),
    tau=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    seed=st.integers(0, 2**31 - 1),
    grid=st.booleans(),
)
def test_kcg_invariants(n, d, n_labeled, n_excluded, budget_frac, tau, seed, grid):
    rng = np.random.default_rng(seed)
    F = (rng.integers(0, 3, (n, d)) if grid else rng.random((n, d)) * 5).astype(np.float32)
    u = rng.random(n)
    perm = rng.permutation(n)
    lab = np.sort(perm[: min(n_labeled, n - 1)])
    excl = perm[len(lab) : len(lab) + n_excluded]
    cand = np.setdiff1d(np.arange(n), np.concatenate([lab, excl]))
    if cand.size == 0:
        return
    budget = max(1, int(budget_frac * cand.size))
    w = uwe_weights(normalize_uncertainty(u, None, "minmax"), tau)
    res = k_center_greedy(F, w, cand, lab, budget)
    rows = cand[res.positions]
    assert len(set(rows.tolist())) == budget  # no duplicates
    assert not set(rows.tolist()) & set(lab.tolist())  # nothing labeled
    assert not set(rows.tolist()) & set(excl.tolist())  # nothing excluded
    if lab.size:
        assert np.all(np.diff(res.distances) <= 1e-12 * max(1.0, res.distances[0]))  # non-increasing
    else:
        assert np.all(np.diff(res.distances[1:]) <= 1e-12 * max(1.0, res.distances[0]))
    E = dense_embeddings(F, w)
    if lab.size:  # the first pick maximises the distance to the labeled set
        D0 = np.min(((E[cand][:, None] - E[lab][None]) ** 2).sum(-1), axis=1)
        assert D0[res.positions[0]] == D0.max()
    else:
        norms = (E[cand] ** 2).sum(1)
        assert norms[res.positions[0]] == norms.max()
    np.testing.assert_array_equal(res.positions, kcg_reference(E, cand, lab, budget)[0])


@pytest.mark.parametrize("n_labeled", [0, 20])
def test_kmeanspp_equals_dense_reference(rng, n_labeled):
    F = clustered(rng, 400, 10)
    w = rng.random(400)
    cand, lab = split(rng, 400, n_labeled)
    for seed in (0, 1, 2):
        got = kmeanspp_seeding(F, as_weights(w, 400), cand, lab, 30, seed)
        np.testing.assert_array_equal(got, kmeanspp_reference(dense_embeddings(F, w), cand, lab, 30, seed))


def test_badge_equals_dense_gradient_embedding_reference(rng):
    n, d, k = 300, 12, 5
    F = clustered(rng, n, d)
    logits = rng.standard_normal((n, k)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    G = badge_weights(probs)
    onehot = np.eye(k)[probs.argmax(1)]
    dense = ((probs.astype(np.float64) - onehot)[:, :, None] * F.astype(np.float64)[:, None, :]).reshape(
        n, -1
    )
    cand, lab = split(rng, n, 0)
    got = kmeanspp_seeding(F, G, cand, lab, 25, seed=3)
    np.testing.assert_array_equal(got, kmeanspp_reference(dense, cand, lab, 25, seed=3))


def outer_product_pool(rng, n, d, k, near_copies=40):
    """BADGE-style rows G ⊗ F, with near-copies of some rows (distances that cancel in ‖a‖² + ‖b‖² − 2ab)."""
    F = clustered(rng, n, d)
    src = rng.integers(0, n, near_copies)
    F[n - near_copies :] = F[src] * (1 + 1e-7 * rng.standard_normal((near_copies, d))).astype(np.float32)
    logits = rng.standard_normal((n, k)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    probs[n - near_copies :] = probs[src]
    G = badge_weights(probs)
    dense = (G[:, :, None] * F.astype(np.float64)[:, None, :]).reshape(n, -1)
    return F, G, dense


@pytest.mark.parametrize("n_labeled", [0, 10, 120])
@pytest.mark.parametrize("prune", [True, False])
def test_outer_product_rows_kcg_and_kmeanspp_equal_reference(rng, n_labeled, prune):
    """K > 1 rows use an O(K + d) lower bound to skip work and a GEMM proposal for the labeled set; both
    must leave the picks and distances of the full K·d computation unchanged."""
    F, G, dense = outer_product_pool(rng, 900, 20, 6)
    cand, lab = split(rng, 900, n_labeled)
    ref_picks, ref_dist = kcg_reference(dense, cand, lab, 60)
    res = k_center_greedy(F, G, cand, lab, 60, prune=prune)
    np.testing.assert_array_equal(res.positions, ref_picks)
    np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12)
    for seed in (0, 1):
        got = kmeanspp_seeding(F, G, cand, lab, 40, seed, prune=prune)
        np.testing.assert_array_equal(got, kmeanspp_reference(dense, cand, lab, 40, seed))


def init_equals_full_scan(F, w, cand, lab, rtol=1e-12, dense=None) -> CentreTracker:
    """The labeled set's nearest-centre distances through the fast init equal the exact scan bit for bit
    and a float64 full scan; the fast tracker, for its stats."""
    n = F.shape[0]
    fast = CentreTracker(DenseEmbedding(F, as_weights(w, n)), cand, lab.size)
    fast.init_centres(lab)
    exact = CentreTracker(DenseEmbedding(F, as_weights(w, n)), cand, lab.size)
    exact.use_faiss = False
    exact.init_centres(lab)
    np.testing.assert_array_equal(fast.distances(), exact.distances())
    E = dense_embeddings(F, w) if dense is None else dense
    full = np.min(((E[cand][:, None, :] - E[lab][None, :, :]) ** 2).sum(-1), axis=1)
    np.testing.assert_allclose(fast.distances(), full, rtol=rtol, atol=1e-300)
    return fast


def test_outer_product_labeled_distances_equal_full_scan(rng):
    """The labeled set's nearest-centre distances through the GEMM proposal equal an exact full scan."""
    F, G, dense = outer_product_pool(rng, 1500, 16, 5, near_copies=200)
    cand, lab = split(rng, 1500, 300)
    init_equals_full_scan(F, G, cand, lab, rtol=1e-10, dense=dense)


TORCH_ENGINES = {
    "torch-cpu-pruned": lambda F, w, c, lab, b: k_center_greedy(F, w, c, lab, b, backend="torch"),
    "torch-cpu-unpruned": lambda F, w, c, lab, b: k_center_greedy(
        F, w, c, lab, b, backend="torch", prune=False
    ),
}


@pytest.mark.parametrize("engine_name", list(TORCH_ENGINES))
@pytest.mark.parametrize("n_labeled", [0, 30])
def test_torch_backend_equals_reference(rng, engine_name, n_labeled):
    F = clustered(rng, 500, 16)
    w = uwe_weights(normalize_uncertainty(rng.random(500), None, "minmax"), 1.0)
    cand, lab = split(rng, 500, n_labeled)
    ref_picks, ref_dist = kcg_reference(dense_embeddings(F, w), cand, lab, 40)
    res = TORCH_ENGINES[engine_name](F, w, cand, lab, 40)
    np.testing.assert_array_equal(res.positions, ref_picks)
    np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12)


@pytest.mark.parametrize("n_labeled", [0, 25])
def test_torch_backend_adversarial(n_labeled):
    rng = np.random.default_rng(11)
    for name, F, u in adversarial_pools(rng):
        cand, lab = split(rng, F.shape[0], n_labeled)
        w = uwe_weights(normalize_uncertainty(u, None, "minmax"), 1.0)
        ref_picks, _ = kcg_reference(dense_embeddings(F, w), cand, lab, 50)
        got = k_center_greedy(F, w, cand, lab, 50, backend="torch")
        np.testing.assert_array_equal(got.positions, ref_picks, err_msg=name)


@pytest.mark.cuda
def test_torch_cuda_backend_equals_cpu(rng):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    F = clustered(rng, 2000, 32)
    w = rng.random(2000)
    cand, lab = split(rng, 2000, 50)
    cpu = k_center_greedy(F, w, cand, lab, 100)
    gpu = k_center_greedy(F, w, cand, lab, 100, backend="torch", device="cuda")
    np.testing.assert_array_equal(cpu.positions, gpu.positions)


def test_cuda_request_without_device_is_a_clear_error(rng):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    from uwe_cli.errors import ResourceError

    F = clustered(rng, 50, 4)
    with pytest.raises(ResourceError, match="no CUDA device"):
        k_center_greedy(F, None, np.arange(50), np.empty(0, np.int64), 3, backend="torch", device="cuda")


def test_kmeanspp_torch_backend_equals_numba(rng):
    F = clustered(rng, 300, 8)
    G = as_weights(rng.random(300), 300)
    cand, lab = split(rng, 300, 10)
    a = kmeanspp_seeding(F, G, cand, lab, 20, seed=5)
    b = kmeanspp_seeding(F, G, cand, lab, 20, seed=5, backend="torch")
    np.testing.assert_array_equal(a, b)


def test_naive_gemm_init_matches_reference_on_random_pool(rng):
    F = clustered(rng, 400, 12)
    w = rng.random(400)
    cand, lab = split(rng, 400, 40)
    ref_picks, _ = kcg_reference(dense_embeddings(F, w), cand, lab, 30)
    got = k_center_greedy_naive(F, w, cand, lab, 30, gemm_init=True)
    np.testing.assert_array_equal(got.positions, ref_picks)


KERNEL_PROBE = """
import hashlib, numpy as np
from uwe_cli.selection import _kernels as kern
rng = np.random.default_rng(1)
n, d = 3000, 200
F = rng.random((n, d), dtype=np.float32) * 3
G = rng.random((n, 2))
E = kern.embed(G[7], F[7])
rows = np.arange(n, dtype=np.int64)
norms = np.sqrt(kern.sq_norms(G, F, rows))
out = []
for fn in (kern.lower_exact, kern.lower_exact_parallel):
    D = np.full(n, np.inf); near = np.full(n, -1, np.int32)
    fn(G, F, rows, D, near, rows, n, E, 0, norms, G[7], F[7], float((E * E).sum()))
    out.append(D)
centres = np.array([7, 100, 300])
D3 = np.empty(n); near3 = np.empty(n, np.int32)
kern.nearest_centre(G, F, rows, G[centres], F[centres], D3, near3)
D1 = np.empty(n); near1 = np.empty(n, np.int32)
kern.nearest_centre(G, F, rows, G[[7]], F[[7]], D1, near1)
out += [D3, D1, kern.sq_norms(G, F, rows)]
print(" ".join(hashlib.sha256(a.tobytes()).hexdigest() for a in out))
"""


def test_kernels_sum_the_same_way_compiled_fresh_or_from_cache(tmp_path):
    """The same distances from a freshly compiled kernel and from numba's cache, serial or parallel.

    With fastmath reassociation a cached parallel kernel summed in another order than the fresh one,
    so two runs of one command could differ in the last bit (seen on a 1M-row pool)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    runs = [
        subprocess.run(
            [sys.executable, "-c", KERNEL_PROBE], env=env, capture_output=True, text=True, check=True
        )
        for _ in range(2)
    ]
    fresh, cached = (r.stdout.split() for r in runs)
    assert fresh == cached
    assert fresh[0] == fresh[1]  # serial and parallel update
    assert fresh[0] == fresh[3]  # a stored centre embedding and one formed on the fly: the same sums


def test_labeled_init_certifies_rows_of_small_weight(rng):
    """Rows whose uncertainty weight is tiny sit near the origin, where FAISS's float32 error (relative to
    the largest centre norm) dwarfs their distances; the per-band norm bound still certifies most of
    them, and every distance equals an exact full scan, twins and ties included."""
    F = clustered(rng, 3000, 24, k=10)
    F[2000:2050] = F[:50]  # candidates with a labeled twin: distance 0
    w = rng.random(3000) ** 4  # many weights near zero
    w[2050:2100] = w[:50]
    cand, lab = np.arange(500, 3000), np.arange(500)
    fast = init_equals_full_scan(F, w, cand, lab)
    assert fast.stats.unsure_rows < 0.05 * cand.size
    ref_picks, _ = kcg_reference(dense_embeddings(F, w), cand, lab, 60)
    np.testing.assert_array_equal(k_center_greedy(F, w, cand, lab, 60).positions, ref_picks)


@pytest.mark.parametrize(("seed", "block"), [(2, 7), (256, 512)])
def test_labeled_init_searches_a_window_of_norms(rng, monkeypatch, seed, block):
    """The labeled-set search visits only centres whose norms are within reach of a block of candidates;
    with weights spread over orders of magnitude that is a fraction of the candidates × labeled product,
    and the distances still equal an exact full scan (tiny seeds and blocks: windows narrower than the k
    neighbours, merged sides, gaps on both sides)."""
    monkeypatch.setattr(engine, "NORM_SEED", seed)
    monkeypatch.setattr(engine, "NORM_BLOCK_ROWS", block)
    F = clustered(rng, 4000, 16, k=8)
    w = 10.0 ** rng.uniform(-3, 0, 4000)
    F[3000:3040] = F[:40]  # labeled twins among the candidates
    w[3000:3040] = w[:40]
    cand, lab = np.arange(800, 4000), np.arange(800)
    fast = init_equals_full_scan(F, w, cand, lab)
    assert fast.stats.labeled_pairs < 0.5 * cand.size * lab.size
    assert fast.stats.unsure_rows < 0.05 * cand.size


def test_labeled_init_windows_of_every_size(monkeypatch):
    """Many small random pools, few neighbours, tiny seeds and blocks: windows of fewer, exactly as many
    and more centres than neighbours, with or without sides; every distance equals the exact scan."""
    monkeypatch.setattr(engine, "KNN_NEIGHBOURS", 3)
    monkeypatch.setattr(engine, "NORM_SEED", 1)
    for seed in range(60):
        rng = np.random.default_rng(seed)
        n, L = int(rng.integers(30, 80)), int(rng.integers(4, 12))
        monkeypatch.setattr(engine, "NORM_BLOCK_ROWS", int(rng.integers(1, 9)))
        F = rng.normal(size=(n, 3)).astype(np.float32)
        w = 10.0 ** rng.uniform(-2, 0, n)
        if seed % 3 == 0:
            F[L : 2 * L] = F[:L]  # twins of the labeled rows
            w[L : 2 * L] = w[:L]
        init_equals_full_scan(F, w, np.arange(L, n), np.arange(L))


class _FuzzyKnn:
    """A float32 k-NN search as bad as its error bound allows: every value off by up to 1e-6 of the norms
    involved (the certificate allows 1e-5), neighbours ordered by those values. It checks the
    certificate, not FAISS."""

    def __init__(self, rng):
        self.rng = rng

    def knn(self, xq, xb, k):
        q, b = xq.astype(np.float64), xb.astype(np.float64)
        true = ((q[:, None, :] - b[None]) ** 2).sum(-1)
        scale = (q**2).sum(1)[:, None] + (b**2).sum(1)[None, :]
        noisy = true + self.rng.uniform(-1e-6, 1e-6, true.shape) * scale
        idx = np.argsort(noisy, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(noisy, idx, axis=1).astype(np.float32), idx


@pytest.mark.parametrize("labeled", [20, 60])
def test_labeled_init_holds_for_any_search_within_its_error(rng, monkeypatch, labeled):
    """Far from the origin float32 cannot order a tight group of labeled units, so the nearest may be
    listed last, in windows of exactly k units (20 labeled) or more (60): every candidate still gets its
    exact distance."""
    monkeypatch.setattr(engine, "_faiss", lambda: _FuzzyKnn(rng))
    d = 3
    group = 1000.0 + rng.uniform(0, 0.01, size=(16, d))  # the 16 smallest-norm labeled units
    far = 3000.0 + rng.uniform(0, 1, size=(labeled - 16, d))
    cands = 999.0 + rng.uniform(0, 0.02, size=(400, d))  # norms below every labeled unit
    F = np.concatenate([group, far, cands]).astype(np.float32)
    init_equals_full_scan(F, None, np.arange(labeled, labeled + 400), np.arange(labeled))


def test_norm_band_bound_is_a_lower_bound(rng):
    """`_norm_band_bound` never exceeds the true squared distance to a centre whose float32 distance is at
    least the given last value."""
    C = rng.normal(size=(300, 8)) * rng.random((300, 1)) ** 3
    Q = rng.normal(size=(500, 8)) * rng.random((500, 1)) ** 3
    true = ((Q[:, None, :] - C[None]) ** 2).sum(-1)
    rel = 1e-5
    cn = np.sort(np.linalg.norm(C, axis=1))
    edges = np.linspace(0, 300, 17).astype(int)
    bands = np.stack([cn[edges[:-1]], cn[edges[1:] - 1]], axis=1)
    qn = np.linalg.norm(Q, axis=1)
    # Worst case allowed for float32: every centre's value is as low as its error bound lets it be.
    approx = true - rel * (qn[:, None] ** 2 + np.linalg.norm(C, axis=1)[None] ** 2)
    last = np.sort(approx, axis=1)[:, 3]
    bound = engine._norm_band_bound(qn, last, rel, bands)
    beyond = approx >= last[:, None]
    assert (bound[:, None] <= np.where(beyond, true, np.inf) * (1 + 1e-12)).all()
    assert (bound > last - rel * (qn**2 + cn[-1] ** 2)).mean() > 0.5  # tighter than the global bound
