"""Inputs and outputs in object storage, against a real S3-compatible server (moto, over HTTP):
the same pool and batch as on local files, sharded extraction into a prefix, resume after a kill,
nothing at the final key before a run completes, one-line errors for every bad remote input."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import s3fs
import torch
from _images import write_images
from conftest import Killed, assert_one_line_error, kill_after, write_pool
from typer.testing import CliRunner

from uwe_cli import storage
from uwe_cli.cli import app
from uwe_cli.errors import StorageError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def fs(s3_server) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(skip_instance_cache=True)


@pytest.fixture
def local_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Images, a tiny_net checkpoint and a labeled list on the local disk."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from tiny_net import tiny_cnn

    torch.manual_seed(0)
    images = tmp_path / "imgs"
    write_images(images, n=9, size=20)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(tiny_cnn(3).state_dict(), ckpt)
    labeled = tmp_path / "labeled.csv"
    labeled.write_text("id\nimg001_gray.png\n")
    return {"images": images, "ckpt": ckpt, "labeled": labeled}


def upload(fs: s3fs.S3FileSystem, bucket: str, job: dict[str, Path]) -> None:
    fs.put(str(job["images"]), f"{bucket}/imgs", recursive=True)
    fs.put(str(job["ckpt"]), f"{bucket}/ckpt.pth")
    fs.put(str(job["labeled"]), f"{bucket}/labeled.csv")


def extract(data: object, ckpt: object, out: object, *extra: object):
    return invoke(
        "extract", "classification", "--model", "tiny_net:tiny_cnn", "--checkpoint", ckpt, "--data", data,
        "--out", out, "--image-size", 16, "--num-workers", 0, "--device", "cpu", "-q", *extra,
    )  # fmt: skip


def sorted_table(table):
    return table.sort_by("id")


def test_remote_job_equals_local_job(
    s3_bucket: str, fs: s3fs.S3FileSystem, local_job, tmp_path: Path
) -> None:
    upload(fs, s3_bucket, local_job)
    s3 = f"s3://{s3_bucket}"
    r = extract(f"{s3}/imgs/", f"{s3}/ckpt.pth", f"{s3}/pool.parquet")
    assert r.exit_code == 0, r.output
    local_pool = tmp_path / "pool.parquet"
    assert extract(local_job["images"], local_job["ckpt"], local_pool).exit_code == 0
    remote = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/pool.parquet")))
    local = pq.read_table(local_pool)
    a, b = sorted_table(remote), sorted_table(local)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for column in ("feature", "probs", "entropy", "bvsb"):
        np.testing.assert_array_equal(
            np.asarray(a.column(column).to_pylist()), np.asarray(b.column(column).to_pylist())
        )
    assert remote.schema.metadata[b"uwe"] == local.schema.metadata[b"uwe"]

    r = invoke(
        "select",
        f"{s3}/pool.parquet",
        "--labeled",
        f"{s3}/labeled.csv",
        "--budget",
        5,
        "--out",
        f"{s3}/batch.csv",
        "-q",
    )
    assert r.exit_code == 0, r.output
    local_batch = tmp_path / "batch.csv"
    r = invoke(
        "select", local_pool, "--labeled", local_job["labeled"], "--budget", 5, "--out", local_batch, "-q"
    )
    assert r.exit_code == 0
    remote_rows = list(csv.DictReader(io.StringIO(fs.cat_file(f"{s3_bucket}/batch.csv").decode())))
    local_rows = list(csv.DictReader(local_batch.open()))
    for rr, lr in zip(remote_rows, local_rows, strict=True):
        assert (rr["id"], rr["distance"], rr["uncertainty"]) == (lr["id"], lr["distance"], lr["uncertainty"])
    r = invoke("inspect", f"{s3}/pool.parquet", "--json")
    assert r.exit_code == 0 and '"rows": 9' in r.stdout


def test_sharded_extraction_into_a_prefix(
    s3_bucket: str, fs: s3fs.S3FileSystem, local_job, tmp_path: Path
) -> None:
    upload(fs, s3_bucket, local_job)
    s3 = f"s3://{s3_bucket}"
    for k in range(3):
        assert extract(f"{s3}/imgs/", f"{s3}/ckpt.pth", f"{s3}/pool/", "--shard", f"{k}/3").exit_code == 0
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/pool")) == [
        f"part-{k:05d}-of-00003.parquet" for k in range(3)
    ]
    out = tmp_path / "b.csv"
    r = invoke("select", f"{s3}/pool/", "--budget", 9, "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert len(list(csv.DictReader(out.open()))) == 9


def small_parts_job(s3: str, data: str):
    """The uploaded tiny_net job into `s3`/pool.parquet, two images per part (resume tests)."""
    from uwe_cli.extract.classification import ClassificationConfig

    return ClassificationConfig(
        data=data, out=f"{s3}/pool.parquet", model="tiny_net:tiny_cnn", checkpoint=f"{s3}/ckpt.pth",
        image_size=16, batch_size=2, part_rows=2, device="cpu",
    )  # fmt: skip


def test_killed_remote_extraction_resumes_and_never_exposes_a_partial_pool(
    s3_bucket: str, fs: s3fs.S3FileSystem, local_job, s3_server
) -> None:
    from uwe_cli.extract.classification import extract_classification

    upload(fs, s3_bucket, local_job)
    s3 = f"s3://{s3_bucket}"
    cfg = small_parts_job(s3, f"{s3}/imgs/")
    with pytest.raises(Killed):
        extract_classification(cfg, kill_after(2))
    keys = s3_server.keys(s3_bucket)
    assert "pool.parquet" not in keys and s3_server.open_uploads(s3_bucket) == []
    assert sum(k.startswith(".pool.parquet.parts/part-") for k in keys) == 2
    result = extract_classification(cfg)
    assert result.resumed == 4 and result.processed == 5
    ids = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/pool.parquet"))).column("id").to_pylist()
    assert sorted(ids) == sorted({*ids}) and len(ids) == 9
    assert not any(k.startswith(".pool.parquet.parts") for k in s3_server.keys(s3_bucket))


def test_resume_from_a_remote_manifest_redoes_changed_objects(
    s3_bucket: str, fs: s3fs.S3FileSystem, local_job
) -> None:
    """Objects a manifest names by URL are stamped (size, ETag) by a metadata request each, so one
    overwritten after an interruption is redone, as for a folder."""
    from uwe_cli.extract.classification import extract_classification

    upload(fs, s3_bucket, local_job)
    s3 = f"s3://{s3_bucket}"
    names = sorted(p.relative_to(local_job["images"]).as_posix() for p in local_job["images"].rglob("*.*"))
    fs.pipe(f"{s3_bucket}/m.csv", ("id,path\n" + "".join(f"{n},{s3}/imgs/{n}\n" for n in names)).encode())
    cfg = small_parts_job(s3, f"{s3}/m.csv")
    with pytest.raises(Killed):
        extract_classification(cfg, kill_after(2))
    fs.pipe(f"{s3_bucket}/imgs/{names[0]}", fs.cat_file(f"{s3_bucket}/imgs/{names[-1]}"))  # changed since
    result = extract_classification(cfg)
    assert result.resumed == 3 and result.redone == 1 and result.processed == len(names) - 3
    resumed = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/pool.parquet")))
    cfg.out = f"{s3}/fresh.parquet"
    extract_classification(cfg)
    fresh = pq.read_table(io.BytesIO(fs.cat_file(f"{s3_bucket}/fresh.parquet")))
    assert resumed.column("id").to_pylist() == fresh.column("id").to_pylist() == names
    np.testing.assert_allclose(  # batches differ between the runs: float rounding only
        np.stack(resumed.column("feature").to_pylist()),
        np.stack(fresh.column("feature").to_pylist()),
        atol=1e-5,
    )


def test_a_failed_write_leaves_no_object(s3_bucket: str, fs: s3fs.S3FileSystem, s3_server) -> None:
    url = f"s3://{s3_bucket}/batch.csv"
    with pytest.raises(RuntimeError), storage.atomic_remote(url) as fh:
        fh.write(b"x" * (6 << 20))
        raise RuntimeError("interrupted")
    assert s3_server.keys(s3_bucket) == [] and s3_server.open_uploads(s3_bucket) == []


def test_bad_remote_inputs_are_one_line_errors(
    s3_bucket: str, fs: s3fs.S3FileSystem, tmp_path: Path, s3_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    pool = write_pool(tmp_path / "p.parquet", np.ones((4, 3), np.float32), np.arange(4.0))
    fs.put(str(pool), f"{s3_bucket}/p.parquet")
    out = tmp_path / "b.csv"
    cases = [
        (["select", "s3://no-such-bucket-uwe/p.parquet"], "s3://no-such-bucket-uwe/p.parquet"),
        (["select", f"s3://{s3_bucket}/missing.parquet"], "missing.parquet"),
        (["select", f"s3://{s3_bucket}/p.parquet", "--labeled", f"s3://{s3_bucket}/nope.csv"], "nope.csv"),
        (["select", "gs://some-bucket/p.parquet"], "pip install 'uwe-cli[gcs]'"),
    ]
    for args, needle in cases:
        assert_one_line_error(invoke(*args, "--budget", 1, "--out", out), needle, out)
    r = invoke("select", pool, "--budget", 1, "--out", "s3://no-such-bucket-uwe/b.csv")
    assert_one_line_error(r, "bucket 'no-such-bucket-uwe' does not exist")
    with s3_server.auth_enforced():
        s3fs.S3FileSystem.clear_instance_cache()
        r = invoke("select", f"s3://{s3_bucket}/p.parquet", "--budget", 1, "--out", out)
        assert_one_line_error(r, "access denied", out)
        # an output in a bucket the keys may not see: access denied too, not "does not exist"
        r = invoke("select", pool, "--budget", 1, "--out", f"s3://{s3_bucket}/b.csv")
        assert_one_line_error(r, f"s3://{s3_bucket}/b.csv: access denied")
        assert "OutputError" not in r.stderr
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    r = invoke("select", f"s3://{s3_bucket}/p.parquet", "--budget", 1, "--out", out)
    assert_one_line_error(r, "cannot reach the storage endpoint", out)
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StorageError, match="KEY=VALUE"):
        storage.parse_storage_options(["novalue"])
    r = invoke(
        "select", f"s3://{s3_bucket}/p.parquet", "--budget", 1, "--out", out, "--storage-option", "bogus=1"
    )
    assert_one_line_error(r, "the filesystem refused the --storage-option values", out)


def test_heatmaps_into_a_bucket(s3_bucket: str, fs: s3fs.S3FileSystem, tmp_path: Path) -> None:
    images = tmp_path / "imgs"
    write_images(images, n=3, size=32)
    r = invoke(
        "extract", "segmentation", "--model", "test_extract_segmentation:tiny_dict", "--num-classes", 4,
        "--data", images, "--out", tmp_path / "pool.parquet", "--heatmaps", f"s3://{s3_bucket}/heat/",
        "--num-workers", 0, "--device", "cpu", "-q",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/heat"))
    ids = pq.read_table(tmp_path / "pool.parquet").column("id").to_pylist()
    assert names == sorted(i.replace("/", "%2F") + ".png" for i in ids)


def test_export_and_report_read_batch_and_pool_from_a_bucket(
    s3_bucket: str, fs: s3fs.S3FileSystem, local_job, tmp_path: Path
) -> None:
    upload(fs, s3_bucket, local_job)
    s3 = f"s3://{s3_bucket}"
    assert extract(f"{s3}/imgs/", f"{s3}/ckpt.pth", f"{s3}/pool.parquet").exit_code == 0
    r = invoke("select", f"{s3}/pool.parquet", "--budget", 3, "--out", f"{s3}/batch.csv", "-q")
    assert r.exit_code == 0, r.output
    r = invoke(
        "export",
        f"{s3}/batch.csv",
        "--pool",
        f"{s3}/pool.parquet",
        "--to",
        "csv",
        "--out",
        f"{s3}/export.csv",
        "-q",
    )
    assert r.exit_code == 0, r.output
    batch_ids = [
        row["id"] for row in csv.DictReader(io.StringIO(fs.cat_file(f"{s3_bucket}/batch.csv").decode()))
    ]
    exported = list(csv.DictReader(io.StringIO(fs.cat_file(f"{s3_bucket}/export.csv").decode())))
    assert [row["id"] for row in exported][:3] == batch_ids
    out = tmp_path / "report.html"
    r = invoke("report", f"{s3}/batch.csv", "--pool", f"{s3}/pool.parquet", "--out", out, "-q")
    assert r.exit_code == 0, r.output
    assert out.stat().st_size > 1000


def test_simulate_reads_pool_and_labels_from_a_bucket(
    s3_bucket: str, fs: s3fs.S3FileSystem, tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 8)).astype(np.float32)
    y = (X[:, 0] + 0.3 * X[:, 1] > 0).astype(int)
    pool = write_pool(tmp_path / "pool.parquet", X)
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"s{i:05d},{v}\n" for i, v in enumerate(y.tolist())))
    fs.put(str(pool), f"{s3_bucket}/sim/pool.parquet")
    fs.put(str(labels), f"{s3_bucket}/sim/labels.csv")
    s3 = f"s3://{s3_bucket}/sim"
    common = ["--budgets", "10,20,30", "--seeds", 2, "--strategies", "uwe,coreset,random", "--no-plot", "-q"]
    r = invoke(
        "simulate", f"{s3}/pool.parquet", "--labels", f"{s3}/labels.csv", *common, "--out", tmp_path / "r"
    )
    assert r.exit_code == 0, r.output
    r = invoke("simulate", pool, "--labels", labels, *common, "--out", tmp_path / "l")
    assert r.exit_code == 0, r.output
    remote = json.loads((tmp_path / "r" / "results.json").read_text())
    local = json.loads((tmp_path / "l" / "results.json").read_text())
    assert remote["curves"] == local["curves"] and remote["recommendation"] == local["recommendation"]
    assert remote["config"]["labels"] == f"{s3}/labels.csv"
    assert remote["config"]["pools"] == [f"{s3}/pool.parquet"]
    # results (and the plot) written into the bucket: the same bytes as on disk
    with_plot = [c for c in common if c != "--no-plot"]
    r = invoke("simulate", pool, "--labels", labels, *with_plot, "--out", f"{s3}/results/")
    assert r.exit_code == 0, r.output
    assert (
        fs.cat_file(f"{s3_bucket}/sim/results/results.json") == (tmp_path / "l" / "results.json").read_bytes()
    )
    assert (
        fs.cat_file(f"{s3_bucket}/sim/results/results.csv") == (tmp_path / "l" / "results.csv").read_bytes()
    )
    assert fs.cat_file(f"{s3_bucket}/sim/results/curves.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert_one_line_error(
        invoke(
            "simulate",
            f"{s3}/pool.parquet",
            "--labels",
            f"{s3}/missing.csv",
            *common,
            "--out",
            tmp_path / "m",
        ),
        "missing.csv",
    )
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["select", "simulate", "inspect"])
def test_storage_option_reaches_the_filesystem(
    command: str,
    s3_server,
    s3_bucket: str,
    fs: s3fs.S3FileSystem,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`--storage-option endpoint_url=...` wins over an environment that points nowhere."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(60, 4)).astype(np.float32)
    pool = write_pool(tmp_path / "pool.parquet", X, rng.random(60).astype(np.float32))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n" + "".join(f"s{i:05d},{int(v > 0)}\n" for i, v in enumerate(X[:, 0])))
    fs.put(str(pool), f"{s3_bucket}/opt/pool.parquet")
    fs.put(str(labels), f"{s3_bucket}/opt/labels.csv")
    s3 = f"s3://{s3_bucket}/opt"
    out = tmp_path / "out"
    args: list[object] = {
        "select": ["select", f"{s3}/pool.parquet", "--budget", 5, "--out", out, "-q"],
        "simulate": [
            *["simulate", f"{s3}/pool.parquet", "--labels", f"{s3}/labels.csv", "--budgets", "10,20"],
            *["--seeds", 1, "--strategies", "uwe,random", "--no-plot", "--out", out, "-q"],
        ],
        "inspect": ["inspect", f"{s3}/pool.parquet", "--json"],
    }[command]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        assert_one_line_error(invoke(*args), "cannot reach the storage endpoint", out)
        r = invoke(*args, "--storage-option", f"endpoint_url={s3_server.endpoint_url}")
        assert r.exit_code == 0, r.output
        if command == "inspect":
            assert json.loads(r.stdout)["rows"] == 60
        else:
            assert out.exists()
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_remove_is_fine_with_a_missing_object(s3_bucket: str, fs: s3fs.S3FileSystem) -> None:
    url = f"s3://{s3_bucket}/gone/report.csv"
    fs.pipe(url, b"x")
    storage.remove(url)
    assert not fs.exists(url)
    storage.remove(url)  # missing: nothing to do, no error
    storage.remove_tree(f"s3://{s3_bucket}/never-written")
