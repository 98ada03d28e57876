"""Benchmark `uwe extract segmentation` on Cityscapes-sized inputs (1024×2048, 19 classes).

Two questions, answered in one run on the same machine:

* Throughput: images/s of the full extraction (decode, normalise, forward, pixel uncertainty,
  region means, Parquet) against a *bare forward pass* of the same model on the same, pre-loaded
  tensors. The gap is what uwe adds on top of the model.
* Memory: peak RSS of the extraction for two image counts, each in a fresh child process. If the
  extractor kept pixel maps or rows around, the larger run would peak higher.

The model is torchvision's lraspp_mobilenet_v3_large with random weights (no download), saved as a
state_dict and loaded the way users load theirs (`--model NAME --checkpoint FILE`).

    python benchmarks/bench_extract_segmentation.py                      # 2 and 4 images, region 512
    python benchmarks/bench_extract_segmentation.py --counts 4 16 --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

OUT = Path("bench-out") / "segmentation"
HEIGHT, WIDTH, CLASSES = 1024, 2048, 19
MODEL = "lraspp_mobilenet_v3_large"


def peak_rss_mb() -> float:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def make_inputs(count: int) -> tuple[Path, Path]:
    """`count` street-like 1024×2048 JPEGs and a random-weight checkpoint, cached in bench-out/."""
    import torch
    import torchvision
    from PIL import Image

    images = OUT / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:HEIGHT, 0:WIDTH]
    for i in range(count):
        path = images / f"frame_{i:04d}.jpg"
        if path.exists():
            continue
        base = (np.sin(xx / (40 + 7 * i)) + np.cos(yy / 55))[..., None] * 60 + 120
        img = np.clip(base + rng.normal(0, 20, (HEIGHT, WIDTH, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path, quality=90)
    ckpt = OUT / f"{MODEL}-{CLASSES}.pth"
    if not ckpt.exists():
        torch.manual_seed(0)
        model = torchvision.models.get_model(MODEL, weights=None, weights_backbone=None, num_classes=CLASSES)
        torch.save(model.state_dict(), ckpt)
    return images, ckpt


def child(args: argparse.Namespace) -> None:
    """One measurement in a fresh process: extraction, then (optionally) the bare forward pass."""
    import torch

    import uwe_cli.extract.segmentation as seg
    from uwe_cli.data import IMAGENET_MEAN, IMAGENET_STD, list_images, load_image
    from uwe_cli.extract.segmentation import SegmentationConfig, extract_segmentation
    from uwe_cli.models import load_model

    images = OUT / f"subset-{args.child}"
    images.mkdir(parents=True, exist_ok=True)
    for item in list_images(OUT / "images")[: args.child]:
        link = images / item.path.name
        if not link.exists():
            link.symlink_to(item.path.resolve())
    ckpt = OUT / f"{MODEL}-{CLASSES}.pth"
    out = OUT / f"pool-{args.child}.parquet"
    out.unlink(missing_ok=True)
    cfg = SegmentationConfig(
        data=images,
        out=out,
        model=MODEL,
        checkpoint=ckpt,
        num_classes=CLASSES,
        region_size=args.region_size,
        batch_size=1,
        num_workers=0,
        device=args.device,
    )
    # Time spent turning logits + features into unit rows (pixel uncertainty, region means).
    reduce_seconds = [0.0]
    original_reduce = seg.reduce_image

    def timed_reduce(*a: object, **k: object) -> object:
        t = time.perf_counter()
        value = original_reduce(*a, **k)  # type: ignore[arg-type]
        reduce_seconds[0] += time.perf_counter() - t
        return value

    seg.reduce_image = timed_reduce  # type: ignore[assignment]
    start = time.perf_counter()
    result = extract_segmentation(cfg)
    seconds = time.perf_counter() - start
    report = {
        "images": args.child,
        "rows": result.rows,
        "total_seconds": seconds,  # includes building the model and loading the checkpoint
        "extract_seconds": result.seconds,  # the image loop: decode, forward, reduce, write
        "extract_images_per_s": result.images_per_second,
        "reduce_seconds_per_image": reduce_seconds[0] / args.child,
        "peak_rss_mb": peak_rss_mb(),
    }
    if args.bare:
        from torchvision.transforms import functional as F

        loaded = load_model(MODEL, "segmentation", CLASSES, ckpt, None, args.device)
        tensors = [
            F.normalize(F.to_tensor(load_image(item.path)), list(IMAGENET_MEAN), list(IMAGENET_STD))[None]
            for item in list_images(images)
        ]
        sync = torch.cuda.synchronize if loaded.module.parameters().__next__().is_cuda else (lambda: None)
        with torch.inference_mode():
            start = time.perf_counter()
            for x in tensors:
                loaded.module(x.to(next(loaded.module.parameters()).device))["out"]
            sync()
            bare = time.perf_counter() - start
        report["bare_forward_seconds"] = bare
        report["bare_images_per_s"] = len(tensors) / bare
    print(json.dumps(report))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs=2, default=[2, 4], help="two image counts")
    parser.add_argument("--region-size", default="512", help="region size (none = image-level)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    small, large = sorted(args.counts)
    make_inputs(large)
    reports = []
    for count in (small, large):
        cmd = [sys.executable, __file__, "--child", str(count), "--region-size", args.region_size]
        cmd += ["--device", args.device] + (["--bare"] if count == large else [])
        env = {**os.environ, "UWE_NO_PROGRESS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        if done.returncode != 0:
            sys.exit(f"child failed:\n{done.stderr}")
        reports.append(json.loads(done.stdout.strip().splitlines()[-1]))
    a, b = reports
    print(
        f"{MODEL}, {CLASSES} classes, {HEIGHT}x{WIDTH} images, region {args.region_size}, "
        f"device {args.device}, {os.cpu_count()} CPU cores"
    )
    print(
        "| images | rows | extraction images/s | bare forward images/s | reduce s/image "
        "| run incl. model load s | peak RSS MB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in reports:
        bare = f"{r['bare_images_per_s']:.3f}" if "bare_images_per_s" in r else "-"
        print(
            f"| {r['images']} | {r['rows']} | {r['extract_images_per_s']:.3f} | {bare} "
            f"| {r['reduce_seconds_per_image']:.2f} | {r['total_seconds']:.1f} | {r['peak_rss_mb']:.0f} |"
        )
    ratio = b["extract_images_per_s"] / b["bare_images_per_s"]
    print(f"extraction runs at {ratio:.0%} of the bare forward speed ({b['images']} images)")
    print(
        f"peak RSS {a['peak_rss_mb']:.0f} MB for {a['images']} images, {b['peak_rss_mb']:.0f} MB for {b['images']}"
    )


if __name__ == "__main__":
    main()
