"""Contexts and the runtime: init, shutdown, and the one place that wires the layers together.

ringreduce never communicates on the user's communicator itself. For each
communicator it is given it keeps a CommContext with two duplicates: one for
calls made on the user's thread ("main") and one for the engine's background
thread ("background"), so the two never interleave with each other or with the
user's own MPI traffic. A context also holds what is computed once per
communicator: its node topology, the plan "auto" follows, its compression state
and its exit-notice key.

The process's state lives in one Runtime object (RUNTIME): the contexts, the
settings read at init, the supervised wait and the liveness services plugged
into it. Lower layers never reach for it: what they need travels down on the
channel (chan.supervisor, chan.context, chan.plan, ...).

Example::

    import ringreduce as rr
    rr.init()
    print(rr.rank(), rr.size())
"""
from __future__ import annotations

import atexit
import threading

import numpy as np

from ..compression.state import CompressionState
from ..core import config, timeline
from ..core.errors import RingReduceError
from ..core.log import configure as configure_logging
from ..core.log import logger
from ..core.mpi import MPI
from ..liveness.deadlock import DeadlockDetector
from ..liveness.exits import ExitNotices
from ..liveness.faults import FaultHooks
from ..liveness.stall import StallService
from ..policy import learn
from ..policy.observations import Observations
from ..policy.plan import NAMES as PLAN_NAMES
from ..policy.plan import plan_for
from ..transport.channel import Channel
from ..transport.topology import NodeTopology
from ..transport.wait import Supervisor
from . import agree

__all__ = ["init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "context", "CommContext", "Runtime", "RUNTIME", "wire_stats"]

_THREAD_LEVELS = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                  MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}


def _world_rank() -> int:
    return MPI.COMM_WORLD.Get_rank() if MPI.Is_initialized() and not MPI.Is_finalized() else 0


def _check_hint() -> str:
    return "" if config.check_enabled() else " (set RINGREDUCE_CHECK=1 to name the missing ranks)"


class CommContext:
    """Engine state for one user communicator: its channels, topology, plan, compression state
    and observations (policy.observations: what its calls cost on this rank)."""

    def __init__(self, runtime: "Runtime", user_comm, is_world: bool):
        self.user_comm = user_comm
        self.is_world = is_world
        rank = user_comm.Get_rank()
        who = f"rank {rank}" if is_world else \
            f"rank {rank} of the sub-communicator (world rank {_world_rank()})"
        sup = runtime.supervisor
        self.main = Channel(user_comm.Dup(), "main", sup, context=self, who=who)
        self.background = Channel(user_comm.Dup(), "background", sup, context=self, who=who)
        self.rank = self.main.rank
        self.size = self.main.size
        self.who = who
        # Read per context: a program may set RINGREDUCE_NODE_ID for one sub-communicator.
        self.topology = NodeTopology.of(self.main.comm, config.text("RINGREDUCE_NODE_ID"))
        self.node_index = self.topology.node_index
        self.num_nodes = self.topology.num_nodes
        self.local_rank = self.topology.local_rank
        self.local_size = self.topology.local_size
        # Matches this context with the peers' in their exit notices and deadlock probes.
        self.exit_key, self.exit_ranks = runtime.notices.key_of(user_comm)
        self.plan = plan_for(self.main.comm, self.topology)
        self.compression = CompressionState(self.rank, self.size)
        # This rank's timings of its calls (per size band and algorithm; not agreed).
        self.observations = Observations()
        plan = self.plan
        shape = learn.shape_key(self.size, plan.nodes, plan.max_local, plan.node_local)
        for chan in (self.main, self.background):
            chan.topology = self.topology
            chan.plan = plan
            chan.compression_state = self.compression
            if self.topology.shares_memory:
                agree.shared_rows(chan)       # the check's rows through shared memory, not MPI
            if plan.learn:
                # Each channel learns on its own calls (their order is the same on every rank).
                chan.learner = learn.Learner(plan, shape, plan.cached, PLAN_NAMES, save=self.rank == 0)
        self._freed = False
        self._notices = runtime.notices
        self._retire_wire = runtime.retire_wire

    def channels(self) -> tuple:
        return (self.main, self.background)

    @property
    def label(self) -> str:
        """How wire_stats names this communicator: "world", or its world ranks."""
        if self.is_world:
            return "world"
        return "ranks " + ",".join(map(str, sorted(self.exit_ranks)))

    def wire(self) -> tuple[int, int]:
        return (self.main.sent + self.background.sent, self.main.received + self.background.received)

    def reset_wire(self) -> None:
        for chan in self.channels():
            chan.sent = chan.received = 0

    def free(self, at_shutdown: bool = False) -> None:
        """Free the duplicates and windows (idempotent: shutdown and the user's Comm.Free both call it).

        At shutdown the ranks leave one by one, so nothing collective may run: the
        agreement rows' window (MPI_Win_free synchronises) is left to MPI_Finalize.
        """
        if self._freed:
            return
        self._freed = True
        self._notices.retire(self)
        self._retire_wire(self.label, self.wire())
        self.main.free(at_shutdown)
        self.background.free(at_shutdown)
        self.topology.close()


class Runtime:
    """The process's engine state: contexts, settings, the supervised wait and liveness services."""

    def __init__(self):
        self.lock = threading.RLock()
        self.world: CommContext | None = None
        self.contexts: dict[int, CommContext] = {}
        self.thread_level: int = MPI.THREAD_SINGLE
        self.settings = config.Settings()
        self.keyval = None
        self.worker = None               # runtime.engine's worker thread, made on first use
        self.shutdown_hooks: list = []
        self.supervisor = Supervisor(check_hint=_check_hint)
        self.notices = ExitNotices(self.context_list, lambda ctx: ctx is self.world)
        self.stall = StallService(self.channels, self.supervisor)
        self.deadlock = DeadlockDetector(self.context_list, self.supervisor, self.notices)
        self.faults = FaultHooks(self.supervisor, self.notices)
        self.supervisor.servers += [self.stall.serve, self.deadlock.serve]
        self.supervisor.watchers += [self.notices.check, self.deadlock.check]
        self._exit_hook = False
        self.retired_wire: dict[str, list] = {}   # freed communicators' wire bytes, by label

    def retire_wire(self, label: str, wire: tuple) -> None:
        total = self.retired_wire.setdefault(label, [0, 0])
        total[0] += wire[0]
        total[1] += wire[1]

    def context_list(self) -> list:
        return list(self.contexts.values())

    def channels(self) -> list:
        return [c for ctx in list(self.contexts.values()) for c in ctx.channels()]

    def thread_multiple(self) -> bool:
        return self.thread_level >= MPI.THREAD_MULTIPLE


RUNTIME = Runtime()


def init(comm=None) -> None:
    """Initialise ringreduce on `comm` (default MPI.COMM_WORLD). Idempotent.

    The engine works on duplicates of `comm`. Calling init again with a different
    communicator is an error; call shutdown() first to switch.

    Example::

        import ringreduce as rr
        rr.init()
        print(rr.rank(), rr.size())
    """
    rt = RUNTIME
    comm = MPI.COMM_WORLD if comm is None else comm
    with rt.lock:
        if rt.world is not None:
            same = MPI.Comm.Compare(rt.world.user_comm, comm) in (MPI.IDENT, MPI.CONGRUENT)
            if not same:
                raise RingReduceError(
                    f"rank {rt.world.rank}: ringreduce is already initialised on another "
                    "communicator; call rr.shutdown() before init() with a new one")
            return
        rt.thread_level = MPI.Query_thread()
        rt.settings = s = config.Settings.from_env()
        rank = comm.Get_rank()
        rt.supervisor.configure(s.stall_warning, s.timeout, _world_rank())
        rt.supervisor.failure = None
        rt.deadlock.after = s.deadlock_after
        configure_logging(rank)
        timeline.configure(rank)
        _agree_on_settings(comm)
        rt.notices.setup(comm)          # collective: the control communicator
        rt.faults.install()
        if not rt._exit_hook:
            # Registered after this module's atexit shutdown, so it runs first (last in, first out).
            rt._exit_hook = True
            atexit.register(lambda: rt.faults.at_exit(is_initialized()))
        world = CommContext(rt, comm, is_world=True)
        rt.world = world
        _attach(comm, world)
        rt.contexts[_key(comm)] = world
        if rt.thread_level < MPI.THREAD_MULTIPLE:
            logger.warning("MPI thread level is %s, not multiple: asynchronous collectives run on the "
                           "calling thread (no overlap)", _THREAD_LEVELS.get(rt.thread_level))


def _agree_on_settings(comm) -> None:
    """Settings every rank must share: RINGREDUCE_CHECK (its exchange is part of every call)."""
    if comm.Get_size() == 1:
        return
    mine = np.array([int(config.check_enabled())], np.int64)
    every = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(mine, every)
    if not (every == every[0]).all():
        on = [r for r, v in enumerate(every) if v]
        off = [r for r, v in enumerate(every) if not v]
        raise RingReduceError(
            f"rank {comm.Get_rank()}: RINGREDUCE_CHECK differs across ranks (on for ranks "
            f"{','.join(map(str, on))}; off for ranks {','.join(map(str, off))}): set it alike "
            "on every rank")


def is_initialized() -> bool:
    return RUNTIME.world is not None


def _key(comm) -> int:
    return comm.py2f()


def _on_user_comm_free(comm, keyval, ctx) -> None:
    """MPI calls this when the user frees a communicator we hold a context for.

    Handles of freed communicators are reused, so the context must go with it, or a
    later communicator with the same handle would inherit a stale one. The user's
    Comm.Free is collective, so freeing our duplicates here happens on every rank.
    """
    rt = RUNTIME
    with rt.lock:
        key = getattr(ctx, "key", None)
        if key is not None and rt.contexts.get(key) is ctx:
            del rt.contexts[key]
    if not MPI.Is_finalized():
        ctx.free()


def _attach(comm, ctx: CommContext) -> None:
    rt = RUNTIME
    if rt.keyval is None:
        rt.keyval = MPI.Comm.Create_keyval(delete_fn=_on_user_comm_free)
    ctx.key = _key(comm)
    comm.Set_attr(rt.keyval, ctx)


def context(comm=None) -> CommContext:
    """The engine context for `comm` (default: the init communicator); initialises on first use.

    A sub-communicator gets its own context the first time it is used; every rank
    of it reaches that first use in the same collective, so the Dup is safe. The
    context lives as an attribute of the communicator and is freed with it.
    """
    rt = RUNTIME
    if rt.world is None:
        init()
    if comm is None:
        return rt.world
    key = _key(comm)
    ctx = rt.contexts.get(key)
    if ctx is None or (comm is not ctx.user_comm and comm.Get_attr(rt.keyval) is not ctx):
        with rt.lock:
            ctx = CommContext(rt, comm, is_world=False)
            _attach(comm, ctx)
            rt.contexts[key] = ctx
    return ctx


def add_shutdown_hook(fn) -> None:
    """Run fn() at shutdown, before the communicators are freed (e.g. stop a thread)."""
    RUNTIME.shutdown_hooks.append(fn)


def shutdown() -> None:
    """Stop the background thread and free the engine's communicators and windows.

    Safe to call more than once; runs automatically at interpreter exit, before MPI
    finalises. init() may be called again afterwards.
    """
    rt = RUNTIME
    with rt.lock:
        if rt.world is None:
            return

        def run_hooks():
            for hook in list(rt.shutdown_hooks):
                try:
                    hook()
                except Exception:  # shutdown must finish; the hook logged its own trouble
                    logger.exception("shutdown hook failed")

        # Aborts after a failure; else stops the engine thread, sends the exit notice
        # (at interpreter exit) and writes the timeline.
        rt.faults.before_shutdown(run_hooks, rt.world.main.comm)
        if not MPI.Is_finalized():
            for ctx in rt.contexts.values():
                ctx.free(at_shutdown=True)
        rt.contexts.clear()
        rt.world = None


atexit.register(shutdown)


def wire_stats(reset: bool = False) -> dict:
    """Bytes this rank sent and received through ringreduce since init (or the last reset).

    Counted where the engine hands bytes to MPI: every point-to-point message of
    our algorithms and the compressed paths, the agreement's allgather, and the
    payload given to MPI's own collectives (native allreduce: the message size in
    each direction; broadcast: sent by the root, received by the others).
    Shared-memory steps move no bytes over a wire and count nothing. With
    reset=True the counters restart at zero after being read.

    Returns ``{"total": {"sent": int, "received": int}, "per_comm": {label: {...}}}``,
    label "world" for the init communicator, "ranks 0,2" for a sub-communicator.

    Example::

        before = rr.wire_stats()["total"]["sent"]
        rr.allreduce(grad, name="w")
        print(rr.wire_stats()["total"]["sent"] - before, "bytes sent")
    """
    rt = RUNTIME
    with rt.lock:
        per = {label: list(v) for label, v in rt.retired_wire.items()}
        for ctx in list(rt.contexts.values()):
            s, r = ctx.wire()
            cur = per.setdefault(ctx.label, [0, 0])
            cur[0] += s
            cur[1] += r
            if reset:
                ctx.reset_wire()
        if reset:
            rt.retired_wire.clear()
    total = [sum(v[0] for v in per.values()), sum(v[1] for v in per.values())]
    return {"total": {"sent": total[0], "received": total[1]},
            "per_comm": {k: {"sent": v[0], "received": v[1]} for k, v in per.items()}}


def rank() -> int:
    """This process's rank in the init communicator."""
    return context().rank


def size() -> int:
    """Number of ranks in the init communicator."""
    return context().size


def local_rank() -> int:
    """This process's rank among the ranks on its node."""
    return context().local_rank


def local_size() -> int:
    """Number of ranks on this process's node."""
    return context().local_size


def thread_level() -> str:
    context()
    return _THREAD_LEVELS.get(RUNTIME.thread_level, str(RUNTIME.thread_level))


def thread_multiple() -> bool:
    context()
    return RUNTIME.thread_multiple()


def world_comm():
    """The user's communicator ringreduce was initialised on (initialises on first use)."""
    return context().user_comm


def use_timeout(seconds: float) -> None:
    """Bound every supervised wait by `seconds` (torch's init_process_group(timeout=) lands here).

    RINGREDUCE_TIMEOUT, when set, wins: it is the operator's word for the whole job.
    """
    if config._raw("RINGREDUCE_TIMEOUT") is not None or not seconds > 0:
        return
    sup = RUNTIME.supervisor
    sup.configure(min(sup.stall_warning, seconds / 2), seconds, sup.rank)


def wait_until(done, what: str) -> None:
    """Wait for done() under the engine's supervision: stall warnings, the timeout, liveness."""
    RUNTIME.supervisor.wait_until(done, what)
