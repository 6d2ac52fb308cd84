"""Reliability scenarios run under mpirun by tests/test_reliability.py: python reliability.py NAME.

Each prints "RESULT rank R ..." lines the test checks. Every scenario initialises
ringreduce itself (some change the environment per rank first).
"""
import os
import sys
import time

import numpy as np
from mpi4py import MPI

R, N = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def _rr():
    import ringreduce as rr
    rr.init()
    rr.allreduce(np.ones(4, np.float32), op=rr.Sum, name="warm")
    MPI.COMM_WORLD.Barrier()
    return rr


def deadlock():
    """Rank 0 waits on an async call, the others call blocking: each waits for a call never made."""
    rr = _rr()
    x = np.ones(1000, np.float32)
    t = time.monotonic()
    try:
        if R == 0:
            rr.allreduce_async(x, op=rr.Sum, name="grad").wait()
        else:
            rr.allreduce(x, op=rr.Sum, name="grad")
        print(f"RESULT rank {R} finished (wrong)", flush=True)
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} raised after {time.monotonic() - t:.1f} s: {exc}", flush=True)
        time.sleep(2)    # exiting after a failure aborts the job: let every rank report first


def unpicklable_broadcast():
    """The root cannot pickle its object and catches the error: the others must raise too."""
    rr = _rr()
    for attempt in range(2):
        try:
            rr.broadcast_object(lambda: 1 if R == 0 else None, root_rank=0)
            print(f"RESULT rank {R} returned (wrong)", flush=True)
        except rr.RingReduceError as exc:
            print(f"RESULT rank {R} raised: {exc}", flush=True)
    y = rr.allreduce(np.ones(3, np.float32), op=rr.Sum, name="after")
    print(f"RESULT rank {R} in step {y[0]:.0f}", flush=True)


def unpicklable_allgather():
    """One rank cannot pickle its object: every rank raises naming it, then they go on in step."""
    rr = _rr()
    bad = N - 1
    try:
        rr.allgather_object((lambda: 0) if R == bad else R)
        print(f"RESULT rank {R} returned (wrong)", flush=True)
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} raised: {exc}", flush=True)
    got = rr.allgather_object(R * 10)
    print(f"RESULT rank {R} in step {got}", flush=True)


def bad_root_object():
    """One rank passes an out-of-range root to broadcast_object: all raise, then stay in step."""
    rr = _rr()
    try:
        rr.broadcast_object("cfg", root_rank=N + 3 if R == 1 else 0)
        print(f"RESULT rank {R} returned (wrong)", flush=True)
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} raised: {exc}", flush=True)
    got = rr.broadcast_object(f"from {R}", root_rank=0)
    print(f"RESULT rank {R} in step {got}", flush=True)


def check_differs():
    """RINGREDUCE_CHECK set on one rank only: init raises on every rank."""
    if R == 1:
        os.environ["RINGREDUCE_CHECK"] = "0"
    import ringreduce as rr
    try:
        rr.init()
        print(f"RESULT rank {R} initialised (wrong)", flush=True)
    except rr.RingReduceError as exc:
        print(f"RESULT rank {R} raised: {exc}", flush=True)


def unsupervised_stalls():
    """Native allreduce, broadcast_ and the object collectives stall: each warns, then finishes."""
    rr = _rr()
    calls = {
        "mpi": lambda: rr.allreduce(np.ones(20000, np.float32), op=rr.Sum, algorithm="mpi", name="late"),
        "broadcast_": lambda: rr.broadcast_(np.ones(100, np.float32), root_rank=N - 1),
        "broadcast_object": lambda: rr.broadcast_object({"k": 1}, root_rank=N - 1),
        "allgather_object": lambda: rr.allgather_object(R),
    }
    for label, call in calls.items():
        if R == N - 1:
            time.sleep(3.5)
        call()
        print(f"RESULT rank {R} done {label}", flush=True)
        MPI.COMM_WORLD.Barrier()


def control_comm_freed():
    """Each init duplicates a control communicator; shutdown and re-init must free the old one."""
    import ringreduce as rr
    from ringreduce.runtime.context import RUNTIME
    rr.init()
    old = RUNTIME.notices.ctl
    rr.shutdown()
    rr.init()
    print(f"RESULT rank {R} old freed {old == MPI.COMM_NULL} new live {RUNTIME.notices.ctl != MPI.COMM_NULL}",
          flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]]()
