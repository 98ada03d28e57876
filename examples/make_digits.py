"""Demo data and model: scikit-learn's 8×8 digits as PNG files, and a tiny CNN trained for seconds.

Writes OUT/digits/<label>/<index>.png (1797 real images), trains `tiny_net.TinyCNN` on a small
labeled subset with the same preprocessing `uwe extract classification` applies, and saves
OUT/tiny.pth (a plain state_dict), OUT/labeled.csv (the IDs the model was trained on) and
OUT/labels.csv (`id,label` for every image: the ground truth `uwe simulate` replays selection with).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).parent))
from tiny_net import tiny_cnn

from uwe_cli.data import classification_transform, load_image

MEAN = STD = (0.5, 0.5, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("demo-out"))
    parser.add_argument("--labeled", type=int, default=100, help="training images (the labeled pool)")
    parser.add_argument("--epochs", type=int, default=15, help="fixed, so the demo is reproducible")
    args = parser.parse_args()

    digits = load_digits()
    folder = args.out / "digits"
    ids = []
    for index, (pixels, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * (255 / 16)).round().astype(np.uint8), mode="L").save(path)
        ids.append(f"{label}/{index:04d}.png")
    print(f"wrote {len(ids)} digit images to {folder}")
    with (args.out / "labels.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "label"])
        writer.writerows(zip(ids, digits.target.tolist(), strict=True))

    rng = np.random.default_rng(0)
    chosen = rng.choice(len(ids), size=args.labeled, replace=False)
    transform = classification_transform(8, 8, MEAN, STD)
    x = torch.stack([transform(load_image(folder / ids[i])) for i in chosen])
    y = torch.as_tensor(digits.target[chosen])

    torch.manual_seed(0)
    model = tiny_cnn(num_classes=10)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    start = time.perf_counter()
    for _ in range(args.epochs):
        model.train()
        for batch in torch.randperm(len(x)).split(32):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    torch.save(model.state_dict(), args.out / "tiny.pth")
    with (args.out / "labeled.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id"])
        writer.writerows([ids[i]] for i in chosen)
    print(
        f"trained tiny_cnn on {args.labeled} labeled digits: {args.epochs} epochs in "
        f"{time.perf_counter() - start:.1f} s, train accuracy {accuracy:.2f}"
    )


if __name__ == "__main__":
    main()
