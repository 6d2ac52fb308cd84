"""Shared-memory windows: the shm algorithm's slots, and the agreement rows of a node-local channel.

SharedWindow: one MPI-3 shared window per channel, a double slot per rank.

Each slot has two halves used by alternate calls, so a rank may start the next
call (and overwrite its slot) while a slower peer is still reading the previous
one: a barrier of call k+1 always separates call k's reads from call k+2's
writes. The window grows (collectively, as every rank sees the same sizes) when
a bigger message comes. Used by algorithms.shm and algorithms.hierarchical.

RowWindow: the mismatch check's fixed-width rows (runtime.agree.Rows) when every
rank of the channel shares a node, exchanged through flags instead of MPI.
"""
from __future__ import annotations

import numpy as np

from ..core.mpi import MPI

__all__ = ["RowWindow", "SharedWindow"]

_MIN_SLOT_BYTES = 1 << 16
_FLAG_BYTES = 64        # a rank's barrier counter, alone in its cache line
_QUICK_POLLS = 32       # flag polls before the supervised wait (about 0.1 us each)
_C_POLLS = 256          # the same in C++ (tens of ns each): a few microseconds


def _count_and_wait(win, flag, peers, e: int, wait) -> None:
    """The barrier in a window: publish our stores, count to e in our flag, wait for every
    peer's flag to reach e (through `wait(done)` when they are not there yet), see theirs."""
    win.Sync()
    flag[0] = e

    def arrived() -> bool:
        for f in peers:
            if f[0] < e:
                return False
        return True

    for _ in range(_QUICK_POLLS):
        if arrived():
            break
    else:
        wait(arrived)       # the supervised wait: ~2 us to enter, so only when a peer is late
    win.Sync()


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
        self.epoch = e = self.epoch + 1
        _count_and_wait(self.win, self._flag, self._peers, e, lambda done: self.chan.supervisor.wait_until(
            done, "shared-memory allreduce barrier", chan=self.chan))

    def close(self) -> None:
        if self.win is not None:
            self._flag, self._peers = None, []      # views into the memory freed below
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
            self._raw = []
            self._cache.clear()


class RowWindow:
    """The agreement rows of a node-local channel in shared memory: an allgather without MPI.

    Every rank writes its fixed-width row, counts the call in its own flag and
    waits until every peer's flag has reached the same count; the n rows are
    then contiguous in rank order, exactly what ``Iallgather(row, rows)`` would
    have received. A cache-line handshake instead of an MPI schedule: about 1 us
    at np=2 on a 2-core VM, against 3.7-4.1 us for Iallgather plus its polls.

    Two sets of rows, alternating by call, as SharedWindow's halves: a rank may
    write call k+2's row only after every rank has reached call k+1, i.e. after
    every rank has finished reading call k's rows.

    Example::

        rows = RowWindow(chan.comm, 2120)
        send, recv = rows.flip()          # this call's own row and the n rows
        send[:8] = ...
        rows.sync(lambda wait: supervisor.wait_until(wait, "the fingerprints"))
        rows.close()
    """

    def __init__(self, comm, width: int, arrive=None):
        n, rank = comm.Get_size(), comm.Get_rank()
        self.width, self.n, self.rank = width, n, rank
        # The C++ handshake (``_C.flags_arrive``, given by the caller: this layer does not
        # load the extension): the same flags and fences, without the per-poll Python.
        # Its arguments are public, for callers that fuse it with their own C++ work.
        self.arrive = arrive
        self.stride = _FLAG_BYTES
        self.polls = _C_POLLS
        block = n * width
        flags_at = -(-2 * block // _FLAG_BYTES) * _FLAG_BYTES
        # One contiguous allocation on rank 0 (the rows of a parity must be adjacent).
        size = flags_at + n * _FLAG_BYTES if rank == 0 else 0
        self.win = MPI.Win.Allocate_shared(size, 1, comm=comm)
        self.win.Lock_all(MPI.MODE_NOCHECK)
        mem, _ = self.win.Shared_query(0)
        raw = np.frombuffer(mem, dtype=np.uint8)
        self._views = [(raw[p * block + rank * width:p * block + (rank + 1) * width],
                        raw[p * block:(p + 1) * block]) for p in (0, 1)]
        flags = [np.frombuffer(mem, dtype=np.int64, count=1, offset=flags_at + j * _FLAG_BYTES)
                 for j in range(n)]
        self._flag = flags[rank]
        self._flag[0] = 0
        self._peers = [f for j, f in enumerate(flags) if j != rank]
        self.flags_at = raw.ctypes.data + flags_at     # address of rank 0's flag
        self.calls = 0
        comm.Barrier()                 # every flag is zero before anyone counts on it

    def flip(self):
        """(own row, all n rows) for the next call: write the row, then sync()."""
        self.calls += 1
        return self._views[self.calls & 1]

    def sync(self, wait) -> None:
        """Publish this call's row and return once every rank has published its own.

        `wait(done)` is the supervised wait to use when the peers are not there yet.
        """
        arrive = self.arrive
        if arrive is None:
            _count_and_wait(self.win, self._flag, self._peers, self.calls, wait)
        elif not arrive(self.flags_at, _FLAG_BYTES, self.n, self.rank, self.calls, _C_POLLS, True):
            self.wait_arrival(wait)

    def wait_arrival(self, wait) -> None:
        """After a C++ handshake that published this call but returned before the peers
        did: `wait(done)` until every flag has reached this call."""
        arrive, at, n, rank, e = self.arrive, self.flags_at, self.n, self.rank, self.calls
        wait(lambda: arrive(at, _FLAG_BYTES, n, rank, e, 1, False))

    def close(self) -> None:
        if self.win is not None:
            self._flag, self._peers, self._views = None, [], []
            self.arrive = None
            self.win.Unlock_all()
            self.win.Free()
            self.win = None
