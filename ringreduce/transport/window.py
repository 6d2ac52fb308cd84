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
        self._cache: dict = {}

    def _allocate(self, half: int) -> None:
        self.close()
        self.half = half
        self.win = MPI.Win.Allocate_shared(2 * half, 1, comm=self.comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        self._raw = []
        for peer in range(self.comm.Get_size()):
            mem, _ = self.win.Shared_query(peer)
            self._raw.append(np.frombuffer(mem, dtype=np.uint8, count=2 * half))

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
        """Make this rank's stores visible, wait for every rank, see theirs."""
        self.win.Sync()
        # A non-blocking barrier, so the wait gets the supervisor's stall warning and timeout.
        self.chan.wait([self.comm.Ibarrier()], "shared-memory allreduce barrier")
        self.win.Sync()

    def close(self) -> None:
        if self.win is not None:
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
            self._raw = []
            self._cache.clear()
