"""What a synchronising step in front of each native MPI_Allreduce costs, with no ringreduce code.

    mpirun -np 2 python scripts/native_sync_cost.py            # 16 KiB .. 1 MiB
    mpirun -np 2 python scripts/native_sync_cost.py 262144     # sizes in bytes

Three loops per size, medians per call (rank 0's), each loop twice:

- raw:  MPI_Allreduce back to back;
- sync: an 8-byte MPI_Allreduce, then the call (what an agreement round costs MPI);
- spin: 5 us of busy Python, then the call (a fixed per-call cost without a sync).

Back to back, the rank that leaves a call first starts the next one early; a
step that waits for every rank takes that away. docs/benchmarks.md quotes it.
"""
from __future__ import annotations

import sys
import time

import numpy as np
from mpi4py import MPI

comm = MPI.COMM_WORLD
_one, _one_out = np.zeros(1, np.int64), np.zeros(1, np.int64)


def loop(nbytes: int, mode: str, calls: int = 2000, warmup: int = 200) -> tuple[float, float]:
    """(median us per iteration, median us of the timed MPI_Allreduce alone)."""
    x = np.ones(nbytes // 4, np.float32)
    out = np.empty_like(x)
    whole, inner = [], []
    for i in range(calls + warmup):
        t0 = time.perf_counter()
        if mode == "sync":
            comm.Allreduce(_one, _one_out, MPI.SUM)
        elif mode == "spin":
            while time.perf_counter() - t0 < 5e-6:
                pass
        t1 = time.perf_counter()
        comm.Allreduce(x, out, MPI.SUM)
        t2 = time.perf_counter()
        if i >= warmup:
            whole.append(t2 - t0)
            inner.append(t2 - t1)
    return float(np.median(whole)) * 1e6, float(np.median(inner)) * 1e6


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1 << 14, 1 << 16, 1 << 18, 1 << 20]
    for nbytes in sizes:
        for _ in range(2):
            got = {mode: loop(nbytes, mode) for mode in ("raw", "sync", "spin")}
            if comm.Get_rank() == 0:
                cells = "  ".join(f"{m} {w:7.1f} us (its allreduce {a:7.1f})" for m, (w, a) in got.items())
                print(f"{nbytes:>9} B  {cells}  sync - raw {got['sync'][0] - got['raw'][0]:+.1f} us",
                      flush=True)


if __name__ == "__main__":
    main()
