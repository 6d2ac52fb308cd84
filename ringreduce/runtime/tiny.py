"""The tiny path: "auto" allreduces up to 4 KiB of host data in one row exchange and one to three C++ calls.

It makes exactly the call the general path makes for "auto" at this size (same
fingerprint, payload piggybacked in the agreement's own allgather, rows
reduced in rank order with the same arithmetic as numpy), with the per-call
work done in C++: over rows in shared memory one call (``_C.small_allreduce``:
pack, handshake, compare, reduce), over MPI rows ``_C.small_pack`` then
``_C.small_same`` and ``_C.small_reduce``: at a few bytes, Python object work
would cost several times the MPI call.

Rows in shared memory hold all 4 KiB. Over MPI, past the row (2 KiB up to 8 ranks),
a second allgather carries the rest, posted only once the rows have shown that
every rank sends the same count.

The fingerprint layout is agree.HEADER; the C++ packer writes the same bytes,
which is asserted at import (``_assert_same_layout``).
"""
from __future__ import annotations

import numpy as np

from ..compression import kernels
from ..core import config, timeline
from ..core.dtypes import SUPPORTED_DTYPES
from ..core.errors import RingReduceError
from ..core.ops import Average, ReduceOp
from . import agree

__all__ = ["REACH", "allreduce", "TinyRows"]

# The tiny path's reach: one row (always, in shared memory), or a row and a second allgather.
REACH = agree.SHARED_PAYLOAD

# dtype -> (fingerprint code, kernel code, integer?); op -> (code, kernel op, average?).
_DTYPES = {dt: (code, kernels._NP_DT[dt], dt.kind in "iu") for dt, code in SUPPORTED_DTYPES.items()}
_KERNEL_OP = {ReduceOp.SUM: "sum", ReduceOp.AVERAGE: "sum", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}
_OPS = {key: (int(op), kernels._OPS[_KERNEL_OP[op]], op == Average)
        for op in ReduceOp if op in _KERNEL_OP for key in (op, int(op))}   # Product: general path
_AUTO_HASH = agree._hash("allgather")
_SHAPE_HASHES: dict = {}


class TinyRows:
    """The tiny path's buffers: the channel's fingerprint rows (agree.Rows) and the tail.

    Each call makes the very exchange that agree.exchange makes (Rows.begin, Rows.post),
    so it matches whatever another rank does at that call (a persistent request would not).
    """

    def __init__(self, chan):
        self.own = own = agree.rows_of(chan)
        self.width = own.width
        self.limit = self.width - agree.HEADER_BYTES
        extra = max(REACH - self.limit, 0)
        self.tail = np.zeros(extra, np.uint8)
        self.rest = np.zeros(chan.size * extra, np.uint8)
        self.tails: dict = {}      # tail bytes -> (send view, receive view): sizes repeat

    def tail_views(self, nbytes: int, n: int):
        views = self.tails.get(nbytes)
        if views is None:
            views = self.tails[nbytes] = (self.tail[:nbytes], self.rest[:n * nbytes])
        return views


def allreduce(chan, x: np.ndarray, op, name, inplace: bool, out, raise_mismatch):
    """The tiny allreduce of host array x, or None to take the general path.

    `raise_mismatch(chan, table, x, op, name, seq)` raises the agreement error.
    """
    codes = _DTYPES.get(x.dtype)
    ops = _OPS.get(op)
    rows = chan.tiny
    if rows is None:
        if kernels._C is None or chan.plan is None:
            return None
        rows = chan.tiny = TinyRows(chan)
    nbytes = x.nbytes
    if (codes is None or ops is None or not x.flags.c_contiguous or nbytes > REACH
            or (ops[2] and codes[2]) or (inplace and not x.flags.writeable) or timeline.on):
        return None
    if config.algorithm_override() not in (None, "auto"):
        return None
    if out is not None and (type(out) is not np.ndarray or out.shape != x.shape
                            or out.dtype != x.dtype or not out.flags.c_contiguous
                            or not out.flags.writeable):
        return None           # the general path explains what is wrong with `out`
    shape_hash = _SHAPE_HASHES.get(x.shape)
    if shape_hash is None:
        shape_hash = agree._hash(x.shape)
        if len(_SHAPE_HASHES) < 4096:
            _SHAPE_HASHES[x.shape] = shape_hash
    seq = chan.next_seq()
    C = kernels._C
    tail = rest = None
    if nbytes > rows.limit:
        tail, rest = rows.tail_views(nbytes - rows.limit, chan.size)
    own = rows.own
    send = own.begin()
    name_hash = 0 if name is None else agree._hash(name)
    shared = own.fused() if tail is None else None
    buf = x if inplace else out if out is not None else np.empty_like(x)
    if shared is not None:
        # Rows in shared memory: pack, handshake, compare and reduce in one C++ call
        # (the reduction writes the result only once every header matched).
        n = chan.size
        chan.count(rows.width, (n - 1) * rows.width)
        state = C.small_allreduce(send, x, seq, codes[0], ops[0], _AUTO_HASH, name_hash, shape_hash,
                                  shared.flags_at, shared.stride, n, shared.rank, shared.calls,
                                  shared.polls, own.recv, rows.width, buf, codes[1], ops[1], ops[2])
        if state == 1:                  # the peers are late: the supervised wait, then the rest
            own.wait_arrival(chan, seq, 1, name)
            state = 0 if C.small_finish(own.recv, rows.width, n, buf, codes[1], ops[1], ops[2]) else 2
        if state == 0:
            return buf
    else:
        C.small_pack(send, x, seq, codes[0], ops[0], _AUTO_HASH, name_hash, shape_hash, tail)
        own.post(chan, seq, 1, name)
    recv = own.recv
    if shared is not None or not C.small_same(recv, rows.width, chan.size):
        table = own.headers(chan.size)
        # With the check off, names and shapes may differ; counts and dtypes never
        # may: a second allgather would not match (a hang, not an error). Every rank
        # sees the same table, so every rank takes the same branch.
        if agree.enabled() or not agree.all_same(table[:, 2:4].copy()):
            raise_mismatch(chan, table, x, ReduceOp(ops[0]), name, seq)
    if tail is not None:
        chan.count(tail.size, (chan.size - 1) * tail.size)
        agree.finish(chan, chan.comm.Iallgather(tail, rest), seq, 1, name)
    C.small_reduce(recv, rows.width, chan.size, buf, codes[1], ops[1], ops[2], rest)
    return buf


def _assert_same_layout() -> None:
    """The C++ packer writes agree's fingerprint layout (a changed field order fails here)."""
    if kernels._C is None:
        return
    row = np.zeros(agree.HEADER_BYTES + 8, np.uint8)
    x = np.arange(2, dtype=np.float32)
    kernels._C.small_pack(row, x, 7, _DTYPES[x.dtype][0], 1, _AUTO_HASH, 11, 13, None)
    want = agree.fingerprint(7, "allreduce", 2, _DTYPES[x.dtype][0], 1, "allgather", None, (), None).copy()
    got = row[:agree.HEADER_BYTES].view(np.int64).copy()
    want[6], want[7] = 11, 13           # name and shape hashes as passed above
    if not np.array_equal(got, want):
        raise RingReduceError(f"the C++ tiny path packs fingerprints as {got.tolist()}, agree.py "
                              f"as {want.tolist()}: rebuild the extension (pip install -e .)")


_assert_same_layout()
