"""The MPI side: initialisation, the engine's communicators, node-local split, info.

ringreduce never communicates on the user's communicator itself. For each
communicator it is given it keeps a context with two duplicates: one for calls
made on the user's thread and one for the engine's background thread, so the two
never interleave with each other or with the user's own MPI traffic.
"""
from __future__ import annotations

import atexit
import os
import sys
import threading

import mpi4py

# Ask for MPI_THREAD_MULTIPLE, unless the user already initialised MPI themselves.
if "mpi4py.MPI" not in sys.modules:
    mpi4py.rc.thread_level = "multiple"
    from ._mpi_env import quiet_one_sided_warnings
    quiet_one_sided_warnings()
from mpi4py import MPI  # noqa: E402

from . import exits  # noqa: E402
from .buffers import ScratchPool  # noqa: E402
from .errors import RingReduceError  # noqa: E402
from .log import configure as _configure_logging, logger  # noqa: E402

__all__ = ["init", "shutdown", "is_initialized", "rank", "size", "local_rank", "local_size",
           "context", "Channel", "CommContext"]

_THREAD_LEVELS = {MPI.THREAD_SINGLE: "single", MPI.THREAD_FUNNELED: "funneled",
                  MPI.THREAD_SERIALIZED: "serialized", MPI.THREAD_MULTIPLE: "multiple"}


class Channel:
    """One duplicated communicator with its own call counter and scratch buffers.

    A channel is used by one thread at a time: the user's thread ("main") or the
    engine's background thread ("background").
    """

    def __init__(self, comm: MPI.Comm, label: str):
        self.comm = comm
        self.label = label
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.seq = 0
        self.pool = ScratchPool()
        self.resources: dict[str, object] = {}   # e.g. shared-memory windows, freed at shutdown

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def free(self) -> None:
        for res in self.resources.values():
            close = getattr(res, "close", None)
            if close is not None:
                close()
        self.resources.clear()
        self.pool.clear()
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()


class CommContext:
    """Engine state for one user communicator: its channels and node layout."""

    def __init__(self, user_comm: MPI.Comm):
        self.user_comm = user_comm
        self.main = Channel(user_comm.Dup(), "main")
        self.background = Channel(user_comm.Dup(), "background")
        self.rank = self.main.rank
        self.size = self.main.size
        self.node_comm, self.node_index, self.num_nodes = _split_by_node(self.main.comm)
        self.local_rank = self.node_comm.Get_rank()
        self.local_size = self.node_comm.Get_size()
        # Matches this context with the peers' in their exit notices (ringreduce.exits).
        self.exit_key, self.exit_ranks = exits.key_of(user_comm)
        from .algorithms import select   # the decision table, broadcast from rank 0
        select.attach(self)

    def free(self) -> None:
        """Free the duplicates and windows (idempotent: shutdown and the user's Comm.Free both call it)."""
        if getattr(self, "_freed", False):
            return
        self._freed = True
        exits.retire(self)
        self.main.free()
        self.background.free()
        self.node_comm.Free()


def _split_by_node(comm: MPI.Comm):
    """Group ranks by node: RINGREDUCE_NODE_ID if set on every rank, else MPI's shared-memory split.

    Returns (node communicator, index of this node, number of nodes).
    """
    node_id = os.environ.get("RINGREDUCE_NODE_ID")
    ids = comm.allgather(node_id)
    if all(i is not None for i in ids):
        order = list(dict.fromkeys(ids))           # first-appearance order, same on every rank
        color = order.index(node_id)
        node_comm = comm.Split(color, comm.Get_rank())
    else:
        if any(i is not None for i in ids):
            missing = [r for r, i in enumerate(ids) if i is None]
            raise RingReduceError(
                f"rank {comm.Get_rank()}: RINGREDUCE_NODE_ID is set on some ranks but not on ranks {missing}")
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    # Number the nodes by their lowest global rank so every rank agrees.
    leaders = comm.allgather(comm.Get_rank() if node_comm.Get_rank() == 0 else -1)
    leader_ranks = sorted(r for r in leaders if r >= 0)
    my_leader = node_comm.bcast(comm.Get_rank() if node_comm.Get_rank() == 0 else None, root=0)
    return node_comm, leader_ranks.index(my_leader), len(leader_ranks)


class _State:
    def __init__(self):
        self.lock = threading.RLock()
        self.world: CommContext | None = None
        self.contexts: dict[int, CommContext] = {}
        self.thread_level: int = MPI.THREAD_SINGLE
        self.shutdown_hooks: list = []


_state = _State()


def init(comm: MPI.Comm | None = None) -> None:
    """Initialise ringreduce on `comm` (default MPI.COMM_WORLD). Idempotent.

    The engine works on duplicates of `comm`. Calling init again with a different
    communicator is an error; call shutdown() first to switch.

    Example::

        import ringreduce as rr
        rr.init()
        print(rr.rank(), rr.size())
    """
    comm = MPI.COMM_WORLD if comm is None else comm
    with _state.lock:
        if _state.world is not None:
            same = MPI.Comm.Compare(_state.world.user_comm, comm) in (MPI.IDENT, MPI.CONGRUENT)
            if not same:
                raise RingReduceError(
                    f"rank {_state.world.rank}: ringreduce is already initialised on another "
                    "communicator; call rr.shutdown() before init() with a new one")
            return
        _state.thread_level = MPI.Query_thread()
        world = CommContext(comm)
        _configure_logging(world.rank)
        from . import faults
        faults.install(world.rank, comm)  # excepthooks, exit notices, stall/timeout, timeline
        _state.world = world
        _attach(comm, world)
        _state.contexts[_key(comm)] = world
        if _state.thread_level < MPI.THREAD_MULTIPLE:
            logger.warning("MPI thread level is %s, not multiple: asynchronous collectives run on the "
                           "calling thread (no overlap)", _THREAD_LEVELS.get(_state.thread_level))


def is_initialized() -> bool:
    return _state.world is not None


def _key(comm: MPI.Comm) -> int:
    return comm.py2f()


_keyval = None


def _on_user_comm_free(comm, keyval, ctx) -> None:
    """MPI calls this when the user frees a communicator we hold a context for.

    Handles of freed communicators are reused, so the context must go with it, or a
    later communicator with the same handle would inherit a stale one. The user's
    Comm.Free is collective, so freeing our duplicates here happens on every rank.
    """
    with _state.lock:
        key = getattr(ctx, "key", None)
        if key is not None and _state.contexts.get(key) is ctx:
            del _state.contexts[key]
    if not MPI.Is_finalized():
        ctx.free()


def _attach(comm: MPI.Comm, ctx: CommContext) -> None:
    global _keyval
    if _keyval is None:
        _keyval = MPI.Comm.Create_keyval(delete_fn=_on_user_comm_free)
    ctx.key = _key(comm)
    comm.Set_attr(_keyval, ctx)


def context(comm: MPI.Comm | None = None) -> CommContext:
    """The engine context for `comm` (default: the init communicator); initialises on first use.

    A sub-communicator gets its own context the first time it is used; every rank
    of it reaches that first use in the same collective, so the Dup is safe. The
    context lives as an attribute of the communicator and is freed with it.
    """
    if _state.world is None:
        init()
    if comm is None:
        return _state.world
    key = _key(comm)
    ctx = _state.contexts.get(key)
    if ctx is None or (comm is not ctx.user_comm and comm.Get_attr(_keyval) is not ctx):
        with _state.lock:
            ctx = CommContext(comm)
            _attach(comm, ctx)
            _state.contexts[key] = ctx
    return ctx


def add_shutdown_hook(fn) -> None:
    """Run fn() at shutdown, before the communicators are freed (e.g. stop a thread)."""
    _state.shutdown_hooks.append(fn)


def shutdown() -> None:
    """Stop the background thread and free the engine's communicators and windows.

    Safe to call more than once; runs automatically at interpreter exit, before MPI
    finalises. init() may be called again afterwards.
    """
    with _state.lock:
        if _state.world is None:
            return
        for hook in list(_state.shutdown_hooks):
            try:
                hook()
            except Exception:  # shutdown must finish; the hook logged its own trouble
                logger.exception("shutdown hook failed")
        if not MPI.Is_finalized():
            for ctx in _state.contexts.values():
                ctx.free()
        _state.contexts.clear()
        _state.world = None


atexit.register(shutdown)


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
    return _THREAD_LEVELS.get(_state.thread_level, str(_state.thread_level))


def thread_multiple() -> bool:
    context()
    return _state.thread_level >= MPI.THREAD_MULTIPLE
