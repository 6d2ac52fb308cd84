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
