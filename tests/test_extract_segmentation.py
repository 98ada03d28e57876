"""`uwe extract segmentation`: pooled values equal a direct computation from the model's own tensors.

The reference below is written independently of the library: it runs the model, hooks the
classifier input itself, computes softmax/entropy/bvsb/lc in float64 and averages over the grid
cells selected by a boolean mask built with float floor/ceil, region by region.
"""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import functional as TF
from typer.testing import CliRunner

from uwe_cli.cli import app
from uwe_cli.data import IMAGENET_MEAN, IMAGENET_STD, load_image
from uwe_cli.errors import ModelError, UweError
from uwe_cli.extract.segmentation import (
    SegmentationConfig,
    extract_segmentation,
    map_span,
    parse_region_grid,
    unit_boxes,
)

HERE = Path(__file__).resolve().parent
K = 4
SIZES = [(45, 77), (64, 64), (70, 90), (70, 90)]  # (H, W): none a multiple of 32 in both axes but one
runner = CliRunner()


# ---------------------------------------------------------------------------------------------- models


class TinySeg(torch.nn.Module):
    """Features at stride 4, logits upsampled to stride 2: both grids differ from the image grid."""

    def __init__(self, num_classes: int = K, as_dict: bool = True) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 6, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.Conv2d(6, 8, 3, stride=2, padding=1),
            torch.nn.ReLU(),
        )
        self.classifier = torch.nn.Conv2d(8, num_classes, 1)
        self.as_dict = as_dict
        with torch.no_grad():
            self.classifier.weight.mul_(4.0)  # peakier probabilities: uncertainty varies across pixels

    def forward(self, x: torch.Tensor) -> object:
        logits = self.classifier(self.body(x))
        logits = F.interpolate(logits, scale_factor=2, mode="bilinear", align_corners=False)
        return {"out": logits, "aux": logits[:, :1]} if self.as_dict else logits


def tiny_dict(num_classes: int = K) -> torch.nn.Module:
    torch.manual_seed(0)
    return TinySeg(num_classes, as_dict=True)


def tiny_tensor(num_classes: int = K) -> torch.nn.Module:
    torch.manual_seed(1)
    return TinySeg(num_classes, as_dict=False)


class ListModel(TinySeg):
    def forward(self, x: torch.Tensor) -> object:
        return [super().forward(x)]


def tiny_list(num_classes: int = K) -> torch.nn.Module:
    return ListModel(num_classes)


def tiny_fixed() -> torch.nn.Module:
    """A factory without `num_classes`: always K outputs, whatever --num-classes says."""
    return TinySeg(K)


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("seg") / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(SIZES):
        # smooth blobs + noise so that pixel uncertainty really varies over the image
        yy, xx = np.mgrid[0:h, 0:w]
        base = (np.sin(xx / (5 + i)) + np.cos(yy / 7))[..., None] * 60 + 120
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"im{i}.png")
    return folder


def run(data: Path, out: Path, **kw: object) -> tuple[object, list[dict]]:
    base: dict[str, object] = {
        "model": "test_extract_segmentation:tiny_dict",
        "num_classes": K,
        "device": "cpu",
        "batch_size": 2,
    }
    base.update(kw)
    result = extract_segmentation(SegmentationConfig(data=data, out=out, **base))  # type: ignore[arg-type]
    return result, pq.read_table(out).to_pylist()


# ---------------------------------------------------------------------------------------------- reference


def span(start: int, end: int, size: int, cells: int) -> tuple[int, int]:
    """The documented rule, written with floats: floor(start·s), ceil(end·s), ≥ 1 cell, in the grid."""
    s = cells / size
    a = min(max(math.floor(start * s), 0), cells - 1)
    b = min(max(math.ceil(end * s), a + 1), cells)
    return a, b


def masked_mean(maps: torch.Tensor, box: tuple[int, int, int, int], image_hw: tuple[int, int]) -> np.ndarray:
    """C×h×w maps averaged over the cells the box maps to, via an explicit boolean mask."""
    x, y, w, h = box
    gh, gw = maps.shape[1:]
    y0, y1 = span(y, y + h, image_hw[0], gh)
    x0, x1 = span(x, x + w, image_hw[1], gw)
    mask = torch.zeros((gh, gw), dtype=torch.bool)
    mask[y0:y1, x0:x1] = True
    return maps[:, mask].mean(dim=1).numpy()


def direct(
    model: torch.nn.Module,
    layer: torch.nn.Module,
    path: Path,
    boxes: list[tuple[int, int, int, int]],
    resize: tuple[int, int] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(B×3 uncertainty, B×C feature) straight from the model's tensors, float64."""
    image = load_image(path)
    hw = (image.height, image.width)
    if resize is not None:
        image = TF.resize(image, list(resize))
    x = TF.normalize(TF.to_tensor(image), list(IMAGENET_MEAN), list(IMAGENET_STD))[None]
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    with torch.no_grad():
        out = model.eval()(x)
    handle.remove()
    logits = (out["out"] if isinstance(out, dict) else out)[0].double()
    p = logits.softmax(dim=0)
    top = p.sort(dim=0, descending=True).values
    ent = -(p * p.clamp_min(1e-300).log()).sum(dim=0)
    maps = torch.stack([ent, top[1] / top[0], 1 - top[0]])
    feat = seen[-1][0].double()
    unc = np.stack([masked_mean(maps, b, hw) for b in boxes])
    fea = np.stack([masked_mean(feat, b, hw) for b in boxes])
    return unc, fea


def check_pool(
    rows: list[dict],
    folder: Path,
    model: torch.nn.Module,
    layer: torch.nn.Module,
    region: tuple[int, int, int, int] | None,
    resize: tuple[int, int] | None = None,
) -> int:
    """Every row equals the direct computation; returns how many clipped border regions were checked."""
    by_id = {r["id"]: r for r in rows}
    expected_rows = 0
    border = 0
    for path in sorted(folder.glob("*.png")):
        with Image.open(path) as im:
            w, h = im.size
        if region is None:
            boxes = [(0, 0, w, h)]
        else:
            rh, rw, sy, sx = region
            boxes = []
            ys = [0]
            while ys[-1] + rh < h and ys[-1] + sy < h:
                ys.append(ys[-1] + sy)
            xs = [0]
            while xs[-1] + rw < w and xs[-1] + sx < w:
                xs.append(xs[-1] + sx)
            boxes = [(x, y, min(rw, w - x), min(rh, h - y)) for y in ys for x in xs]
        unc, fea = direct(model, layer, path, boxes, resize)
        for j, (x, y, bw, bh) in enumerate(boxes):
            uid = path.name if region is None else f"{path.name}@{x},{y},{bw}x{bh}"
            row = by_id[uid]
            got = [row["entropy"], row["bvsb"], row["least_confidence"]]
            np.testing.assert_allclose(got, unc[j], rtol=1e-5, atol=1e-6, err_msg=uid)
            np.testing.assert_allclose(row["feature"], fea[j], rtol=1e-4, atol=1e-5, err_msg=uid)
            assert row["source"].endswith(path.name)
            if region is not None:
                assert (row["image_id"], row["x"], row["y"], row["width"], row["height"]) == (
                    path.name,
                    x,
                    y,
                    bw,
                    bh,
                )
                border += (bw, bh) != (region[1], region[0])
        expected_rows += len(boxes)
    assert len(rows) == expected_rows == len(by_id)
    return border


# ---------------------------------------------------------------------------------------------- units


def test_span_rule_matches_float_reference() -> None:
    for size in (7, 45, 64, 77, 1024):
        for cells in (1, 3, 12, 23, 64, size):
            for start in range(0, size, max(1, size // 9)):
                for end in {start + 1, min(size, start + 32), size}:
                    assert map_span(start, end, size, cells) == span(start, end, size, cells)


def test_region_grid_clips_borders_and_covers_image() -> None:
    boxes = unit_boxes(77, 45, parse_region_grid("32"))
    assert boxes[0] == (0, 0, 32, 32) and boxes[-1] == (64, 32, 13, 13)
    cover = np.zeros((45, 77), dtype=int)
    for x, y, w, h in boxes:
        cover[y : y + h, x : x + w] += 1
    assert (cover == 1).all()
    assert unit_boxes(77, 45, parse_region_grid("32x16", "16x8"))[1] == (8, 0, 16, 32)
    assert unit_boxes(77, 45, None) == [(0, 0, 77, 45)]
    for bad in ("0", "-3", "32x0", "abc"):
        with pytest.raises(UweError):
            parse_region_grid(bad)


# ---------------------------------------------------------------------------------------------- pooled values


def test_image_level_equals_direct(images: Path, tmp_path: Path) -> None:
    result, rows = run(images, tmp_path / "pool.parquet")
    model = tiny_dict()
    check_pool(rows, images, model, model.classifier, None)
    meta = result.metadata  # type: ignore[attr-defined]
    assert meta["task"] == "segmentation" and meta["num_classes"] == K and meta["feature_dim"] == 8
    assert meta["region_size"] is None
    assert "image_id" not in pq.read_schema(tmp_path / "pool.parquet").names


@pytest.mark.parametrize("region", [(32, 32, 32, 32), (24, 40, 16, 20)])
def test_region_level_equals_direct(images: Path, tmp_path: Path, region: tuple[int, int, int, int]) -> None:
    rh, rw, sy, sx = region
    _, rows = run(
        images,
        tmp_path / "pool.parquet",
        model="test_extract_segmentation:tiny_tensor",
        region_size=f"{rh}x{rw}",
        region_stride=f"{sy}x{sx}",
        batch_size=3,
    )
    model = tiny_tensor()
    assert check_pool(rows, images, model, model.classifier, region) > 0
    schema = pq.read_schema(tmp_path / "pool.parquet")
    assert all(str(schema.field(c).type) == "int32" for c in ("x", "y", "width", "height"))
    assert str(schema.field("feature").type).startswith("fixed_size_list<element: float>[8]")


def test_resize_keeps_boxes_in_original_pixels(images: Path, tmp_path: Path) -> None:
    _, rows = run(images, tmp_path / "pool.parquet", region_size="32", resize="40x56")
    model = tiny_dict()
    check_pool(rows, images, model, model.classifier, (32, 32, 32, 32), resize=(40, 56))


TORCHVISION = [
    ("lraspp_mobilenet_v3_large", "classifier.high_classifier"),
    ("deeplabv3_mobilenet_v3_large", "classifier.4"),
    # ResNet-50 takes ~15 s to build and round-trip through a checkpoint on 2 shared cores: opt-in.
    pytest.param(
        "fcn_resnet50",
        "classifier.4",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not os.environ.get("UWE_SLOW_TESTS"), reason="set UWE_SLOW_TESTS=1"),
        ],
    ),
]


@pytest.mark.parametrize(("name", "layer_name"), TORCHVISION)
def test_torchvision_models_equal_direct(name: str, layer_name: str, images: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=K).eval()
    ckpt = tmp_path / "model.pth"
    torch.save(model.state_dict(), ckpt)
    small = tmp_path / "small"
    small.mkdir()
    for p in sorted(images.glob("*.png"))[:2]:  # 45×77 and 64×64
        (small / p.name).write_bytes(p.read_bytes())
    result, rows = run(small, tmp_path / "pool.parquet", model=name, checkpoint=ckpt, region_size="32")
    assert result.details["feature_layer"] == f"input of {layer_name}"  # type: ignore[attr-defined]
    layer = dict(model.named_modules())[layer_name]
    assert check_pool(rows, small, model, layer, (32, 32, 32, 32)) > 0


def test_whole_pickled_module_without_model_name(images: Path, tmp_path: Path) -> None:
    model = tiny_tensor()
    ckpt = tmp_path / "whole.pt"
    torch.save(model, ckpt)
    _, rows = run(
        images,
        tmp_path / "pool.parquet",
        model=None,
        num_classes=None,
        checkpoint=ckpt,
        trust_checkpoint=True,
    )
    check_pool(rows, images, model, model.classifier, None)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated upstream
def test_torchscript_is_refused_with_a_clear_error(images: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "scripted.pt"
    torch.jit.trace(tiny_tensor().eval(), torch.zeros(1, 3, 32, 32)).save(str(ckpt))
    with pytest.raises(ModelError, match="TorchScript"):
        run(images, tmp_path / "pool.parquet", model=None, checkpoint=ckpt, trust_checkpoint=True)
    assert not (tmp_path / "pool.parquet").exists()


def test_explicit_feature_layer(images: Path, tmp_path: Path) -> None:
    _, rows = run(images, tmp_path / "pool.parquet", feature_layer="body.2")
    model = tiny_dict()
    check_pool(rows, images, model, model.body[2], None)
    assert len(rows[0]["feature"]) == 6


def test_heatmaps_one_png_per_image_at_original_size(images: Path, tmp_path: Path) -> None:
    result, _ = run(images, tmp_path / "pool.parquet", heatmaps=tmp_path / "heat", region_size="32")
    assert result.details["heatmaps"] == len(SIZES)  # type: ignore[attr-defined]
    for i, (h, w) in enumerate(SIZES):
        with Image.open(tmp_path / "heat" / f"im{i}.png.png") as im:
            assert im.size == (w, h) and im.mode == "RGB"
            assert len(np.unique(np.asarray(im).reshape(-1, 3), axis=0)) > 1


def test_resume_after_interruption_gives_the_same_pool(images: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted(images.glob("*.png")):
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zz_broken.png").write_bytes(b"not a png")
    out = tmp_path / "pool.parquet"
    with pytest.raises(UweError):
        run(data, out, region_size="32", part_rows=1, batch_size=1)
    assert not out.exists()
    (data / "zz_broken.png").unlink()
    result, rows = run(data, out, region_size="32", part_rows=1, batch_size=1)
    assert result.resumed == len(SIZES)  # type: ignore[attr-defined]
    assert result.processed == 0  # type: ignore[attr-defined]
    _, fresh = run(data, tmp_path / "fresh.parquet", region_size="32", batch_size=1)
    assert rows == fresh


def test_shards_and_workers_give_the_same_rows(images: Path, tmp_path: Path) -> None:
    _, full = run(images, tmp_path / "full.parquet", region_size="32")
    parts = tmp_path / "parts"
    for k in range(2):
        run(images, parts, region_size="32", shard=(k, 2), num_workers=2, batch_size=3)
    from uwe_cli.pool import read_pool

    pool = read_pool(parts)
    assert pool.ids.to_pylist() == [r["id"] for r in full]
    np.testing.assert_allclose(pool.features, np.array([r["feature"] for r in full]), rtol=1e-5, atol=1e-6)
    assert pool.metadata["task"] == "segmentation" and pool.metadata["region_size"] == [32, 32]


# ---------------------------------------------------------------------------------------------- errors


def cli(*args: str) -> object:
    return runner.invoke(app, ["extract", "segmentation", *args], env={"UWE_NO_PROGRESS": "1"})


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--model", "test_extract_segmentation:tiny_list"], "list"),
        (["--model", "test_extract_segmentation:tiny_dict", "--region-size", "0"], "--region-size"),
        (["--model", "test_extract_segmentation:tiny_dict", "--region-size", "-8"], "--region-size"),
        (["--model", "test_extract_segmentation:tiny_dict", "--feature-layer", "body.9"], "body."),
        (["--model", "test_extract_segmentation:tiny_fixed", "--num-classes", "5"], "--num-classes"),
    ],
)
def test_bad_inputs_exit_2_with_one_line(images: Path, tmp_path: Path, extra: list[str], needle: str) -> None:
    out = tmp_path / "pool.parquet"
    result = cli("--data", str(images), "--out", str(out), "--device", "cpu", "--num-workers", "0", *extra)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.output
    assert not out.exists()
    assert not any(tmp_path.iterdir())


def test_missing_feature_layer_names_nearby_layers() -> None:
    from uwe_cli.extract.segmentation import find_feature_layer

    with pytest.raises(ModelError, match=r"classifer.*classifier"):
        find_feature_layer(tiny_dict(), K, "classifer")


# ---------------------------------------------------------------------------------------------- end to end


def test_cli_extract_then_select(images: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env["UWE_NO_PROGRESS"] = "1"
    uwe = str(Path(sys.executable).with_name("uwe"))
    pool, batch = tmp_path / "pool.parquet", tmp_path / "batch.csv"
    cmd = (
        f"'{uwe}' extract segmentation --model test_extract_segmentation:tiny_dict --num-classes {K} "
        f"--data '{images}' --out '{pool}' --region-size 32 --device cpu --num-workers 0 && "
        f"'{uwe}' select '{pool}' --budget 5 --tau 0.1 --out '{batch}'"
    )
    done = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with batch.open(newline="") as fh:
        picked = [row["id"] for row in csv.DictReader(fh)]
    ids = set(pq.read_table(pool, columns=["id"]).column(0).to_pylist())
    assert len(picked) == 5 and set(picked) <= ids


def test_json_summary_is_one_line_on_stdout(images: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "pool.parquet"
    result = CliRunner().invoke(
        app,
        ["extract", "segmentation", "--model", "test_extract_segmentation:tiny_dict", "--num-classes", str(K),
         "--data", str(images), "--out", str(out), "--device", "cpu", "--num-workers", "0", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    summary = json.loads(lines[0])
    assert len(lines) == 1 and summary["task"] == "segmentation" and summary["rows"] == len(SIZES)


def test_class_names_must_match_the_classes(images: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=f"2 class names given but the model has {K} classes"):
        run(images, tmp_path / "pool.parquet", class_names=["a", "b"])
    assert not (tmp_path / "pool.parquet").exists()
    _, rows = run(images, tmp_path / "named.parquet", class_names=[f"c{i}" for i in range(K)])
    meta = pq.read_schema(tmp_path / "named.parquet").metadata[b"uwe"]
    assert b'"class_names": ["c0"' in meta and rows


def test_side_folders_apart_from_the_pool(images: Path, tmp_path: Path) -> None:
    """--heatmaps may not be the pool, its work folder (deleted at the end) or its skip report."""
    out = tmp_path / "pool.parquet"
    for folder in (out, tmp_path / ".pool.parquet.parts", tmp_path / "pool.skipped.csv"):
        result = cli(
            "--data", str(images), "--out", str(out), "--device", "cpu", "--num-workers", "0",
            "--model", "test_extract_segmentation:tiny_dict", "--heatmaps", str(folder),
        )  # fmt: skip
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert len(lines) == 1 and f"--heatmaps {folder} is the --out pool" in lines[0], result.output
        assert not any(tmp_path.iterdir())
