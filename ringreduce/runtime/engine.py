"""The engine's background thread: asynchronous collectives that overlap the caller's work.

One worker thread per process runs submitted collectives in submission order on
each communicator context's "background" channel (its own duplicated
communicator), so they never interleave with collectives made on the user's
thread. Ranks must submit in the same order, as with any collective.
Without MPI_THREAD_MULTIPLE the work runs on the calling thread instead.

Errors in a collective are delivered to the caller's Handle.wait(). An error in
the thread itself (outside any collective) reaches threading.excepthook, which
ringreduce.liveness.faults turns into an abort of the job naming the rank. Shutdown
drains the queue and stops the thread; if it cannot (a collective still waits
for peers past RINGREDUCE_TIMEOUT) the job is aborted rather than left to hang
in MPI_Finalize.
"""
from __future__ import annotations

import math
import queue
import threading
import time

import numpy as np

from ..core import device as _device
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..core.ops import Average
from ..liveness.faults import abort
from ..transport.wait import SPIN_SECONDS
from . import context as _comm
from .collectives import allreduce_on
from .process_sets import resolve_comm

__all__ = ["Handle", "allreduce_async"]


class Handle:
    """A pending asynchronous collective.

    Example::

        h = rr.allreduce_async(grad, name="layer1.weight")
        ...                                  # compute while it runs
        avg = h.wait()
    """

    def __init__(self, description: str, runtime=None):
        self.description = description
        self._runtime = runtime
        self._event = threading.Event()
        self._result = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the collective has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None):
        """Block until finished and return the result; re-raises an error from the engine thread.

        While it blocks, the wait takes part in liveness like any supervised wait: it
        answers peers' stall and deadlock queries, and raises if every rank is
        deadlocked (e.g. this rank waits for an async call its peers make blocking).
        """
        if not self._event.wait(SPIN_SECONDS):
            self._wait_slowly(timeout)
        if self._error is not None:
            raise self._error
        return self._result

    def _wait_slowly(self, timeout: float | None) -> None:
        rt = self._runtime
        start = time.monotonic()
        with rt.supervisor.blocked(f"the engine thread's {self.description}") as entry:
            while not self._event.wait(0.005):
                waited = time.monotonic() - start
                if timeout is not None and waited >= timeout:
                    raise RingReduceError(f"{self.description} did not finish within {timeout} s")
                worker = rt.worker
                if worker is None or not worker.alive():
                    raise RingReduceError(f"{self.description} will never finish: the engine thread "
                                          "has stopped")
                rt.supervisor.tick(entry)

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # delivered to the waiting caller, never lost
            self._error = exc
        finally:
            self._event.set()


_NOTHING = object()         # no queue item yet
_LINGER = object()          # queue marker: an inline job ran; keep MPI progressing a while
LINGER_SECONDS = 0.2        # how long the idle engine thread keeps poking MPI after a job
LINGER_POLL = 0.001         # between pokes: the GIL is taken for a microsecond per millisecond


class _Worker:
    """The engine thread: runs submitted collectives one at a time, in submission order."""

    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        # Held while a job runs, here or inline (run_blocking): the two never overlap.
        self.running = threading.Lock()
        self._count = threading.Lock()
        self._pending = 0            # submitted and not finished
        self._thread = threading.Thread(target=self._loop, name="ringreduce-engine", daemon=True)
        self._thread.start()

    def submit(self, handle: Handle, fn) -> None:
        with self._count:
            self._pending += 1
        self._queue.put((handle, fn))

    def idle(self) -> bool:
        """Nothing queued or running (meaningful while holding `running`)."""
        return self._pending == 0

    def linger(self) -> None:
        """Ask the idle thread to keep MPI progressing for a while (after an inline job)."""
        self._queue.put(_LINGER)

    def _loop(self) -> None:
        item = _NOTHING
        while True:
            item = self._queue.get() if item is _NOTHING else item
            if item is None:          # stop()
                return
            if item is not _LINGER:
                handle, fn = item
                with self.running:
                    handle._run(fn)
                with self._count:
                    self._pending -= 1
            item = self._progress_while_idle()

    def _progress_while_idle(self):
        """Poke MPI's progress engine every LINGER_POLL s for LINGER_SECONDS, or until work comes.

        A large receive completes before MPI has acknowledged it to the sender (the
        rendezvous acknowledgement waits for this rank's next progress). If the caller
        now blocks outside MPI until that sender moves on (a gloo collective beside
        ours, a file lock, a socket), neither rank would move: these pokes send it.
        Returns the next queue item (None is stop()'s), or _NOTHING when none came.
        """
        end = time.monotonic() + LINGER_SECONDS
        while time.monotonic() < end:
            try:
                return self._queue.get(timeout=LINGER_POLL)
            except queue.Empty:
                MPI.COMM_WORLD.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
        return _NOTHING

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float | None) -> bool:
        """Finish the queued work and end the thread; False if it is still running after `timeout`."""
        self._queue.put(None)
        self._thread.join(timeout)
        return not self._thread.is_alive()


_worker_lock = threading.Lock()


def _get_worker() -> _Worker | None:
    rt = _comm.RUNTIME
    if not _comm.thread_multiple():
        return None
    with _worker_lock:
        if rt.worker is None:
            rt.worker = _Worker()
            if stop_worker not in rt.shutdown_hooks:
                _comm.add_shutdown_hook(stop_worker)
    return rt.worker


def stop_worker() -> None:
    """Stop the engine thread (at shutdown); abort the job if a collective keeps it from stopping."""
    rt = _comm.RUNTIME
    with _worker_lock:
        worker, rt.worker = rt.worker, None
    if worker is None:
        return
    # Its waits time out on their own after RINGREDUCE_TIMEOUT; allow that and a margin.
    timeout = rt.supervisor.timeout
    limit = timeout + 10 if math.isfinite(timeout) else None
    if not worker.stop(limit):
        abort(f"the engine thread did not stop within {limit:.0f} s: a collective is still "
              "waiting for other ranks")


def submit(description: str, fn) -> Handle:
    """Run fn() on the engine thread (or right here without thread support); return its Handle."""
    handle = Handle(description, _comm.RUNTIME)
    worker = _get_worker()
    if worker is None:
        handle._run(fn)
    else:
        worker.submit(handle, fn)
    return handle


def allreduce_async(x, op=Average, algorithm: str = "auto", compression=None,
                    name: str | None = None, out: np.ndarray | None = None, comm=None,
                    prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                    process_set=None) -> Handle:
    """Start an allreduce on the engine's background thread; returns a Handle.

    Same arguments and result as rr.allreduce. Do not modify `x` (or `out`) until
    the handle is done.

    Example::

        h = rr.allreduce_async(np.ones(4, np.float32), op=rr.Sum, name="ones")
        assert h.wait()[0] == rr.size()
    """
    label = f"allreduce of tensor '{name}'" if name else "allreduce"
    return run_async(resolve_comm(comm, process_set), label,
                     lambda chan: allreduce_on(chan, x, op, algorithm, compression, name, out, False,
                                               prescale_factor, postscale_factor), x)


def run_blocking(comm, label: str, fn, *arrays) -> Handle:
    """Run fn(background channel) for a caller that waits at once: here, when the engine is idle.

    A blocking call behind no queued work runs on the calling thread, on the engine's
    channel, so it keeps its place in the channel's order and skips two thread
    switches (tens of microseconds); behind queued work it queues too.
    """
    worker = _get_worker()
    if worker is None:
        return run_async(comm, label, fn, *arrays)
    chan = _comm.context(comm).background
    with worker.running:
        if worker.idle():
            handle = Handle(f"{chan.who}: {label}", _comm.RUNTIME)
            handle._run(lambda: fn(chan))
            worker.linger()
            return handle
    return run_async(comm, label, fn, *arrays)


def run_async(comm, label: str, fn, *arrays) -> Handle:
    """Run fn(background channel) on the engine thread: every collective's async form."""
    chan = _comm.context(comm).background
    for a in arrays:
        _device.synchronize(a)   # the caller's stream wrote it; the engine thread has its own stream
    return submit(f"{chan.who}: {label}", lambda: fn(chan))
