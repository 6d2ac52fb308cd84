"""Faults end the whole job, fast and with the rank named, instead of leaving peers waiting.

rr.init() installs:

- sys.excepthook: an uncaught exception on the main thread of one rank prints
  its traceback as usual, then aborts the job (MPI_Abort on COMM_WORLD) with a
  message naming the rank. Without this, the other ranks would wait for the
  dead rank's next collective until RINGREDUCE_TIMEOUT.
- threading.excepthook: the same for ringreduce's own threads (the engine's
  communication thread). Exceptions in the user's other threads keep Python's
  behaviour (printed, the thread ends, the job goes on).
- a shutdown step: if a collective timed out (progress.failure()), shutdown
  aborts instead of finalising, because MPI_Finalize would wait for peers that
  never answer; otherwise it stops the engine thread (aborting if it cannot be
  stopped), at interpreter exit sends the exit notice (below) and writes the
  timeline.
- exit notices (ringreduce.exits): a rank that ends normally (sys.exit(n), the
  end of the script) while its peers still call collectives tells them so; a
  peer waiting for a call the leaver never made raises RingReduceError naming
  it ("rank 1 exited (sys.exit or end of script) at call 41 while rank 0 waits
  in allreduce of tensor 'w' (call 42) ..."), which, uncaught, aborts the job.

A disagreement that every rank sees (the mismatch check) is an ordinary,
catchable RingReduceError; only when it goes uncaught does it abort the job.

Example::

    import ringreduce as rr
    rr.init()                  # installs the hooks
    raise ValueError("boom")   # on one rank: the job ends, "rank 3: uncaught ValueError: boom"
"""
from __future__ import annotations

import atexit
import os
import sys
import threading
import time

from mpi4py import MPI

from . import exits, progress, timeline
from .log import logger

__all__ = ["install", "abort"]

_installed = False
_prev_excepthook = None
_prev_threadhook = None
_leaving = False             # the interpreter is exiting (set by our atexit hook)


def install(rank: int, comm=None) -> None:
    """Read the fault settings and install the hooks (idempotent; called by rr.init()).

    comm: the init communicator; its control duplicate carries the exit notices
    (collective: every rank of it calls init).
    """
    global _installed, _prev_excepthook, _prev_threadhook
    progress.configure()
    timeline.configure(rank)
    if comm is not None:
        exits.setup(comm)
    if _installed:
        return
    _installed = True
    _prev_excepthook = sys.excepthook
    _prev_threadhook = threading.excepthook
    sys.excepthook = _excepthook
    threading.excepthook = _threadhook
    from . import comm as _comm
    _comm.add_shutdown_hook(_at_shutdown)
    # Registered after comm's atexit shutdown, so it runs first (atexit is last in, first out).
    atexit.register(_at_exit)


def _at_exit() -> None:
    """The interpreter is exiting: shutdown will send the exit notice (or send it now if
    rr.shutdown() already ran)."""
    global _leaving
    _leaving = True
    from . import comm as _comm
    if not _comm.is_initialized() and progress.failure() is None:
        try:
            exits.notify()
        except Exception:
            logger.exception("could not send the exit notice")


def _world_rank() -> int:
    try:
        return MPI.COMM_WORLD.Get_rank()
    except Exception:
        return -1


def abort(message: str, code: int = 1) -> None:
    """Print `message` naming this rank, keep what the timeline has, and abort the whole job."""
    rank = _world_rank()
    text = f"ringreduce: rank {rank}: {message}; aborting the job\n"
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
        sys.stdout.flush()
    except Exception:   # stderr may be closed; abort regardless
        pass
    # Give the launcher's output forwarding a moment: hydra tears it down on abort.
    time.sleep(0.3)
    try:
        timeline.flush(None)
    except Exception:
        logger.exception("could not write the timeline")
    if MPI.Is_initialized() and not MPI.Is_finalized():
        MPI.COMM_WORLD.Abort(code)
        # MPICH's MPI_Abort may return before the launcher kills us: never go on to
        # the exit hooks and MPI_Finalize, which would wait for the peers.
        os._exit(code)
    raise SystemExit(code)


def _excepthook(exc_type, exc, tb) -> None:
    (_prev_excepthook or sys.__excepthook__)(exc_type, exc, tb)
    if MPI.Is_initialized() and not MPI.Is_finalized():
        abort(f"uncaught {exc_type.__name__}: {exc}")


def _threadhook(args) -> None:
    (_prev_threadhook or threading.__excepthook__)(args)
    name = args.thread.name if args.thread is not None else "?"
    if name.startswith("ringreduce") and args.exc_type is not SystemExit \
            and MPI.Is_initialized() and not MPI.Is_finalized():
        abort(f"uncaught {args.exc_type.__name__} in thread {name}: {args.exc_value}")


def _at_shutdown() -> None:
    reason = progress.failure()
    if reason is not None and not MPI.Is_finalized():
        abort(f"shutting down after a failure ({reason}); MPI_Finalize would wait for ranks "
              "that do not answer")
    from . import comm as _comm
    from . import engine
    engine.stop_worker()
    if _leaving:
        # Before the timeline's gather: a peer still waiting in a later call must hear of it.
        try:
            exits.notify()
        except Exception:
            logger.exception("could not send the exit notice")
    if timeline.on and _comm.is_initialized() and not MPI.Is_finalized():
        path = timeline.flush(_comm.context().main.comm)
        if path:
            logger.info("timeline written to %s", path)
