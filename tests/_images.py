"""Small generated images for extraction tests (PNG/JPEG, RGB/grayscale/RGBA/palette, odd sizes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, n: int = 8, seed: int = 0, size: int = 40) -> list[Path]:
    """n images cycling through formats and modes; sizes vary so resizing and cropping are exercised."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    kinds = ["rgb.png", "gray.png", "rgba.png", "rgb.jpg", "gray.jpg", "pal.png"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        h, w = size + (i * 3) % 17, size + (i * 5) % 23
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        sub = folder / ("sub" if i % 3 == 0 else "")
        sub.mkdir(exist_ok=True)
        path = sub / f"img{i:03d}_{kind}"
        if kind.startswith("gray"):
            img = Image.fromarray(rgb[..., 0], mode="L")
        elif kind.startswith("rgba"):
            alpha = rng.integers(0, 256, (h, w, 1), dtype=np.uint8)
            img = Image.fromarray(np.concatenate([rgb, alpha], axis=2), mode="RGBA")
        elif kind.startswith("pal"):
            img = Image.fromarray(rgb).convert("P")
        else:
            img = Image.fromarray(rgb)
        img.save(path)
        paths.append(path)
    return paths


def write_truncated_png(path: Path, size: int = 40) -> Path:
    """A PNG cut in half: opens fine, fails on decode."""
    full = path.with_suffix(".full.png")
    noise = np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8)
    Image.fromarray(noise).save(full)
    data = full.read_bytes()
    full.unlink()
    path.write_bytes(data[: len(data) // 2])
    return path
