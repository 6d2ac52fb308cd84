"""Soak test: many allreduces of mixed sizes, algorithms and compressions; resident memory start/end.

    mpirun -np 2 python scripts/soak.py --calls 100000

Every call's result is checked (exact for Sum of small integers in float32 on
the uncompressed algorithms). RSS is read from /proc/self/statm after a
warm-up (so pools and caches are full) and at the end; growth must stay under
--max-growth (default 5 %), on every rank.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

import ringreduce as rr

SIZES = [1, 7, 256, 4099, 65536, 1 << 18]
ALGORITHMS = ["auto", "ring", "tree", "mpi"]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def compressions() -> list:
    comp = getattr(rr, "Compression", None)
    if comp is None:
        return [None]
    return [None, comp.fp16, comp.bf16, comp.int8, comp.int4, comp.onebit]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=100_000)
    ap.add_argument("--warmup", type=int, default=2000)
    ap.add_argument("--max-growth", type=float, default=0.05)
    args = ap.parse_args()
    rr.init()
    n, r = rr.size(), rr.rank()
    comps = compressions()
    rng = np.random.default_rng(1234)          # same schedule on every rank
    inputs = {s: np.full(s, r + 1, np.float32) for s in SIZES}
    expect = n * (n + 1) / 2
    start_rss = None
    t0 = time.perf_counter()
    async_handles = []
    for i in range(args.warmup + args.calls):
        if i == args.warmup:
            start_rss = rss_bytes()
            t0 = time.perf_counter()
        size = SIZES[rng.integers(len(SIZES))]
        comp = comps[rng.integers(len(comps))] if rng.random() < 0.3 else None
        algo = ALGORITHMS[rng.integers(len(ALGORITHMS))] if comp is None else "auto"
        x = inputs[size]
        name = f"t{size}.{i % 7}"
        if comp is not None:
            name = f"c{size}.{type(comp).__name__}.{getattr(comp, 'name', comp)!s:.20}"
        if rng.random() < 0.2:
            async_handles.append((rr.allreduce_async(x, op=rr.Sum, algorithm=algo, compression=comp,
                                                     name=name), comp))
            if len(async_handles) >= 4:
                for h, c in async_handles:
                    y = h.wait()
                    assert c is not None or y[0] == expect
                async_handles.clear()
            continue
        y = rr.allreduce(x, op=rr.Sum, algorithm=algo, compression=comp, name=name)
        if comp is None:
            assert y[0] == expect and y[-1] == expect, (i, size, algo)
        if r == 0 and (i + 1) % 10000 == 0:
            print(f"{i + 1} calls, rss {rss_bytes() / 2**20:.1f} MiB", flush=True)
    for h, _ in async_handles:
        h.wait()
    end_rss = rss_bytes()
    took = time.perf_counter() - t0
    growth = (end_rss - start_rss) / start_rss
    worst = MPI.COMM_WORLD.allreduce(growth, op=MPI.MAX)
    if r == 0:
        print(f"soak: {args.calls} allreduces on {n} ranks in {took:.0f} s "
              f"(sizes {SIZES[0]}..{SIZES[-1]} floats, algorithms {ALGORITHMS}, "
              f"{len(comps) - 1} compressions); rank 0 RSS {start_rss / 2**20:.1f} -> "
              f"{end_rss / 2**20:.1f} MiB ({100 * growth:+.2f} %), worst rank {100 * worst:+.2f} %")
    return 0 if worst < args.max_growth else 1


if __name__ == "__main__":
    raise SystemExit(main())
