"""The promises of docs/guarantees.md, tried as a hostile or careless user would: nothing from a file
runs code unasked, no input is overwritten, special files are streamed into, every bad input exits 2
with one line and leaves nothing behind, IDs round-trip, resumed runs notice changed inputs."""

from __future__ import annotations

import csv
import json
import os
import pickle
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _images import write_images
from conftest import Killed, assert_one_line_error, kill_after, leftovers, write_pool
from typer.testing import CliRunner

from uwe_cli.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()
MARKER = Path("/tmp/uwe-test-pwned")


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


class Evil:
    """Unpickling this runs a shell command: the classic malicious checkpoint."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


@pytest.fixture
def images(tmp_path: Path) -> Path:
    folder = tmp_path / "imgs"
    write_images(folder, n=4, size=20)
    return folder


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A tiny_net state_dict checkpoint (`--model tiny_net:tiny_cnn`)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    from tiny_net import tiny_cnn

    torch.manual_seed(0)
    path = tmp_path / "tiny.pth"
    torch.save(tiny_cnn(3).state_dict(), path)
    return path


def extract(*args: object):
    return invoke(
        "extract", "classification", "--num-workers", 0, "--device", "cpu", "--image-size", 16, *args
    )


def pool_file(tmp_path: Path, n: int = 12, ids: list[str] | None = None, name: str = "pool.parquet") -> Path:
    rng = np.random.default_rng(0)
    return write_pool(tmp_path / name, rng.random((n, 4)).astype(np.float32), rng.random(n), ids=ids)


# ------------------------------------------------------------------------------------- 1. checkpoints


@pytest.mark.parametrize("wrapper", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize(
    ("task", "model"),
    [
        ("classification", "tiny_net:tiny_cnn"),
        ("classification", None),
        ("segmentation", "lraspp_mobilenet_v3_large"),
        ("detection", "fasterrcnn_mobilenet_v3_large_fpn"),
        ("detection", None),
    ],
)
def test_malicious_checkpoint_never_runs_without_the_flag(
    tmp_path: Path, images: Path, monkeypatch: pytest.MonkeyPatch, wrapper: str, task: str, model: str | None
) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    MARKER.unlink(missing_ok=True)
    ckpt = tmp_path / "evil.pth"
    if wrapper == "torch.save":
        torch.save({"state_dict": Evil()}, ckpt)
    else:
        with ckpt.open("wb") as fh:
            pickle.dump({"state_dict": Evil()}, fh)
    out = tmp_path / "pool.parquet"
    args = ["extract", task, "--data", images, "--out", out, "--checkpoint", ckpt, "--num-workers", 0]
    r = invoke(*args, *(["--model", model] if model else []))
    assert_one_line_error(r, "--trust-checkpoint", out)
    assert "posix.system" in r.stderr
    assert not MARKER.exists()
    assert leftovers(tmp_path) == []


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_torchscript_needs_the_flag(tmp_path: Path, images: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.script(torch.nn.Linear(3, 2)).save(str(path))
    r = extract("--data", images, "--out", tmp_path / "p.parquet", "--checkpoint", path)
    assert_one_line_error(r, "TorchScript program", tmp_path / "p.parquet")


# ------------------------------------------------------------------------------------- 2. inputs are never outputs


def test_select_refuses_to_overwrite_its_inputs(tmp_path: Path) -> None:
    pool = pool_file(tmp_path)
    labeled = tmp_path / "lab.txt"
    labeled.write_text("s00001\n")
    before = {p: p.read_bytes() for p in (pool, labeled)}
    link = tmp_path / "link.parquet"
    link.symlink_to(pool)
    hard = tmp_path / "hard.csv"
    os.link(labeled, hard)
    parts = tmp_path / "parts"
    parts.mkdir()
    pq.write_table(pq.read_table(pool), parts / "a.parquet")
    cases = [
        ([pool, "--out", pool], "is the input"),
        ([pool, "--labeled", labeled, "--out", labeled], "is the input"),
        ([pool, "--exclude", labeled, "--out", labeled], "is the input"),
        ([pool, "--out", link], f"--out {link} is the input"),  # named as given, not where it leads
        ([pool, "--labeled", labeled, "--out", hard], "is the input"),
        ([parts, "--out", parts / "batch.csv"], "inside the input folder"),
    ]
    for args, needle in cases:
        r = invoke("select", *args, "--budget", 2)
        assert_one_line_error(r, needle, parts / "batch.csv")
    assert {p: p.read_bytes() for p in (pool, labeled)} == before
    assert link.is_symlink() and hard.stat().st_ino == labeled.stat().st_ino


def test_extract_refuses_to_overwrite_its_inputs(tmp_path: Path, images: Path, tiny: Path) -> None:
    manifest = tmp_path / "m.csv"
    first = sorted(images.rglob("*.png"))[0]
    manifest.write_text(f"id,path\na,{first}\n")
    elsewhere = tmp_path / "elsewhere.png"
    os.link(first, elsewhere)
    snapshot = {p: p.read_bytes() for p in (tiny, manifest, first)}
    model = ["--model", "tiny_net:tiny_cnn", "--checkpoint", tiny]
    cases = [
        (["--data", images, "--out", tiny], "is the input"),
        (["--data", manifest, "--out", manifest], "is the input"),
        (["--data", images, "--out", first], "inside the input folder"),
        (["--data", manifest, "--out", elsewhere], "one of the input images"),
        (["--data", images, "--out", images / "pool.parquet"], "inside the input folder"),
    ]
    for args, needle in cases:
        assert_one_line_error(extract(*model, *args), needle)
    assert {p: p.read_bytes() for p in snapshot} == snapshot
    assert leftovers(tmp_path) == []


# ------------------------------------------------------------------------------------- 3. special files


def test_fifo_is_streamed_into_not_replaced(tmp_path: Path) -> None:
    pool = pool_file(tmp_path)
    fifo = tmp_path / "batch.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    r = invoke("select", pool, "--budget", 3, "--out", fifo, "--quiet")
    reader.join(timeout=30)
    assert r.exit_code == 0, r.output
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    rows = list(csv.DictReader(received[0].decode().splitlines()))
    assert len(rows) == 3


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full")
def test_dev_null_and_dev_full(tmp_path: Path) -> None:
    pool = pool_file(tmp_path)
    r = invoke("select", pool, "--budget", 3, "--out", "/dev/null", "--quiet")
    assert r.exit_code == 0 and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    # /dev/full in a real process: the write error surfaces when the stream is flushed
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "uwe_cli.cli",
            "select",
            str(pool),
            "--budget",
            "3",
            "--out",
            "/dev/full",
            "-q",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "/dev/full" in lines[0] and "No space left" in lines[0]
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)


def test_outputs_get_the_umask(tmp_path: Path) -> None:
    pool = pool_file(tmp_path)
    old = os.umask(0o022)
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "uwe_cli.cli",
                "select",
                str(pool),
                "-b",
                "2",
                "-o",
                str(tmp_path / "b.csv"),
                "-q",
            ],
            capture_output=True,
        )
    finally:
        os.umask(old)
    assert proc.returncode == 0
    assert stat.S_IMODE((tmp_path / "b.csv").stat().st_mode) == 0o644


# ------------------------------------------------------------------------------------- 4-6. exit codes, one line


def test_corrupt_parquet_names_the_file(tmp_path: Path) -> None:
    pool = pool_file(tmp_path, n=2000)
    data = bytearray(pool.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    end = len(data) - 8 - footer
    for i in range(4, end, 7):  # garble the pages, keep the footer valid
        data[i] ^= 0x5A
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(data))
    out = tmp_path / "b.csv"
    assert_one_line_error(invoke("select", bad, "--budget", 2, "--out", out), str(bad), out)
    assert_one_line_error(invoke("inspect", bad), str(bad))


def test_bad_options_and_outputs_exit_2(tmp_path: Path, tiny: Path, images: Path) -> None:
    pool = pool_file(tmp_path)
    (tmp_path / "afile").write_text("x")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--seed", "-1", "--out", tmp_path / "x.csv"], "--seed"),
        (["--out", tmp_path / "adir"], "is a directory"),
        (["--out", ""], "--out is empty"),
        (["--out", tmp_path / "afile" / "b.csv"], "Not a directory"),
        (["--out", "/proc/uwe-test/b.csv"], "cannot write --out"),
    ]
    for args, needle in cases:
        assert_one_line_error(invoke("select", pool, "--budget", 2, *args), needle)
    # an ensemble whose members disagree on the number of classes
    from tiny_net import tiny_cnn

    other = tmp_path / "tiny4.pth"
    torch.save(tiny_cnn(4).state_dict(), other)
    out = tmp_path / "e.parquet"
    r = extract(
        "--model",
        "tiny_net:tiny_cnn",
        "--checkpoint",
        tiny,
        "--checkpoint",
        other,
        "--data",
        images,
        "--out",
        out,
    )
    assert_one_line_error(r, "disagree on the number of classes", out)


def test_usage_errors_are_one_line_in_a_real_process(tmp_path: Path) -> None:
    pool = pool_file(tmp_path)
    for args, needle in [
        (["select", str(pool), "--budget", "2.5", "--out", "x.csv"], "'--budget'"),
        (["select", str(pool), "--budget", "ten", "--out", "x.csv"], "'--budget'"),
        (["select", str(pool), "--budget", "2", "--bugdet"], "No such option"),
        (["select"], "Missing argument"),
        (["frobnicate"], "No such command"),
    ]:
        proc = subprocess.run([sys.executable, "-m", "uwe_cli.cli", *args], capture_output=True, text=True)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and needle in lines[0], (args, proc.stderr)


# ------------------------------------------------------------------------------------- 7-9. IDs, values, metadata


def test_every_pool_id_round_trips_through_the_batch_file(tmp_path: Path) -> None:
    ids = [
        'a"quoted"',
        "comma,inside",
        "é ünïcödé",
        "line\u2028sep",
        "nel\x85x",
        "x" * 200_000,
        "plain",
        "'s",
    ]
    ids += [f"u{i}" for i in range(8)]
    pool = pool_file(tmp_path, n=len(ids), ids=ids)
    first = tmp_path / "first.csv"
    assert invoke("select", pool, "--budget", 8, "--strategy", "random", "--out", first, "-q").exit_code == 0
    picked = [r["id"] for r in csv.DictReader(first.open(newline="", encoding="utf-8"))]
    second = tmp_path / "second.csv"
    r = invoke("select", pool, "--budget", 8, "--labeled", first, "--out", second, "-q")
    assert r.exit_code == 0, r.output
    again = [r["id"] for r in csv.DictReader(second.open(newline="", encoding="utf-8"))]
    assert set(picked) | set(again) == set(ids) and not set(picked) & set(again)
    text = tmp_path / "ids.txt"  # the plain-text format keeps IDs without newlines as they are
    text.write_text("\n".join(i for i in ids if i != "x" * 200_000) + "\n", encoding="utf-8")
    r = invoke("select", pool, "--budget", 1, "--labeled", text, "--out", tmp_path / "t.csv", "-q")
    assert r.exit_code == 0 and "not in the pool" not in r.stderr
    assert [row["id"] for row in csv.DictReader((tmp_path / "t.csv").open())] == ["x" * 200_000]


@pytest.mark.parametrize(
    ("bad_id", "needle"),
    [("a\nb", "control character"), ("", "empty ID"), (" pad", "space"), ("tab\t", "control")],
)
def test_ids_that_cannot_round_trip_are_refused(tmp_path: Path, bad_id: str, needle: str) -> None:
    pool = pool_file(tmp_path, n=3, ids=["ok", bad_id, "fine"])
    out = tmp_path / "b.csv"
    assert_one_line_error(invoke("select", pool, "--budget", 1, "--out", out), needle, out)


def test_empty_vectors_refused_and_huge_tau_warns(tmp_path: Path) -> None:
    table = pa.table(
        {
            "id": ["a", "b"],
            "feature": pa.array([[], []], pa.list_(pa.float32(), 0)),
            "entropy": pa.array([0.1, 0.2], pa.float32()),
        }
    )
    pq.write_table(table, tmp_path / "empty.parquet")
    out = tmp_path / "b.csv"
    assert_one_line_error(
        invoke("select", tmp_path / "empty.parquet", "-b", 1, "-o", out), "empty vectors", out
    )
    pool = pool_file(tmp_path)
    r = invoke("select", pool, "--budget", 3, "--tau", "1e6", "--out", out, "-q")
    assert r.exit_code == 0 and "underflows to 0" in r.stderr


@pytest.mark.parametrize(
    ("meta", "needle"),
    [(b"{not json", "not valid JSON"), (b'{"schema": 99}', "schema version 99; this uwe reads version 1")],
)
def test_bad_metadata_is_refused_by_select_and_inspect(tmp_path: Path, meta: bytes, needle: str) -> None:
    table = pq.read_table(pool_file(tmp_path)).replace_schema_metadata({b"uwe": meta})
    pq.write_table(table, tmp_path / "m.parquet")
    out = tmp_path / "b.csv"
    assert_one_line_error(invoke("select", tmp_path / "m.parquet", "-b", 1, "-o", out), needle, out)
    assert_one_line_error(invoke("inspect", tmp_path / "m.parquet"), needle)


def test_inspect_refuses_a_string_feature_column(tmp_path: Path) -> None:
    pq.write_table(pa.table({"id": ["a"], "feature": ["1,2,3"], "entropy": [0.5]}), tmp_path / "s.parquet")
    assert_one_line_error(invoke("inspect", tmp_path / "s.parquet"), "must be a list of floats")


@pytest.mark.parametrize(
    ("entropy", "needle"),
    [
        (pa.array(["0.5", "0.1"]), "uncertainty column 'entropy' is not numeric (string)"),
        (pa.array([True, False]), "uncertainty column 'entropy' is not numeric (bool)"),
        (pa.array([0.5, float("nan")]), "NaN or Inf in 'entropy'"),
        (pa.array([0.5, float("inf")]), "NaN or Inf in 'entropy'"),
        (pa.array([0.5, -0.1]), "negative 'entropy'"),
    ],
)
def test_select_and_inspect_refuse_the_same_uncertainty(
    tmp_path: Path, entropy: pa.Array, needle: str
) -> None:
    feature = pa.array([[1.0, 2.0], [3.0, 4.0]], pa.list_(pa.float32(), 2))
    pq.write_table(
        pa.table({"id": ["a", "b"], "feature": feature, "entropy": entropy}), tmp_path / "u.parquet"
    )
    out = tmp_path / "b.csv"
    assert_one_line_error(invoke("select", tmp_path / "u.parquet", "-b", 1, "-o", out), needle, out)
    assert_one_line_error(invoke("inspect", tmp_path / "u.parquet"), needle)
    assert_one_line_error(invoke("inspect", tmp_path / "u.parquet", "--json"), needle)


def test_inspect_json_is_strict_json_with_non_finite_values(tmp_path: Path) -> None:
    feature = pa.array([[1.0], [3.0], [2.0]], pa.list_(pa.float32(), 1))
    score = pa.array([0.5, float("nan"), float("inf")])
    pq.write_table(
        pa.table({"id": ["a", "b", "c"], "feature": feature, "score": score}), tmp_path / "s.parquet"
    )
    r = invoke("inspect", tmp_path / "s.parquet", "--json")
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))
    assert info["uncertainty"]["score"] == {"min": 0.5, "mean": 0.5, "max": 0.5, "nulls": 0, "non_finite": 2}


# ------------------------------------------------------------------------------------- 10-12. extraction


def test_resume_redoes_changed_and_drops_deleted_images(
    tmp_path: Path, tiny: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from uwe_cli.extract.classification import ClassificationConfig, extract_classification

    folder = tmp_path / "imgs"
    paths = write_images(folder, n=6, size=20)
    out = tmp_path / "pool.parquet"

    def config() -> ClassificationConfig:
        return ClassificationConfig(
            data=folder, out=out, model="tiny_net:tiny_cnn", checkpoint=tiny, image_size=16, batch_size=2,
            part_rows=2, device="cpu",
        )  # fmt: skip

    with pytest.raises(Killed):
        extract_classification(config(), kill_after(2))
    done_ids = sorted(p.relative_to(folder).as_posix() for p in paths)[:4]
    deleted, changed = folder / done_ids[0], folder / done_ids[1]
    deleted.unlink()
    write_images(tmp_path / "other", n=2, size=30, seed=9)
    changed.write_bytes(sorted((tmp_path / "other").rglob("*.png"))[0].read_bytes())
    (folder / "0-new.png").write_bytes(sorted((tmp_path / "other").rglob("*.png"))[1].read_bytes())
    result = extract_classification(config())
    assert result.resumed == 2 and result.redone == 1 and result.processed == 4
    ids = pq.read_table(out).column("id").to_pylist()
    assert sorted(ids) == sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.*"))
    assert len(ids) == len(set(ids)) == 6
    fresh = tmp_path / "fresh.parquet"
    cfg = config()
    cfg.out = fresh
    extract_classification(cfg)
    a, b = pq.read_table(out), pq.read_table(fresh)
    # the same rows in the same order as an uninterrupted run (the order decides ties in selection)
    assert a.column("id").to_pylist() == b.column("id").to_pylist()
    np.testing.assert_array_equal(
        np.stack(a.column("feature").to_pylist()), np.stack(b.column("feature").to_pylist())
    )


def test_option_errors_leave_nothing_and_block_nothing(tmp_path: Path, images: Path, tiny: Path) -> None:
    out = tmp_path / "pool.parquet"
    model = ["--model", "tiny_net:tiny_cnn", "--checkpoint", tiny, "--data", images, "--out", out]
    for args, needle in [
        (["--num-workers", "-1"], "--num-workers"),
        (["--batch-size", "0"], "--batch-size"),
        (["--image-size", "0"], "--image-size must be positive"),
        (["--std", "inf,1,1"], "finite"),
        (["--mean", "nan,0,0"], "--mean and --std must be finite"),
    ]:
        r = invoke("extract", "classification", "--num-workers", 0, "--device", "cpu", *model, *args)
        assert_one_line_error(r, needle, out)
        assert leftovers(tmp_path) == []
    assert extract(*model).exit_code == 0  # the corrected command is not blocked


def test_dangling_symlinks_and_loops_are_not_silently_skipped(
    tmp_path: Path, images: Path, tiny: Path
) -> None:
    model = ["--model", "tiny_net:tiny_cnn", "--checkpoint", tiny]
    (images / "gone.png").symlink_to(tmp_path / "missing.png")
    out = tmp_path / "pool.parquet"
    assert_one_line_error(extract(*model, "--data", images, "--out", out), "gone.png", out)
    r = extract(*model, "--data", images, "--out", out, "--skip-bad-images", "-q")
    assert r.exit_code == 0
    report = (tmp_path / "pool.skipped.csv").read_text()
    assert "gone.png" in report
    (images / "gone.png").unlink()
    (images / "sub" / "loop").symlink_to(images)
    out2 = tmp_path / "pool2.parquet"
    assert_one_line_error(extract(*model, "--data", images, "--out", out2), "symlink loop", out2)


def test_heatmaps_of_tricky_ids_never_collide_or_escape(tmp_path: Path) -> None:
    from uwe_cli.extract.segmentation import heatmap_path

    folder = tmp_path / "heat"
    names = {heatmap_path(folder, i) for i in ("a/pwn", "../a/pwn", "./a/pwn", "a%2Fpwn")}
    assert len(names) == 4 and all(p.parent == folder for p in names)
