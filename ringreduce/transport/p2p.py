"""Point-to-point primitives shared by the algorithms: chunking arithmetic and byte messages.

MPI only ever moves bytes here; the reductions happen locally. Every message is
at most MAX_MESSAGE_BYTES long, so no MPI count exceeds 2**31 - 1.
"""
from __future__ import annotations

import numpy as np

from ..core.mpi import MPI

# Lowered by tests to exercise the splitting without multi-GiB buffers.
MAX_MESSAGE_BYTES = 2**31 - 1


def chunk_bounds(count: int, parts: int) -> np.ndarray:
    """Offsets (parts + 1 of them) splitting `count` into parts balanced to within one element."""
    base, extra = divmod(count, parts)
    sizes = np.full(parts, base, dtype=np.int64)
    sizes[:extra] += 1
    return np.concatenate(([0], np.cumsum(sizes)))


def message_slices(nbytes: int):
    """(start, stop) byte ranges that cover nbytes in messages MPI can count."""
    if nbytes == 0:
        return [(0, 0)]
    step = MAX_MESSAGE_BYTES
    return [(lo, min(lo + step, nbytes)) for lo in range(0, nbytes, step)]


def isend(chan, buf: np.ndarray, dest: int, tag: int) -> list:
    """Post sends of a contiguous array's bytes on the channel (split if huge); returns the requests."""
    raw = buf.reshape(-1).view(np.uint8)
    chan.count(raw.size, 0)
    comm = chan.comm
    return [comm.Isend([raw[lo:hi], MPI.BYTE], dest, tag) for lo, hi in message_slices(raw.size)]


def irecv(chan, buf: np.ndarray, source: int, tag: int) -> list:
    """Post receives into a contiguous array's bytes (split like isend)."""
    raw = buf.reshape(-1).view(np.uint8)
    chan.count(0, raw.size)
    comm = chan.comm
    return [comm.Irecv([raw[lo:hi], MPI.BYTE], source, tag) for lo, hi in message_slices(raw.size)]


def sendrecv(chan, sendbuf: np.ndarray, dest: int, recvbuf: np.ndarray, source: int, tag: int) -> None:
    """Exchange with a peer without deadlock (receives posted before sends)."""
    chan.wait(irecv(chan, recvbuf, source, tag) + isend(chan, sendbuf, dest, tag))


def waitall(chan, reqs: list, what: str = "") -> None:
    """Wait for the requests through the channel's supervisor (never MPI's own Waitall)."""
    chan.wait(reqs, what)


def arrived(comm, tag: int):
    """Receive every message with `tag` that has already arrived: yields (source, uint8 bytes).

    For the small control messages of the liveness services (never blocks).
    """
    status = MPI.Status()
    while True:
        msg = comm.improbe(MPI.ANY_SOURCE, tag, status)
        if msg is None:
            return
        buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
        msg.Recv([buf, MPI.BYTE])
        yield status.Get_source(), buf


def bcast_bytes(chan, buf: np.ndarray, root: int, what: str = "broadcast") -> None:
    """Broadcast a contiguous array's bytes from `root` (split so no count passes the MPI limit)."""
    raw = buf.reshape(-1).view(np.uint8)
    reqs = [chan.comm.Ibcast([raw[lo:hi], MPI.BYTE], root=root) for lo, hi in message_slices(raw.size)]
    mine = chan.rank == root
    chan.count(raw.size if mine else 0, 0 if mine else raw.size)
    chan.wait(reqs, what)


class PendingSends:
    """Small control sends left to complete on their own (they go eagerly), pruned as they do."""

    def __init__(self):
        self.reqs: list = []

    def keep(self, req, buf) -> None:
        """Hold the request and its buffer until the send has completed."""
        self.reqs.append((req, buf))
        if len(self.reqs) > 64:
            self.reqs = [(r, b) for r, b in self.reqs if not r.Test()]


def allgather_bytes(chan, data: np.ndarray | None, what: str):
    """Every rank's bytes, under supervision: (list of n uint8 arrays, []) or (None, bad ranks).

    `data` is this rank's uint8 payload, or None when it has none to give (it could
    not be produced, e.g. an unpicklable object): then every rank gets (None, the
    ranks that gave None), so a failure on one rank is seen by all in the same call.
    The lengths travel first, then the bytes (MPI_Iallgatherv, or one broadcast per
    rank when a count would pass 2**31 - 1).
    """
    n = chan.size
    lengths = np.empty(n, np.int64)
    mine = np.array([-1 if data is None else data.size], np.int64)
    chan.count(8, 8 * (n - 1))
    chan.wait([chan.comm.Iallgather(mine, lengths)], f"{what} (lengths)")
    bad = [r for r in range(n) if lengths[r] < 0]
    if bad:
        return None, bad
    displs = np.concatenate(([0], np.cumsum(lengths)[:-1])).astype(np.int64)
    recv = np.empty(int(lengths.sum()), np.uint8)
    if int(lengths.sum()) <= MAX_MESSAGE_BYTES:
        req = chan.comm.Iallgatherv([data, MPI.BYTE], [recv, (lengths, displs), MPI.BYTE])
        chan.count(data.size, int(lengths.sum()) - data.size)
        chan.wait([req], what)
    else:
        for r in range(n):
            part = recv[displs[r]:displs[r] + lengths[r]]
            if r == chan.rank:
                part[...] = data
            bcast_bytes(chan, part, r, what)
    return [recv[displs[r]:displs[r] + lengths[r]] for r in range(n)], []
