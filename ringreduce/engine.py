"""The engine's background thread: asynchronous collectives that overlap the caller's work.

One worker thread per process runs submitted collectives in submission order on
each communicator context's "background" channel (its own duplicated
communicator), so they never interleave with collectives made on the user's
thread. Ranks must submit in the same order, as with any collective.
Without MPI_THREAD_MULTIPLE the work runs on the calling thread instead.
"""
from __future__ import annotations

import queue
import threading

import numpy as np

from . import comm as _comm
from .collectives import allreduce_on
from .errors import RingReduceError
from .ops import Average

__all__ = ["Handle", "allreduce_async"]


class Handle:
    """A pending asynchronous collective.

    Example::

        h = rr.allreduce_async(grad, name="layer1.weight")
        ...                                  # compute while it runs
        avg = h.wait()
    """

    def __init__(self, description: str):
        self.description = description
        self._event = threading.Event()
        self._result = None
        self._error: BaseException | None = None

    def done(self) -> bool:
        """True once the collective has finished (successfully or not)."""
        return self._event.is_set()

    def wait(self, timeout: float | None = None):
        """Block until finished and return the result; re-raises an error from the engine thread."""
        if not self._event.wait(timeout):
            raise RingReduceError(f"{self.description} did not finish within {timeout} s")
        if self._error is not None:
            raise self._error
        return self._result

    def _run(self, fn) -> None:
        try:
            self._result = fn()
        except BaseException as exc:  # delivered to the waiting caller, never lost
            self._error = exc
        finally:
            self._event.set()


class _Worker:
    def __init__(self):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name="ringreduce-engine", daemon=True)
        self._thread.start()

    def submit(self, handle: Handle, fn) -> None:
        self._queue.put((handle, fn))

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            handle, fn = item
            handle._run(fn)

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)


_worker: _Worker | None = None
_worker_lock = threading.Lock()


def _get_worker() -> _Worker | None:
    global _worker
    if not _comm.thread_multiple():
        return None
    with _worker_lock:
        if _worker is None:
            _worker = _Worker()
            _comm.add_shutdown_hook(_stop_worker)
    return _worker


def _stop_worker() -> None:
    global _worker
    with _worker_lock:
        if _worker is not None:
            _worker.stop()
            _worker = None


def submit(description: str, fn) -> Handle:
    """Run fn() on the engine thread (or right here without thread support); return its Handle."""
    handle = Handle(description)
    worker = _get_worker()
    if worker is None:
        handle._run(fn)
    else:
        worker.submit(handle, fn)
    return handle


def allreduce_async(x, op=Average, algorithm: str = "auto", compression=None,
                    name: str | None = None, out: np.ndarray | None = None, comm=None) -> Handle:
    """Start an allreduce on the engine's background thread; returns a Handle.

    Same arguments and result as rr.allreduce. Do not modify `x` (or `out`) until
    the handle is done.

    Example::

        h = rr.allreduce_async(np.ones(4, np.float32), op=rr.Sum, name="ones")
        assert h.wait()[0] == rr.size()
    """
    chan = _comm.context(comm).background
    label = f"allreduce of tensor '{name}'" if name else "allreduce"
    return submit(f"rank {chan.rank}: {label}",
                  lambda: allreduce_on(chan, x, op, algorithm, compression, name, out))
