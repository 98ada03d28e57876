"""`uwe report`: page content against the pool and batch, the map's subsample and projection, bad input."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, leftovers, write_pool
from handoff_pools import classification_pool, detection_pool, region_pool
from typer.testing import CliRunner

from uwe_cli.batch import read_batch
from uwe_cli.cli import app
from uwe_cli.pool import read_detection_pool
from uwe_cli.report import ReportOptions, build_report
from uwe_cli.report.projection import classwise_operator, dense_operator, randomized_pca, subsample
from uwe_cli.selection.classwise import SRC_FEATURE, build_classwise

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"UWE_NO_PROGRESS": "1"})


class Page(HTMLParser):
    """Thumbnails (alt text, in order), heatmap images, every src/href, and the map's JSON."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.thumbs: list[str] = []
        self.heats = 0
        self.links: list[str] = []
        self.bars = 0
        self._json = False
        self.map: dict = {}
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img" and a.get("class") == "thumb":
            self.thumbs.append(a["alt"])
        if tag == "img" and a.get("class") == "heat":
            self.heats += 1
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        self.bars += tag == "rect" and "bar" in (a.get("class") or "")
        self._json = tag == "script" and a.get("id") == "map-data"

    def handle_data(self, data):
        if self._json:
            self.map = json.loads(data)
            self._json = False


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    out = {}
    for name, make, budget in (
        ("classification", classification_pool, 12),
        ("regions", region_pool, 10),
        ("detection", detection_pool, 8),
    ):
        folder = root / name
        folder.mkdir()
        fx = make(folder)
        batch = folder / "batch.csv"
        assert invoke("select", fx.pool, "--budget", budget, "--out", batch, "-q").exit_code == 0
        out[name] = (fx, batch)
    return out


@pytest.mark.parametrize("kind", ["classification", "regions", "detection"])
def test_page_holds_every_pick_in_order_and_nothing_external(kinds, kind, tmp_path):
    fx, batch = kinds[kind]
    labeled = tmp_path / "labeled.txt"
    b = read_batch(batch)
    others = [i for i in fx.ids if i not in b.ids]
    labeled.write_text("\n".join(others[:3]) + "\n")
    out = tmp_path / "report.html"
    result = invoke("report", batch, "--pool", fx.pool, "--labeled", labeled, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    text = out.read_text()
    page = Page(text)
    assert page.thumbs == [f"#{r} {i}" for r, i in zip(b.ranks, b.ids, strict=True)]
    assert all(link.startswith(("data:image/jpeg;base64,", "#")) for link in page.links), page.links[:3]
    assert "http://" not in text and "https://" not in text  # no CDN, nothing fetched
    data = page.map
    assert len(data["x"]) == len(fx.ids)  # small pool: every unit on the map
    assert data["c"].count(2) == len(b) and data["c"].count(1) == 3
    assert [data["ids"][k] for k in data["p"] if k >= 0] == sorted(b.ids, key=fx.ids.index)
    assert page.bars == 60  # pool and batch histograms, 30 bins each
    if kind == "detection":
        assert text.count('class="rep"') > 0 and "represents its class" in text
    if kind == "regions":
        assert text.count('class="region"') == len(b)


def test_representative_box_is_the_most_uncertain_of_its_class(kinds):
    fx, batch = kinds["detection"]
    data = build_report(batch, [fx.pool], ReportOptions())
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(fx.pool).to_pylist() if r["label"] is not None]
    for pick in data.picks.picks:
        for label in {b.label for b in pick.boxes}:
            mine = [r for r in rows if r["id"] == pick.id and r["label"] == label]
            best = max(mine, key=lambda r: r["bvsb"])
            (rep,) = [b for b in pick.boxes if b.label == label and b.representative]
            assert (rep.x1, rep.y1) == pytest.approx(tuple(best["box"][:2]))


def test_histograms_count_the_pool_and_the_batch(kinds):
    fx, batch = kinds["classification"]
    data = build_report(batch, [fx.pool], ReportOptions())
    assert data.pool_uncertainty is not None and data.batch_uncertainty is not None
    assert data.pool_uncertainty.size == len(fx.ids) and data.batch_uncertainty.size == len(read_batch(batch))
    assert data.pool_uncertainty.min() == 0 and data.pool_uncertainty.max() == 1  # minmax over the pool


def test_subsample_keeps_every_picked_and_labeled_unit():
    rng = np.random.default_rng(0)
    keep = rng.choice(100_000, 3_000, replace=False)
    rows = subsample(100_000, keep, 20_000, np.random.default_rng(1))
    assert rows.size == 20_000 and np.all(np.diff(rows) > 0) and np.isin(keep, rows).all()
    assert np.array_equal(rows, subsample(100_000, keep, 20_000, np.random.default_rng(1)))
    assert np.array_equal(subsample(50, keep[:5] % 50, 100, rng), np.arange(50))
    assert np.array_equal(subsample(10_000, keep[:30] % 10_000, 10, rng), np.unique(keep[:30] % 10_000))


def test_randomized_pca_equals_exact_pca():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((2_000, 6)) * [9, 5, 2, 1, 0.5, 0.1]) @ rng.standard_normal((6, 64))
    x = x.astype(np.float32)
    got = randomized_pca(dense_operator(x), 2, seed=0)
    centred = x.astype(np.float64) - x.astype(np.float64).mean(axis=0)
    u, s, _ = np.linalg.svd(centred, full_matrices=False)
    exact = u[:, :2] * s[:2]
    exact *= np.sign(exact[np.abs(exact).argmax(axis=0), [0, 1]])
    np.testing.assert_allclose(got, exact, rtol=1e-4, atol=1e-3 * s[0] / np.sqrt(len(x)))


def test_classwise_operator_equals_the_dense_embedding(tmp_path):
    fx = detection_pool(tmp_path, n_images=30)
    pool = read_detection_pool(fx.pool)
    emb = build_classwise(pool, None, 1.0, "minmax", "max")
    images = np.array([0, 2, 3, 5, 7, 11, 29])
    d, k = emb.dim, emb.num_classes
    dense = np.zeros((len(images), k * d))
    for row, i in enumerate(images):
        for b in range(emb.offsets[i], emb.offsets[i + 1]):
            c = emb.block_class[b]
            assert emb.block_src[b] == SRC_FEATURE
            dense[row, c * d : (c + 1) * d] = emb.block_scale[b] * emb.features[emb.block_row[b]]
    dense -= dense.mean(axis=0)
    op = classwise_operator(emb, images)
    a = np.random.default_rng(0).standard_normal((k * d, 3))
    b = np.random.default_rng(1).standard_normal((len(images), 3))
    np.testing.assert_allclose(op.matmul(a), dense @ a, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(op.rmatmul(b), dense.T @ b, rtol=1e-5, atol=1e-4)


def test_large_pool_map_is_subsampled(tmp_path, rng):
    n = 3_000
    names = [f"img{i:04d}.png" for i in range(40)]
    from PIL import Image

    (tmp_path / "img").mkdir()
    for name in names:
        Image.new("RGB", (20, 16), (90, 120, 200)).save(tmp_path / "img" / name)
    ids = names + [f"unit{i}" for i in range(n - len(names))]
    pool = write_pool(
        tmp_path / "pool.parquet", rng.random((n, 8)).astype(np.float32), rng.random(n), ids=ids
    )
    batch = tmp_path / "batch.csv"
    batch.write_text("rank,id\n" + "".join(f"{k + 1},{name}\n" for k, name in enumerate(names[:25])))
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("\n".join(ids[100:400]) + "\nnot-in-pool\n")
    opts = ReportOptions(labeled=labeled, images=tmp_path / "img", max_points=1_000)
    data = build_report(batch, [pool], opts)
    assert len(data.map_category) == 1_000
    assert (data.map_category == 2).sum() == 25 and (data.map_category == 1).sum() == 300
    assert any("1 labeled IDs are not in the pool" in n for n in data.notes)
    assert any("map: 1,000 of 3,000" in n for n in data.notes)


def test_settings_from_select_json(kinds, tmp_path):
    fx, _ = kinds["classification"]
    batch = tmp_path / "batch.csv"
    result = invoke("select", fx.pool, "--budget", 5, "--tau", 0.5, "--out", batch, "--json", "-q")
    settings = tmp_path / "select.json"
    settings.write_text(result.stdout)
    out = tmp_path / "r.html"
    assert (
        invoke("report", batch, "--pool", fx.pool, "--settings", settings, "--out", out, "-q").exit_code == 0
    )
    text = out.read_text()
    for key, value in (("strategy", "uwe"), ("tau", "0.5"), ("budget", "5")):
        assert re.search(rf"<td>{key}</td><td>{re.escape(value)}</td>", text), key


def test_heatmaps_drawn_over_region_thumbnails(kinds, tmp_path):
    from uwe_cli.extract.segmentation import heatmap_path, write_heatmap

    fx, batch = kinds["regions"]
    heat = tmp_path / "heat"
    image_ids = sorted({i.rsplit("#", 1)[0] for i in read_batch(batch).ids})
    for image_id in image_ids[:-1]:
        w, h = fx.sizes[image_id]
        write_heatmap(heatmap_path(heat, image_id), np.random.default_rng(0).random((h, w)), 1.0, (h, w))
    out = tmp_path / "r.html"
    result = invoke("report", batch, "--pool", fx.pool, "--heatmaps", heat, "--out", out)
    assert result.exit_code == 0, result.output
    page = Page(out.read_text())
    with_heat = sum(1 for i in read_batch(batch).ids if i.rsplit("#", 1)[0] in image_ids[:-1])
    assert page.heats == with_heat > 0
    assert (
        "note: " in result.stderr
        and "have no heatmap" in result.stderr
        and 'id="heat-toggle"' in out.read_text()
    )


@pytest.mark.slow
def test_umap_map(kinds):
    fx, batch = kinds["classification"]
    data = build_report(batch, [fx.pool], ReportOptions(map="umap"))
    assert data.map_xy.shape == (len(fx.ids), 2) and np.isfinite(data.map_xy).all()


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------


def test_batch_ids_not_in_pool(kinds, tmp_path):
    _, batch = kinds["classification"]
    other, _ = kinds["detection"]
    out = tmp_path / "r.html"
    assert_one_line_error(
        invoke("report", batch, "--pool", other.pool, "--out", out), "are not in the pool", out
    )


def test_unreachable_image(tmp_path):
    fx = detection_pool(tmp_path, n_images=6)
    batch = tmp_path / "batch.csv"
    assert invoke("select", fx.pool, "--budget", 6, "--out", batch, "-q").exit_code == 0
    victim = fx.images / read_batch(batch).ids[-1]
    victim.write_bytes(b"not an image")
    out = tmp_path / "r.html"
    assert_one_line_error(
        invoke("report", batch, "--pool", fx.pool, "--out", out), f"cannot read image {victim}", out
    )
    victim.unlink()
    assert_one_line_error(
        invoke("report", batch, "--pool", fx.pool, "--out", out), f"cannot read image {victim}", out
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--map", "tsne"], "unknown --map 'tsne'"),
        (["--tau", "-1"], "--tau must be"),
        (["--thumb-size", "4"], "--thumb-size must be within"),
        (["--max-points", "0"], "--max-points must be at least 1"),
        (["--labeled", "/nonexistent/labeled.txt"], "--labeled file not found"),
        (["--heatmaps", "/nonexistent/heat"], "--heatmaps /nonexistent/heat: no such folder"),
        (["--class-names", "a,b"], "class 2 has no name (2 class names)"),
        (["--class-names", "nmaes.txt"], "--class-names nmaes.txt: no such file"),
    ],
)
def test_bad_options(kinds, tmp_path, extra, needle):
    fx, batch = kinds["classification"]
    out = tmp_path / "r.html"
    assert_one_line_error(invoke("report", batch, "--pool", fx.pool, "--out", out, *extra), needle, out)


def test_output_that_is_an_input_is_refused(kinds, tmp_path):
    """The batch, a --class-names file, and the image of a pick (read through the pool's `source`)."""
    fx, batch = kinds["detection"]
    names = tmp_path / "names.txt"
    names.write_text("background\ncar\nperson\nbike\n")
    image = fx.images / read_batch(batch).ids[-1]
    for out, extra, needle in (
        (batch, [], "is the input"),
        (names, ["--class-names", names], "is the input"),
        (image, [], f"is the input {image}"),
    ):
        before = Path(out).read_bytes()
        assert_one_line_error(invoke("report", batch, "--pool", fx.pool, "--out", out, *extra), needle)
        assert Path(out).read_bytes() == before
