"""Allgather (uneven counts) as algorithms: ring, node-local shared memory, native MPI_Allgatherv.

Every runner has one signature, ``run(chan, send, recv, counts, displs)``: `send`
is this rank's flat uint8 bytes, `recv` the flat uint8 result, and rank j's bytes
land in ``recv[displs[j]:displs[j] + counts[j]]``. Every rank knows every count
before the call (the runtime exchanges them in the agreement round), so MPI only
moves bytes and any dtype works. Nothing is reduced: all ranks end with the same
bytes by construction.

- ``ring``: n - 1 hops; at hop h rank r sends block (r - h) to its right and
  receives block (r - h - 1) from its left, straight into `recv`.
- ``shm``: in blocks of :data:`BLOCK_BYTES`, every rank copies its bytes into
  its slot of the channel's shared window; one barrier; every rank copies the
  peers' slots out. The slots' two halves alternate per block, as for the shm
  allreduce, so no trailing barrier is needed.
- ``mpi``: MPI_Allgatherv; blocking once the agreement round has shown every
  rank in this call (``agreed``), supervised MPI_Iallgatherv otherwise.

The ring and mpi runners hand device (cupy) buffers to a CUDA-aware MPI as
they are; ``shm`` works in a host window and falls back to the ring when the
ranks do not share a node or the buffers live on a device.

Example::

    from ringreduce.algorithms import allgatherv
    allgatherv.ring(chan, send, recv, counts, displs)
"""
from __future__ import annotations

import numpy as np

from ..core import device, timeline
from ..core.mpi import MPI
from ..transport import p2p
from . import shm

__all__ = ["ring", "shared", "native", "run_shm", "BLOCK_BYTES"]

# Bytes per rank and block through the shared window (cache-sized, like the shm allreduce's).
BLOCK_BYTES = 1 << 20
_TAG = 73


def _own(chan, send, recv, displs) -> None:
    lo = int(displs[chan.rank])
    if send.size:
        recv[lo:lo + send.size] = send
        if type(recv) is not np.ndarray:
            device.synchronize(recv)      # the stream rule: MPI reads recv next


def ring(chan, send, recv, counts, displs) -> None:
    """Ring allgather: n - 1 neighbour exchanges, each block forwarded as it arrives."""
    n, r = chan.size, chan.rank
    _own(chan, send, recv, displs)
    if n == 1:
        return
    right, left = (r + 1) % n, (r - 1) % n
    for h in range(n - 1):
        out_b, in_b = (r - h) % n, (r - h - 1) % n
        so, si = int(displs[out_b]), int(displs[in_b])
        reqs = (p2p.irecv(chan, recv[si:si + int(counts[in_b])], left, _TAG)
                + p2p.isend(chan, recv[so:so + int(counts[out_b])], right, _TAG))
        p2p.waitall(chan, reqs, "ring allgather")


def native(chan, send, recv, counts, displs, agreed: bool = False) -> None:
    """MPI_Allgatherv of the bytes (one broadcast per rank when a count would pass 2**31 - 1)."""
    total = int(counts.sum())
    me = chan.rank
    if total > p2p.MAX_MESSAGE_BYTES:
        _own(chan, send, recv, displs)
        for j in range(chan.size):
            lo = int(displs[j])
            p2p.bcast_bytes(chan, recv[lo:lo + int(counts[j])], j, "allgather (native, per rank)")
        return
    chan.count(int(counts[me]), total - int(counts[me]))
    sendbuf, recvbuf = [send, MPI.BYTE], [recv, (counts, displs), MPI.BYTE]
    if agreed:
        chan.comm.Allgatherv(sendbuf, recvbuf)
    else:
        chan.wait([chan.comm.Iallgatherv(sendbuf, recvbuf)], "native MPI_Allgatherv")


def shared(chan, send, recv, counts, displs) -> None:
    """Allgather through the channel's shared window (every rank on one node, host buffers)."""
    n, r = chan.size, chan.rank
    _own(chan, send, recv, displs)
    largest = int(counts.max()) if n else 0
    if n == 1 or largest == 0:
        return
    win = shm.window(chan)
    step = min(BLOCK_BYTES, largest)
    views = win.views(np.uint8, step)
    t0 = timeline.now() if timeline.on else 0
    for start in range(0, largest, step):
        slots = views[win.next_parity()]
        mine = send[start:start + step]
        if mine.size:
            slots[r][:mine.size] = mine
        win.sync()
        for j in range(n):
            if j == r:
                continue
            k = min(step, int(counts[j]) - start)
            if k > 0:
                lo = int(displs[j]) + start
                recv[lo:lo + k] = slots[j][:k]
    if t0:
        timeline.complete("shm allgather", t0, {"bytes": int(counts.sum())})


def run_shm(chan, send, recv, counts, displs) -> None:
    """The "shm" runner: the shared window when usable, else the ring."""
    if type(send) is np.ndarray and shm.usable(chan):
        shared(chan, send, recv, counts, displs)
    else:
        ring(chan, send, recv, counts, displs)
