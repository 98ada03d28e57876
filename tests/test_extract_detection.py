"""`uwe extract detection`: per-box probs/features must be the model's own intermediate tensors.

Detectors are torchvision's, built with random weights (weights=None) at tiny input sizes and with
a zero score threshold so that random weights still produce boxes. Each test re-runs the model's
standard forward with hooks on the layers whose values we store, and checks every kept detection
against those tensors: never against hard-coded numbers.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from _images import write_images
from conftest import assert_one_line_error
from torchvision.models import detection as D
from torchvision.ops import boxes as box_ops
from typer.testing import CliRunner

from uwe_cli.errors import ModelError
from uwe_cli.extract.detection import (
    DetectionConfig,
    box_uncertainty,
    detect,
    detector_info,
    extract_detection,
)

K = 4  # class outputs (background included for the softmax families)
SMALL = {"weights": None, "weights_backbone": None, "min_size": 64, "max_size": 96}
runner = CliRunner()

RPN = {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100}  # fewer proposals: faster tests


def _jitter(model: torch.nn.Module) -> torch.nn.Module:
    """Random-init SSDlite gives the same class scores everywhere; noise makes anchors distinguishable."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


BUILDERS = {
    "fasterrcnn": lambda: D.fasterrcnn_resnet50_fpn(num_classes=K, box_score_thresh=0.0, **RPN, **SMALL),
    "fasterrcnn_v2": lambda: D.fasterrcnn_resnet50_fpn_v2(
        num_classes=K, box_score_thresh=0.0, **RPN, **SMALL
    ),
    "maskrcnn": lambda: D.maskrcnn_resnet50_fpn(
        num_classes=K, box_score_thresh=0.0, box_detections_per_img=30, **RPN, **SMALL
    ),
    "retinanet": lambda: D.retinanet_resnet50_fpn(
        num_classes=K, score_thresh=0.0, topk_candidates=50, **SMALL
    ),
    "retinanet_v2": lambda: D.retinanet_resnet50_fpn_v2(
        num_classes=K, score_thresh=0.0, topk_candidates=50, **SMALL
    ),
    "fcos": lambda: D.fcos_resnet50_fpn(num_classes=K, score_thresh=0.0, topk_candidates=50, **SMALL),
    "ssdlite": lambda: _jitter(
        D.ssdlite320_mobilenet_v3_large(
            num_classes=K, weights=None, weights_backbone=None, score_thresh=0.0, topk_candidates=50
        )
    ),
    "ssd300": lambda: D.ssd300_vgg16(
        num_classes=K, weights=None, weights_backbone=None, score_thresh=0.0, topk_candidates=50
    ),
}


def _small_frcnn() -> torch.nn.Module:
    """The cheapest detector, for pipeline and CLI tests."""
    return D.fasterrcnn_mobilenet_v3_large_fpn(num_classes=K, box_score_thresh=0.0, **RPN, **SMALL)


def _images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(3, 56, 72, generator=g), torch.rand(3, 64, 48, generator=g)]


@pytest.fixture(scope="module", params=list(BUILDERS))
def detector(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    return request.param, BUILDERS[request.param]().eval()


class Recorder:
    """Inputs (and outputs) of modules during the model's own standard forward pass."""

    def __init__(self, modules: list[torch.nn.Module], pre: bool = False) -> None:
        self.calls: list[tuple[tuple, object]] = []
        if pre:
            self.handles = [m.register_forward_pre_hook(self._pre) for m in modules]
        else:
            self.handles = [m.register_forward_hook(self._post) for m in modules]

    def _pre(self, module, args):
        self.calls.append((args, None))

    def _post(self, module, args, output):
        self.calls.append((args, output))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def _standard(model: torch.nn.Module, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    with torch.no_grad():
        out = model(images)
    return out[1] if isinstance(out, tuple) else out


def _level_table(maps: list[torch.Tensor], anchors: list[int], image: int, width: int) -> torch.Tensor:
    """Per-anchor feature rows in the heads' (level, H, W, A) output order, zero-padded to width."""
    rows = []
    for fmap, a in zip(maps, anchors, strict=True):
        f = fmap[image].permute(1, 2, 0).reshape(-1, fmap.shape[1])
        f = F.pad(f, (0, width - f.shape[1]))
        rows.append(f.repeat_interleave(a, dim=0))
    return torch.cat(rows)


def _reference(name: str, model: torch.nn.Module, images: list[torch.Tensor]):
    """Per image: (class-score table over all proposals/anchors, matching feature table, standard output)."""
    info = detector_info(model)
    if info.family == "rcnn":
        with (
            Recorder([model.roi_heads.box_predictor]) as pred,
            Recorder([model.roi_heads], pre=True) as heads,
        ):
            standard = _standard(model, images)
        (feats,), (logits, _) = pred.calls[0]
        proposals = heads.calls[0][0][1]
        probs = F.softmax(logits, -1).split([len(p) for p in proposals])
        feats = feats.flatten(1).split([len(p) for p in proposals])
        return list(zip(probs, feats, standard, strict=True))
    if info.family in ("retinanet", "fcos"):
        with (
            Recorder([model.head.classification_head.cls_logits]) as cls,
            Recorder([model.head]) as head,
        ):
            standard = _standard(model, images)
        maps = [args[0] for args, _ in cls.calls]
        out = head.calls[0][1]
        hw = [m.shape[2] * m.shape[3] for m in maps]
        a = out["cls_logits"].shape[1] // sum(hw)
        refs = []
        for i in range(len(images)):
            # as the model's postprocess_detections computes them: per image, per level
            logits = out["cls_logits"][i].split([n * a for n in hw])
            if info.family == "fcos":
                ctr = out["bbox_ctrness"][i].split(hw)
                scores = [
                    torch.sqrt(torch.sigmoid(x) * torch.sigmoid(c)) for x, c in zip(logits, ctr, strict=True)
                ]
            else:
                scores = [torch.sigmoid(x) for x in logits]
            refs.append(
                (torch.cat(scores), _level_table(maps, [a] * len(maps), i, maps[0].shape[1]), standard[i])
            )
        return refs
    head = model.head.classification_head
    finals = [
        [m for m in block.modules() if isinstance(m, torch.nn.Conv2d)][-1] for block in head.module_list
    ]
    with Recorder(finals) as cls, Recorder([model.head]) as whole:
        standard = _standard(model, images)
    maps = [args[0] for args, _ in cls.calls]
    anchors = [c.out_channels // K for c in finals]
    width = max(c.in_channels for c in finals)
    scores = F.softmax(whole.calls[0][1]["cls_logits"], -1)
    return [(scores[i], _level_table(maps, anchors, i, width), standard[i]) for i in range(len(images))]


def test_boxes_probs_features_are_the_models_own(detector: tuple[str, torch.nn.Module]) -> None:
    name, model = detector
    images = _images()
    dets = detect(model, images, score_threshold=None, max_detections=None)
    refs = _reference(name, model, images)
    info = detector_info(model)
    assert info.num_classes == K
    total = 0
    for det, (score_table, feature_table, standard) in zip(dets, refs, strict=True):
        # the kept boxes are exactly the model's standard output
        assert torch.equal(det.boxes, standard["boxes"])
        assert torch.equal(det.scores, standard["scores"])
        assert torch.equal(det.labels, standard["labels"])
        assert det.features.shape[1] == info.feature_dim
        # each stored class-score row is one proposal's/anchor's row of the model's tensor ...
        same = (det.probs[:, None, :] == score_table[None]).all(dim=2)
        assert same.any(dim=1).all(), f"{name}: a detection has no matching proposal/anchor"
        # ... and the stored feature is that same proposal's/anchor's head input
        i, j = torch.nonzero(same, as_tuple=True)
        feature_ok = (feature_table[j] == det.features[i]).all(dim=1).float()
        assert (torch.zeros(len(det)).index_add_(0, i, feature_ok) > 0).all(), name
        # the box's score is its row's entry for the predicted label
        assert torch.equal(det.probs.gather(1, det.labels[:, None])[:, 0], det.scores)
        total += len(det)
    assert total > 0


@pytest.mark.parametrize("name", ["fasterrcnn", "retinanet"])
def test_score_threshold_and_max_detections_match_model_settings(name: str) -> None:
    torch.manual_seed(0)
    model = BUILDERS[name]().eval()
    images = _images()[:1]
    owner = model.roi_heads if hasattr(model, "roi_heads") else model
    old = owner.score_thresh, owner.detections_per_img
    try:
        owner.score_thresh, owner.detections_per_img = 0.3, 7
        standard = _standard(model, images)
    finally:
        owner.score_thresh, owner.detections_per_img = old
    det = detect(model, images, score_threshold=0.3, max_detections=7)[0]
    assert len(det) <= 7 and (det.scores > 0.3).all()
    assert torch.equal(det.boxes, standard[0]["boxes"])
    assert torch.equal(det.scores, standard[0]["scores"])


def test_box_head_and_boxes_of_faster_rcnn_proposals() -> None:
    """Two-stage: the box of each detection is its proposal's regression for the label, decoded."""
    torch.manual_seed(1)
    model = BUILDERS["fasterrcnn"]().eval()
    images = _images()
    with (
        Recorder([model.roi_heads.box_predictor]) as pred,
        Recorder([model.roi_heads], pre=True) as heads,
        Recorder([model.transform]) as tr,
    ):
        _standard(model, images)
    (feats,), (logits, regression) = pred.calls[0]
    feats = feats.flatten(1)
    _, proposals, image_sizes = heads.calls[0][0][:3]
    decoded = model.roi_heads.box_coder.decode(regression, proposals)
    probs = F.softmax(logits, -1)
    image_list = tr.calls[0][1][0]
    dets = detect(model, images, score_threshold=None, max_detections=None)
    offset = 0
    checked = 0
    for n, det in enumerate(dets):
        sy = images[n].shape[1] / image_list.image_sizes[n][0]
        sx = images[n].shape[2] / image_list.image_sizes[n][1]
        scale = torch.tensor([sx, sy, sx, sy])
        rows = range(offset, offset + len(proposals[n]))
        for i in range(len(det)):
            candidates = [
                j
                for j in rows
                if torch.equal(probs[j], det.probs[i]) and torch.equal(feats[j], det.features[i])
            ]
            boxes = [
                box_ops.clip_boxes_to_image(decoded[j, det.labels[i]], image_sizes[n]) * scale
                for j in candidates
            ]
            assert any(torch.allclose(det.boxes[i], b, atol=1e-4) for b in boxes), (n, i)
            checked += 1
        offset += len(proposals[n])
    assert checked > 0


def _numpy_uncertainty(p: np.ndarray, background: int | None) -> dict[str, np.ndarray]:
    if background is not None:
        p = np.delete(p, background, axis=1)
    q = p / p.sum(axis=1, keepdims=True)
    s = np.sort(q, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=1)
    return {"bvsb": s[:, -2] / s[:, -1], "entropy": ent, "least_confidence": 1 - s[:, -1]}


def test_uncertainty_on_foreground_distribution() -> None:
    p = torch.tensor([[0.9, 0.06, 0.04], [0.1, 0.45, 0.45], [0.5, 0.5, 0.0]])
    got = box_uncertainty(p, background_class=0)
    want = _numpy_uncertainty(p.numpy().astype(np.float64), 0)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-6, atol=1e-7)
    sig = torch.tensor([[0.2, 0.8, 0.4], [1e-3, 1e-3, 2e-3]])
    got = box_uncertainty(sig, background_class=None)
    want = _numpy_uncertainty(sig.numpy().astype(np.float64), None)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key], rtol=1e-5, atol=1e-7)
    zero = box_uncertainty(torch.zeros(1, 3), background_class=None)
    assert float(zero["bvsb"][0]) == 1.0 and torch.isfinite(zero["entropy"]).all()


# ---------------------------------------------------------------- user detectors and the pool

USER_MODULE = textwrap.dedent(
    '''
    import os

    import torch


    class KnownBoxes(torch.nn.Module):
        """A detector whose output is a function of the image size only: known boxes per image."""

        num_classes = 3

        def forward(self, images):
            out = []
            for img in images:
                h, w = img.shape[-2:]
                if os.environ.get("KNOWN_DET_FAIL_HEIGHT") == str(int(h)):
                    raise RuntimeError("simulated crash")
                if w < 40:  # narrow images: nothing detected
                    n = 0
                else:
                    n = 3
                g = torch.Generator().manual_seed(int(h * 1000 + w))
                probs = torch.softmax(torch.randn(n, 3, generator=g), dim=1)
                feats = torch.randn(n, 5, generator=g)
                boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0], [0.0, 0.0, w / 2, h / 2], [3.0, 3.0, w, h]])[:n]
                out.append(
                    {
                        "boxes": boxes,
                        "labels": probs.argmax(dim=1),
                        "scores": probs.amax(dim=1),
                        "probs": probs,
                        "features": feats,
                    }
                )
            return out


    def known_boxes():
        return KnownBoxes()
    '''
)


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    pkg = tmp_path / "userdet"
    pkg.mkdir()
    (pkg / "known_det.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(pkg))
    return "known_det:known_boxes"


def _folder(tmp_path: Path) -> Path:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name, (h, w) in {"a.png": (50, 60), "b.png": (30, 30), "c.png": (44, 70)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_user_detector_pool_rows(tmp_path: Path, user_module: str) -> None:
    import importlib

    folder = _folder(tmp_path)
    out = tmp_path / "pool.parquet"
    result = extract_detection(
        DetectionConfig(data=folder, out=out, model=user_module, device="cpu", score_threshold=None)
    )
    model = importlib.import_module("known_det").KnownBoxes()
    table = pq.read_table(out)
    meta = json.loads(table.schema.metadata[b"uwe"])
    assert meta["task"] == "detection" and meta["num_classes"] == 3 and meta["feature_dim"] == 5
    assert meta["detector_family"] == "user" and meta["background_class"] is None
    assert table.schema.field("box").type.list_size == 4
    rows = table.to_pylist()
    assert [r["id"] for r in rows] == ["a.png"] * 3 + ["b.png"] + ["c.png"] * 3
    assert result.details["detections"] == 6 and result.details["empty_images"] == 1 and result.rows == 7
    empty = rows[3]
    assert empty["label"] is None and empty["feature"] is None and empty["box"] is None
    assert empty["source"].endswith("b.png")
    from torchvision.transforms.functional import to_tensor

    from uwe_cli.data import load_image

    for image_id in ("a.png", "c.png"):
        ref = model([to_tensor(load_image(folder / image_id))])[0]
        mine = [r for r in rows if r["id"] == image_id]
        order = torch.argsort(ref["scores"], descending=True, stable=True)
        np.testing.assert_array_equal(
            np.array([r["box"] for r in mine], np.float32), ref["boxes"][order].numpy()
        )
        np.testing.assert_array_equal(
            np.array([r["probs"] for r in mine], np.float32), ref["probs"][order].numpy()
        )
        np.testing.assert_array_equal(
            np.array([r["feature"] for r in mine], np.float32), ref["features"][order].numpy()
        )
        assert [r["label"] for r in mine] == ref["labels"][order].tolist()
        want = _numpy_uncertainty(ref["probs"][order].numpy().astype(np.float64), None)
        for key, values in want.items():
            np.testing.assert_allclose([r[key] for r in mine], values, rtol=1e-5)

    # --score-threshold / --max-detections on a user detector: after its own post-processing
    out2 = tmp_path / "pool2.parquet"
    extract_detection(
        DetectionConfig(
            data=folder, out=out2, model=user_module, device="cpu", score_threshold=0.5, max_detections=1
        )
    )
    rows2 = pq.read_table(out2).to_pylist()
    assert sorted({r["id"] for r in rows2}) == ["a.png", "b.png", "c.png"]
    for r in rows2:
        assert r["label"] is None or r["score"] > 0.5
    assert max(sum(r["id"] == i and r["label"] is not None for r in rows2) for i in ("a.png", "c.png")) <= 1


def test_torchvision_pool_matches_detect(tmp_path: Path) -> None:
    """Whole-pipeline check: pool rows equal `detect` on the loaded images, boxes in input pixels."""
    from torchvision.transforms.functional import to_tensor

    from uwe_cli.data import load_image

    torch.manual_seed(0)
    model = _small_frcnn().eval()
    ckpt = tmp_path / "frcnn.pth"
    torch.save(model.state_dict(), ckpt)
    folder = _folder(tmp_path)
    out = tmp_path / "pool.parquet"
    vis = tmp_path / "vis"
    cfg = DetectionConfig(
        data=folder,
        out=out,
        model="fasterrcnn_mobilenet_v3_large_fpn",
        checkpoint=ckpt,
        min_size=64,
        max_size=96,
        score_threshold=0.2,
        max_detections=5,
        device="cpu",
        batch_size=1,  # batching pads images, which changes features near borders
        visualize=vis,
    )
    result = extract_detection(cfg)
    assert result.num_classes == K  # inferred from the checkpoint's classification conv
    table = pq.read_table(out)
    rows = table.to_pylist()
    for image_id in ("a.png", "b.png", "c.png"):
        det = detect(model, [to_tensor(load_image(folder / image_id))], 0.2, 5)[0]
        mine = [r for r in rows if r["id"] == image_id]
        if len(det) == 0:
            assert len(mine) == 1 and mine[0]["label"] is None
            continue
        np.testing.assert_array_equal(np.array([r["box"] for r in mine], np.float32), det.boxes.numpy())
        np.testing.assert_array_equal(np.array([r["probs"] for r in mine], np.float32), det.probs.numpy())
        np.testing.assert_array_equal(
            np.array([r["feature"] for r in mine], np.float32), det.features.numpy()
        )
        assert (det.boxes[:, 2] <= load_image(folder / image_id).width).all()
    assert sorted(p.name for p in vis.iterdir()) == ["a.png.png", "b.png.png", "c.png.png"]


def test_user_detector_contract_errors() -> None:
    class Bad(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0), "scores": torch.zeros(0)}]

    with pytest.raises(ModelError, match="lacks probs, features"):
        detect(Bad(), [torch.rand(3, 8, 8)])


# ---------------------------------------------------------------- CLI


def invoke(*args: str):
    from uwe_cli.cli import app

    return runner.invoke(app, list(args), env={"UWE_NO_PROGRESS": "1"})


@pytest.fixture(scope="module")
def frcnn_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("frcnn")
    torch.manual_seed(0)
    model = _small_frcnn()
    state, full = root / "state.pth", root / "full.pth"
    torch.save(model.state_dict(), state)
    torch.save(model, full)
    return state, full


def test_cli_bad_inputs(tmp_path: Path, frcnn_files: tuple[Path, Path]) -> None:
    state, full = frcnn_files
    images = tmp_path / "imgs"
    write_images(images, n=2)
    out = tmp_path / "pool.parquet"
    base = ["extract", "detection", "--out", str(out), "--num-workers", "0", "--device", "cpu"]
    model = ["--model", "fasterrcnn_mobilenet_v3_large_fpn", "--checkpoint", str(state)]
    assert_one_line_error(invoke(*base, "--data", str(tmp_path / "nope"), *model), "not found", out)
    assert_one_line_error(invoke(*base, "--data", str(images), "--model", "fasterrcnn_r9000"), "unknown", out)
    r = invoke(*base, "--data", str(images), *model, "--max-detections", "0")
    assert_one_line_error(r, "--max-detections", out)
    r = invoke(*base, "--data", str(images), *model, "--score-threshold", "1.5")
    assert_one_line_error(r, "--score-threshold", out)
    r = invoke(*base, "--data", str(images), *model, "--num-classes", "7")
    assert_one_line_error(r, "cls_score.weight", out)
    r = invoke(
        *base, "--data", str(images), "--checkpoint", str(full), "--trust-checkpoint", "--class-names", "a,b"
    )
    assert_one_line_error(r, "2 class names", out)
    r = invoke(*base, "--data", str(images), *model, "--min-size", "0")
    assert_one_line_error(r, "--min-size", out)
    (images / "broken.png").write_bytes(b"\x89PNG garbage")
    r = invoke(*base, "--data", str(images), "--checkpoint", str(full), "--trust-checkpoint")
    assert_one_line_error(r, "broken.png", out)


def test_cli_end_to_end_with_select(tmp_path: Path, frcnn_files: tuple[Path, Path]) -> None:
    _, full = frcnn_files
    images = tmp_path / "imgs"
    write_images(images, n=5, size=36)
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "detection", "--checkpoint", str(full), "--trust-checkpoint", "--data", str(images),
        "--out", str(out),
        "--score-threshold", "0", "--max-detections", "3", "--num-workers", "0", "--device", "cpu",
        "--class-names", "background,cat,dog,bird",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    assert set(table.column("id").to_pylist()) == {
        p.relative_to(images).as_posix() for p in images.rglob("*.*")
    }
    meta = json.loads(table.schema.metadata[b"uwe"])
    assert meta["class_names"] == ["background", "cat", "dog", "bird"] and meta["num_classes"] == K
    batch = tmp_path / "b.csv"
    r = invoke("select", str(out), "--budget", "2", "--out", str(batch), "--quiet")
    assert r.exit_code == 0, r.output
    lines = batch.read_text().splitlines()
    assert "id" in lines[0].split(",") and len(lines) == 3


def test_cli_shards_cover_all_images(tmp_path: Path, user_module: str) -> None:
    folder = _folder(tmp_path)
    out = tmp_path / "pool_dir"
    for k in range(2):
        r = invoke(
            "extract", "detection", "--model", user_module, "--data", str(folder), "--out", str(out),
            "--shard", f"{k}/2", "--num-workers", "0", "--device", "cpu",
        )  # fmt: skip
        assert r.exit_code == 0, r.output
    ids = [i for p in sorted(out.glob("*.parquet")) for i in pq.read_table(p).column("id").to_pylist()]
    assert sorted(set(ids)) == ["a.png", "b.png", "c.png"]


def test_interrupted_run_resumes(tmp_path: Path, user_module: str, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = _folder(tmp_path)
    out = tmp_path / "pool.parquet"
    cfg = DetectionConfig(data=folder, out=out, model=user_module, device="cpu", batch_size=1, part_rows=1)
    monkeypatch.setenv("KNOWN_DET_FAIL_HEIGHT", "44")  # c.png, the last image
    with pytest.raises(ModelError, match="simulated crash"):
        extract_detection(cfg)
    assert not out.exists()
    monkeypatch.delenv("KNOWN_DET_FAIL_HEIGHT")
    result = extract_detection(cfg)
    assert result.resumed == 2 and result.processed == 1
    fresh = tmp_path / "fresh.parquet"
    extract_detection(DetectionConfig(data=folder, out=fresh, model=user_module, device="cpu"))
    assert pq.read_table(out).to_pylist() == pq.read_table(fresh).to_pylist()


def test_json_summary_is_one_line_on_stdout(tmp_path: Path, user_module: str) -> None:
    folder = _folder(tmp_path)
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "detection", "--model", user_module, "--data", str(folder), "--out", str(out),
        "--num-workers", "0", "--device", "cpu", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    summary = json.loads(lines[0])
    assert (
        len(lines) == 1 and summary["task"] == "detection" and summary["rows"] == pq.read_table(out).num_rows
    )
    assert summary["processed"] == 3 and summary["detections"] + summary["empty_images"] >= 3
