"""Write a synthetic clustered unit pool: python benchmarks/make_pool.py OUT.parquet --rows N --dim D."""

from __future__ import annotations

import argparse

from synthetic import write_unit_pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out")
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=20)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-probs", action="store_true")
    a = ap.parse_args()
    write_unit_pool(a.out, a.rows, a.dim, a.clusters, a.classes, a.seed, with_probs=not a.no_probs)
    print(f"wrote {a.out}: {a.rows} rows x {a.dim}")


if __name__ == "__main__":
    main()
