"""Detection pools and class-wise KCG against a dense float64 brute force built from the raw rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import first_within_rounding

from uwe_cli.errors import PoolError, SelectionError
from uwe_cli.pool import DetectionPool, is_detection_pool, read_detection_pool
from uwe_cli.selection.classwise import build_classwise, classwise_kcg, to_dense

Row = dict  # {"id": str, "label": int | None, "bvsb": float | None, "feature": list[float] | None, ...}


# ---------------------------------------------------------------------------------------------
# Pool fixtures


def write_pool(
    path: Path,
    rows: list[Row],
    dim: int | None,
    num_classes: int | None = None,
    fixed: bool = True,
    metadata: dict | None = None,
) -> Path:
    """A detection pool file from explicit rows (missing keys are written as nulls)."""
    feature_type = pa.list_(pa.float32(), dim) if fixed else pa.list_(pa.float32())
    columns: dict[str, pa.Array] = {
        "id": pa.array([r["id"] for r in rows], pa.string()),
        "label": pa.array([r.get("label") for r in rows], pa.int32()),
        "score": pa.array(
            [r.get("score", 0.9 if r.get("label") is not None else None) for r in rows], pa.float32()
        ),
        "bvsb": pa.array([r.get("bvsb") for r in rows], pa.float32()),
        "entropy": pa.array([r.get("entropy", r.get("bvsb")) for r in rows], pa.float32()),
        "feature": pa.array([r.get("feature") for r in rows], feature_type),
        "source": pa.array([r.get("source", f"/data/{r['id']}.jpg") for r in rows], pa.string()),
    }
    for key in {k for r in rows for k in r} - set(columns):
        columns[key] = pa.array([r.get(key) for r in rows])
    meta = {"schema": 1, "task": "detection", **({"num_classes": num_classes} if num_classes else {})}
    meta.update(metadata or {})
    table = pa.table(columns).replace_schema_metadata({"uwe": json.dumps(meta)})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def random_rows(
    rng: np.random.Generator,
    n_images: int,
    num_classes: int,
    dim: int,
    max_boxes: int = 4,
    n_duplicates: int = 0,
    shuffle: bool = False,
) -> list[Row]:
    """Images with 0..max_boxes boxes (several per class possible), plus exact duplicate images."""
    images: list[list[Row]] = []
    for i in range(n_images):
        k = int(rng.integers(0, max_boxes + 1))
        if k == 0:
            images.append([{"id": f"im{i}"}])
            continue
        boxes = []
        for _ in range(k):
            boxes.append(
                {
                    "id": f"im{i}",
                    "label": int(rng.integers(0, num_classes)),
                    "bvsb": float(np.float32(rng.uniform(0.01, 1.0))),
                    "feature": rng.standard_normal(dim).astype(np.float32).tolist(),
                }
            )
        images.append(boxes)
    for j in range(n_duplicates):
        src = images[int(rng.integers(0, n_images))]
        images.append([{**r, "id": f"dup{j}"} for r in src])
    rows = [r for img in images for r in img]
    if shuffle:  # an image's rows need not be contiguous
        rows = [rows[i] for i in rng.permutation(len(rows))]
    return rows


# ---------------------------------------------------------------------------------------------
# Brute-force reference: dense K×d embeddings in float64 straight from the rows, plain Algorithm 1


def reference_embeddings(
    rows: list[Row],
    num_classes: int,
    dim: int,
    in_play: set[str] | None,
    tau: float,
    normalize: str,
    aggregate: str,
) -> tuple[list[str], np.ndarray]:
    ids = list(dict.fromkeys(r["id"] for r in rows))
    play = set(ids) if in_play is None else in_play
    boxes = [r for r in rows if r.get("label") is not None and r["id"] in play]
    u = np.array([np.float32(r["bvsb"]) for r in boxes], dtype=np.float64)
    if normalize == "minmax" and len(u):
        u = np.ones_like(u) if u.max() == u.min() else (u - u.min()) / (u.max() - u.min())
    emb = {id_: np.zeros(num_classes * dim) for id_ in ids}
    groups: dict[tuple[str, int], list[int]] = {}
    for b, r in enumerate(boxes):
        groups.setdefault((r["id"], r["label"]), []).append(b)
    for (id_, c), members in groups.items():
        vectors = np.stack(
            [u[b] ** tau * np.asarray(boxes[b]["feature"], np.float32).astype(np.float64) for b in members]
        )
        if aggregate == "max":
            best = max(members, key=lambda b: (u[b], -b))  # largest u, then the earlier row
            block = vectors[members.index(best)]
        else:
            block = vectors.sum(axis=0) / len(members)
        emb[id_][c * dim : (c + 1) * dim] = block
    return ids, np.stack([emb[i] for i in ids])


def reference_kcg(
    x: np.ndarray, candidates: np.ndarray, centres: np.ndarray, budget: int
) -> tuple[list, list]:
    def dist2(c: int) -> np.ndarray:
        return ((x[candidates] - x[c]) ** 2).sum(axis=1)

    min_d2 = np.full(len(candidates), np.inf)
    for c in centres:
        min_d2 = np.minimum(min_d2, dist2(c))
    picked = np.zeros(len(candidates), dtype=bool)
    picks, distances = [], []
    for t in range(budget):
        if t == 0 and len(centres) == 0:
            norms = (x[candidates] ** 2).sum(axis=1)
            p = first_within_rounding(norms, x.shape[1])
            d = norms[p]
        else:
            masked = np.where(picked, -1.0, min_d2)
            p = first_within_rounding(masked, x.shape[1])
            d = masked[p]
        picked[p] = True
        picks.append(int(candidates[p]))
        distances.append(float(np.sqrt(d)))
        min_d2 = np.minimum(min_d2, dist2(candidates[p]))
    return picks, distances


def select(
    pool: DetectionPool, labeled: list[int], budget: int, tau: float, aggregate: str, normalize="minmax"
):
    labeled_arr = np.array(sorted(labeled), dtype=np.int64)
    candidates = np.setdiff1d(np.arange(pool.num_images), labeled_arr)
    emb = build_classwise(pool, None, tau=tau, normalize=normalize, aggregate=aggregate)
    return emb, candidates, labeled_arr, classwise_kcg(emb, candidates, labeled_arr, budget)


# ---------------------------------------------------------------------------------------------
# KCG equals brute force


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("tau", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("with_labeled", [False, True])
def test_kcg_equals_dense_bruteforce(tmp_path, aggregate, tau, with_labeled):
    rng = np.random.default_rng(int(tau * 10) + 7 * with_labeled + (aggregate == "mean"))
    num_classes, dim = 5, 6
    rows = random_rows(rng, 70, num_classes, dim, n_duplicates=6, shuffle=True)
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, dim, num_classes))
    labeled = sorted(rng.choice(pool.num_images, 8, replace=False).tolist()) if with_labeled else []
    emb, candidates, centres, (picks, distances) = select(pool, labeled, 30, tau, aggregate)

    ids, dense = reference_embeddings(rows, num_classes, dim, None, tau, "minmax", aggregate)
    assert ids == pool.image_ids.to_pylist()
    np.testing.assert_allclose(to_dense(emb), dense, rtol=1e-12, atol=1e-12)
    ref_picks, ref_distances = reference_kcg(dense, candidates, centres, 30)
    np.testing.assert_array_equal(picks, ref_picks)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_in_play_subset_renormalises_and_matches(tmp_path, aggregate):
    rng = np.random.default_rng(3)
    num_classes, dim = 4, 5
    rows = random_rows(rng, 60, num_classes, dim, n_duplicates=3)
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, dim, num_classes))
    ids = pool.image_ids.to_pylist()
    in_play = rng.random(pool.num_images) < 0.6
    emb = build_classwise(pool, in_play, tau=1.0, aggregate=aggregate)
    play_idx = np.flatnonzero(in_play)
    centres, candidates = play_idx[:5], play_idx[5:]
    picks, distances = classwise_kcg(emb, candidates, centres, 15)

    _, dense = reference_embeddings(
        rows, num_classes, dim, {ids[i] for i in play_idx}, 1.0, "minmax", aggregate
    )
    np.testing.assert_allclose(to_dense(emb, play_idx), dense[play_idx], rtol=1e-12, atol=1e-12)
    ref_picks, ref_distances = reference_kcg(dense, candidates, centres, 15)
    np.testing.assert_array_equal(picks, ref_picks)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-10)
    assert np.isnan(emb.image_uncertainty[~in_play]).all()
    with pytest.raises(SelectionError, match="out of play"):
        classwise_kcg(emb, np.flatnonzero(~in_play), centres, 1)


def test_normalize_none_and_constant_uncertainty(tmp_path):
    rng = np.random.default_rng(5)
    rows = random_rows(rng, 40, 3, 4)
    for r in rows:
        if r.get("label") is not None:
            r["bvsb"] = 0.25  # max == min: normalised u is 1 everywhere
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 4, 3))
    for normalize in ("minmax", "none"):
        emb, candidates, centres, (picks, _) = select(pool, [0, 1], 10, 1.0, "max", normalize)
        _, dense = reference_embeddings(rows, 3, 4, None, 1.0, normalize, "max")
        np.testing.assert_allclose(to_dense(emb), dense, rtol=1e-12)
        np.testing.assert_array_equal(picks, reference_kcg(dense, candidates, centres, 10)[0])
    assert set(np.unique(build_classwise(pool).image_uncertainty)) <= {0.0, 1.0}


def test_empty_images_and_duplicates_tie_to_earlier(tmp_path):
    """All-empty candidates tie at distance ‖0 − centre‖; duplicates of a centre sit at 0."""
    f = [1.0, 2.0]
    rows = [
        {"id": "a", "label": 0, "bvsb": 0.5, "feature": f},
        {"id": "e1"},
        {"id": "b", "label": 0, "bvsb": 0.5, "feature": f},  # duplicate of a
        {"id": "e2"},
        {"id": "c", "label": 1, "bvsb": 0.2, "feature": [0.0, 1.0]},
    ]
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 2, 2))
    emb = build_classwise(pool, tau=0.0)
    picks, distances = classwise_kcg(emb, np.array([1, 2, 3, 4]), np.array([0]), 4)
    # c is at √(5 + 1) from a; then the empty e1, e2 are at ‖c‖ = 1 (tie: e1); then b (a duplicate of
    # the centre a) and e2 (a duplicate of e1) both sit at 0 (tie: b).
    assert picks.tolist() == [4, 1, 2, 3]
    np.testing.assert_array_equal(picks, reference_kcg(to_dense(emb), np.arange(1, 5), np.array([0]), 4)[0])
    np.testing.assert_allclose(distances, [math.sqrt(6), 1.0, 0.0, 0.0])
    # Without labeled images the first pick is the largest norm, reported as that norm.
    picks, distances = classwise_kcg(emb, np.arange(5), np.array([], dtype=np.int64), 2)
    assert picks.tolist() == [0, 4] and distances[0] == pytest.approx(math.sqrt(5))
    np.testing.assert_array_equal(emb.image_uncertainty, [1.0, 0.0, 1.0, 0.0, 0.0])


def test_max_picks_most_uncertain_box_and_earlier_on_ties(tmp_path):
    rows = [
        {"id": "a", "label": 1, "bvsb": 0.2, "feature": [1.0, 0.0]},
        {"id": "a", "label": 1, "bvsb": 0.9, "feature": [0.0, 3.0]},
        {"id": "a", "label": 1, "bvsb": 0.9, "feature": [5.0, 5.0]},  # ties with the row above
        {"id": "a", "label": 0, "bvsb": 0.1, "feature": [2.0, 2.0]},
    ]
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 2))
    dense = to_dense(build_classwise(pool, tau=1.0, aggregate="max"))
    np.testing.assert_allclose(dense, [[0.0, 0.0, 0.0, 3.0]])  # class 0 box has u = 0 after min–max
    dense = to_dense(build_classwise(pool, tau=0.0, aggregate="mean"))
    np.testing.assert_allclose(dense, [[2.0, 2.0, 2.0, 8.0 / 3.0]])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_exact_arithmetic_and_invariants(tmp_path, data):
    """Small-integer features and dyadic u make every `max` distance exact: massive ties, same picks."""
    num_classes = data.draw(st.integers(1, 4))
    dim = data.draw(st.integers(1, 3))
    n_images = data.draw(st.integers(2, 14))
    rows: list[Row] = []
    for i in range(n_images):
        n_boxes = data.draw(st.integers(0, 3))
        if n_boxes == 0:
            rows.append({"id": f"i{i}"})
        for _ in range(n_boxes):
            feature = data.draw(st.lists(st.integers(-2, 2), min_size=dim, max_size=dim))
            label = data.draw(st.integers(0, num_classes - 1))
            u = data.draw(st.sampled_from([0.0, 0.5, 1.0, 2.0]))
            rows.append({"id": f"i{i}", "label": label, "bvsb": u, "feature": [float(v) for v in feature]})
    tau = data.draw(st.sampled_from([0.0, 1.0, 2.0]))
    aggregate = data.draw(st.sampled_from(["max", "mean"]))
    pool = read_detection_pool(write_pool(tmp_path / "h.parquet", rows, dim, num_classes))
    n = pool.num_images
    labeled = sorted(data.draw(st.sets(st.integers(0, n - 1), max_size=n - 1)))
    budget = data.draw(st.integers(0, n - len(labeled)))
    emb, candidates, centres, (picks, distances) = select(pool, labeled, budget, tau, aggregate, "none")

    _, dense = reference_embeddings(rows, num_classes, dim, None, tau, "none", aggregate)
    np.testing.assert_allclose(to_dense(emb), dense, rtol=1e-15)
    ref_picks, ref_distances = reference_kcg(dense, candidates, centres, budget)
    if aggregate == "max":  # exact arithmetic: identical ties, identical picks
        np.testing.assert_array_equal(to_dense(emb), dense)
        np.testing.assert_array_equal(picks, ref_picks)
        np.testing.assert_array_equal(distances, ref_distances)
    # Invariants: unique candidates; distances fall after the first pick; each distance is the
    # distance to the nearest earlier centre; pruning changes nothing, bit for bit.
    assert len(set(picks.tolist())) == budget and set(picks.tolist()) <= set(candidates.tolist())
    assert (np.diff(distances[1:]) <= 1e-12).all()
    x = to_dense(emb)
    for t, pick in enumerate(picks):
        earlier = np.concatenate([centres, picks[:t]]).astype(np.int64)
        expected = (
            np.sqrt(((x[earlier] - x[pick]) ** 2).sum(axis=1)).min()
            if len(earlier)
            else math.sqrt((x[pick] ** 2).sum())
        )
        assert distances[t] == pytest.approx(expected, rel=1e-12, abs=1e-12)
    unpruned = classwise_kcg(emb, candidates, centres, budget, prune=False)
    np.testing.assert_array_equal(unpruned[0], picks)
    np.testing.assert_array_equal(unpruned[1], distances)


@pytest.mark.parametrize("aggregate", ["max", "mean"])
def test_pruning_is_exact_on_clustered_data(tmp_path, aggregate):
    """Clustered boxes make the triangle-inequality pruning skip most work; results stay bitwise equal."""
    rng = np.random.default_rng(11)
    centres_f = rng.standard_normal((4, 8)) * 5
    rows = []
    for i in range(300):
        for _ in range(int(rng.integers(0, 4))):
            k = int(rng.integers(0, 4))
            f = (centres_f[k] + 0.1 * rng.standard_normal(8)).astype(np.float32).tolist()
            rows.append({"id": f"im{i}", "label": k, "bvsb": float(rng.uniform(0.1, 1)), "feature": f})
        if not rows or rows[-1]["id"] != f"im{i}":
            rows.append({"id": f"im{i}"})
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 8, 4))
    emb = build_classwise(pool, aggregate=aggregate)
    candidates = np.arange(20, pool.num_images)
    fast = classwise_kcg(emb, candidates, np.arange(20), 60)
    slow = classwise_kcg(emb, candidates, np.arange(20), 60, prune=False)
    np.testing.assert_array_equal(fast[0], slow[0])
    np.testing.assert_array_equal(fast[1], slow[1])


# ---------------------------------------------------------------------------------------------
# Reading


def test_reader_orders_images_by_first_appearance_across_parts(tmp_path):
    part1 = [
        {"id": "z", "label": 2, "bvsb": 0.5, "feature": [1.0, 1.0]},
        {"id": "empty"},
        {"id": "a", "label": 0, "bvsb": 0.1, "feature": [0.0, 1.0]},
        {"id": "z", "label": 0, "bvsb": 0.7, "feature": [2.0, 1.0]},
    ]
    part2 = [{"id": "a", "label": 1, "bvsb": 0.3, "feature": [3.0, 1.0]}, {"id": "new"}]
    write_pool(tmp_path / "pool" / "part-0.parquet", part1, 2)
    write_pool(tmp_path / "pool" / "part-1.parquet", part2, 2)
    assert is_detection_pool(tmp_path / "pool")
    pool = read_detection_pool(tmp_path / "pool")
    assert pool.image_ids.to_pylist() == ["z", "empty", "a", "new"]
    assert pool.box_image.tolist() == [0, 2, 0, 2]
    assert pool.box_label.tolist() == [2, 0, 0, 1]
    assert pool.box_row.tolist() == [0, 2, 3, 4]
    assert pool.num_classes == 3  # no metadata num_classes: max label + 1
    assert pool.uncertainty_column == "bvsb"
    assert pool.sources.to_pylist() == ["/data/z.jpg", "/data/empty.jpg", "/data/a.jpg", "/data/new.jpg"]
    np.testing.assert_array_equal(pool.box_features[1], np.float32([0.0, 1.0]))
    assert read_detection_pool(tmp_path / "pool", uncertainty="entropy").uncertainty_column == "entropy"


def test_reader_accepts_variable_lists_and_float16(tmp_path):
    rows = [{"id": "a", "label": 0, "bvsb": 0.5, "feature": [1.0, 2.0, 3.0]}, {"id": "b"}]
    pool = read_detection_pool(write_pool(tmp_path / "v.parquet", rows, None, fixed=False))
    assert pool.dim == 3 and pool.box_features.dtype == np.float32
    table = pq.read_table(tmp_path / "v.parquet")
    table = table.set_column(5, "feature", table.column("feature").cast(pa.list_(pa.float16(), 3)))
    pq.write_table(table, tmp_path / "h.parquet")
    np.testing.assert_array_equal(read_detection_pool(tmp_path / "h.parquet").box_features, [[1, 2, 3]])


GOOD = {"id": "ok", "label": 0, "bvsb": 0.5, "feature": [1.0, 2.0]}


@pytest.mark.parametrize(
    ("bad_row", "kwargs", "message"),
    [
        (
            {"id": "x", "label": 0, "bvsb": 0.5, "feature": [float("nan"), 0.0]},
            {},
            "id 'x'.*NaN or Inf in 'feature'",
        ),
        (
            {"id": "x", "label": 0, "bvsb": float("inf"), "feature": [0.0, 0.0]},
            {},
            "id 'x'.*NaN or Inf in 'bvsb'",
        ),
        ({"id": "x", "label": 0, "bvsb": -0.1, "feature": [0.0, 0.0]}, {}, "id 'x'.*negative 'bvsb'"),
        ({"id": "x", "label": 0, "bvsb": None, "feature": [0.0, 0.0]}, {}, "id 'x'.*null 'bvsb'"),
        (
            {"id": "x", "label": 3, "bvsb": 0.5, "feature": [0.0, 0.0]},
            {"num_classes": 3},
            "id 'x'.*'label' 3 outside",
        ),
        ({"id": "x", "label": -1, "bvsb": 0.5, "feature": [0.0, 0.0]}, {}, "id 'x'.*negative 'label'"),
        ({"id": "x", "label": 1, "bvsb": 0.5}, {}, "id 'x' has a box .* null 'feature'"),
        ({"id": "x", "label": 1, "bvsb": 0.5, "feature": [1.0]}, {"fixed": False}, "feature lengths differ"),
    ],
)
def test_validation_errors_name_the_culprit(tmp_path, bad_row, kwargs, message):
    path = write_pool(
        tmp_path / "bad.parquet", [GOOD, bad_row], None if not kwargs.get("fixed", True) else 2, **kwargs
    )
    with pytest.raises(PoolError, match=message) as info:
        read_detection_pool(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_validation_errors_on_schema(tmp_path):
    path = write_pool(tmp_path / "p.parquet", [GOOD], 2)
    table = pq.read_table(path)
    for column in ("label", "feature", "id"):
        pq.write_table(table.drop_columns([column]), tmp_path / "m.parquet")
        with pytest.raises(PoolError, match=f"no '{column}' column"):
            read_detection_pool(tmp_path / "m.parquet")
    pq.write_table(table.drop_columns(["bvsb"]), tmp_path / "m.parquet")
    with pytest.raises(PoolError, match=r"no 'bvsb' column.*--uncertainty"):
        read_detection_pool(tmp_path / "m.parquet")
    assert read_detection_pool(tmp_path / "m.parquet", uncertainty="entropy").num_boxes == 1
    with pytest.raises(PoolError, match="'nope' not found"):
        read_detection_pool(path, uncertainty="nope")
    write_pool(tmp_path / "d" / "a.parquet", [GOOD], 2, num_classes=3)
    write_pool(tmp_path / "d" / "b.parquet", [GOOD], 2, num_classes=4)
    with pytest.raises(PoolError, match="num_classes 4 differs from 3"):
        read_detection_pool(tmp_path / "d")
    write_pool(tmp_path / "e" / "a.parquet", [GOOD], 2)
    write_pool(tmp_path / "e" / "b.parquet", [{**GOOD, "feature": [1.0, 2.0, 3.0]}], 3)
    with pytest.raises(PoolError, match="feature length 3 differs from 2"):
        read_detection_pool(tmp_path / "e")
    pq.write_table(table.slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(PoolError, match="pool is empty"):
        read_detection_pool(tmp_path / "empty.parquet")


def test_selection_argument_errors(tmp_path):
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", [GOOD, {"id": "e"}], 2))
    emb = build_classwise(pool)
    none = np.array([], dtype=np.int64)
    with pytest.raises(SelectionError, match="exceeds the 2 candidate"):
        classwise_kcg(emb, np.array([0, 1]), none, 3)
    with pytest.raises(SelectionError, match="ascending"):
        classwise_kcg(emb, np.array([1, 0]), none, 1)
    with pytest.raises(SelectionError, match="out of range"):
        classwise_kcg(emb, np.array([0, 5]), none, 1)
    with pytest.raises(SelectionError, match="--aggregate"):
        build_classwise(pool, aggregate="median")
    with pytest.raises(SelectionError, match="--tau"):
        build_classwise(pool, tau=-1.0)
    picks, distances = classwise_kcg(emb, np.array([0, 1]), none, 0)
    assert picks.shape == (0,) and distances.shape == (0,)


def test_many_classes_multiword_masks(tmp_path):
    """K > 64 spreads the class bitmasks over several words; the labeled-set index must still be exact."""
    rng = np.random.default_rng(21)
    num_classes, dim = 150, 3
    rows = random_rows(rng, 120, num_classes, dim, max_boxes=6, n_duplicates=4)
    for r in rows:  # concentrate on a few classes across the word boundaries so that images share
        if r.get("label") is not None:
            r["label"] = int(rng.choice([0, 63, 64, 65, 127, 128, 149]))
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, dim, num_classes))
    labeled = sorted(rng.choice(pool.num_images, 25, replace=False).tolist())
    emb, candidates, centres, (picks, distances) = select(pool, labeled, 40, 1.0, "max")
    _, dense = reference_embeddings(rows, num_classes, dim, None, 1.0, "minmax", "max")
    ref_picks, ref_distances = reference_kcg(dense, candidates, centres, 40)
    np.testing.assert_array_equal(picks, ref_picks)
    np.testing.assert_allclose(distances, ref_distances, rtol=1e-10)
    unpruned = classwise_kcg(emb, candidates, centres, 40, prune=False)
    np.testing.assert_array_equal(unpruned[0], picks)
    np.testing.assert_array_equal(unpruned[1], distances)


# ---------------------------------------------------------------------------------------------
# The torch engine, K-Means++ and the one selection pipeline on detection pools


@pytest.mark.parametrize("aggregate", ["max", "mean"])
@pytest.mark.parametrize("with_labeled", [False, True])
@pytest.mark.parametrize("integer", [False, True])
def test_torch_engine_equals_dense_bruteforce(tmp_path, aggregate, with_labeled, integer):
    from uwe_cli.selection.classwise_torch import TorchClasswiseTracker
    from uwe_cli.selection.greedy import k_center_greedy

    rng = np.random.default_rng(3 + with_labeled + 2 * integer)
    rows = random_rows(rng, 60, 4, 5, n_duplicates=5, shuffle=True)
    if integer:  # many exact ties: the summation order must not matter
        for r in rows:
            if r.get("feature") is not None:
                r["feature"] = [float(v) for v in rng.integers(0, 3, 5)]
                r["bvsb"] = 1.0
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 5, num_classes=4))
    labeled = np.array([0, 7, 9] if with_labeled else [], dtype=np.int64)
    cand = np.setdiff1d(np.arange(pool.num_images), labeled)
    emb = build_classwise(pool, None, tau=1.0, aggregate=aggregate)
    tracker = TorchClasswiseTracker(emb, cand, len(labeled) + 20, device="cpu")
    got = k_center_greedy(tracker, labeled, 20)
    _ids, dense = reference_embeddings(rows, 4, 5, None, 1.0, "minmax", aggregate)
    want, want_d = reference_kcg(dense, cand, labeled, 20)
    assert cand[got.positions].tolist() == want
    np.testing.assert_allclose(got.distances, want_d, rtol=1e-9)


def test_kmeanspp_on_detection_pools_equals_dense_reference(tmp_path):
    from reference import kmeanspp_reference

    from uwe_cli.selection.classwise import ClasswiseTracker
    from uwe_cli.selection.greedy import kmeanspp_seeding

    rng = np.random.default_rng(5)
    rows = random_rows(rng, 50, 3, 4)
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 4, num_classes=3))
    emb = build_classwise(pool)
    _, dense = reference_embeddings(rows, 3, 4, None, 1.0, "minmax", "max")
    cand, lab = np.arange(4, 50), np.arange(4)
    for seed in (0, 1):
        got = kmeanspp_seeding(ClasswiseTracker(emb, cand, 40), lab, 15, seed)
        np.testing.assert_array_equal(got, kmeanspp_reference(dense, cand, lab, 15, seed))


def test_run_select_on_detection_pools_honours_memory_and_device(tmp_path, monkeypatch):
    from uwe_cli import select as select_module
    from uwe_cli.errors import ResourceError
    from uwe_cli.select import run_select
    from uwe_cli.selection.classwise_torch import TorchClasswiseTracker

    rng = np.random.default_rng(8)
    path = write_pool(tmp_path / "p.parquet", random_rows(rng, 40, 3, 4), 4, num_classes=3)
    with pytest.raises(ResourceError, match="--max-memory allows"):
        run_select([path], 5, max_memory=1024)
    numba = run_select([path], 6, device="cpu")
    used = []
    original = TorchClasswiseTracker.__init__

    def spy(self, *args, **kwargs):
        used.append(kwargs.get("device"))
        original(self, *args, **kwargs)

    monkeypatch.setattr(TorchClasswiseTracker, "__init__", spy)
    monkeypatch.setattr(select_module, "resolve_device", lambda device: ("torch", "cpu"))
    torch_run = run_select([path], 6, device="auto")
    assert used == ["cpu"]
    assert torch_run.batch.ids == numba.batch.ids
    np.testing.assert_allclose(torch_run.batch.distance, numba.batch.distance, rtol=1e-12)


def test_appended_centres_give_the_same_distances_as_the_originals(tmp_path):
    """A shard that receives another shard's image as blocks must measure exactly what the owner would."""
    from uwe_cli.selection.classwise import ClasswiseTracker

    rng = np.random.default_rng(12)
    rows = random_rows(rng, 40, 4, 6)
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, 6, num_classes=4))
    for aggregate in ("max", "mean"):
        emb = build_classwise(pool, aggregate=aggregate)
        cand = np.arange(20)
        direct = ClasswiseTracker(emb, cand, 30)
        other = ClasswiseTracker(build_classwise(pool, aggregate=aggregate), cand, 30)
        for image in (25, 31, 38, 22):
            direct.add(image)
            other.add(other.append_image(*direct.blocks(image)))
            np.testing.assert_array_equal(other.distances(), direct.distances())


@pytest.mark.parametrize("engine", ["numba", "numba-unpruned", "torch"])
def test_near_ties_are_ordered_as_the_dense_reference(tmp_path, engine):
    """Grid features under weights √u, u ∈ {⅓, ⅔, 1}: distances equal in exact arithmetic are rounded
    apart by the order of summation; every engine must still pick what the reference picks."""
    from uwe_cli.selection.classwise_torch import TorchClasswiseTracker
    from uwe_cli.selection.greedy import k_center_greedy

    rng = np.random.default_rng(11)
    num_classes, dim = 2, 300
    rows = random_rows(rng, 300, num_classes, dim, max_boxes=2, n_duplicates=20)
    for r in rows:
        if r.get("feature") is not None:
            r["feature"] = [float(v) for v in rng.integers(0, 3, dim)]
            r["bvsb"] = float(np.float32(rng.integers(1, 4) / 3))
    pool = read_detection_pool(write_pool(tmp_path / "p.parquet", rows, dim, num_classes))
    emb = build_classwise(pool, None, tau=0.5, normalize="none", aggregate="max")
    cand = np.arange(pool.num_images)
    _ids, dense = reference_embeddings(rows, num_classes, dim, None, 0.5, "none", "max")
    np.testing.assert_array_equal(to_dense(emb), dense)
    want, want_d = reference_kcg(dense, cand, np.empty(0, np.int64), 200)
    name, _, unpruned = engine.partition("-")
    if name == "torch":
        got = k_center_greedy(TorchClasswiseTracker(emb, cand, 200, device="cpu"), np.empty(0, np.int64), 200)
        picks, distances = cand[got.positions].tolist(), got.distances
    else:
        picks, distances = classwise_kcg(emb, cand, np.empty(0, np.int64), 200, prune=not unpruned)
    assert list(picks) == want
    np.testing.assert_allclose(distances, want_d, rtol=1e-12)
