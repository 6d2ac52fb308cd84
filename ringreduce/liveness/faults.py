"""Faults end the whole job, fast and with the rank named, instead of leaving peers waiting.

rr.init() installs (through a FaultHooks object the runtime owns):

- sys.excepthook: an uncaught exception on the main thread of one rank prints
  its traceback as usual, then aborts the job (MPI_Abort on COMM_WORLD) with a
  message naming the rank. Without this, the other ranks would wait for the
  dead rank's next collective until RINGREDUCE_TIMEOUT.
- threading.excepthook: the same for ringreduce's own threads (the engine's
  communication thread). Exceptions in the user's other threads keep Python's
  behaviour (printed, the thread ends, the job goes on).
- a shutdown step: if a collective timed out (the supervisor's failure), shutdown
  aborts instead of finalising, because MPI_Finalize would wait for peers that
  never answer; otherwise it stops the engine thread (aborting if it cannot be
  stopped), at interpreter exit sends the exit notice (below) and writes the
  timeline.
- exit notices (ringreduce.liveness.exits): a rank that ends normally (sys.exit(n), the
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

import os
import sys
import threading
import time
import traceback

from ..core import timeline
from ..core.log import logger
from ..core.mpi import MPI

__all__ = ["FaultHooks", "abort"]


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


class FaultHooks:
    """The process's fault hooks: excepthooks, the exit step and the shutdown step.

    Parameters
    ----------
    supervisor : transport.wait.Supervisor (its failure decides abort vs finalise)
    notices : liveness.exits.ExitNotices
    """

    def __init__(self, supervisor, notices):
        self.supervisor = supervisor
        self.notices = notices
        self.installed = False
        self.leaving = False         # the interpreter is exiting (set by at_exit)
        self._prev_excepthook = None
        self._prev_threadhook = None

    def install(self) -> None:
        """Install the excepthooks (idempotent)."""
        if self.installed:
            return
        self.installed = True
        self._prev_excepthook = sys.excepthook
        self._prev_threadhook = threading.excepthook
        sys.excepthook = self._excepthook
        threading.excepthook = self._threadhook

    def at_exit(self, initialised: bool) -> None:
        """The interpreter is exiting: shutdown will send the exit notice (or send it now if
        rr.shutdown() already ran)."""
        self.leaving = True
        if not initialised and self.supervisor.failure is None:
            try:
                self.notices.notify()
            except Exception:
                logger.exception("could not send the exit notice")

    def before_shutdown(self, stop_engine, timeline_comm) -> None:
        """Abort after a failure; else stop the engine, send the exit notice, write the timeline."""
        reason = self.supervisor.failure
        if reason is not None and not MPI.Is_finalized():
            abort(f"shutting down after a failure ({reason}); MPI_Finalize would wait for ranks "
                  "that do not answer")
        stop_engine()
        if self.leaving:
            # Before the timeline's gather: a peer still waiting in a later call must hear of it.
            try:
                self.notices.notify()
            except Exception:
                logger.exception("could not send the exit notice")
        if timeline.on and timeline_comm is not None and not MPI.Is_finalized():
            path = timeline.flush(timeline_comm)
            if path:
                logger.info("timeline written to %s", path)

    def _excepthook(self, exc_type, exc, tb) -> None:
        (self._prev_excepthook or sys.__excepthook__)(exc_type, exc, tb)
        if MPI.Is_initialized() and not MPI.Is_finalized():
            if sys.stderr is not sys.__stderr__ and sys.__stderr__ is not None:
                # An outer hook (torch.distributed's) captures stderr to prefix it after we
                # return; the abort would lose the traceback, so print it where it is seen.
                traceback.print_exception(exc_type, exc, tb, file=sys.__stderr__)
            abort(f"uncaught {exc_type.__name__}: {exc}")

    def _threadhook(self, args) -> None:
        (self._prev_threadhook or threading.__excepthook__)(args)
        name = args.thread.name if args.thread is not None else "?"
        if name.startswith("ringreduce") and args.exc_type is not SystemExit \
                and MPI.Is_initialized() and not MPI.Is_finalized():
            abort(f"uncaught {args.exc_type.__name__} in thread {name}: {args.exc_value}")
