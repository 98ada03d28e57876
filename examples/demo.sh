#!/usr/bin/env bash
# The whole job on real images: digits as PNG files, a tiny model trained for a few seconds,
# `uwe extract classification` to a pool, `uwe select` for the next 20 images to label, and
# `uwe simulate` to check which strategy and tau work on these images (docs/simulate.md).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=demo-out
rm -rf "$OUT"
mkdir -p "$OUT"

python examples/make_digits.py --out "$OUT" --labeled 100 --epochs 15

# examples/ on PYTHONPATH makes the user architecture importable as tiny_net:tiny_cnn.
PYTHONPATH="examples${PYTHONPATH:+:$PYTHONPATH}" uwe extract classification \
    --model tiny_net:tiny_cnn --checkpoint "$OUT/tiny.pth" \
    --data "$OUT/digits" --out "$OUT/pool.parquet" \
    --image-size 8 --resize 8 --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5 \
    --class-names 0,1,2,3,4,5,6,7,8,9 --batch-size 256 --num-workers 0

uwe select "$OUT/pool.parquet" --budget 20 --labeled "$OUT/labeled.csv" --out "$OUT/batch.csv"

echo
echo "next 20 images to label ($OUT/batch.csv):"
cat "$OUT/batch.csv"

echo
uwe simulate "$OUT/pool.parquet" --labels "$OUT/labels.csv" --budgets 20,40,80,160,320 \
    --strategies uwe,coreset,uncertainty,random,badge --tau 0.1,0.5,1 --seeds 5 --out "$OUT/simulate"
