"""Channel: one duplicated communicator, its call counter, scratch buffers and per-channel resources.

A channel is used by one thread at a time: the user's thread ("main") or the
engine's background thread ("background"). The node and leaders' channels of the
hierarchical algorithm are sub-channels: they carry traffic for their parent's
call, so waits on them are reported under the parent's call number (``root``).

Everything an algorithm keeps between calls on a channel is a typed attribute
here, freed with the channel: the plan "auto" follows, the shared window, the
hierarchical layout, the agreement rows, pinned staging buffers, compression state.

Example::

    chan = Channel(comm.Dup(), "main", supervisor)
    chan.wait([chan.comm.Ibarrier()], "a barrier")
    chan.free()
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from ..core.mpi import MPI

__all__ = ["Channel", "ScratchPool"]


class Channel:
    """One duplicated communicator with its own call counter and scratch buffers.

    Parameters
    ----------
    comm : the communicator this channel owns (freed with it)
    label : "main", "background", or "<parent>/node" style for sub-channels
    supervisor : transport.wait.Supervisor, the process's supervised wait
    context : the runtime context that owns the channel (None for sub-channels)
    parent : the channel a sub-channel works for
    who : how errors name this rank, e.g. "rank 1" or "rank 1 of the
        sub-communicator (world rank 3)"
    """

    def __init__(self, comm, label: str, supervisor, context=None, parent: "Channel | None" = None,
                 who: str | None = None):
        self.comm = comm
        self.label = label
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.seq = 0
        self.pool = ScratchPool()
        self.supervisor = supervisor
        self.context = context if parent is None else parent.context
        self.parent = parent
        self.root: Channel = self if parent is None else parent.root
        self.who = who or f"rank {self.rank}"
        self.topology = None          # transport.topology.NodeTopology (context channels)
        self.plan = None              # policy.plan.Plan, set by the runtime
        self.learner = None           # policy.learn.Learner: auto's learning on this channel
        self.window = None            # transport.window.SharedWindow, made on first shm call
        self.node_channels = None     # algorithms.hierarchical.NodeChannels, made on first use
        self.rows = None              # runtime.agree.Rows: the fingerprint rows
        self.tiny = None              # runtime.tiny.TinyRows: the tiny path's buffers
        self.fast_calls = None        # runtime.collectives' fast path: call shape -> what it precomputed
        self.stagers: dict = {}       # GPU id -> transport.staging.Stager
        self.compression_state = None  # compression.state.CompressionState (shared per context)
        self.warned_shm_fallback = False
        self.sent = 0                 # payload bytes this rank handed to MPI on this channel
        self.received = 0             # (sub-channels count into their root: rr.wire_stats())

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq

    def count(self, sent: int, received: int) -> None:
        """Add to the root channel's wire counters (bytes this rank sends and receives)."""
        if self.size > 1:             # one rank: nothing crosses a wire
            root = self.root
            root.sent += sent
            root.received += received

    def wait(self, reqs: list, what="", inspector=None) -> None:
        """Wait for the requests under supervision (stall warning, timeout, liveness checks)."""
        self.supervisor.wait(reqs, what, inspector, self)

    def free(self, at_shutdown: bool = False) -> None:
        """Free everything the channel holds; at_shutdown, the agreement rows' window is left
        to MPI_Finalize (freeing a window synchronises its ranks, which leave one by one then)."""
        held = (self.window, self.node_channels) if at_shutdown else (self.window, self.node_channels, self.rows)
        for res in held:
            if res is not None:
                res.close()
        self.window = self.node_channels = self.tiny = self.rows = self.fast_calls = None
        self.stagers.clear()
        self.pool.clear()
        if self.comm != MPI.COMM_NULL:
            self.comm.Free()
            self.comm = MPI.COMM_NULL


class ScratchPool:
    """Reusable flat scratch buffers, so steady-state calls allocate nothing.

    Buffers are keyed by (slot, dtype, array module) and grown geometrically; a
    slot is owned by one algorithm phase at a time (the engine runs one collective
    per communicator at a time, so no two users share a slot).

    Buffers come from numpy unless `xp` names another array module (cupy), or
    the call happens inside ``with pool.using(cupy):``, which is how the
    engine runs the unchanged algorithms on device buffers with device scratch.

    Example::

        pool = ScratchPool()
        a = pool.get("ring", np.float32, 100)        # numpy
        with pool.using(cupy):
            d = pool.get("ring", np.float32, 100)    # cupy, a different buffer
    """

    def __init__(self):
        self._bufs: dict[tuple, np.ndarray] = {}
        self._lock = threading.Lock()
        self._xp = np

    @contextlib.contextmanager
    def using(self, xp):
        """Within the block, get() without `xp` allocates from array module `xp`."""
        prev, self._xp = self._xp, xp
        try:
            yield self
        finally:
            self._xp = prev

    def get(self, slot: str, dtype, count: int, xp=None):
        xp = self._xp if xp is None else xp
        dtype = np.dtype(dtype)
        # Device buffers belong to one GPU: key them by the current device too.
        where = xp.__name__ if xp is np else (xp.__name__, xp.cuda.Device().id)
        key = (slot, dtype, where)
        with self._lock:
            buf = self._bufs.get(key)
            if buf is None or buf.size < count:
                size = max(count, 2 * buf.size if buf is not None else 0)
                buf = xp.empty(size, dtype=dtype)
                self._bufs[key] = buf
        return buf[:count]

    def nbytes(self) -> int:
        return sum(b.nbytes for b in self._bufs.values())

    def clear(self) -> None:
        with self._lock:
            self._bufs.clear()
