"""Fault scenarios run under mpirun by tests/test_faults.py: python scenario.py NAME.

Each prints "RESULT ..." lines the test checks; the fault ones must end the job.
"""
import importlib.util
import os
import signal
import sys
import threading
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
        h = rr.runtime.engine.submit("rank {R}: async step", lambda: 1 / 0)
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
    """A few calls of each kind, for the timeline file (TL_FULL=1: also compressed, shm, torch)."""
    warm()
    for algo in ("ring", "tree", "auto"):
        rr.allreduce(np.ones(5000, np.float32), name=f"t.{algo}", algorithm=algo)
    if R == 0:
        time.sleep(0.05)          # the others wait: a "wait" event
    rr.allreduce(np.ones(10, np.float32), name="t.late")
    rr.allreduce_async(np.ones(300, np.float32), name="t.async").wait()
    rr.broadcast_(np.ones(8), name="t.bcast")
    if os.environ.get("TL_FULL"):
        x = np.arange(5000, dtype=np.float32)
        for comp in (rr.Compression.fp16, rr.Compression.int8):
            y = rr.allreduce(x, op=rr.Sum, compression=comp, name=f"t.{comp.format}")
            assert np.abs(y - N * x).max() <= 0.02 * N * x.max(), comp
        for count in (100, 300000):        # the replicated and the blocked shm paths
            y = rr.allreduce(np.ones(count, np.float32), op=rr.Sum, algorithm="shm",
                             name=f"t.shm.{count}")
            assert (y == N).all()
        if importlib.util.find_spec("torch") is not None:   # the MPICH CI venv has no torch
            _torch_step()
    print(f"RESULT rank {R} done", flush=True)


def _torch_step():
    import torch
    import ringreduce.torch as rrt

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    opt = rrt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    model(torch.full((4, 8), float(R + 1))).sum().backward()
    opt.step()


def sys_exit():
    """Rank 1 calls sys.exit(3) mid-loop while the others go on calling collectives."""
    warm()
    for i in range(10000):
        if R == 1 and i == 5:
            sys.exit(3)
        rr.allreduce(np.ones(1000, np.float32), name="w")
    print(f"RESULT rank {R} unexpectedly finished", flush=True)


def staggered_exit():
    """Every rank makes the same calls, then they leave at different times: exit 0, silent.

    Rank 0 is still waiting inside ringreduce (on a message it sends itself after 3 s)
    when the others leave, so it takes in their exit notices while waiting and must
    not abort. The last rank shuts ringreduce down itself before it exits.
    """
    from ringreduce.runtime.context import RUNTIME

    warm()
    for i in range(10):
        rr.allreduce(np.ones(50000, np.float32), name="w", algorithm="ring")
    sub = MPI.COMM_WORLD.Split(R % 2, R)
    y = rr.allreduce(np.ones(10, np.float32), op=rr.Sum, name="sub", comm=sub)
    assert y[0] == sub.Get_size()
    sub.Free()
    rr.allreduce_async(np.ones(300, np.float32), name="last.async").wait()
    if R == 0:
        me = MPI.COMM_SELF.Dup()
        got = np.zeros(1)
        req = me.Irecv(got, 0, 5)
        threading.Timer(3.0, lambda: me.Send(np.ones(1), 0, 5)).start()
        RUNTIME.supervisor.wait([req], "a wait that outlives the other ranks")
        seen = sorted(RUNTIME.notices.peers_exited())
        print(f"RESULT rank {R} saw exits of {seen}", flush=True)
    else:
        time.sleep(0.3 * R)
        if R == LAST:
            rr.shutdown()
    print(f"RESULT rank {R} done", flush=True)


if __name__ == "__main__":
    globals()[sys.argv[1]]()
