"""Native MPI's two ways in: blocking MPI_Allreduce against MPI_Iallreduce plus our supervised wait.

    mpirun -np 2 python scripts/native_modes.py                # 64 KiB .. 2 MiB
    mpirun -np 2 python scripts/native_modes.py 262144         # sizes in bytes

With the check on, a native-routed call is agreed first and then makes MPI's blocking
call; with the check off it makes MPI_Iallreduce and waits under supervision (a
blocking call without agreement could hang). So "check off / check on" compares two
MPI calls as well as the check. Per size, in turn, 9 rounds: the blocking call alone,
the nonblocking one with the engine's wait, and ``rr.allreduce(algorithm="mpi")``
with the check on and off. Printed on rank 0: medians of the slowest rank's mean per
call, off / on, and nonblocking / blocking.
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

import ringreduce as rr   # before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings
from mpi4py import MPI  # noqa: E402
from ringreduce.algorithms import native  # noqa: E402
from ringreduce.cli.bench import _time  # noqa: E402
from ringreduce.core.ops import ReduceOp  # noqa: E402
from ringreduce.runtime.context import context  # noqa: E402


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21]
    rr.init()
    comm = MPI.COMM_WORLD
    chan = context().main

    def checked(flag, x, y):
        os.environ["RINGREDUCE_CHECK"] = flag
        return lambda: rr.allreduce(x, op=rr.Sum, out=y, algorithm="mpi")

    rows = []
    for nbytes in sizes:
        x = np.ones(nbytes // 4, np.float32)
        y = np.empty_like(x)
        iters = max(5, min(300, (30 << 20) // nbytes))
        loops = {"blocking": lambda: comm.Allreduce(x, y),
                 "nonblocking": lambda: native.allreduce(chan, y, ReduceOp.SUM, src=x, agreed=False)}
        samples = {k: [] for k in ("blocking", "nonblocking", "on", "off")}
        for _ in range(9):
            for k, fn in loops.items():
                samples[k].append(_time(comm, fn, iters))
            for k, flag in (("on", "1"), ("off", "0")):
                samples[k].append(_time(comm, checked(flag, x, y), iters))
        os.environ["RINGREDUCE_CHECK"] = "1"
        rows.append((nbytes, {k: statistics.median(v) * 1e6 for k, v in samples.items()}))
    if comm.Get_rank() == 0:
        print(f"# native_modes  np={comm.Get_size()}  {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"{'bytes':>9} {'blocking':>9} {'Iallreduce':>10} {'rr on':>8} {'rr off':>8} {'off/on':>7} "
              f"{'Iall/block':>10}")
        for nbytes, m in rows:
            print(f"{nbytes:>9} {m['blocking']:8.1f}u {m['nonblocking']:9.1f}u {m['on']:7.1f}u {m['off']:7.1f}u "
                  f"{m['off'] / m['on']:7.3f} {m['nonblocking'] / m['blocking']:10.3f}")


if __name__ == "__main__":
    main()
