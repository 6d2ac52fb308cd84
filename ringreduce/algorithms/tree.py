"""Tree allreduce: recursive doubling, latency-optimal for small messages.

log2(p) exchange rounds between partners whose ranks differ in one bit. For a
rank count that is not a power of two, the first 2*(n-p) ranks fold in pairs
first (the even one hands its data to its odd neighbour and gets the result back
at the end). In every exchange both partners compute op(lower rank's data,
higher rank's data), so all ranks hold identical bits.
"""
from __future__ import annotations

import numpy as np

from ..ops import ReduceOp, finish_average, reduce_into
from ._transfer import irecv, isend, sendrecv, waitall

_TAG = 72


def allreduce(chan, buf: np.ndarray, op: ReduceOp) -> None:
    """Recursive-doubling allreduce of the flat contiguous array `buf`, in place."""
    comm, n, r = chan.comm, chan.size, chan.rank
    if n == 1 or buf.size == 0:
        finish_average(op, buf, n)
        return
    p = 1 << (n.bit_length() - 1)
    extra = n - p
    tmp = chan.pool.get("tree", buf.dtype, buf.size)

    if r < 2 * extra:
        if r % 2 == 0:   # folded away: hand over the data, receive the answer
            waitall(isend(comm, buf, r + 1, _TAG))
            waitall(irecv(comm, buf, r + 1, _TAG))
            return
        waitall(irecv(comm, tmp, r - 1, _TAG))
        reduce_into(op, buf, tmp, src_first=True)
        vrank = r // 2
    else:
        vrank = r - extra

    def real(v: int) -> int:
        return 2 * v + 1 if v < extra else v + extra

    mask = 1
    while mask < p:
        peer = real(vrank ^ mask)
        sendrecv(comm, buf, peer, tmp, peer, _TAG)
        reduce_into(op, buf, tmp, src_first=peer < r)
        mask <<= 1
    finish_average(op, buf, n)
    if r < 2 * extra:
        waitall(isend(comm, buf, r - 1, _TAG))
