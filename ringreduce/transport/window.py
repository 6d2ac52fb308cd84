"""The shared-memory window: one MPI-3 shared window per channel, a double slot per rank.

Each slot has two halves used by alternate calls, so a rank may start the next
call (and overwrite its slot) while a slower peer is still reading the previous
one: a barrier of call k+1 always separates call k's reads from call k+2's
writes. The window grows (collectively, as every rank sees the same sizes) when
a bigger message comes. Used by algorithms.shm and algorithms.hierarchical.
"""
from __future__ import annotations

import numpy as np

from ..core.mpi import MPI

__all__ = ["SharedWindow"]

_MIN_SLOT_BYTES = 1 << 16
_FLAG_BYTES = 64        # a rank's barrier counter, alone in its cache line


class SharedWindow:
    """A growable shared window with one double slot per rank, for one channel.

    Example::

        win = SharedWindow(chan)
        views = win.views(np.float32, 1000)   # views[parity][rank] -> float32[1000]
        win.close()
    """

    def __init__(self, chan):
        self.chan = chan
        self.comm = chan.comm
        self.win = None
        self.half = 0          # bytes in one half-slot
        self.calls = 0         # parity source: every rank makes the same calls
        self.epoch = 0         # barriers passed since the window was (re)allocated
        self._flag = None      # this rank's barrier counter (int64 view into the window)
        self._peers: list = []  # the other ranks' counters
        self._cache: dict = {}

    def _allocate(self, half: int) -> None:
        self.close()
        self.half = half
        # Each rank's segment: its two half-slots, then its barrier flag (own cache line).
        self.win = MPI.Win.Allocate_shared(2 * half + _FLAG_BYTES, 1, comm=self.comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._raw = []
        flags = []
        for peer in range(self.comm.Get_size()):
            mem, _ = self.win.Shared_query(peer)
            self._raw.append(np.frombuffer(mem, dtype=np.uint8, count=2 * half))
            flags.append(np.frombuffer(mem, dtype=np.int64, count=1, offset=2 * half))
        rank = self.comm.Get_rank()
        self._flag = flags[rank]
        self._flag[0] = 0
        self._peers = [f for j, f in enumerate(flags) if j != rank]
        self.epoch = 0
        self.comm.Barrier()            # every flag is zero before anyone counts on it

    def views(self, dtype, count: int):
        """Per-parity, per-rank typed views of `count` elements, growing the window if needed."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        if nbytes > self.half:
            need = max(_MIN_SLOT_BYTES, 1 << (nbytes - 1).bit_length())
            self._allocate(need)
            self._cache.clear()
        key = (dtype, count)
        v = self._cache.get(key)
        if v is None:
            v = [[raw[p * self.half:p * self.half + nbytes].view(dtype) for raw in self._raw]
                 for p in (0, 1)]
            if len(self._cache) > 64:
                self._cache.clear()
            self._cache[key] = v
        return v

    def next_parity(self) -> int:
        self.calls += 1
        return self.calls & 1

    def sync(self) -> None:
        """Make this rank's stores visible, wait for every rank, see theirs.

        A barrier in the window itself: each rank counts its barriers in its own flag
        and waits until every peer's flag has reached the same count (a peer may be
        ahead, never more than one barrier: it waits for us at its next one). Reading
        a flag costs a cache-line transfer, where MPI_Ibarrier's schedule costs
        microseconds. The wait goes through the supervisor (stall warning, timeout,
        liveness checks) like any MPI request.
        """
        self.win.Sync()
        self.epoch = e = self.epoch + 1
        self._flag[0] = e
        if not self._arrived(e):
            self.chan.supervisor.wait_until(lambda: self._arrived(e), "shared-memory allreduce barrier",
                                            chan=self.chan)
        self.win.Sync()

    def _arrived(self, e: int) -> bool:
        for f in self._peers:
            if f[0] < e:
                return False
        return True

    def close(self) -> None:
        if self.win is not None:
            self._flag, self._peers = None, []      # views into the memory freed below
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
            self._raw = []
            self._cache.clear()
