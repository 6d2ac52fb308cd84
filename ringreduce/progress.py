"""Waiting on MPI requests. Every blocking wait in the engine goes through here.

One place for stall warnings, timeouts and fault detection: the algorithms never
call MPI's Wait functions directly.

A wait first spins on MPI's Testall (as MPI's own Waitall would, so small
messages keep their latency), then, after SPIN_SECONDS, polls with a growing
sleep (at most 1 ms), which frees the core and lets the wait watch the clock:

- after RINGREDUCE_STALL_WARNING seconds (default 60) it logs a warning; for
  the mismatch check's exchange it first asks the other ranks where they are
  (ringreduce.stall) and names the ranks that have not entered the call;
- on every tick it takes in exit notices (ringreduce.exits): if a peer has
  left (sys.exit, end of script) before a call this rank has entered, it
  raises RingReduceError naming that rank at once, instead of waiting for
  the timeout;
- after RINGREDUCE_TIMEOUT seconds (default 600) it raises RingReduceError.
  In both cases the peers are in an unknown state, so the process is marked failed:
  every later wait raises at once, and shutdown aborts the job instead of
  letting MPI_Finalize hang (ringreduce.faults).

Example::

    from ringreduce import progress
    req = comm.Iallgather(send, recv)
    progress.wait([req], "allgather of the fingerprints")
"""
from __future__ import annotations

import os
import threading
import time

from mpi4py import MPI

from . import timeline
from .errors import RingReduceError
from .log import logger

__all__ = ["wait", "configure", "failure", "SPIN_SECONDS"]

# Spin this long before sleeping: a healthy collective's ranks arrive within
# microseconds to a few milliseconds of each other, so nearly every wait ends
# in the spin phase and pays no sleep latency.
SPIN_SECONDS = 0.002
_MAX_SLEEP = 0.001

_stall_warning = 60.0
_timeout = 600.0
_failure: str | None = None
# What each thread is waiting for now (slow waits only), for the stall inspector's replies.
activity: dict[int, str] = {}


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        logger.warning("%s=%r is not a number of seconds; using %s", var, raw, default)
        return default
    return value if value > 0 else float("inf")    # 0 or negative turns it off


def configure() -> None:
    """Read RINGREDUCE_STALL_WARNING and RINGREDUCE_TIMEOUT (called by rr.init())."""
    global _stall_warning, _timeout
    _stall_warning = _seconds("RINGREDUCE_STALL_WARNING", 60.0)
    _timeout = _seconds("RINGREDUCE_TIMEOUT", 600.0)


def failure() -> str | None:
    """The reason this process's collectives can no longer be trusted (after a timeout), or None."""
    return _failure


def _rank() -> int:
    return MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() and not MPI.Is_finalized() else 0


def _text(what) -> str:
    return what() if callable(what) else (what or "a collective")


def wait(reqs: list, what="", inspector=None) -> None:
    """Wait until all requests complete.

    Parameters
    ----------
    reqs : list of MPI.Request
    what : str or callable returning str
        The call, for diagnostics (a callable is only evaluated on the slow path).
    inspector : ringreduce.stall.Inspector, optional
        Asks the other ranks where they are when the wait stalls.
    """
    if not reqs:
        return
    if _failure is not None:
        raise RingReduceError(f"rank {_rank()}: {_text(what)} cannot start: {_failure}")
    if MPI.Request.Testall(reqs):
        return
    start = time.perf_counter()
    t0 = timeline.now() if timeline.on else 0
    spin_end = start + SPIN_SECONDS
    while time.perf_counter() < spin_end:
        if MPI.Request.Testall(reqs):
            if timeline.on:
                timeline.complete("wait", t0, {"what": _text(what)})
            return
    _wait_slowly(reqs, what, inspector, start)
    if timeline.on:
        timeline.complete("wait", t0, {"what": _text(what)})


def _wait_slowly(reqs, what, inspector, start: float) -> None:
    from . import exits, stall
    global _failure
    me = threading.get_ident()
    activity[me] = _text(what)
    warned = False
    asked = False
    nap = 5e-5
    try:
        while not MPI.Request.Testall(reqs):
            stall.serve()
            lost = exits.check(what)
            if lost is not None:
                msg = f"rank {_rank()}: {lost}"
                _failure = f"a peer has left ({msg})"
                raise RingReduceError(msg)
            waited = time.perf_counter() - start
            if inspector is not None:
                if not asked and waited >= 0.75 * min(_stall_warning, _timeout):
                    inspector.ask()
                    asked = True
                inspector.collect()
            if not warned and waited >= _stall_warning:
                warned = True
                detail = inspector.describe() if inspector is not None else ""
                logger.warning("rank %d: %s has waited %.0f s%s", _rank(), _text(what), waited,
                               f": {detail}" if detail else " (set RINGREDUCE_CHECK=1 to name the "
                               "missing ranks)" if inspector is None and _check_off() else "")
            if waited >= _timeout:
                detail = inspector.describe() if inspector is not None else ""
                msg = (f"rank {_rank()}: {_text(what)} timed out after {waited:.0f} s "
                       f"(RINGREDUCE_TIMEOUT={_timeout:g})" + (f": {detail}" if detail else ""))
                _failure = f"an earlier collective timed out ({msg})"
                raise RingReduceError(msg)
            time.sleep(nap)
            nap = min(2 * nap, _MAX_SLEEP)
    finally:
        activity.pop(me, None)


def _check_off() -> bool:
    return os.environ.get("RINGREDUCE_CHECK", "1").strip().lower() in ("0", "false", "off", "no")


configure()
