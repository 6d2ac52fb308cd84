"""Tree allreduce: recursive doubling, latency-optimal for small messages, pipelined for large.

log2(p) exchange rounds between partners whose ranks differ in one bit. For a
rank count that is not a power of two, the first 2*(n-p) ranks fold in pairs
first (the even one hands its data to its odd neighbour and gets the result back
at the end). In every exchange both partners compute op(lower rank's data,
higher rank's data), so all ranks hold identical bits. Large messages are
exchanged in segments, each reduced as soon as it arrives while the later ones
are still moving.

Timeline: "tree fold" (ranks folded away hand over their data), one "tree
exchange" per recursive-doubling round (args: round, peer), "tree unfold".
"""
from __future__ import annotations

import numpy as np

from ..core import timeline
from ..core.ops import ReduceOp, finish_average, reduce_into
from ..transport.p2p import irecv, isend, sendrecv, waitall

_TAG = 72
# Large messages are exchanged in segments of this many bytes, so reducing one
# segment overlaps the transfer of the next ones (a pipelined recursive doubling).
SEGMENT_BYTES = 1 << 18


def _exchange_reduce(chan, buf: np.ndarray, tmp: np.ndarray, peer: int, op: ReduceOp,
                     src_first: bool) -> None:
    """buf = op(buf, peer's buf) segment by segment, each reduced as soon as it has arrived.

    A segment of buf is overwritten only once our own send of it has completed.
    """
    step = max(1, SEGMENT_BYTES // buf.itemsize)
    if buf.size <= step:
        sendrecv(chan, buf, peer, tmp, peer, _TAG)
        reduce_into(op, buf, tmp, src_first=src_first)
        return
    spans = [(lo, min(lo + step, buf.size)) for lo in range(0, buf.size, step)]
    recvs = [irecv(chan, tmp[lo:hi], peer, _TAG) for lo, hi in spans]
    sends = [isend(chan, buf[lo:hi], peer, _TAG) for lo, hi in spans]
    for (lo, hi), rq, sq in zip(spans, recvs, sends):
        waitall(chan, rq + sq)
        reduce_into(op, buf[lo:hi], tmp[lo:hi], src_first=src_first)


def allreduce(chan, buf: np.ndarray, op: ReduceOp) -> None:
    """Recursive-doubling allreduce of the flat contiguous array `buf`, in place."""
    n, r = chan.size, chan.rank
    if n == 1 or buf.size == 0:
        finish_average(op, buf, n)
        return
    p = 1 << (n.bit_length() - 1)
    extra = n - p
    tmp = chan.pool.get("tree", buf.dtype, buf.size)
    t0 = timeline.now() if timeline.on else 0

    if r < 2 * extra:
        if r % 2 == 0:   # folded away: hand over the data, receive the answer
            waitall(chan, isend(chan, buf, r + 1, _TAG))
            if t0:
                timeline.complete("tree fold", t0, {"bytes": buf.nbytes, "peer": r + 1})
                t0 = timeline.now()
            waitall(chan, irecv(chan, buf, r + 1, _TAG))
            if t0:
                timeline.complete("tree unfold", t0, {"bytes": buf.nbytes, "peer": r + 1})
            return
        waitall(chan, irecv(chan, tmp, r - 1, _TAG))
        reduce_into(op, buf, tmp, src_first=True)
        vrank = r // 2
        if t0:
            timeline.complete("tree fold", t0, {"bytes": buf.nbytes, "peer": r - 1})
    else:
        vrank = r - extra

    def real(v: int) -> int:
        return 2 * v + 1 if v < extra else v + extra

    mask = 1
    while mask < p:
        peer = real(vrank ^ mask)
        if t0:
            t0 = timeline.now()
        _exchange_reduce(chan, buf, tmp, peer, op, src_first=peer < r)
        if t0:
            timeline.complete("tree exchange", t0, {"bytes": buf.nbytes, "round": mask.bit_length(),
                                                    "peer": peer})
        mask <<= 1
    finish_average(op, buf, n)
    if r < 2 * extra:
        if t0:
            t0 = timeline.now()
        waitall(chan, isend(chan, buf, r - 1, _TAG))
        if t0:
            timeline.complete("tree unfold", t0, {"bytes": buf.nbytes, "peer": r - 1})
