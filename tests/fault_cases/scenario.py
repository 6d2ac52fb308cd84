"""Fault scenarios run under mpirun by tests/test_faults.py: python scenario.py NAME.

Each prints "RESULT ..." lines the test checks; the fault ones must end the job.
"""
import os
import signal
import sys
import time

import numpy as np

import ringreduce as rr

from mpi4py import MPI

rr.init()
R, N = rr.rank(), rr.size()
LAST = N - 1
MPI.COMM_WORLD.Barrier()   # start the clock together: a loaded machine starts ranks seconds apart


def warm():
    y = rr.allreduce(np.ones(4, np.float32), op=rr.Sum, name="warm")
    assert y[0] == N


def stall_warning():
    """The last rank enters late: the others warn naming it, then all finish normally."""
    warm()
    if R == LAST:
        time.sleep(float(os.environ.get("LATE", "4")))
    y = rr.allreduce(np.ones(10, np.float32), op=rr.Sum, name="late.grad")
    print(f"RESULT rank {R} ok {y[0]:.0f}", flush=True)


def timeout():
    """The last rank never enters: the others time out, the job ends."""
    warm()
    if R == LAST:
        time.sleep(120)
        return
    rr.allreduce(np.ones(10, np.float32), op=rr.Sum, name="never.grad")
    print(f"RESULT rank {R} unexpectedly finished", flush=True)


def timeout_caught():
    """The timeout is caught: later collectives refuse, and exit aborts instead of hanging."""
    warm()
    if R == LAST:
        time.sleep(120)
        return
    try:
        rr.allreduce(np.ones(10, np.float32), op=rr.Sum, name="never.grad")
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} caught: {exc}", flush=True)
    try:
        rr.allreduce(np.ones(10, np.float32), op=rr.Sum, name="after")
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} refused: {exc}", flush=True)


def exception():
    """One rank raises in user code while the others are inside an allreduce."""
    warm()
    if R == LAST:
        raise ValueError("boom in user code")
    rr.allreduce(np.ones(1 << 20, np.float32), name="big")


def engine_exception():
    """The engine thread itself fails on one rank."""
    warm()
    if R == LAST:
        def broken(self, fn):
            raise RuntimeError("engine thread broke")
        rr.Handle._run = broken
    h = rr.allreduce_async(np.ones(1000, np.float32), name="async.grad")
    h.wait()
    rr.allreduce(np.ones(10, np.float32), name="after")


def engine_error_waited():
    """An error raised inside an async collective on one rank, surfacing in h.wait()."""
    warm()
    if R == LAST:
        h = rr.engine.submit("rank {R}: async step", lambda: 1 / 0)
    else:
        h = rr.allreduce_async(np.ones(1000, np.float32), name="async.grad")
    h.wait()


def sigkill():
    """One rank is killed mid-allreduce."""
    warm()
    x = np.ones(1 << 22, np.float32)
    for i in range(1000):
        if R == LAST and i == 3:
            os.kill(os.getpid(), signal.SIGKILL)
        rr.allreduce(x, name="big", algorithm="ring")


def timeline():
    """A few calls of each kind, for the timeline file."""
    warm()
    for algo in ("ring", "tree", "auto"):
        rr.allreduce(np.ones(5000, np.float32), name=f"t.{algo}", algorithm=algo)
    if R == 0:
        time.sleep(0.05)          # the others wait: a "wait" event
    rr.allreduce(np.ones(10, np.float32), name="t.late")
    rr.allreduce_async(np.ones(300, np.float32), name="t.async").wait()
    rr.broadcast_(np.ones(8), name="t.bcast")
    print(f"RESULT rank {R} done", flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]]()
