"""The supervised wait: every MPI wait in the engine goes through a Supervisor.

One place for stall warnings, timeouts and liveness checks: the algorithms
never call MPI's Wait functions directly (they call ``chan.wait(reqs, what)``).

A wait first spins on MPI's Testall (as MPI's own Waitall would, so small
messages keep their latency), then, after SPIN_SECONDS, polls with a growing
sleep (at most 1 ms), which frees the core and lets the wait watch the clock.
On every tick of that slow phase it:

- runs the registered *servers* (answer other ranks' stall and deadlock
  queries: ringreduce.liveness registers them, this module never imports it);
- runs the registered *watchers*, each of which may return an error message
  (a peer has left, every rank is deadlocked): the wait then raises
  RingReduceError with it;
- after ``stall_warning`` seconds (RINGREDUCE_STALL_WARNING, default 60) logs a
  warning, naming the missing ranks when the wait has a stall inspector;
- after ``timeout`` seconds (RINGREDUCE_TIMEOUT, default 600) raises.

After a timeout or a liveness error the peers are in an unknown state, so the
supervisor is marked failed: every later wait raises at once, and shutdown
aborts the job instead of letting MPI_Finalize hang (ringreduce.liveness.faults).

Example::

    sup = Supervisor(rank=0)
    sup.wait([comm.Iallgather(send, recv)], "allgather of the fingerprints")
"""
from __future__ import annotations

import contextlib
import threading
import time

from ..core import timeline
from ..core.errors import RingReduceError
from ..core.log import logger
from ..core.mpi import MPI

__all__ = ["Supervisor", "Waiting", "SPIN_SECONDS"]

# Spin this long before sleeping: a healthy collective's ranks arrive within
# microseconds to a few milliseconds of each other, so nearly every wait ends
# in the spin phase and pays no sleep latency.
SPIN_SECONDS = 0.002
_MAX_SLEEP = 0.001


def _text(what) -> str:
    return what() if callable(what) else (what or "a collective")


class Waiting:
    """What one thread is blocked in: for stall replies and deadlock detection.

    ``chan`` is the channel of the call (its root: a sub-channel's wait counts as its
    parent's call) and ``seq`` that call's number; both None for a wait that is not
    on a channel (Handle.wait on the engine thread's result).
    """

    __slots__ = ("what", "chan", "seq", "since", "serial")

    def __init__(self, what: str, chan, seq, serial: int):
        self.what = what
        self.chan = chan
        self.seq = seq
        self.since = time.monotonic()
        self.serial = serial


class Supervisor:
    """The process's supervised wait, its settings and its liveness callbacks.

    Parameters
    ----------
    stall_warning, timeout : seconds (infinity turns either off)
    rank : this process's rank for messages (world rank)
    """

    def __init__(self, stall_warning: float = 60.0, timeout: float = 600.0, rank: int = 0,
                 check_hint=None):
        self.stall_warning = stall_warning
        self.timeout = timeout
        self.rank = rank
        self.failure: str | None = None
        self.servers: list = []      # fn() -> None, on every slow tick
        self.watchers: list = []     # fn(waiting: Waiting) -> error message or None
        self.waiting: dict[int, Waiting] = {}   # thread id -> what it is blocked in (slow waits)
        self._serial = 0
        self._lock = threading.Lock()
        # Returns a hint for the stall warning when no inspector can name the missing ranks.
        self.check_hint = check_hint

    def configure(self, stall_warning: float, timeout: float, rank: int) -> None:
        self.stall_warning, self.timeout, self.rank = stall_warning, timeout, rank

    def fail(self, reason: str) -> None:
        """Mark the process failed: later waits raise at once, shutdown aborts."""
        if self.failure is None:
            self.failure = reason

    def wait(self, reqs: list, what="", inspector=None, chan=None) -> None:
        """Wait until all requests complete.

        Parameters
        ----------
        reqs : list of MPI.Request
        what : str or callable returning str
            The call, for diagnostics (a callable is only evaluated on the slow path).
        inspector : ringreduce.liveness.stall.Inspector, optional
            Asks the other ranks where they are when the wait stalls.
        chan : the channel the requests belong to (for deadlock detection)
        """
        if not reqs:
            return
        if self.failure is not None:
            raise RingReduceError(f"rank {self.rank}: {_text(what)} cannot start: {self.failure}")
        if MPI.Request.Testall(reqs):
            return
        self.wait_until(lambda: MPI.Request.Testall(reqs), what, inspector, chan)

    def wait_until(self, done, what="", inspector=None, chan=None) -> None:
        """Wait until done() is true, under the same supervision as wait() (spin, then poll
        with stall warnings, timeout and liveness checks). For conditions that are not MPI
        requests, such as flags in a shared-memory window."""
        if self.failure is not None:
            raise RingReduceError(f"rank {self.rank}: {_text(what)} cannot start: {self.failure}")
        start = time.perf_counter()
        t0 = timeline.now() if timeline.on else 0
        spin_end = start + SPIN_SECONDS
        while time.perf_counter() < spin_end:
            if done():
                if timeline.on:
                    timeline.complete("wait", t0, {"what": _text(what)})
                return
        root = chan.root if chan is not None else None
        with self.blocked(_text(what), root):
            self._wait_slowly(done, what, inspector, start)
        if timeline.on:
            timeline.complete("wait", t0, {"what": _text(what)})

    @contextlib.contextmanager
    def blocked(self, what: str, chan=None):
        """Record that this thread is blocked in `what` (on `chan`'s current call) meanwhile."""
        me = threading.get_ident()
        with self._lock:
            self._serial += 1
            entry = Waiting(what, chan, chan.seq if chan is not None else None, self._serial)
            prev = self.waiting.get(me)
            self.waiting[me] = entry
        try:
            yield entry
        finally:
            with self._lock:
                if prev is None:
                    self.waiting.pop(me, None)
                else:
                    self.waiting[me] = prev

    def tick(self, entry: Waiting) -> None:
        """One slow-phase step: serve peers' queries, run the watchers (may raise)."""
        for serve in self.servers:
            serve()
        for watch in self.watchers:
            msg = watch(entry)
            if msg is not None:
                text = f"rank {self.rank}: {msg}"
                self.fail(f"a liveness check failed ({text})")
                raise RingReduceError(text)

    def _wait_slowly(self, done, what, inspector, start: float) -> None:
        entry = self.waiting[threading.get_ident()]
        warned = asked = False
        nap = 5e-5
        while not done():
            self.tick(entry)
            waited = time.perf_counter() - start
            if inspector is not None:
                if not asked and waited >= 0.75 * min(self.stall_warning, self.timeout):
                    inspector.ask()
                    asked = True
                inspector.collect()
            if not warned and waited >= self.stall_warning:
                warned = True
                detail = inspector.describe() if inspector is not None else ""
                hint = self.check_hint() if inspector is None and self.check_hint else ""
                logger.warning("rank %d: %s has waited %.0f s%s", self.rank, _text(what), waited,
                               f": {detail}" if detail else (hint or ""))
            if waited >= self.timeout:
                detail = inspector.describe() if inspector is not None else ""
                msg = (f"rank {self.rank}: {_text(what)} timed out after {waited:.0f} s "
                       f"(RINGREDUCE_TIMEOUT={self.timeout:g})" + (f": {detail}" if detail else ""))
                self.fail(f"an earlier collective timed out ({msg})")
                raise RingReduceError(msg)
            time.sleep(nap)
            nap = min(2 * nap, _MAX_SLEEP)
