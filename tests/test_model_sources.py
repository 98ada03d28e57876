"""Models from timm and Hugging Face transformers: pools equal the models' own outputs on the tensors
their own preprocessing makes; no download ever; a missing extra is a one-line error."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _images import write_images
from conftest import assert_one_line_error
from typer.testing import CliRunner

from uwe_cli.cli import app
from uwe_cli.data import load_image

runner = CliRunner()
timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    write_images(folder, n=4, size=36)
    return folder


@pytest.fixture(autouse=True)
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No Hugging Face cache: anything that tried to download or read a cached model would fail."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def pool_matrix(table, column: str) -> np.ndarray:
    return np.stack(table.column(column).to_pylist()).astype(np.float64)


def test_timm_model_equals_its_own_forward(images: Path, tmp_path: Path) -> None:
    from timm.data import create_transform, resolve_data_config

    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    ckpt = tmp_path / "tiny.pth"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--model", "timm:resnet18", "--checkpoint", ckpt, "--data", images,
        "--out", out, "--num-workers", 0, "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    transform = create_transform(**resolve_data_config({}, model=model))
    x = torch.stack([transform(load_image(images / i)) for i in ids])
    seen = {}
    handle = model.get_classifier().register_forward_hook(lambda m, inp, o: seen.update(f=inp[0]))
    with torch.no_grad():
        probs = model(x).softmax(dim=1).double().numpy()
    handle.remove()
    np.testing.assert_allclose(pool_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        pool_matrix(table, "feature"), seen["f"].double().numpy(), rtol=1e-4, atol=1e-5
    )


def test_timm_weights_come_from_the_local_cache_only(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--model", "timm:resnet18", "--weights", "DEFAULT", "--data", images,
        "--out", out, "--num-workers", 0, "--device", "cpu",
    )  # fmt: skip
    assert_one_line_error(r, "not in the local Hugging Face cache", out)
    r = invoke("extract", "classification", "--model", "timm:no_such_net9", "--data", images, "--out", out)
    assert_one_line_error(r, "unknown timm model", out)


def tiny_vit(folder: Path) -> Path:
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=3, id2label={0: "cat", 1: "dog", 2: "bird"},
        label2id={"cat": 0, "dog": 1, "bird": 2},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_hf_classifier_equals_its_own_forward(images: Path, tmp_path: Path) -> None:
    model_dir = tiny_vit(tmp_path / "vit")
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--model", f"hf:{model_dir}", "--data", images, "--out", out,
        "--num-workers", 0, "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    ids = table.column("id").to_pylist()
    model = transformers.ViTForImageClassification.from_pretrained(model_dir).eval()
    processor = transformers.ViTImageProcessor.from_pretrained(model_dir)
    x = processor(images=[load_image(images / i) for i in ids], return_tensors="pt")["pixel_values"]
    seen = {}
    handle = model.classifier.register_forward_hook(lambda m, inp, o: seen.update(f=inp[0]))
    with torch.no_grad():
        probs = model(pixel_values=x).logits.softmax(dim=1).double().numpy()
    handle.remove()
    np.testing.assert_allclose(pool_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        pool_matrix(table, "feature"), seen["f"].double().numpy(), rtol=1e-4, atol=1e-5
    )
    import json

    assert json.loads(table.schema.metadata[b"uwe"])["class_names"] == ["cat", "dog", "bird"]


def test_hf_segmentation_model_pools_its_own_logits(images: Path, tmp_path: Path) -> None:
    from uwe_cli.extract.segmentation import SegmentationTransform
    from uwe_cli.uncertainty import entropy

    config = transformers.SegformerConfig(
        num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3], strides=[2],
        num_attention_heads=[1], mlp_ratios=[2], decoder_hidden_size=8, num_labels=3,
    )  # fmt: skip
    torch.manual_seed(0)
    folder = tmp_path / "segformer"
    transformers.SegformerForSemanticSegmentation(config).save_pretrained(folder)
    processor = transformers.SegformerImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(folder)
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "segmentation", "--model", f"hf:{folder}", "--data", images, "--out", out,
        "--num-workers", 0, "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    table = pq.read_table(out)
    model = transformers.SegformerForSemanticSegmentation.from_pretrained(folder).eval()
    transform = SegmentationTransform((32, 32), processor.image_mean, processor.image_std)
    for row in table.to_pylist():
        x = transform(load_image(images / row["id"]))[0][None]
        with torch.no_grad():
            logits = model(pixel_values=x).logits[0]
        expected = float(entropy(logits.double().softmax(dim=0), dim=0).mean())
        assert row["entropy"] == pytest.approx(expected, rel=1e-4)
        assert len(row["feature"]) == 8


@pytest.mark.parametrize(("model", "extra"), [("timm:resnet18", "timm"), ("hf:/some/dir", "hf")])
def test_missing_extra_is_a_one_line_error(images: Path, tmp_path: Path, model: str, extra: str) -> None:
    package = "timm" if extra == "timm" else "transformers"
    code = (
        f"import sys; sys.modules[{package!r}] = None\n"  # as if the package were not installed
        "from uwe_cli.cli import main; main()"
    )
    out = tmp_path / "p.parquet"
    proc = subprocess.run(
        [sys.executable, "-c", code, "extract", "classification", "--model", model, "--data", str(images),
         "--out", str(out), "--num-workers", "0"],
        capture_output=True, text=True,
    )  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert f"pip install 'uwe-cli[{extra}]'" in lines[0] and not out.exists()
