"""The engine's own Python per call: auto settled on native MPI, with MPI and the handshake stubbed out.

    mpirun -np 2 python scripts/fast_path_cost.py              # 16 KiB and 256 KiB
    mpirun -np 2 python scripts/fast_path_cost.py 262144       # sizes in bytes

After warm-up calls, the size's band is settled on "mpi", the channel's communicator
is replaced by one whose ``Allreduce`` does nothing and the check's handshake by a
function that reports "agreed": what is left of ``rr.allreduce(x, out=y)`` is
Python. Two settings alternate in blocks of 2000 calls, 15 blocks each: every call
timed for the learner (as before 2026-12-07) and only the calls the drift check
reads (``_Band.timed``). Printed on rank 0: per size and setting, the median and
the fastest block, in us per call.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

import ringreduce as rr   # before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings
from mpi4py import MPI  # noqa: E402
from ringreduce.policy import learn  # noqa: E402
from ringreduce.runtime import collectives  # noqa: E402
from ringreduce.runtime.context import context  # noqa: E402

BLOCKS, CALLS = 15, 2000


class _NoMPI:
    """The channel's communicator with Allreduce doing nothing (everything else passes through)."""

    def __init__(self, comm):
        self._comm = comm

    def Allreduce(self, *args):
        pass

    def __getattr__(self, name):
        return getattr(self._comm, name)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [1 << 14, 1 << 18]
    rr.init()
    chan = context().main
    if chan.learner is None:
        raise SystemExit("auto does not learn here (a tuning file?): run with RINGREDUCE_LEARN=1")
    real_comm, real_exchange, real_timed = chan.comm, collectives._header_exchange, learn._Band.timed
    settings = {"every call timed": lambda band: True, "drift-check calls timed": real_timed}
    results = []
    for nbytes in sizes:
        x = np.ones(nbytes // 4, np.float32)
        y = np.empty_like(x)
        for _ in range(50):
            rr.allreduce(x, op=rr.Sum, out=y)
        band = chan.learner.band_for(x.nbytes, False)
        band.choice, band.source, band.baseline, band.interval = "mpi", "learned", 1.0, learn.LAST_CHECK
        times = {k: [] for k in settings}
        chan.comm, collectives._header_exchange = _NoMPI(real_comm), (lambda *args: 0)
        try:
            for _ in range(BLOCKS):
                for label, timed in settings.items():
                    learn._Band.timed = timed
                    real_comm.Barrier()
                    t = time.perf_counter()
                    for _ in range(CALLS):
                        rr.allreduce(x, op=rr.Sum, out=y)
                    times[label].append((time.perf_counter() - t) / CALLS)
        finally:
            chan.comm, collectives._header_exchange, learn._Band.timed = real_comm, real_exchange, real_timed
        results.append((nbytes, times))
    if real_comm.Get_rank() == 0:
        print(f"# fast_path_cost  np={real_comm.Get_size()}  {time.strftime('%Y-%m-%d %H:%M')}")
        for nbytes, times in results:
            for label, ts in times.items():
                print(f"{nbytes:>9} B  {label:>24}: median {statistics.median(ts) * 1e6:6.2f} us, "
                      f"fastest block {min(ts) * 1e6:6.2f} us")


if __name__ == "__main__":
    main()
