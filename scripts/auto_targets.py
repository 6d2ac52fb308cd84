"""auto against the best column, per launch, and the out-of-the-box targets (docs/benchmarks.md).

    mpirun -np 2 ringreduce-bench --forget -a mpi,ring,tree,shm,auto --json oob1.json   # twice
    python scripts/auto_targets.py oob1.json oob2.json

Reads the JSON of two or more `ringreduce-bench -a mpi,ring,tree,shm,auto` launches
and prints, per size, each column's range over the launches, auto / best (the
fastest of mpi, ring, tree and shm in the same launch) and auto - mpi, one figure
per launch; then whether each launch meets the targets of issue 19 (a target is
met when every launch meets it):

- auto <= 1.15 x best from 256 KiB to 64 MiB;
- auto <= native + 3 us from 1 KiB to 64 KiB;
- auto <= 3 x native below 1 KiB.
"""
from __future__ import annotations

import argparse
import json

PEERS = ("mpi", "ring", "tree", "shm")
KiB = 1024


def load(path: str) -> dict[int, dict[str, float]]:
    """{size: {algorithm: median us}} of one launch."""
    times: dict[int, dict[str, float]] = {}
    for row in json.load(open(path))["rows"]:
        times.setdefault(row["size"], {})[row["algorithm"]] = row["time_us"]
    return times


def label(size: int) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if size >= 1 << shift:
            return f"{size >> shift} {unit}"
    return f"{size} B"


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    fmt = (lambda v: f"{v:.1f}") if hi < 100 else (lambda v: f"{v:.0f}")
    return fmt(lo) if fmt(lo) == fmt(hi) else f"{fmt(lo)}-{fmt(hi)}"


def misses(size: int, t: dict[str, float]) -> str | None:
    """The target this launch's auto misses at this size, or None."""
    best = min(t[a] for a in PEERS if a in t)
    if size >= 256 * KiB and t["auto"] > 1.15 * best:
        return f"{t['auto'] / best:.2f}x best"
    if KiB <= size <= 64 * KiB and t["auto"] > t["mpi"] + 3.0:
        return f"native + {t['auto'] - t['mpi']:.1f} us"
    if size < KiB and t["auto"] > 3.0 * t["mpi"]:
        return f"{t['auto'] / t['mpi']:.2f}x native"
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="ringreduce-bench --json files, one per launch")
    launches = [load(p) for p in ap.parse_args().json]
    sizes = sorted(set.intersection(*(set(t) for t in launches)))
    print("| size | " + " | ".join(PEERS) + " | auto | auto / best | auto - mpi (us) |")
    print("|---" * (len(PEERS) + 4) + "|")
    failed: dict[int, list[str]] = {}
    for size in sizes:
        rows = [t[size] for t in launches]
        cells = [span([r[a] for r in rows]) if all(a in r for r in rows) else "-" for a in PEERS + ("auto",)]
        ratios = []
        for r in rows:
            best = min(PEERS, key=lambda a: r.get(a, float("inf")))
            ratios.append((r["auto"] / r[best], best))
        names = {b for _, b in ratios}
        ratio = ", ".join(f"{q:.2f}" for q, _ in ratios) + f" ({'/'.join(sorted(names))})"
        diff = ", ".join(f"{r['auto'] - r['mpi']:+.1f}" for r in rows) if size <= 64 * KiB else ""
        print(f"| {label(size)} | " + " | ".join(cells) + f" | {ratio} | {diff} |")
        for i, r in enumerate(rows):
            miss = misses(size, r)
            if miss:
                failed.setdefault(i, []).append(f"{label(size)}: {miss}")
    print()
    for i in range(len(launches)):
        print(f"launch {i + 1}: " + ("every target met" if i not in failed else "missed at " + "; ".join(failed[i])))


if __name__ == "__main__":
    main()
