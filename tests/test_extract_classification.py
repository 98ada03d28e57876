"""`uwe extract classification`: pools equal a direct forward pass; every checkpoint form; errors; resume."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision
from conftest import Killed, assert_one_line_error, kill_after
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from _images import write_images, write_truncated_png

from uwe_cli.data import (
    ClassificationPreprocess,
    classification_preprocess,
    classification_transform,
    list_images,
    load_image,
    parse_shard,
    shard_items,
    split_weights_transform,
)
from uwe_cli.errors import DataError, ModelError, PoolError
from uwe_cli.extract.classification import ClassificationConfig, extract_classification
from uwe_cli.models import unwrap_state_dict
from uwe_cli.pool import read_pool
from uwe_cli.uncertainty import bald, bvsb, entropy, least_confidence

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SIZE = 32
K = 4
runner = CliRunner()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("imgs") / "data"
    write_images(folder, n=6)
    return folder


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model("resnet18", weights=None, num_classes=K).eval()


@pytest.fixture(scope="module")
def resnet_ckpt(tmp_path_factory: pytest.TempPathFactory, resnet: torch.nn.Module) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "resnet.pth"
    torch.save(resnet.state_dict(), path)
    return path


def cfg(data: Path, out: Path, **kw: object) -> ClassificationConfig:
    base: dict[str, object] = {"model": "resnet18", "image_size": SIZE, "batch_size": 4, "device": "cpu"}
    base.update(kw)
    return ClassificationConfig(data=data, out=out, **base)  # type: ignore[arg-type]


def direct(model: torch.nn.Module, folder: Path, ids: list[str], head: torch.nn.Module | None = None):
    """Reference: the same transform, one forward pass, the head's input captured by hand."""
    transform = classification_transform(SIZE)
    x = torch.stack([transform(load_image(folder / i)) for i in ids])
    captured = {}
    head = head if head is not None else model.fc

    def hook(_m: torch.nn.Module, inp: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
        captured["f"] = inp[0]

    handle = head.register_forward_hook(hook)
    with torch.no_grad():
        probs = model(x).softmax(dim=1).numpy()
    handle.remove()
    return captured["f"].reshape(len(ids), -1).numpy(), probs


def load(path: Path) -> pa.Table:
    return pq.read_table(path) if path.is_file() else pq.ParquetDataset(path).read()


def column_matrix(table: pa.Table, name: str) -> np.ndarray:
    return np.stack(table.column(name).to_pylist()).astype(np.float32)


def ref_measures(p: np.ndarray) -> dict[str, np.ndarray]:
    s = np.sort(p, axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p > 0, p * np.log(p), 0.0), axis=1)
    return {"entropy": ent, "bvsb": s[:, -2] / s[:, -1], "least_confidence": 1 - s[:, -1]}


# ---------------------------------------------------------------- uncertainty


def test_uncertainty_matches_numpy_for_vectors_and_maps() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(5), size=7).astype(np.float64)
    p[0] = [1, 0, 0, 0, 0]
    t = torch.from_numpy(p)
    ref = ref_measures(p)
    np.testing.assert_allclose(entropy(t).numpy(), ref["entropy"], atol=1e-12)
    np.testing.assert_allclose(bvsb(t).numpy(), ref["bvsb"], atol=1e-12)
    np.testing.assert_allclose(least_confidence(t).numpy(), ref["least_confidence"], atol=1e-12)
    maps = t.T.reshape(1, 5, 7, 1).expand(2, 5, 7, 3)  # N×K×H×W
    np.testing.assert_allclose(entropy(maps)[1, :, 2].numpy(), ref["entropy"], atol=1e-12)
    samples = torch.from_numpy(rng.dirichlet(np.ones(5), size=(3, 7)))
    expected = entropy(samples.mean(0)) - torch.stack([entropy(s) for s in samples]).mean(0)
    np.testing.assert_allclose(bald(samples).numpy(), expected.clamp_min(0).numpy(), atol=1e-12)
    assert torch.allclose(bald(torch.stack([t, t])), torch.zeros(7, dtype=t.dtype), atol=1e-12)


# ---------------------------------------------------------------- data


def test_directory_listing_ids_and_modes(images: Path) -> None:
    items = list_images(images)
    ids = [i.id for i in items]
    assert ids == sorted(ids) and len(ids) == 6
    assert any(i.startswith("sub/") for i in ids)
    for item in items:
        img = load_image(item.path)
        assert img.mode == "RGB"


def test_shards_are_disjoint_and_cover() -> None:
    items = list(range(11))
    parts = [shard_items(items, (k, 3)) for k in range(3)]  # type: ignore[arg-type]
    assert [x for part in parts for x in part] == items
    assert parse_shard("2/3") == (2, 3)
    for bad in ("3/3", "a/b", "1", "-1/2"):
        with pytest.raises(DataError):
            parse_shard(bad)


# ---------------------------------------------------------------- exactness


def _split_batch(pre: ClassificationPreprocess, pils: list[object]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([pre.geometry(img) for img in pils])
    return x, pre.normalize(x)


def test_split_preprocess_is_bit_identical(images: Path) -> None:
    """uint8 geometry in the loader + one normalisation per batch == ToTensor + Normalize per image."""
    pils = [load_image(item.path) for item in list_images(images)]
    for kw in ({}, {"resize": 50, "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}):
        raw, x = _split_batch(classification_preprocess(SIZE, **kw), pils)  # type: ignore[arg-type]
        assert raw.dtype == torch.uint8 and x.dtype == torch.float32
        ref = torch.stack([classification_transform(SIZE, **kw)(img) for img in pils])  # type: ignore[arg-type]
        assert torch.equal(x, ref)


@pytest.mark.parametrize(
    "weights", ["ResNet18_Weights.IMAGENET1K_V1", "EfficientNet_B0_Weights.IMAGENET1K_V1"]
)
def test_split_weights_transform_is_bit_identical(weights: str, images: Path) -> None:
    """torchvision weights' transforms (bilinear and bicubic, various sizes) split the same way."""
    transform = torchvision.models.get_weight(weights).transforms()
    pre = split_weights_transform(transform)
    assert pre.mean is not None  # really split, not the whole-transform fallback
    pils = [load_image(item.path) for item in list_images(images)]
    raw, x = _split_batch(pre, pils)
    assert raw.dtype == torch.uint8
    assert torch.equal(x, torch.stack([transform(img) for img in pils]))
    composed = split_weights_transform(classification_transform(SIZE))  # Resize, crop, ToTensor, Normalize
    assert composed.mean is not None
    _, y = _split_batch(composed, pils)
    assert torch.equal(y, torch.stack([classification_transform(SIZE)(img) for img in pils]))
    odd = torchvision.transforms.Compose(
        [*classification_transform(SIZE).transforms, torchvision.transforms.Lambda(abs)]
    )
    whole = split_weights_transform(odd)  # cannot be split: kept whole, same values
    assert whole.mean is None
    _, z = _split_batch(whole, pils)
    assert torch.equal(z, torch.stack([odd(img) for img in pils]))


def test_weights_transform_path_equals_direct_forward(
    images: Path, resnet: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With --weights the model's own transforms are used; offline here, so the loaded model is faked."""
    import uwe_cli.extract.classification as extractor
    from uwe_cli.models import LoadedModel

    transform = torchvision.models.get_weight("ResNet18_Weights.IMAGENET1K_V1").transforms()
    monkeypatch.setattr(
        extractor,
        "load_model",
        lambda *a, **k: LoadedModel(module=resnet, name="resnet18", weights_transform=transform),
    )
    out = tmp_path / "pool.parquet"
    extract_classification(
        ClassificationConfig(data=images, out=out, model="resnet18", batch_size=4, device="cpu")
    )
    table = load(out)
    ids = table.column("id").to_pylist()
    x = torch.stack([transform(load_image(images / i)) for i in ids])
    with torch.no_grad():
        probs = resnet(x).softmax(dim=1).numpy()
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)


def test_pool_equals_direct_forward(images: Path, resnet: torch.nn.Module, resnet_ckpt: Path, tmp_path: Path):
    out = tmp_path / "pool.parquet"
    result = extract_classification(cfg(images, out, checkpoints=[resnet_ckpt], num_classes=K))
    assert result.rows == 6 and result.feature_dim == 512 and result.num_classes == K
    table = load(out)
    ids = table.column("id").to_pylist()
    assert ids == [i.id for i in list_images(images)]
    feats, probs = direct(resnet, images, ids)
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)
    for name, values in ref_measures(probs).items():
        np.testing.assert_allclose(table.column(name).to_numpy(), values, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(table.column("pred").to_numpy(), probs.argmax(1))
    pool = read_pool(out, need_probs=True)
    assert pool.metadata["task"] == "classification" and pool.metadata["feature_dim"] == 512
    assert (
        pool.metadata["checkpoint_sha256"]
        == __import__("hashlib").sha256(resnet_ckpt.read_bytes()).hexdigest()
    )
    assert pool.metadata["num_classes"] == K


def _wrap_forms(resnet: torch.nn.Module, tmp: Path) -> dict[str, tuple[Path, dict[str, object]]]:
    sd = resnet.state_dict()
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    forms: dict[str, tuple[object, dict[str, object]]] = {
        "plain": (sd, {}),
        "state_dict": ({"state_dict": sd, "epoch": 3}, {}),
        "model_state_dict+ddp": ({"model_state_dict": prefixed, "optimizer": {}}, {}),
        "model": ({"model": sd}, {}),
        "pickled_module": (resnet, {"model": None, "trust_checkpoint": True}),
        "factory": (sd, {"model": "torchvision.models:resnet18"}),
    }
    out = {}
    for name, (obj, kw) in forms.items():
        path = tmp / f"{name}.pth"
        torch.save(obj, path)
        out[name] = (path, kw)
    return out


@pytest.mark.parametrize(
    "form", ["plain", "state_dict", "model_state_dict+ddp", "model", "pickled_module", "factory"]
)
def test_checkpoint_forms(form: str, images: Path, resnet: torch.nn.Module, tmp_path: Path) -> None:
    path, kw = _wrap_forms(resnet, tmp_path)[form]
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, checkpoints=[path], **kw))  # num_classes inferred
    table = load(out)
    feats, probs = direct(resnet, images, table.column("id").to_pylist())
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)


class WithFeatures(torch.nn.Module):
    """A TorchScript-friendly wrapper returning (logits, features): hooks cannot reach into TorchScript."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(*list(net.children())[:-1])
        self.fc = net.fc

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.flatten(self.body(x), 1)
        return self.fc(f), f


def test_torchscript(images: Path, resnet: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(WithFeatures(resnet)).save(str(path))
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, model=None, checkpoints=[path], trust_checkpoint=True))
    table = load(out)
    feats, probs = direct(resnet, images, table.column("id").to_pylist())
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)
    plain = tmp_path / "plain.pt"
    torch.jit.script(resnet).save(str(plain))
    with pytest.raises(ModelError, match="feature"):
        extract_classification(
            cfg(images, tmp_path / "p2.parquet", model=None, checkpoints=[plain], trust_checkpoint=True)
        )
    assert not (tmp_path / "p2.parquet").exists()


def test_user_factory_and_feature_layer(
    images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from tiny_net import tiny_cnn

    torch.manual_seed(1)
    net = tiny_cnn(num_classes=3).eval()
    ckpt = tmp_path / "tiny.pth"
    torch.save({"state_dict": net.state_dict()}, ckpt)
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, model="tiny_net:tiny_cnn", checkpoints=[ckpt]))
    table = load(out)
    ids = table.column("id").to_pylist()
    feats, probs = direct(net, images, ids, head=net.head[3])
    assert feats.shape[1] == 64
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)
    # --feature-layer: the flattened output of a named module
    out2 = tmp_path / "pool2.parquet"
    extract_classification(
        cfg(images, out2, model="tiny_net:tiny_cnn", checkpoints=[ckpt], feature_layer="body.5")
    )
    feats2, _ = direct(net, images, ids, head=net.head[0])  # input of head.0 = flattened body output
    np.testing.assert_allclose(column_matrix(load(out2), "feature"), feats2, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small"])
def test_other_architectures_take_last_linear_input(name: str, images: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torchvision.models.get_model(name, weights=None, num_classes=K).eval()
    ckpt = tmp_path / "m.pth"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, model=name, checkpoints=[ckpt], num_classes=K))
    table = load(out)
    feats, probs = direct(net, images, table.column("id").to_pylist(), head=net.classifier[-1])
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(column_matrix(table, "probs"), probs, rtol=1e-4, atol=1e-6)


def test_ensemble_mean_probs_and_bald(
    images: Path, resnet: torch.nn.Module, resnet_ckpt: Path, tmp_path: Path
):
    torch.manual_seed(5)
    other = torchvision.models.get_model("resnet18", weights=None, num_classes=K).eval()
    ckpt2 = tmp_path / "b.pth"
    torch.save(other.state_dict(), ckpt2)
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, checkpoints=[resnet_ckpt, ckpt2]))
    table = load(out)
    ids = table.column("id").to_pylist()
    f1, p1 = direct(resnet, images, ids)
    _, p2 = direct(other, images, ids)
    mean = (p1 + p2) / 2
    np.testing.assert_allclose(column_matrix(table, "probs"), mean, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(column_matrix(table, "feature"), f1, rtol=1e-4, atol=1e-5)
    ref_bald = ref_measures(mean)["entropy"] - (ref_measures(p1)["entropy"] + ref_measures(p2)["entropy"]) / 2
    np.testing.assert_allclose(table.column("bald").to_numpy(), np.maximum(ref_bald, 0), atol=1e-5)
    np.testing.assert_allclose(table.column("entropy").to_numpy(), ref_measures(mean)["entropy"], atol=1e-5)


def test_mc_dropout(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from tiny_net import tiny_cnn

    torch.manual_seed(0)
    net = tiny_cnn(num_classes=K).eval()
    ckpt = tmp_path / "m.pth"
    torch.save(net.state_dict(), ckpt)
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images, out, model="tiny_net:tiny_cnn", checkpoints=[ckpt], mc_dropout=4))
    table = load(out)
    ids = table.column("id").to_pylist()
    feats, probs_eval = direct(net, images, ids, head=net.head[3])
    np.testing.assert_allclose(column_matrix(table, "feature"), feats, rtol=1e-4, atol=1e-5)  # dropout off
    probs = column_matrix(table, "probs")
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert not np.allclose(probs, probs_eval, atol=1e-7)  # stochastic passes really had dropout on
    assert (table.column("bald").to_numpy() >= 0).all() and table.column("bald").to_numpy().max() > 0
    with pytest.raises(ModelError, match="dropout"):
        extract_classification(cfg(images, tmp_path / "x.parquet", mc_dropout=2))


@pytest.mark.parametrize("suffix", ["csv", "parquet"])
def test_manifest(suffix: str, images: Path, resnet: torch.nn.Module, resnet_ckpt: Path, tmp_path: Path):
    items = list_images(images)[:4]
    manifest = images.parent / f"manifest.{suffix}"
    table = pa.table({"id": [f"m{i}" for i in range(4)], "path": [f"data/{it.id}" for it in items]})
    if suffix == "csv":
        manifest.write_text("id,path\n" + "".join(f"m{i},data/{it.id}\n" for i, it in enumerate(items)))
    else:
        pq.write_table(table, manifest)
    out = tmp_path / "pool.parquet"
    extract_classification(cfg(images.parent / manifest.name, out, checkpoints=[resnet_ckpt]))
    got = load(out)
    assert got.column("id").to_pylist() == [f"m{i}" for i in range(4)]
    feats, _ = direct(resnet, images, [it.id for it in items])
    np.testing.assert_allclose(column_matrix(got, "feature"), feats, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- resume, shard, skip


def test_resume_after_kill_has_every_image_once(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    config = cfg(images, out, checkpoints=[resnet_ckpt], batch_size=2, part_rows=2)
    with pytest.raises(Killed):
        extract_classification(config, progress=kill_after(2))
    assert not out.exists()
    parts = list((tmp_path / ".pool.parquet.parts").glob("part-*.parquet"))
    assert len(parts) == 2
    result = extract_classification(config)
    assert result.resumed == 4 and result.processed == 2 and result.rows == 6
    assert not (tmp_path / ".pool.parquet.parts").exists()
    resumed = load(out)
    fresh_path = tmp_path / "fresh.parquet"
    extract_classification(cfg(images, fresh_path, checkpoints=[resnet_ckpt]))
    fresh = load(fresh_path)
    order = np.argsort(resumed.column("id").to_pylist())
    assert sorted(resumed.column("id").to_pylist()) == fresh.column("id").to_pylist()
    np.testing.assert_allclose(
        column_matrix(resumed, "feature")[order], column_matrix(fresh, "feature"), atol=1e-5
    )
    read_pool(out)  # unique ids, valid schema


def test_resume_with_different_settings_is_refused(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    with pytest.raises(Killed):
        extract_classification(
            cfg(images, out, checkpoints=[resnet_ckpt], batch_size=2, part_rows=2), progress=kill_after(2)
        )
    with pytest.raises(PoolError, match=r"different settings \(.*→ .*40"):
        extract_classification(cfg(images, out, checkpoints=[resnet_ckpt], image_size=40))


def test_shards_fill_one_pool_directory(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pooldir"
    for k in range(3):
        extract_classification(cfg(images, out, checkpoints=[resnet_ckpt], shard=(k, 3)))
    assert sorted(p.name for p in out.iterdir()) == [f"part-{k:05d}-of-00003.parquet" for k in range(3)]
    pool = read_pool(out)
    single = tmp_path / "single.parquet"
    extract_classification(cfg(images, single, checkpoints=[resnet_ckpt]))
    whole = read_pool(single)
    assert pool.ids.to_pylist() == whole.ids.to_pylist()
    np.testing.assert_allclose(pool.features, whole.features, atol=1e-5)


def test_shards_of_another_split_and_empty_shards(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pooldir"
    extract_classification(cfg(images, out, checkpoints=[resnet_ckpt], shard=(0, 3)))
    with pytest.raises(DataError, match=r"holds parts of a 3-way split .*use another folder or --shard K/3"):
        extract_classification(cfg(images, out, checkpoints=[resnet_ckpt], shard=(0, 2)))
    n = 999  # more shards than images
    heard: list[str] = []
    from uwe_cli.extract.classification import ClassificationTask
    from uwe_cli.extract.runner import run_extraction

    result = run_extraction(
        ClassificationTask(cfg(images, tmp_path / "d", checkpoints=[resnet_ckpt], shard=(0, n + 1))),
        warn=heard.append,
    )
    assert result.rows == 0 and heard == [
        f"shard 0/{n + 1} holds none of the images in {images}; nothing written"
    ]
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_skip_bad_images_writes_report(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_images(data, n=4)
    write_truncated_png(data / "zz_truncated.png")
    (data / "zz_garbage.jpg").write_bytes(b"not an image")
    out = tmp_path / "pool.parquet"
    with pytest.raises(DataError, match=r"zz_garbage\.jpg"):
        extract_classification(cfg(data, out, checkpoints=[resnet_ckpt]))
    assert not out.exists() and not (tmp_path / ".pool.parquet.parts").exists()
    result = extract_classification(cfg(data, out, checkpoints=[resnet_ckpt], skip_bad_images=True))
    assert result.rows == 4
    report = (tmp_path / "pool.skipped.csv").read_text().splitlines()
    assert report[0] == "id,path,error" and len(report) == 3
    assert {line.split(",")[0] for line in report[1:]} == {"zz_garbage.jpg", "zz_truncated.png"}
    assert "zz_garbage.jpg" not in load(out).column("id").to_pylist()


# ---------------------------------------------------------------- CLI


def invoke(*args: str):
    from uwe_cli.cli import app

    return runner.invoke(app, list(args), env={"UWE_NO_PROGRESS": "1"})


def test_cli_bad_inputs(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    base = ["extract", "classification", "--out", str(out), "--image-size", "32", "--num-workers", "0"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_one_line_error(invoke(*base, "--data", str(empty), "--model", "resnet18"), "no images", out)
    bad = tmp_path / "bad"
    write_images(bad, n=2)
    (bad / "broken.png").write_bytes(b"\x89PNG garbage")
    r = invoke(*base, "--data", str(bad), "--model", "resnet18", "--checkpoint", str(resnet_ckpt))
    assert_one_line_error(r, "broken.png", out)
    wrong = tmp_path / "wrong.pth"
    torch.save(torchvision.models.get_model("resnet34", weights=None, num_classes=K).state_dict(), wrong)
    r = invoke(*base, "--data", str(images), "--model", "resnet18", "--checkpoint", str(wrong))
    assert_one_line_error(r, "unexpected keys: layer1.2", out)
    r = invoke(
        *base,
        "--data",
        str(images),
        "--model",
        "resnet18",
        "--num-classes",
        "7",
        "--checkpoint",
        str(resnet_ckpt),
    )
    assert_one_line_error(r, "fc.weight (4, 512) vs (7, 512)", out)
    assert_one_line_error(invoke(*base, "--data", str(images), "--model", "resnet1800"), "unknown", out)
    manifest = tmp_path / "m.csv"
    manifest.write_text("name,file\na,b.png\n")
    r = invoke(*base, "--data", str(manifest), "--model", "resnet18")
    assert_one_line_error(r, "lacks column(s) id, path", out)
    manifest.write_text("id,path\na,missing.png\n")
    assert_one_line_error(invoke(*base, "--data", str(manifest), "--model", "resnet18"), "row 1", out)
    r = invoke(*base, "--data", str(images), "--model", "resnet18", "--device", "cuda")
    if not torch.cuda.is_available():
        assert_one_line_error(r, "no CUDA device", out)
    assert_one_line_error(
        invoke(*base, "--data", str(images), "--checkpoint", str(resnet_ckpt)), "--model", out
    )
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"nonsense")
    r = invoke(*base, "--data", str(images), "--model", "resnet18", "--checkpoint", str(garbage))
    assert_one_line_error(r, "garbage.pth", out)


def test_cli_weights_offline_error(images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No network in the test environment and an empty cache: a clear one-line error."""
    import socket

    def offline(*a: object, **k: object) -> None:
        raise OSError("network disabled in this test")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(socket, "getaddrinfo", offline)
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract",
        "classification",
        "--data",
        str(images),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        "IMAGENET1K_V1",
    )
    assert_one_line_error(r, "--weights IMAGENET1K_V1", out)
    r = invoke(
        "extract",
        "classification",
        "--data",
        str(images),
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--weights",
        "NOPE",
    )
    assert_one_line_error(r, "unknown --weights", out)


def test_cli_extract_then_select(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    names = tmp_path / "classes.txt"
    names.write_text("a\nb\nc\nd\n")
    r = invoke(
        "extract", "classification", "--data", str(images), "--out", str(out), "--model", "resnet18",
        "--checkpoint", str(resnet_ckpt), "--image-size", "32", "--resize", "36", "--mean", "0.5,0.5,0.5",
        "--std", "0.25,0.25,0.25", "--batch-size", "3", "--num-workers", "1", "--class-names", str(names),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "wrote 6 rows" in r.output
    pool = read_pool(out)
    assert pool.metadata["class_names"] == ["a", "b", "c", "d"]
    batch = tmp_path / "batch.csv"
    r = invoke("select", str(out), "--budget", "3", "--out", str(batch))
    assert r.exit_code == 0, r.output
    import pyarrow.csv

    chosen = pyarrow.csv.read_csv(batch).column("id").to_pylist()
    assert len(chosen) == 3 and set(chosen) <= set(pool.ids.to_pylist())


def test_unwrap_state_dict_errors() -> None:
    with pytest.raises(ModelError, match="no state_dict"):
        unwrap_state_dict({"epoch": 3, "lr": 0.1})


def test_json_summary_is_one_line_on_stdout(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--data", str(images), "--out", str(out), "--model", "resnet18",
        "--checkpoint", str(resnet_ckpt), "--image-size", "32", "--num-workers", "0", "--json",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    summary = json.loads(lines[0])
    assert len(lines) == 1 and summary["task"] == "classification" and summary["rows"] == 6
    assert summary["num_classes"] == K and summary["feature_dim"] == 512
    r = invoke(
        "extract", "classification", "--data", str(images), "--out", "-", "--json", "--model", "resnet18"
    )
    assert r.exit_code == 2 and "both write to stdout" in r.stderr


def test_class_names_must_match_the_classes(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--data", str(images), "--out", str(out), "--model", "resnet18",
        "--checkpoint", str(resnet_ckpt), "--image-size", "32", "--class-names", "a,b,c",
    )  # fmt: skip
    assert_one_line_error(r, "3 class names given but the model has 4 classes", out)


def test_cli_refuses_model_mixups_and_unwritable_outputs(
    images: Path, resnet_ckpt: Path, tmp_path: Path
) -> None:
    """Options that cannot both apply, and outputs no file can be created at, are refused before any work."""
    out = tmp_path / "pool.parquet"
    base = ["extract", "classification", "--data", str(images), "--image-size", "32", "--num-workers", "0"]
    whole = tmp_path / "whole.pt"
    torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=K), whole)
    r = invoke(
        *base, "--out", str(out), "--model", "resnet34", "--checkpoint", str(whole), "--trust-checkpoint"
    )
    assert_one_line_error(r, "holds a whole model (ResNet), which runs as it is: drop --model resnet34", out)
    r = invoke(*base, "--out", str(out), "--model", "tiny_net:tiny_cnn", "--weights", "DEFAULT")
    assert_one_line_error(
        r, "--weights applies to torchvision and timm models, not --model tiny_net:tiny_cnn", out
    )
    folder = tmp_path / "newout"
    r = invoke(*base, "--out", f"{folder}/", "--model", "resnet18", "--checkpoint", str(resnet_ckpt))
    assert_one_line_error(r, "ends with '/', a folder; give a file name", folder)
    r = invoke(
        *base, "--out", "/proc/uwe-pool.parquet", "--model", "resnet18", "--checkpoint", str(resnet_ckpt)
    )
    assert_one_line_error(r, "cannot write --out /proc/uwe-pool.parquet")
    r = invoke(
        *base,
        "--out",
        str(out),
        "--model",
        "resnet18",
        "--checkpoint",
        str(resnet_ckpt),
        "--gpus-per-worker",
        "1",
    )
    assert_one_line_error(r, "--gpus-per-worker applies with --ray only", out)


def test_cli_warns_before_work_when_weights_are_random(
    images: Path, resnet_ckpt: Path, tmp_path: Path
) -> None:
    base = ["extract", "classification", "--data", str(images), "--image-size", "32", "--num-workers", "0"]
    r = invoke(*base, "--out", str(tmp_path / "a.parquet"), "--model", "resnet18", "--amp", "-q")
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2 and "runs with random weights" in warnings[0], r.stderr
    assert "--amp only applies on CUDA" in warnings[1]  # --device auto resolved to the CPU
    r = invoke(
        *base, "--out", str(tmp_path / "b.parquet"), "--model", "resnet18", "--checkpoint", str(resnet_ckpt)
    )
    assert r.exit_code == 0 and "warning" not in r.stderr, r.stderr


def test_cli_errors_say_what_the_file_is(images: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    base = ["extract", "classification", "--out", str(out), "--image-size", "32", "--num-workers", "0"]
    model = ["--data", str(images), "--model", "resnet18"]
    r = invoke(*base, *model, "--checkpoint", str(images))
    assert_one_line_error(r, f"checkpoint {images} is a directory; give the checkpoint file", out)
    text = tmp_path / "weights.csv"
    text.write_text("a,b\n1,2\n")
    r = invoke(*base, *model, "--checkpoint", str(text))
    assert_one_line_error(
        r, f"checkpoint {text} is not a torch checkpoint (neither a zip nor a pickle file)", out
    )
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,path\na,{images}\n")
    r = invoke(*base, "--data", str(manifest), "--model", "resnet18")
    assert_one_line_error(r, f"{images} is a directory, not an image file", out)
    r = invoke(*base, "--data", str(images), "--model", f"hf:{tmp_path / 'no-such-model'}")
    assert_one_line_error(r, "no such directory", out)


def test_cli_refuses_an_empty_class_name(images: Path, resnet_ckpt: Path, tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    base = ["extract", "classification", "--data", str(images), "--out", str(out), "--image-size", "32"]
    r = invoke(*base, "--model", "resnet18", "--checkpoint", str(resnet_ckpt), "--class-names", "a,,c,d")
    assert_one_line_error(r, "--class-names: the name of class 1 is empty", out)
