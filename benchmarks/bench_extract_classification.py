"""Benchmark `uwe extract classification`: throughput against a bare forward pass, and peak memory.

1. Throughput: the same images, the same model and batch size, in the same process: a bare
   `model(x)` loop over tensors preprocessed in advance (the upper bound: the images decoded and
   transformed exactly as extraction does, but outside the timed loop: no decoding, no hooks, no
   uncertainty, no Parquet) against the full extraction from image files to a pool (decoding,
   resize/crop, normalisation, forward, features, uncertainty, Parquet). The pool's probabilities
   are checked against the bare forward's, so both sides saw the same tensors.
2. Memory: peak RSS of a fresh process extracting a small and a 4× larger folder; streaming row
   groups keep it flat.

Run: .venv/bin/python benchmarks/bench_extract_classification.py [--images 256] [--size 112]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np

# Peak RSS of the child itself: VmHWM belongs to the process image and starts afresh at exec, whereas
# Linux carries ru_maxrss over fork + exec, so a child would report this (larger) parent's peak.
PEAK_RSS = """
def peak_rss_mb():
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""
CHILD = (
    PEAK_RSS
    + """
import json, sys, time
from uwe_cli.extract.classification import ClassificationConfig, extract_classification
cfg = ClassificationConfig(data=sys.argv[1], out=sys.argv[2], model="resnet18", checkpoints=[sys.argv[3]],
                           image_size=int(sys.argv[4]), batch_size=32, num_workers=0, device="cpu")
start = time.perf_counter()
result = extract_classification(cfg)
print(json.dumps({"rows": result.rows, "seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}))
"""
)
BASELINE = (
    PEAK_RSS
    + """
import torchvision
torchvision.models.get_model("resnet18", weights=None, num_classes=10)
print(peak_rss_mb())
"""
)


def write_images(folder: Path, n: int, size: int, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 256, (size + i % 7, size + i % 5, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:06d}.{'png' if i % 2 else 'jpg'}")


def _stamp(stamps: list[float], _done: int, _total: int) -> None:
    """Progress callback: the time of each report (one after every batch)."""
    stamps.append(time.perf_counter())


def throughput(
    folder: Path, ckpt: Path, out: Path, size: int, batch: int, workers: int, rounds: int
) -> dict[str, float]:
    import pyarrow.parquet as pq
    import torch
    import torchvision

    from uwe_cli.data import classification_transform, list_images, load_image
    from uwe_cli.extract.classification import ClassificationConfig, extract_classification

    model = torchvision.models.get_model("resnet18", weights=None, num_classes=10)
    model.load_state_dict(torch.load(ckpt))
    model.eval()
    transform = classification_transform(size)
    tensors = torch.stack([transform(load_image(item.path)) for item in list_images(folder)])
    n = len(tensors)
    cfg = ClassificationConfig(
        data=folder,
        out=out,
        model="resnet18",
        checkpoints=[ckpt],
        image_size=size,
        batch_size=batch,
        num_workers=workers,
        device="cpu",
    )
    # Alternate the two measurements and keep the best of each: on a shared machine the load
    # changes from one minute to the next, and best-of-rounds compares like with like. The best
    # single full batch of each (bare forward vs. one batch of extraction, from one progress report
    # to the next) gives a steady-state ratio that short load spikes and warm-up do not blur.
    bare = loop = end_to_end = 0.0
    bare_batch = extract_batch = float("inf")
    max_diff = 0.0
    full = n // batch
    for _ in range(rounds):
        with torch.inference_mode():
            model(tensors[:batch])  # warm-up
            logits = []
            start = time.perf_counter()
            for i, chunk in enumerate(tensors.split(batch)):
                t0 = time.perf_counter()
                logits.append(model(chunk))
                if i < full:
                    bare_batch = min(bare_batch, time.perf_counter() - t0)
            bare = max(bare, n / (time.perf_counter() - start))
        stamps: list[float] = []
        start = time.perf_counter()
        result = extract_classification(cfg, progress=partial(_stamp, stamps))
        end_to_end = max(end_to_end, result.rows / (time.perf_counter() - start))
        intervals = [b - a for a, b in itertools.pairwise(stamps)][:full]
        extract_batch = min([extract_batch, *intervals])
        pool_probs = np.stack(pq.read_table(out, columns=["probs"]).column("probs").to_pylist())
        bare_probs = torch.cat(logits).softmax(dim=1).numpy()
        max_diff = max(max_diff, float(np.abs(pool_probs - bare_probs).max()))
        out.unlink()
        loop = max(loop, result.images_per_second)  # decode + forward + uncertainty + Parquet
    if max_diff > 1e-5:
        raise SystemExit(f"extraction and bare forward disagree (max |Δprob| {max_diff:.2e})")
    return {
        "images": n,
        "bare_forward_img_s": bare,
        "extract_img_s": loop,
        "end_to_end_img_s": end_to_end,
        "ratio": loop / bare,
        "bare_batch_img_s": batch / bare_batch,
        "extract_batch_img_s": batch / extract_batch,
        "batch_ratio": bare_batch / extract_batch,
        "max_prob_diff": max_diff,
    }


def peak_rss(folder: Path, ckpt: Path, out: Path, size: int) -> dict[str, float]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out), str(ckpt), str(size)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=256, help="images in the throughput run")
    parser.add_argument("--size", type=int, default=112, help="crop size fed to resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds; best of each is kept")
    parser.add_argument(
        "--rss-images",
        type=int,
        default=5000,
        help="small RSS run; the large one has 4× (keep it above the writer's 4096-row merge buffer)",
    )
    parser.add_argument("--rss-size", type=int, default=32, help="crop size in the RSS runs")
    args = parser.parse_args()

    import torch
    import torchvision

    from uwe_cli.extract.writer import DEFAULT_PART_ROWS, MERGE_ROW_GROUP_ROWS

    with tempfile.TemporaryDirectory(prefix="uwe-bench-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        ckpt = root / "resnet18.pth"
        torch.save(torchvision.models.get_model("resnet18", weights=None, num_classes=10).state_dict(), ckpt)
        write_images(root / "throughput", args.images, args.size + 16)
        t = throughput(
            root / "throughput",
            ckpt,
            root / "t.parquet",
            args.size,
            args.batch_size,
            args.num_workers,
            args.rounds,
        )
        print(
            f"throughput ({t['images']:.0f} images, resnet18 @ {args.size}px, batch {args.batch_size}, "
            f"{torch.get_num_threads()} torch threads, {args.num_workers} loader worker(s)):"
        )
        print(f"  bare forward on preloaded tensors : {t['bare_forward_img_s']:8.1f} images/s")
        print(f"  uwe extract classification        : {t['extract_img_s']:8.1f} images/s")
        print(f"    (with model loading, end to end : {t['end_to_end_img_s']:8.1f} images/s)")
        print(f"  ratio                             : {t['ratio']:8.2f}  (target ≥ 0.80)")
        print(
            f"  best single batch, bare / extract : {t['bare_batch_img_s']:8.1f} / "
            f"{t['extract_batch_img_s']:.1f} images/s, ratio {t['batch_ratio']:.2f} (steady state)"
        )
        print(f"  max |pool probs - bare probs|     : {t['max_prob_diff']:8.1e}")
        print(f"  load average (1, 5, 15 min)       : {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        base = subprocess.run(
            [sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True
        ).stdout.strip()
        print(f"peak RSS of a process that only imports torch and builds resnet18: {float(base):.1f} MB")
        print(
            f"peak RSS of a fresh extraction process (resnet18 @ {args.rss_size}px, num_workers 0; "
            f"bounded by the writer's buffers: {DEFAULT_PART_ROWS}-row parts, "
            f"{MERGE_ROW_GROUP_ROWS}-row merge groups, plus ~1 KB per listed image):"
        )
        for n in (args.rss_images, 4 * args.rss_images):
            folder = root / f"rss{n}"
            write_images(folder, n, args.rss_size + 8, seed=n)
            r = peak_rss(folder, ckpt, root / f"rss{n}.parquet", args.rss_size)
            print(
                f"  {n:6d} images: {r['peak_rss_mb']:7.1f} MB peak RSS, {r['rows'] / r['seconds']:7.1f} images/s"
            )


if __name__ == "__main__":
    main()
