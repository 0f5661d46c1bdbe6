"""Per-kernel times from a CSV of Nsight Compute metrics (bench/gpu/profile.sh): totals by kernel and launch
shape, and the launches from --first to --last one by one.

    python bench/ncu_times.py times.csv [--first 0 --last 14]
"""

from __future__ import annotations

import argparse
import collections
import csv


def kernels(path: str) -> list[dict[str, object]]:
    """One dict a profiled launch: its short name, grid, block and metrics."""
    found: dict[str, dict[str, object]] = {}
    with open(path, newline="") as f:
        for r in csv.reader(f):
            if len(r) < 15 or r[0] == "ID":
                continue
            d = found.setdefault(r[0], {"name": r[4].split("[")[0].split("::")[0], "block": r[7], "grid": r[8]})
            d[r[12]] = float(r[14].replace(",", "")) if r[14] else 0.0
    return list(found.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--last", type=int, default=0)
    args = ap.parse_args()
    ks = kernels(args.csv)
    total = sum(float(k.get("gpu__time_duration.sum", 0)) for k in ks)
    print(f"{len(ks)} kernels, {total / 1e3:.1f} us")
    groups: dict[tuple[object, ...], list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    for k in ks:
        g = groups[(k["name"], k["grid"], k["block"])]
        g[0] += 1
        g[1] += float(k.get("gpu__time_duration.sum", 0))
        g[2] += float(k.get("dram__bytes_read.sum", 0))
    for (name, grid, block), (n, t, b) in sorted(groups.items(), key=lambda x: -x[1][1]):
        each, rate = t / n / 1e3, b / max(t, 1)
        print(f"{name:>20} {grid:>14} {block:>12} x{n:<4} {t / 1e3:9.1f} us ({each:7.1f} each) {rate:6.1f} GB/s")
    for i, k in enumerate(ks[args.first : args.last], args.first):
        t, b = float(k.get("gpu__time_duration.sum", 0)), float(k.get("dram__bytes_read.sum", 0))
        inst = float(k.get("smsp__inst_executed.sum", 0))
        print(f"{i:4d} {k['name']:>22} {k['grid']:>14} {k['block']:>12} {t / 1e3:8.1f} us {b / 1e6:8.2f} MB "
              f"{b / max(t, 1):7.1f} GB/s {inst / 1e6:7.2f}M inst")  # fmt: skip


if __name__ == "__main__":
    main()
