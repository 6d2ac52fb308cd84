"""What a native-routed call pays between two MPI calls: the handshake, our Python, or both.

    mpirun -np 2 python scripts/between_calls.py 16384 262144

For each size (bytes, float32, op Sum), back to back in a loop, interleaved
rounds, medians of the slowest rank's mean per call:

- native: ``MPI_Allreduce`` alone (mpi4py, the engine's own communicator);
- barrier+native: an ``MPI_Barrier`` before each;
- handshake: the check's shared-memory handshake alone (``agree.Rows`` on one node);
- handshake+native: that handshake before each ``MPI_Allreduce``;
- tiny+native: a 4-byte ``rr.allreduce`` (the tiny path: handshake plus its Python)
  before each ``MPI_Allreduce``;
- rr mpi: ``rr.allreduce(x, out=y, algorithm="mpi", op=rr.Sum)`` (check on).

Python run between two MPI calls delays the peer as well as this rank (it waits
in its next call), so it costs the loop more than its own time; the handshake
alone is C++ and short.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import ringreduce as rr   # before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings
from mpi4py import MPI  # noqa: E402
from ringreduce.runtime import agree  # noqa: E402
from ringreduce.runtime.context import context  # noqa: E402


def main() -> None:
    rr.init()
    chan = context(None).main
    comm = chan.comm
    rows = agree.rows_of(chan)
    if rows.window is None:
        raise SystemExit("the ranks do not share a node: the handshake goes by MPI here")

    def handshake():
        rows.begin()
        rows.window.sync(lambda done: chan.supervisor.wait_until(done, "between_calls handshake"))

    sizes = [int(a) for a in sys.argv[1:]] or [16384, 262144]
    small = np.ones(1, np.float32)
    for nbytes in sizes:
        x = np.ones(nbytes // 4, np.float32)
        out = np.empty_like(x)
        iters = max(20, min(500, (20 << 20) // nbytes))
        fns = [("native", lambda: comm.Allreduce(x, out)),
               ("barrier+native", lambda: (comm.Barrier(), comm.Allreduce(x, out))),
               ("handshake", handshake),
               ("handshake+native", lambda: (handshake(), comm.Allreduce(x, out))),
               ("tiny+native", lambda: (rr.allreduce(small, op=rr.Sum), comm.Allreduce(x, out))),
               ("rr mpi", lambda: rr.allreduce(x, out=out, algorithm="mpi", op=rr.Sum))]

        def timed(fn) -> float:
            comm.Barrier()
            t = time.perf_counter()
            for _ in range(iters):
                fn()
            return comm.allreduce((time.perf_counter() - t) / iters * 1e6, op=MPI.MAX)

        for _, fn in fns:
            for _ in range(30):
                fn()
        samples: dict[str, list[float]] = {}
        for _ in range(11):
            for name, fn in fns:
                samples.setdefault(name, []).append(timed(fn))
        if comm.rank == 0:
            print(f"# between_calls  np={comm.size}  {nbytes} B  {time.strftime('%Y-%m-%d %H:%M')}")
            for name, v in samples.items():
                print(f"{name:>18}  median {statistics.median(v):8.1f} us  min {min(v):8.1f} us")


if __name__ == "__main__":
    main()
