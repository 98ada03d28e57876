"""`uwe export`: Label Studio tasks, COCO and CSV from real batches, checked against the pools; bad input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import assert_one_line_error, leftovers
from handoff_pools import CLASS_NAMES, DET_NAMES, classification_pool, detection_pool, region_pool
from typer.testing import CliRunner

from uwe_cli.batch import read_batch
from uwe_cli.cli import app
from uwe_cli.errors import BatchError, ExportError
from uwe_cli.export import ExportOptions, ImageRefs, build_export

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], env={"UWE_NO_PROGRESS": "1"})


def select(pool: Path, budget: int, out: Path) -> Path:
    result = invoke("select", pool, "--budget", budget, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def kinds(tmp_path_factory):
    """(fixture, batch file) per pool kind; the detection batch holds every image (some without boxes)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, make, budget in (
        ("classification", classification_pool, 12),
        ("regions", region_pool, 10),
        ("detection", detection_pool, 12),
    ):
        folder = root / name
        folder.mkdir()
        fx = make(folder)
        out[name] = (fx, select(fx.pool, budget, folder / "batch.csv"))
    return out


def pool_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def export(kind_fixture, to: str, tmp_path: Path, *extra: object) -> Path:
    fx, batch = kind_fixture
    out = tmp_path / f"out.{'csv' if to == 'csv' else 'json'}"
    result = invoke("export", batch, "--pool", fx.pool, "--to", to, "--out", out, "--quiet", *extra)
    assert result.exit_code == 0, result.output
    return out


def percent_box(box, size):
    w, h = size
    x1, y1 = min(max(box[0], 0), w), min(max(box[1], 0), h)
    x2, y2 = min(max(box[2], 0), w), min(max(box[3], 0), h)
    return {"x": x1 / w * 100, "y": y1 / h * 100, "width": (x2 - x1) / w * 100, "height": (y2 - y1) / h * 100}


def test_labelstudio_classification(kinds, tmp_path):
    fx, batch = kinds["classification"]
    tasks = json.loads(export(kinds["classification"], "labelstudio", tmp_path).read_text())
    b = read_batch(batch)
    rows = {r["id"]: r for r in pool_rows(fx.pool)}
    assert [t["data"]["uwe_id"] for t in tasks] == b.ids
    assert [t["data"]["rank"] for t in tasks] == list(range(1, len(b) + 1))
    assert [t["data"]["uncertainty"] for t in tasks] == b.uncertainty
    assert [t["data"]["distance"] for t in tasks] == b.distance
    for task in tasks:
        row = rows[task["data"]["uwe_id"]]
        assert task["data"]["image"] == row["source"]
        (prediction,) = task["predictions"]
        (result,) = prediction["result"]
        assert (
            result["type"] == "choices" and result["from_name"] == "choice" and result["to_name"] == "image"
        )
        assert result["value"] == {"choices": [CLASS_NAMES[row["pred"]]]}
        assert prediction["score"] == pytest.approx(max(row["probs"]))
        assert (result["original_width"], result["original_height"]) == fx.sizes[row["id"]]


def test_labelstudio_detection_boxes_in_percent(kinds, tmp_path):
    fx, batch = kinds["detection"]
    tasks = json.loads(export(kinds["detection"], "labelstudio", tmp_path).read_text())
    assert [t["data"]["uwe_id"] for t in tasks] == read_batch(batch).ids
    boxes: dict[str, list] = {}
    for row in pool_rows(fx.pool):
        if row["label"] is not None:
            boxes.setdefault(row["id"], []).append(row)
    assert sorted(t["data"]["uwe_id"] for t in tasks) == sorted(fx.ids)  # images without boxes too
    for task in tasks:
        image = task["data"]["uwe_id"]
        (prediction,) = task["predictions"]
        expected = boxes.get(image, [])
        assert len(prediction["result"]) == len(expected)
        for result, row in zip(prediction["result"], expected, strict=True):
            assert result["value"]["rectanglelabels"] == [DET_NAMES[row["label"]]]
            got = {k: result["value"][k] for k in ("x", "y", "width", "height")}
            assert got == pytest.approx(percent_box(row["box"], fx.sizes[image]), abs=1e-9)
            assert 0 <= got["x"] <= 100 and got["x"] + got["width"] <= 100 + 1e-9
            assert result["score"] == pytest.approx(row["score"])
        if expected:
            assert prediction["score"] == pytest.approx(np.mean([r["score"] for r in expected]))
        else:
            assert prediction["result"] == [] and "score" not in prediction


def test_labelstudio_regions_as_rectangles(kinds, tmp_path):
    fx, batch = kinds["regions"]
    tasks = json.loads(export(kinds["regions"], "labelstudio", tmp_path).read_text())
    rows = {r["id"]: r for r in pool_rows(fx.pool)}
    assert [t["data"]["uwe_id"] for t in tasks] == read_batch(batch).ids
    for task in tasks:
        row = rows[task["data"]["uwe_id"]]
        assert task["data"]["image_id"] == row["image_id"]
        (result,) = task["predictions"][0]["result"]
        assert result["type"] == "rectangle" and result["from_name"] == "region"
        box = [row["x"], row["y"], row["x"] + row["width"], row["y"] + row["height"]]
        got = {k: result["value"][k] for k in ("x", "y", "width", "height")}
        assert got == pytest.approx(percent_box(box, fx.sizes[row["image_id"]]), abs=1e-9)


def test_min_score_and_class_names_choose_the_boxes(kinds, tmp_path):
    fx, _ = kinds["detection"]
    tasks = json.loads(
        export(
            kinds["detection"], "labelstudio", tmp_path, "--min-score", 0.5, "--class-names", "auto,,cycle"
        ).read_text()
    )
    kept = sorted(
        (r["id"], {0: "auto", 2: "cycle"}[r["label"]], r["score"])
        for r in pool_rows(fx.pool)
        if r["label"] in (0, 2) and r["score"] >= np.float32(0.5)
    )
    got = sorted(
        (t["data"]["uwe_id"], res["value"]["rectanglelabels"][0], res["score"])
        for t in tasks
        for res in t["predictions"][0]["result"]
    )
    assert [g[:2] for g in got] == [k[:2] for k in kept] and kept
    assert [g[2] for g in got] == pytest.approx([k[2] for k in kept])
    assert len(tasks) == len(fx.ids)  # images left without boxes stay in the export


def test_image_references_url_prefix_and_path_map(kinds, tmp_path):
    fx, batch = kinds["classification"]
    tasks = json.loads(
        export(
            kinds["classification"], "labelstudio", tmp_path, "--url-prefix", "/data/local-files/?d=x/"
        ).read_text()
    )
    refs = {t["data"]["uwe_id"]: t["data"]["image"] for t in tasks}
    if 'odd, "quoted" name.png' in refs:
        assert refs['odd, "quoted" name.png'] == "/data/local-files/?d=x/odd%2C%20%22quoted%22%20name.png"
    assert all(ref.startswith("/data/local-files/?d=x/") for ref in refs.values())
    out = export(kinds["classification"], "csv", tmp_path, "--path-map", f"{fx.images}=s3://bucket/imgs")
    rows = list(csv.DictReader(out.open(newline="")))
    assert [r["image"] for r in rows] == [f"s3://bucket/imgs/{i}" for i in read_batch(batch).ids]


def test_coco_loads_in_pycocotools(kinds, tmp_path):
    from pycocotools.coco import COCO

    for name in ("classification", "regions", "detection"):
        fx, batch = kinds[name]
        path = export(kinds[name], "coco", tmp_path)
        coco = COCO(str(path))
        b = read_batch(batch)
        images = coco.dataset["images"]
        image_of = {img["id"]: img for img in images}
        rows = pool_rows(fx.pool)
        if name == "regions":
            anns = coco.dataset["annotations"]
            assert [a["uwe_id"] for a in anns] == b.ids
            by_id = {r["id"]: r for r in rows}
            for ann in anns:
                row = by_id[ann["uwe_id"]]
                assert ann["bbox"] == [row["x"], row["y"], row["width"], row["height"]]
                assert image_of[ann["image_id"]]["file_name"] == row["source"]
            assert coco.getCatIds() == [1]
            continue
        assert [img["uwe_id"] for img in images] == b.ids
        assert [(img["width"], img["height"]) for img in images] == [fx.sizes[i] for i in b.ids]
        if name == "classification":
            by_id = {r["id"]: r for r in rows}
            for img in images:
                (ann,) = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
                assert ann["category_id"] == by_id[img["uwe_id"]]["pred"]
                assert ann["bbox"] == [0.0, 0.0, float(img["width"]), float(img["height"])]
            assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == CLASS_NAMES
        else:
            expected = {}  # boxes clipped to the image; none left empty
            for r in rows:
                if r["label"] is not None:
                    w, h = fx.sizes[r["id"]]
                    x1, x2 = (min(max(v, 0.0), w) for v in r["box"][0::2])
                    y1, y2 = (min(max(v, 0.0), h) for v in r["box"][1::2])
                    if x2 > x1 and y2 > y1:
                        expected.setdefault(r["id"], []).append((r, [x1, y1, x2 - x1, y2 - y1]))
            clipped = sum(
                r["label"] is not None and list(r["box"]) != [b[0], b[1], b[0] + b[2], b[1] + b[3]]
                for want in expected.values()
                for r, b in want
            )
            assert clipped  # the fixture has boxes reaching out of their images
            for img in images:
                anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
                want = expected.get(img["uwe_id"], [])
                assert len(anns) == len(want)
                for ann, (row, bbox) in zip(anns, want, strict=True):
                    assert ann["bbox"] == pytest.approx(bbox)
                    assert ann["bbox"][0] >= 0 and ann["bbox"][0] + ann["bbox"][2] <= img["width"] + 1e-9
                    assert ann["bbox"][1] >= 0 and ann["bbox"][1] + ann["bbox"][3] <= img["height"] + 1e-9
                    assert ann["category_id"] == row["label"] and ann["score"] == pytest.approx(row["score"])
            assert any(not expected.get(img["uwe_id"]) for img in images)  # empty images are listed


def test_csv_round_trips_odd_ids_and_stdout(kinds):
    fx, batch = kinds["detection"]
    result = invoke("export", batch, "--pool", fx.pool, "--to", "csv", "--out", "-", "--quiet")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    firsts = []
    for row in rows:
        if not firsts or firsts[-1] != row["id"]:
            firsts.append(row["id"])
    assert firsts == read_batch(batch).ids
    assert 'odd, "quoted" name.png' in firsts
    n_boxes = sum(1 for r in pool_rows(fx.pool) if r["label"] is not None)
    n_empty = sum(
        1 for i in fx.ids if not any(r["id"] == i and r["label"] is not None for r in pool_rows(fx.pool))
    )
    assert len(rows) == n_boxes + n_empty


def test_library_call_matches_cli(kinds):
    fx, batch = kinds["regions"]
    result = build_export(batch, [fx.pool], ExportOptions(to="labelstudio", refs=ImageRefs("http://h/")))
    assert result.summary["picks"] == len(read_batch(batch)) == len(result.document)
    assert all(t["data"]["image"].startswith("http://h/") for t in result.document)


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------


def test_batch_ids_not_in_pool(kinds, tmp_path):
    _, batch = kinds["classification"]
    other = kinds["detection"][0]
    out = tmp_path / "tasks.json"
    result = invoke("export", batch, "--pool", other.pool, "--to", "labelstudio", "--out", out)
    assert_one_line_error(result, "are not in the pool", out)
    with pytest.raises(BatchError, match="first: "):
        build_export(batch, [other.pool], ExportOptions())
    assert leftovers(tmp_path) == []


def test_rectanglelabels_on_a_pool_without_boxes(kinds, tmp_path):
    fx, batch = kinds["classification"]
    out = tmp_path / "tasks.json"
    args = ["export", batch, "--pool", fx.pool, "--to", "labelstudio", "--predictions", "rectanglelabels"]
    assert_one_line_error(invoke(*args, "--out", out), "has no boxes", out)
    fx, batch = kinds["detection"]
    args = ["export", batch, "--pool", fx.pool, "--to", "labelstudio", "--predictions", "choices"]
    assert_one_line_error(invoke(*args, "--out", out), "needs a classification pool", out)


def test_unreachable_image(tmp_path):
    fx = classification_pool(tmp_path, n=10)
    batch = select(fx.pool, 10, tmp_path / "batch.csv")
    victim = fx.images / read_batch(batch).ids[4]
    victim.unlink()
    for to in ("labelstudio", "coco", "csv"):
        out = tmp_path / f"out.{to}"
        result = invoke("export", batch, "--pool", fx.pool, "--to", to, "--out", out)
        assert_one_line_error(result, f"cannot read image {victim}", out)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "extra,needle",
    [
        (["--to", "cvat"], "unknown --to 'cvat'"),
        (["--to", "coco", "--min-score", "2"], "--min-score must be within [0, 1]"),
        (["--to", "coco", "--path-map", "nothing"], "expected OLD=NEW"),
        (["--to", "coco", "--class-names", "a,"], "has no name (2 class names)"),
        (["--to", "coco", "--class-names", "nmaes.txt"], "--class-names nmaes.txt: no such file"),
        (["--to", "labelstudio", "--to-name", " "], "--to-name is empty"),
        (["--to", "labelstudio", "--from-name", ""], "--from-name is empty"),
        (["--to", "coco", "--url-prefix", "a/", "--path-map", "a=b"], "not both"),
    ],
)
def test_bad_options(kinds, tmp_path, extra, needle):
    fx, batch = kinds["classification"]
    out = tmp_path / "out.json"
    assert_one_line_error(invoke("export", batch, "--pool", fx.pool, "--out", out, *extra), needle, out)


def test_bad_batch_files(kinds, tmp_path):
    fx, _ = kinds["classification"]
    out = tmp_path / "out.json"
    cases = {
        "empty.csv": ("", "no 'id' column"),
        "noid.csv": ("rank,name\n1,a\n", "no 'id' column"),
        "dup.csv": (f"id\n{fx.ids[5]}\n{fx.ids[5]}\n", "appears twice"),
        "rank.csv": (f"rank,id\nfirst,{fx.ids[5]}\n", "'rank' is not an integer"),
    }
    for name, (text, needle) in cases.items():
        path = tmp_path / name
        path.write_text(text)
        result = invoke("export", path, "--pool", fx.pool, "--to", "coco", "--out", out)
        assert_one_line_error(result, needle, out)
    with pytest.raises(ExportError):
        build_export(tmp_path / "dup.csv", [fx.pool], ExportOptions(to="nope"))


def test_output_that_is_an_input_is_refused(kinds, tmp_path):
    """A --class-names file, and the image of a pick (read through the pool's `source`): never replaced."""
    fx, batch = kinds["detection"]
    names = tmp_path / "names.txt"
    names.write_text("\n".join(DET_NAMES) + "\n")
    image = fx.images / read_batch(batch).ids[0]
    for to in ("labelstudio", "coco", "csv"):
        for out, extra in ((names, ["--class-names", names]), (image, [])):
            before = out.read_bytes()
            result = invoke("export", batch, "--pool", fx.pool, "--to", to, "--out", out, *extra)
            assert_one_line_error(result, f"is the input {out}")
            assert out.read_bytes() == before


def test_path_map_to_a_web_url_quotes_the_rest(tmp_path):
    fx = classification_pool(tmp_path, n=10)
    batch = select(fx.pool, 10, tmp_path / "batch.csv")
    odd = 'odd, "quoted" name.png'
    assert odd in read_batch(batch).ids
    out = tmp_path / "tasks.json"
    args = ["export", batch, "--pool", fx.pool, "--to", "labelstudio", "--out", out, "--quiet"]
    assert invoke(*args, "--path-map", f"{fx.images}/=https://h.example/a b/").exit_code == 0
    refs = {t["data"]["uwe_id"]: t["data"]["image"] for t in json.loads(out.read_text())}
    assert refs[odd] == "https://h.example/a b/odd%2C%20%22quoted%22%20name.png"  # NEW is kept as given
    assert invoke(*args, "--path-map", f"{fx.images}/=/mnt/x/").exit_code == 0
    refs = {t["data"]["uwe_id"]: t["data"]["image"] for t in json.loads(out.read_text())}
    assert refs[odd] == f"/mnt/x/{odd}"  # a path stays a path


def test_summary_counts_picks_with_predictions_and_results(kinds, tmp_path):
    fx, batch = kinds["detection"]
    for to in ("labelstudio", "coco", "csv"):
        out = tmp_path / f"out.{to}"
        result = invoke("export", batch, "--pool", fx.pool, "--to", to, "--out", out, "--json")
        assert result.exit_code == 0, result.output
        summary = json.loads(result.stdout)
        if to == "coco":
            anns = json.loads(out.read_text())["annotations"]
            assert summary["results"] == len(anns)
            assert summary["predicted_picks"] == len({a["image_id"] for a in anns}) < summary["picks"]
        elif to == "labelstudio":
            tasks = json.loads(out.read_text())
            assert summary["predicted_picks"] == sum(bool(t["predictions"][0]["result"]) for t in tasks)
            assert summary["results"] == sum(len(t["predictions"][0]["result"]) for t in tasks)
        else:
            rows = list(csv.DictReader(out.open(newline="")))
            assert summary["results"] == sum(r["x1"] != "" for r in rows)


def test_class_names_from_a_list_a_file_or_one_name(tmp_path):
    from uwe_cli.errors import DataError
    from uwe_cli.ids import read_class_names

    names = tmp_path / "names.txt"
    names.write_text("\ufeffcat\n\ndog\n\n")  # a BOM, an empty name kept in place, trailing lines dropped
    assert read_class_names(str(names)) == (["cat", "", "dog"], [names])
    assert read_class_names(" cat , dog ") == (["cat", "dog"], [])
    assert read_class_names("person") == (["person"], [])
    for typo in ("nmaes.txt", "lists/names"):
        with pytest.raises(DataError, match=f"--class-names {typo}: no such file"):
            read_class_names(typo)
    with pytest.raises(DataError, match="holds no names"):
        read_class_names(",")
