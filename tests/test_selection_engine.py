"""The fast paths of the selection engines, each forced on and checked against the float64 reference.

Each path is one way of not computing a distance: the int8 screen (and its fallback to float64 where it
cannot decide), buckets and their compaction, regrouping of rows, features reordered in place, threads,
the numpy engine for small problems, and the torch backend's float32 screen.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import dense_embeddings, kcg_reference, kmeanspp_reference

from uwe_cli.selection import _kernels as kern
from uwe_cli.selection import dense as engine
from uwe_cli.selection import small, torch_backend
from uwe_cli.selection.dense import CentreTracker, DenseEmbedding, as_weights, dense_kcg, dense_kmeanspp
from uwe_cli.selection.greedy import k_center_greedy
from uwe_cli.selection.strategies import badge_weights


def clustered(rng, n, d, k=6, spread=0.4):
    centres = rng.gamma(2.0, 1.0, size=(k, d))
    out = centres[rng.integers(0, k, n)] + spread * rng.standard_normal((n, d))
    return np.maximum(out, 0).astype(np.float32)


def split(rng, n, n_labeled):
    perm = rng.permutation(n)
    return np.sort(perm[n_labeled:]), np.sort(perm[:n_labeled])


@pytest.fixture
def every_path(monkeypatch):
    """Screen at any width, rows regrouped often, no spare slots (compaction on every move), threads."""
    monkeypatch.setattr(engine, "SCREEN_MIN_DIM", 1)
    monkeypatch.setattr(engine, "RELAYOUT_MIN_ELEMENTS", 0)
    monkeypatch.setattr(engine, "RELAYOUT_FIRST", 2)
    monkeypatch.setattr(engine, "RELAYOUT_FACTOR", 2)
    monkeypatch.setattr(engine, "SPARE_SLOTS", 0.0)
    monkeypatch.setattr(engine, "PARALLEL_MIN_WORK", 0)


def check_kcg(F, w, cand, lab, budget, **kw):
    ref_picks, ref_dist = kcg_reference(dense_embeddings(F, w), cand, lab, budget)
    res = dense_kcg(F, w, cand, lab, budget, **kw)
    np.testing.assert_array_equal(res.positions, ref_picks)
    np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12, atol=1e-12)
    return res


@pytest.mark.parametrize("n_labeled", [0, 5, 40])
@pytest.mark.parametrize("tau_weights", [False, True])
def test_every_fast_path_equals_reference(rng, every_path, n_labeled, tau_weights):
    F = clustered(rng, 800, 48, k=9)
    F[100:140] = F[:40]  # exact duplicates: D = 0 and distance ties
    w = rng.random(800) if tau_weights else None
    cand, lab = split(rng, 800, n_labeled)
    res = check_kcg(F, w, cand, lab, 300)
    assert res.stats.screened > 0  # the screen decided candidates
    assert res.stats.evaluated > 0  # and float64 decided the rest


def test_screen_that_cannot_decide_falls_back_to_float64(rng, monkeypatch):
    """An error bound too wide to prove anything leaves every decision to the exact float64 distance."""
    monkeypatch.setattr(engine, "SCREEN_MIN_DIM", 1)
    F = clustered(rng, 600, 40)
    cand, lab = split(rng, 600, 0)
    ref_picks, _ = kcg_reference(dense_embeddings(F, None), cand, lab, 120)

    real_build = kern.build_screen

    def loose(g, X, Q, qa, qr):
        real_build(g, X, Q, qa, qr)
        qr[:] = np.float32(1e30)  # the certified error as if it were huge

    monkeypatch.setattr(kern, "build_screen", loose)
    res = dense_kcg(F, None, cand, lab, 120)
    np.testing.assert_array_equal(res.positions, ref_picks)
    assert res.stats.screened == 0


def test_screen_keeps_float32_near_ties_for_float64(every_path):
    """Distances equal, or apart by far less than float32 resolution (integer grid, 300 dims, tiny offsets).

    Weights and offsets are powers of two, so every float64 distance is exact whatever the order of
    summation: the order must match the reference tie for tie.
    """
    rng = np.random.default_rng(3)
    F = rng.integers(0, 3, size=(500, 300)).astype(np.float32)
    F[::7] += np.float32(2.0**-20)  # offsets far below the screen's resolution
    u = 2.0 ** -rng.integers(0, 3, 500).astype(np.float64)
    cand, lab = split(rng, 500, 20)
    check_kcg(F, u, cand, lab, 200)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), exponent=st.integers(-44, 14), spread=st.floats(1e-6, 10.0))
def test_screen_bound_holds_at_any_scale(seed, exponent, spread):
    """Tiny (float32 underflow) to huge (past the screen's range) values: still the reference order."""
    rng = np.random.default_rng(seed)
    F = (clustered(rng, 150, 20, spread=spread) * np.float32(10.0**exponent)).astype(np.float32)
    if not np.isfinite(F).all() or (F.astype(np.float64) ** 2).sum(axis=1).max() > 1e300:
        return
    cand, lab = split(rng, 150, int(rng.integers(0, 20)))
    w = rng.random(150) ** float(rng.choice([1.0, 30.0]))  # weights down to float32 underflow, too
    saved = engine.SCREEN_MIN_DIM
    engine.SCREEN_MIN_DIM = 1
    try:
        check_kcg(F, w, cand, lab, 60)
        check_kcg(F, w, cand, lab, 60, backend="torch")
    finally:
        engine.SCREEN_MIN_DIM = saved


def test_kmeanspp_and_badge_on_every_path(rng, every_path):
    F = clustered(rng, 500, 24)
    w = rng.random(500)
    cand, lab = split(rng, 500, 30)
    for seed in (0, 1):
        got = dense_kmeanspp(F, as_weights(w, 500), cand, lab, 40, seed)
        np.testing.assert_array_equal(got, kmeanspp_reference(dense_embeddings(F, w), cand, lab, 40, seed))
    probs = rng.dirichlet(np.ones(4), 500).astype(np.float32)
    G = badge_weights(probs)  # K = 4: no screen, buckets and regrouping still on
    dense = (G[:, :, None] * F.astype(np.float64)[:, None, :]).reshape(500, -1)
    got = dense_kmeanspp(F, G, cand, lab, 40, 2)
    np.testing.assert_array_equal(got, kmeanspp_reference(dense, cand, lab, 40, 2))


@pytest.mark.parametrize("n_labeled", [0, 8, 50])
@pytest.mark.parametrize("weights", ["uwe", "badge", "read-only"])
def test_features_handed_over_are_reordered_in_place_with_the_same_result(
    rng, every_path, n_labeled, weights
):
    n = 700
    F = clustered(rng, n, 32)
    if weights == "badge":
        G = badge_weights(rng.dirichlet(np.ones(4), n).astype(np.float32))  # K = 4
        E = (G[:, :, None] * F.astype(np.float64)[:, None, :]).reshape(n, -1)
    else:
        G = as_weights(rng.random(n), n)
        E = dense_embeddings(F, G[:, 0])
    cand, lab = split(rng, n, n_labeled)
    cand = cand[cand % 11 != 0]  # excluded rows: neither candidates nor centres
    ref_picks, _ = kcg_reference(E, cand, lab, 150)
    mine, mine_g = F.copy(), G.copy()
    mine_g.flags.writeable = weights != "read-only"
    tracker = CentreTracker(DenseEmbedding(mine, mine_g, reorder=True), cand, lab.size + 150)
    res = k_center_greedy(tracker, lab, 150)
    np.testing.assert_array_equal(res.positions, ref_picks)
    rest = np.setdiff1d(np.arange(n), cand)
    m = cand.size
    # candidates in front (in the engine's order), every other row after them in row order, in place
    np.testing.assert_array_equal(mine[m:], F[rest])
    assert sorted(map(bytes, mine[:m])) == sorted(map(bytes, F[cand]))
    if weights == "read-only":
        np.testing.assert_array_equal(mine_g, G)  # left alone, copied instead
    else:  # the weights moved with their feature rows
        np.testing.assert_array_equal(mine_g[m:], G[rest])
        pairs = sorted(bytes(f) + bytes(g) for f, g in zip(mine[:m], mine_g[:m], strict=True))
        assert pairs == sorted(bytes(f) + bytes(g) for f, g in zip(F[cand], G[cand], strict=True))


def test_caller_features_are_left_alone_without_handover(rng, every_path):
    F = clustered(rng, 300, 16)
    before = F.copy()
    check_kcg(F, None, np.arange(300), np.empty(0, np.int64), 50)
    np.testing.assert_array_equal(F, before)


def test_one_centre_moving_most_candidates_compacts_instead_of_growing(rng, monkeypatch):
    """A far outlier first, then the bulk: the second centre takes nearly every candidate at once."""
    monkeypatch.setattr(engine, "SPARE_SLOTS", 0.1)
    F = clustered(rng, 400, 12)
    F[7] = 1e4  # largest norm: picked first, every other candidate is far from it
    tracker_sizes = []
    real_compact = CentreTracker._compact

    def spy(self, new_id=-1):
        tracker_sizes.append(self.D.size)
        real_compact(self, new_id)
        # the moved slots' norms are recomputed, bit for bit as at the start
        live = np.flatnonzero(self.D[: self.used] >= 0)
        rows = self.xrow[live].astype(np.int64)
        np.testing.assert_array_equal(self.norms[live], np.sqrt(kern.sq_norms(self.g, self.X, rows)))

    monkeypatch.setattr(CentreTracker, "_compact", spy)
    check_kcg(F, rng.random(400) + 0.5, np.arange(400), np.empty(0, np.int64), 100)
    assert tracker_sizes and len(set(tracker_sizes)) == 1  # compacted, never reallocated


def test_small_engine_equals_reference_and_is_chosen_for_small_work(rng):
    assert small.is_small(1000, 512, 100) and not small.is_small(20_000, 512, 2_000)
    F = clustered(rng, 400, 16)
    w = rng.random(400)
    cand, lab = split(rng, 400, 25)
    E = dense_embeddings(F, w)
    ref_picks, _ = kcg_reference(E, cand, lab, 60)
    tracker = small.NumpyTracker(DenseEmbedding(F, as_weights(w, 400)), cand, 85)
    np.testing.assert_array_equal(k_center_greedy(tracker, lab, 60).positions, ref_picks)
    got = dense_kmeanspp(F, as_weights(w, 400), cand, lab, 30, 4, backend="numpy")
    np.testing.assert_array_equal(got, kmeanspp_reference(E, cand, lab, 30, 4))


def test_torch_screen_decides_and_falls_back_exactly(rng, monkeypatch):
    F = clustered(rng, 500, 24)
    w = rng.random(500)
    cand, lab = split(rng, 500, 20)
    ref_picks, _ = kcg_reference(dense_embeddings(F, w), cand, lab, 80)
    res = dense_kcg(F, w, cand, lab, 80, backend="torch")
    np.testing.assert_array_equal(res.positions, ref_picks)
    assert res.stats.screened > 0
    import torch

    def undecided(self, rows, norms, D, E):  # a bound that proves nothing: float64 decides every candidate
        return torch.zeros(rows.numel(), dtype=torch.bool)

    monkeypatch.setattr(torch_backend.TorchCentreTracker, "_screened_out", undecided)
    res = dense_kcg(F, w, cand, lab, 80, backend="torch")
    np.testing.assert_array_equal(res.positions, ref_picks)
    assert res.stats.screened == 0


@pytest.mark.parametrize("strategy", ["uwe", "coreset", "kmeanspp"])
def test_select_pipeline_on_the_compiled_engine_equals_reference(
    tmp_path, rng, every_path, monkeypatch, strategy
):
    """`run_select` with the numba engine (features handed over and reordered), labeled and excluded rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from conftest import write_pool
    from reference import minmax

    from uwe_cli.select import run_select

    monkeypatch.setattr(small, "SMALL_WORK", 0)  # never the numpy engine
    n = 900
    F = clustered(rng, n, 40, k=8)
    u = rng.random(n).astype(np.float32)
    path = write_pool(tmp_path / "pool.parquet", F, u)
    parts = tmp_path / "parts"  # several files, several row groups each: the parallel reader's layout
    parts.mkdir()
    table = pq.read_table(path)
    for i, s in enumerate(range(0, n, 300)):
        pq.write_table(table.slice(s, 300), parts / f"part-{i}.parquet", row_group_size=70)
    labeled_rows, excluded_rows = np.arange(0, n, 17), np.arange(5, n, 29)
    (tmp_path / "lab.txt").write_text("".join(f"s{i:05d}\n" for i in labeled_rows))
    (tmp_path / "excl.txt").write_text("".join(f"s{i:05d}\n" for i in excluded_rows))
    res = run_select(
        [parts], 120, strategy=strategy, labeled=tmp_path / "lab.txt", exclude=tmp_path / "excl.txt", seed=7
    )
    in_play = np.ones(n, dtype=bool)
    in_play[np.setdiff1d(excluded_rows, labeled_rows)] = False
    cand = np.flatnonzero(in_play & ~np.isin(np.arange(n), labeled_rows))
    w = None if strategy == "coreset" else minmax(u.astype(np.float64), in_play)
    E = dense_embeddings(F, w)
    if strategy == "kmeanspp":
        picks = kmeanspp_reference(E, cand, labeled_rows, 120, 7)
    else:
        picks, _ = kcg_reference(E, cand, labeled_rows, 120)
    assert res.batch.ids == [f"s{i:05d}" for i in cand[picks]]
    assert pa.array(res.batch.ids).unique().to_pylist() == res.batch.ids


def test_parallel_reader_reports_the_first_bad_row_in_file_order(tmp_path, rng):
    """Row groups are decoded by several threads; the error is still the first problem in file order."""
    import pyarrow.parquet as pq
    from conftest import write_pool

    from uwe_cli.errors import PoolError
    from uwe_cli.pool import read_pool

    n = 600
    F = clustered(rng, n, 8)
    F[250, 3] = np.nan  # file 0, row group 3
    F[320, 0] = np.inf  # file 1, row group 0
    path = write_pool(tmp_path / "whole.parquet", F, rng.random(n))
    parts = tmp_path / "parts"
    parts.mkdir()
    table = pq.read_table(path)
    pq.write_table(table.slice(0, 300), parts / "part-0.parquet", row_group_size=60)
    pq.write_table(table.slice(300), parts / "part-1.parquet", row_group_size=60)
    with pytest.raises(PoolError, match="id 's00250'"):
        read_pool([parts])
    with pytest.raises(PoolError, match=r"part-1\.parquet: NaN or Inf in 'feature' of id 's00320'"):
        read_pool([parts / "part-1.parquet"])
    F[250, 3] = F[320, 0] = 1.0
    path = write_pool(tmp_path / "whole.parquet", F, rng.random(n))
    pq.write_table(pq.read_table(path), tmp_path / "groups.parquet", row_group_size=45)
    pool = read_pool([tmp_path / "groups.parquet"])
    assert pool.ids.to_pylist() == [f"s{i:05d}" for i in range(n)]
    np.testing.assert_array_equal(pool.features, F)


def near_tie_pool(rng, n, d):
    """Grid features under weights √u, u ∈ {0, ⅓, ⅔, 1}: many distances tie in exact arithmetic and are
    rounded apart differently by different summation orders; a tenth of the rows are duplicates."""
    F = rng.integers(0, 3, (n, d)).astype(np.float32)
    F[n // 2 : n // 2 + n // 10] = F[: n // 10]
    w = np.sqrt(rng.integers(0, 4, n) / 3)
    return F, w


@pytest.mark.parametrize("n_labeled", [0, 60])
@pytest.mark.parametrize("backend", ["numba", "numpy", "torch", "numba-unpruned"])
def test_near_ties_are_ordered_as_the_reference_by_every_engine(rng, every_path, backend, n_labeled):
    """Every engine agrees with the reference on distances within rounding of each other, so a larger
    budget only adds picks at the end."""
    F, w = near_tie_pool(rng, 800, 300)
    cand, lab = split(rng, 800, n_labeled)
    ref_picks, ref_dist = kcg_reference(dense_embeddings(F, w), cand, lab, 500)
    name, _, unpruned = backend.partition("-")
    res = dense_kcg(F, w, cand, lab, 500, backend=name, prune=not unpruned)
    np.testing.assert_array_equal(res.positions, ref_picks)
    np.testing.assert_allclose(res.distances, ref_dist, rtol=1e-12)
