"""Allgather-reduce for tiny messages: one collective call, then a local reduction.

Every rank gathers all n payloads and reduces them in rank order, so the result
is identical everywhere. With the mismatch check on, the payload rides in the
same message as the call's fingerprint (see runtime.agree.exchange), which makes the
check free for the smallest, latency-bound calls.
"""
from __future__ import annotations

import numpy as np

from ..core.mpi import MPI
from ..core.ops import ReduceOp, finish_average, reduce_into


def reduce_rows(rows: np.ndarray, buf: np.ndarray, op: ReduceOp) -> None:
    """buf = op over the n gathered payload rows (uint8, one per rank), in rank order."""
    flat = buf.reshape(-1)
    flat[...] = rows[0].view(buf.dtype)
    for i in range(1, rows.shape[0]):
        reduce_into(op, flat, rows[i].view(buf.dtype))
    finish_average(op, flat, rows.shape[0])


def piggyback_bytes(n: int) -> int:
    """Payload bytes that ride inside the fingerprint allgather on n ranks.

    Every fingerprint exchange on a communicator has one width, whatever the call,
    so ranks that disagree about the call still make matching MPI calls (never a
    truncation or a hang). Payloads up to this size travel inside it (the
    "allgather" algorithm): 2 KiB up to 8 ranks, then less, so that each rank
    receives at most 16 KiB per call however many ranks there are. Rows stay
    under the 4 KiB eager limit of Open MPI's shared-memory transport: measured
    on 2 ranks, a 2120-byte row took 1.4 us and a 4168-byte one 3.7 us.
    """
    width = _PIGGYBACK.get(n)
    if width is None:
        width = _PIGGYBACK[n] = max(256, min(2048, 16384 // max(n, 1)))
    return width


_PIGGYBACK: dict = {}


def allreduce(chan, buf: np.ndarray, op: ReduceOp) -> None:
    """Allgather every rank's bytes of `buf`, then reduce locally in place."""
    width = buf.nbytes
    if width == 0:
        return
    recv = chan.pool.get("ag-recv", np.uint8, chan.size * width)
    req = chan.comm.Iallgather([buf.reshape(-1).view(np.uint8), MPI.BYTE], [recv, MPI.BYTE])
    chan.count(width, (chan.size - 1) * width)
    chan.wait([req], "allgather-reduce")
    reduce_rows(recv.reshape(chan.size, width), buf, op)
