"""A pool of real features: Fashion-MNIST images, a CNN trained here for a few minutes, `uwe extract`.

    sudo apt-get install -y dataset-fashion-mnist     # 70,000 real 28×28 images (Debian package)
    .venv/bin/python benchmarks/real_pool.py --out bench-out/peers/fashion-pool.parquet

Steps: the IDX files are checked against their sha256 and written as PNG files (one folder per split and
class); `real_net.fashion_cnn` is trained on the 60,000 training images for `--epochs` (CPU);
then `uwe extract classification` runs it over all 70,000 PNGs and writes the pool (512-d features of
the penultimate layer, entropy and the other uncertainties), exactly as a user would. Training runs a
fixed number of epochs from a fixed seed, so the pool does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
FASHION = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
SHA256 = {  # decompressed files of Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
CLASSES = "tshirt,trouser,pullover,dress,coat,sandal,shirt,sneaker,bag,boot"


def read_idx(folder: Path, name: str) -> np.ndarray:
    path = folder / name
    raw = path.read_bytes() if path.exists() else gzip.decompress((folder / (name + ".gz")).read_bytes())
    if hashlib.sha256(raw).hexdigest() != SHA256[name]:
        raise SystemExit(f"{path}: unexpected sha256 (not Debian's Fashion-MNIST)")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def write_pngs(folder: Path, arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    from PIL import Image

    for split, (x, y) in arrays.items():
        for i in range(x.shape[0]):
            out = folder / split / str(int(y[i])) / f"{split}-{i:05d}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i], mode="L").save(out)


def train(x: np.ndarray, y: np.ndarray, epochs: int, out: Path) -> None:
    sys.path.insert(0, str(HERE))
    from real_net import fashion_cnn

    torch.manual_seed(0)
    model = fashion_cnn(10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # The extractor's preprocessing: grey replicated to RGB, then (v/255 − 0.5) / 0.5.
    X = torch.from_numpy(x.copy()).float().div(255).sub(0.5).div(0.5)[:, None].expand(-1, 3, -1, -1)
    Y = torch.from_numpy(y.astype(np.int64))
    start = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0])
        for s in range(0, X.shape[0], 128):
            idx = perm[s : s + 128]
            loss = nn.functional.cross_entropy(model(X[idx].contiguous()), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    print(
        f"trained {epochs} epoch(s) in {time.perf_counter() - start:.0f} s (loss {float(loss):.3f})",
        flush=True,
    )
    torch.save(model.state_dict(), out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--data", type=Path, default=FASHION, help="folder with the four IDX files (.gz or not)")
    ap.add_argument("--epochs", type=int, default=2, help="training epochs (a few minutes on 2 cores)")
    a = ap.parse_args()
    work = a.out.parent / "fashion"
    arrays = {s: (read_idx(a.data, img), read_idx(a.data, lab)) for s, (img, lab) in FILES.items()}
    png = work / "png"
    if not (png / "test").exists():
        t = time.perf_counter()
        write_pngs(png, arrays)
        print(f"wrote 70,000 PNGs in {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = work / "fashion-cnn.pth"
    if not ckpt.exists():
        train(*arrays["train"], a.epochs, ckpt)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    cmd = [
        sys.executable,
        "-m",
        "uwe_cli.cli",
        "extract",
        "classification",
        "--model",
        "real_net:fashion_cnn",
    ]
    cmd += ["--checkpoint", str(ckpt), "--data", str(png), "--out", str(a.out), "--num-classes", "10"]
    cmd += ["--image-size", "28", "--resize", "28", "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"]
    cmd += [
        "--class-names",
        CLASSES,
        "--batch-size",
        "256",
        "--num-workers",
        "2",
        "--device",
        "cpu",
        "--quiet",
    ]
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env)
    print(f"uwe extract classification: {a.out} in {time.perf_counter() - t:.0f} s", flush=True)


if __name__ == "__main__":
    main()
