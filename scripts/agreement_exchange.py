"""What one exchange of the check's fingerprint rows costs: MPI_Iallgather vs the shared-memory handshake.

    mpirun -np 2 python scripts/agreement_exchange.py [--calls 20000]

Both move the same fixed-width rows (agree.Rows: 2120 bytes per rank up to 8
ranks) between the ranks of one node, the way a ringreduce call agrees before
its data: ``Iallgather`` polled with ``Test`` to completion, and
``transport.window.RowWindow`` (write the row, bump a flag, wait for the
peers' flags). Printed: microseconds per exchange on rank 0, each measured
twice, interleaved.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import ringreduce  # noqa: F401  # isort: skip  (before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings)
from mpi4py import MPI  # isort: skip
from ringreduce.runtime.agree import Rows
from ringreduce.transport.window import RowWindow


def per_call(comm, fn, calls: int) -> float:
    for _ in range(calls // 10):
        fn()
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    args = ap.parse_args()
    comm = MPI.COMM_WORLD.Dup()
    width = Rows(comm.Get_size()).width
    send = np.zeros(width, np.uint8)
    recv = np.zeros(comm.Get_size() * width, np.uint8)

    def allgather():
        req = comm.Iallgather(send, recv)
        while not req.Test():
            pass

    rows = RowWindow(comm, width)

    def spin(done):
        while not done():
            pass

    def handshake():
        row, _ = rows.flip()
        row[:72] = send[:72]
        rows.sync(spin)

    for label, fn in [("MPI_Iallgather", allgather), ("shared rows", handshake)] * 2:
        t = per_call(comm, fn, args.calls)
        if comm.Get_rank() == 0:
            print(f"{label:16s} {t:6.2f} us per exchange ({width}-byte rows, {comm.Get_size()} ranks)")
    rows.close()
    comm.Free()


if __name__ == "__main__":
    main()
