"""Selection and extraction on a real local Ray instance (started once per session, 2 CPUs):
byte-identical batches for every strategy and pool kind, a worker killed midway, one-line errors,
and extraction by Ray Data actors equal to the local extractor, resumable after a kill."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _images import write_images
from conftest import Killed, assert_one_line_error, kill_after, write_pool
from test_classwise import random_rows
from test_classwise import write_pool as write_detection_pool
from typer.testing import CliRunner

from uwe_cli.cli import app
from uwe_cli.select import run_select
from uwe_cli.selection.request import RayOptions

ray = pytest.importorskip("ray")
ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="session", autouse=True)
def ray_instance():
    """One local instance for the session; actors import `tiny_net` and test factories from these paths."""
    extra = os.pathsep.join([str(ROOT / "examples"), str(ROOT / "tests")])
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = extra + (os.pathsep + previous if previous else "")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        logging_level="error",
        _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
    )
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = previous


@pytest.fixture(scope="module")
def unit_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pool of three parts with probs, source and region columns."""
    folder = tmp_path_factory.mktemp("unit") / "pool"
    folder.mkdir()
    rng = np.random.default_rng(0)
    n = 240
    F = np.maximum(rng.gamma(2.0, 1.0, (6, 12))[rng.integers(0, 6, n)] + rng.normal(0, 0.4, (n, 12)), 0)
    u = rng.random(n)
    probs = rng.dirichlet(np.ones(4), n)
    extra = {
        "source": pa.array([f"/data/im{i // 4}.png" for i in range(n)]),
        "image_id": pa.array([f"im{i // 4}" for i in range(n)]),
        "x": pa.array([(i % 4) * 16 for i in range(n)], pa.int32()),
    }
    whole = write_pool(folder.parent / "whole.parquet", F.astype(np.float32), u, probs=probs, extra=extra)
    table = pq.read_table(whole)
    for k, (a, b) in enumerate([(0, 70), (70, 170), (170, n)]):
        pq.write_table(table.slice(a, b - a), folder / f"part-{k}.parquet")
    return folder


def batches_equal(pool: Path, tmp: Path, *args: object, workers: int) -> None:
    local, distributed = tmp / "local.csv", tmp / "ray.csv"
    r = invoke("select", pool, *args, "--out", local, "-q")
    assert r.exit_code == 0, r.output
    r = invoke("select", pool, *args, "--ray", "--workers", workers, "--out", distributed, "-q")
    assert r.exit_code == 0, r.output
    assert distributed.read_bytes() == local.read_bytes(), (args, workers)


@pytest.mark.parametrize("strategy", ["uwe", "coreset", "uncertainty", "random", "kmeanspp", "badge"])
def test_unit_pool_batches_are_byte_identical(unit_pool: Path, tmp_path: Path, strategy: str) -> None:
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("".join(f"s{i:05d}\n" for i in (3, 80, 81, 200)))
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("s00010\ns00150\n")
    common = ["--budget", 25, "--strategy", strategy, "--seed", 7]
    batches_equal(unit_pool, tmp_path, *common, workers=3)
    batches_equal(unit_pool, tmp_path, *common, "--labeled", labeled, "--exclude", excluded, workers=2)
    if strategy == "uwe":
        batches_equal(unit_pool, tmp_path, *common, "--tau", "0.5", workers=1)


@pytest.mark.parametrize("strategy", ["uwe", "kmeanspp"])
def test_compiled_engine_batches_are_byte_identical(tmp_path: Path, strategy: str) -> None:
    """A pool whose selection is too much work for the numpy engine: local and Ray both run the compiled
    bucket engine (its screen, buckets and float64 kernels), and the batch files still match."""
    from uwe_cli.selection.small import is_small

    rng = np.random.default_rng(5)
    n, d, budget = 20_000, 256, 60
    assert not is_small(n, d, budget + 4)
    F = np.maximum(rng.gamma(2.0, 1.0, (40, d))[rng.integers(0, 40, n)] + rng.normal(0, 0.5, (n, d)), 0)
    folder = tmp_path / "pool"
    folder.mkdir()
    whole = write_pool(tmp_path / "whole.parquet", F.astype(np.float32), rng.random(n))
    table = pq.read_table(whole)
    for k, (a, b) in enumerate([(0, 7_000), (7_000, n)]):
        pq.write_table(table.slice(a, b - a), folder / f"part-{k}.parquet")
    labeled = tmp_path / "labeled.txt"
    ids = table.column("id").to_pylist()
    labeled.write_text("".join(ids[i] + "\n" for i in (5, 700, 12_000, 19_999)))
    batches_equal(
        folder, tmp_path, "--budget", budget, "--strategy", strategy, "--labeled", labeled, workers=2
    )


def test_near_ties_give_the_same_batch_on_ray(tmp_path: Path) -> None:
    """Distances that only rounding separates (grid features under weights √⅓, √⅔) are settled by the
    reference's arithmetic on every shard, so Ray and the local run pick alike."""
    rng = np.random.default_rng(13)
    n, d = 800, 300
    F = rng.integers(0, 3, (n, d)).astype(np.float32)
    F[400:500] = F[:100]
    folder = tmp_path / "pool"
    folder.mkdir()
    whole = write_pool(tmp_path / "whole.parquet", F, rng.integers(0, 4, n) / 3)
    table = pq.read_table(whole)
    for k, (a, b) in enumerate([(0, 330), (330, n)]):
        pq.write_table(table.slice(a, b - a), folder / f"part-{k}.parquet")
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("".join(f"s{i:05d}\n" for i in range(0, n, 7)))
    batches_equal(folder, tmp_path, "--budget", 500, "--tau", 0.5, "--labeled", labeled, workers=2)


@pytest.fixture(scope="module")
def detection_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("det") / "pool"
    rows = random_rows(np.random.default_rng(3), 70, 4, 6, n_duplicates=5)
    write_detection_pool(folder / "a.parquet", rows[: len(rows) // 2], 6, num_classes=4)
    write_detection_pool(folder / "b.parquet", rows[len(rows) // 2 :], 6, num_classes=4)
    return folder


@pytest.mark.parametrize("strategy", ["uwe", "coreset", "uncertainty", "random", "kmeanspp"])
def test_detection_pool_batches_are_byte_identical(
    detection_pool: Path, tmp_path: Path, strategy: str
) -> None:
    labeled = tmp_path / "labeled.txt"
    labeled.write_text("im4\nim30\nim41\n")
    excluded = tmp_path / "excluded.txt"
    excluded.write_text("im7\n")
    common = ["--budget", 20, "--strategy", strategy, "--seed", 2]
    batches_equal(detection_pool, tmp_path, *common, "--aggregate", "mean", workers=3)
    batches_equal(detection_pool, tmp_path, *common, "--labeled", labeled, "--exclude", excluded, workers=2)


def test_a_worker_killed_midway_gives_the_same_batch(unit_pool: Path) -> None:
    local = run_select([unit_pool], 30)
    actors: list = []
    killed = []

    def kill_at_pick_ten(done: int, total: int) -> None:
        if done >= 10 and not killed:
            ray.kill(actors[1], no_restart=False)  # the process dies; Ray restarts it
            killed.append(done)

    ray_opts = RayOptions(workers=3, on_actors=actors.extend)
    result = run_select([unit_pool], 30, progress=kill_at_pick_ten, ray=ray_opts)
    assert killed and result.batch == local.batch


def test_errors_are_one_line(unit_pool: Path, tmp_path: Path) -> None:
    bad = tmp_path / "pool"
    bad.mkdir()
    for part in unit_pool.iterdir():
        (bad / part.name).write_bytes(part.read_bytes())
    data = bytearray((bad / "part-1.parquet").read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    for i in range(4, len(data) - 8 - footer, 5):  # garbled pages, valid footer
        data[i] ^= 0x33
    (bad / "part-1.parquet").write_bytes(bytes(data))
    out = tmp_path / "b.csv"
    r = invoke("select", bad, "--budget", 5, "--ray", "--workers", 2, "--out", out)
    assert_one_line_error(r, "part-1.parquet", out)
    r = invoke(
        "select", unit_pool, "--budget", 5, "--ray", "--workers", 2, "--max-memory", "300M", "--out", out
    )
    assert_one_line_error(r, "a worker's share of the pool needs about", out)
    code = "import sys; sys.modules['ray'] = None\nfrom uwe_cli.cli import main; main()"
    for prefix, needle in [
        ([sys.executable, "-m", "uwe_cli.cli"], "cannot reach the Ray cluster at 127.0.0.1:9"),
        ([sys.executable, "-c", code], "pip install 'uwe-cli[ray]'"),
    ]:
        args = [
            "select",
            str(unit_pool),
            "--budget",
            "3",
            "--ray",
            "--ray-address",
            "127.0.0.1:9",
            "--out",
            str(out),
        ]
        proc = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], proc.stderr
        assert not out.exists()


# -------------------------------------------------------------------------------------------- extraction


@pytest.fixture
def job(tmp_path: Path) -> dict[str, Path]:
    sys.path.insert(0, str(ROOT / "examples"))
    from tiny_net import tiny_cnn

    images = tmp_path / "imgs"
    write_images(images, n=14, size=24)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny.pth"
    torch.save(tiny_cnn(3).state_dict(), ckpt)
    return {"images": images, "ckpt": ckpt}


def test_extraction_on_ray_equals_local_and_resumes(job: dict[str, Path], tmp_path: Path) -> None:
    from uwe_cli.extract.classification import ClassificationConfig, extract_classification

    def config(out: Path, **kw: object) -> ClassificationConfig:
        return ClassificationConfig(
            data=job["images"], out=out, model="tiny_net:tiny_cnn", checkpoint=job["ckpt"], image_size=16,
            batch_size=2, part_rows=2, device="cpu", **kw,
        )  # fmt: skip

    local = tmp_path / "local.parquet"
    extract_classification(config(local))
    distributed = tmp_path / "ray.parquet"
    with pytest.raises(Killed):
        extract_classification(config(distributed, ray=True, workers=2), kill_after(3))
    assert not distributed.exists()
    result = extract_classification(config(distributed, ray=True, workers=2))
    assert result.resumed == 6 and result.processed == 8 and result.rows == 14
    a, b = pq.read_table(local), pq.read_table(distributed)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    for column in ("feature", "probs"):
        np.testing.assert_allclose(
            np.stack(b.column(column).to_pylist()),
            np.stack(a.column(column).to_pylist()),
            rtol=1e-5,
            atol=1e-6,
        )
    assert a.schema.metadata == b.schema.metadata


def test_extraction_asks_for_more_gpus_than_there_are(job: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "pool.parquet"
    r = invoke(
        "extract", "classification", "--model", "tiny_net:tiny_cnn", "--checkpoint", job["ckpt"], "--data",
        job["images"], "--out", out, "--image-size", 16, "--ray", "--workers", 2, "--gpus-per-worker", 1,
    )  # fmt: skip
    assert_one_line_error(r, "needs 2 GPUs", out)


def test_storage_options_reach_the_workers(unit_pool: Path, job: dict[str, Path], tmp_path: Path) -> None:
    """Pool, images and checkpoint on an S3 server that only `--storage-option endpoint_url=...` names
    (the environment points elsewhere, or nowhere): shards and extraction workers must reach it too."""
    import s3fs
    from s3_server import start_s3_server

    (tmp_path / "s3-log").mkdir()
    server = start_s3_server(tmp_path / "s3-log")
    try:
        client = server.client()
        client.create_bucket(Bucket="opts")
        for part in sorted(unit_pool.glob("*.parquet")):
            client.upload_file(str(part), "opts", f"pool/{part.name}")
        for image in sorted(job["images"].rglob("*.*")):
            client.upload_file(str(image), "opts", f"imgs/{image.relative_to(job['images']).as_posix()}")
        client.upload_file(str(job["ckpt"]), "opts", "tiny.pth")
        opts = ["--storage-option", f"endpoint_url={server.endpoint_url}"]
        opts += ["--storage-option", "key=uwe", "--storage-option", "secret=uwe"]
        batches_equal("s3://opts/pool/", tmp_path, "--budget", 12, *opts, workers=2)
        out = {}
        for name, extra in (("local", []), ("ray", ["--ray", "--workers", 1])):
            out[name] = tmp_path / f"{name}.parquet"
            r = invoke(
                "extract", "classification", "--model", "tiny_net:tiny_cnn", "--checkpoint", "s3://opts/tiny.pth",
                "--data", "s3://opts/imgs/", "--out", out[name], "--image-size", 16, "-q", *opts, *extra,
            )  # fmt: skip
            assert r.exit_code == 0, r.output
        a, b = pq.read_table(out["local"]), pq.read_table(out["ray"])
        assert a.column("id").to_pylist() == b.column("id").to_pylist() and a.num_rows == 14
    finally:
        server.stop()
        s3fs.S3FileSystem.clear_instance_cache()


def test_quiet_ray_extraction_prints_nothing(job: dict[str, Path], tmp_path: Path) -> None:
    """Ray's own log lines (Python loggers, and its C++ core writing to fd 2) stay off the terminal."""
    out = tmp_path / "pool.parquet"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "examples")}
    env.pop("RAY_ADDRESS", None)
    args = ["extract", "classification", "--model", "tiny_net:tiny_cnn", "--checkpoint", str(job["ckpt"])]
    args += ["--data", str(job["images"]), "--out", str(out), "--image-size", "16", "--ray", "--workers", "1"]
    proc = subprocess.run(
        [sys.executable, "-m", "uwe_cli.cli", *args, "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stderr == "" and proc.stdout == "", proc.stderr
    assert pq.read_table(out).num_rows == 14
