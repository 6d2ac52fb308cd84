#!/usr/bin/env python
"""torch.distributed collectives on the "ringreduce" backend against gloo, in one job.

Both process groups span the same ranks; for every size the two are timed in
alternation (ours, gloo, gloo, ours, ...), so both see the same machine load,
and each figure is the median of the repetitions. Prints one table per
collective: size, ringreduce us, gloo us, gloo/ringreduce (above 1: we are
faster), and ringreduce's bus bandwidth.

Example::

    mpirun -np 2 python scripts/c10d_bench.py                  # 4 B .. 64 MiB, all three
    mpirun -np 2 python scripts/c10d_bench.py -c all_reduce -e 1M --json c10d.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
import torch.distributed as dist

import ringreduce as rr
import ringreduce.torch  # noqa: F401  (registers the "ringreduce" backend)
from ringreduce.core.mpi import MPI
from ringreduce.torch.gloo import init_gloo

warnings.filterwarnings("ignore", category=FutureWarning)    # torch's renamed collectives
COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "reduce_scatter_tensor")


def size_arg(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    text = text.strip().upper().rstrip("B")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def sizes(lo: int, hi: int, factor: int):
    s = lo
    while s <= hi:
        yield s
        s *= factor


def runner(kind: str, nbytes: int, group, n: int):
    """A zero-argument call doing one collective of `nbytes` per rank (fp32) on `group`."""
    count = max(1, nbytes // 4)
    x = torch.zeros(count * (n if kind == "reduce_scatter_tensor" else 1))   # sums stay finite
    out = torch.empty(count * n if kind == "all_gather_into_tensor" else count)
    if kind == "all_reduce":
        return lambda: dist.all_reduce(x, group=group)
    if kind == "all_gather_into_tensor":
        return lambda: dist.all_gather_into_tensor(out, x, group=group)
    return lambda: dist.reduce_scatter_tensor(out, x, group=group)


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def bus_factor(kind: str, n: int) -> float:
    """nccl-tests' bus bandwidth factors: bytes each rank's link carries per byte of input."""
    return 2 * (n - 1) / n if kind == "all_reduce" else (n - 1) / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-b", "--begin", type=size_arg, default=4, help="smallest size per rank (bytes)")
    p.add_argument("-e", "--end", type=size_arg, default=64 * 2**20, help="largest size per rank")
    p.add_argument("-f", "--factor", type=int, default=4)
    p.add_argument("-c", "--collectives", default=",".join(COLLECTIVES))
    p.add_argument("--budget", type=float, default=0.6,
                   help="seconds per size and backend (repetitions follow from it, 5..200)")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    args = p.parse_args(argv)
    kinds = [k for k in args.collectives.split(",") if k]
    for k in kinds:
        if k not in COLLECTIVES:
            p.error(f"unknown collective {k!r}; choose from {', '.join(COLLECTIVES)}")

    rr.init()
    comm = MPI.COMM_WORLD
    n, rank = comm.Get_size(), comm.Get_rank()
    init_gloo(comm, backend="ringreduce")        # the default group is ours, on a shared store
    groups = {"ringreduce": None, "gloo": dist.new_group(backend="gloo")}
    rows = []
    for kind in kinds:
        if rank == 0:
            print(f"\n# {kind}, np={n}, fp32, median of alternating repetitions")
            print(f"# {'bytes':>10} {'ringreduce us':>14} {'gloo us':>12} {'gloo/ours':>10} "
                  f"{'busbw GB/s':>11}", flush=True)
        for nbytes in sizes(args.begin, args.end, args.factor):
            calls = {b: runner(kind, nbytes, g, n) for b, g in groups.items()}
            for fn in calls.values():       # warm-up: buffers, layouts, first-call costs
                timed(fn, 2)
            probe = max(statistics.median(timed(fn, 3)) for fn in calls.values())
            reps = comm.allreduce(int(min(200, max(5, args.budget / max(probe, 1e-6)))), op=MPI.MIN)
            got = {b: [] for b in calls}
            for i in range(reps):
                order = ("ringreduce", "gloo") if i % 2 == 0 else ("gloo", "ringreduce")
                for b in order:
                    got[b] += timed(calls[b], 1)
            # the slowest rank's median is the collective's time
            med = {b: comm.allreduce(statistics.median(v), op=MPI.MAX) for b, v in got.items()}
            busbw = bus_factor(kind, n) * nbytes / med["ringreduce"] / 1e9
            row = dict(collective=kind, bytes=nbytes, ranks=n, reps=reps,
                       ringreduce_us=med["ringreduce"] * 1e6, gloo_us=med["gloo"] * 1e6,
                       gloo_over_ours=med["gloo"] / med["ringreduce"], busbw_gbs=busbw)
            rows.append(row)
            if rank == 0:
                print(f"  {nbytes:>10} {row['ringreduce_us']:>14.1f} {row['gloo_us']:>12.1f} "
                      f"{row['gloo_over_ours']:>10.2f} {busbw:>11.2f}", flush=True)
    if args.json and rank == 0:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
