"""Tree allreduce: recursive doubling, latency-optimal for small messages, pipelined for large.

log2(p) exchange rounds between partners whose ranks differ in one bit. For a
rank count that is not a power of two, the first 2*(n-p) ranks fold in pairs
first (the even one hands its data to its odd neighbour and gets the result back
at the end). In every exchange both partners compute op(lower rank's data,
higher rank's data), so all ranks hold identical bits. Large messages are
exchanged in segments, each reduced as soon as it arrives while the later ones
are still moving.

With `agreed` (the mismatch check's round over MPI, started by the caller), the
first segment of each rank's first message leaves, and its receive is posted,
before ``agreed(recv, send)`` finishes the round: the round's latency overlaps the
first exchange instead of preceding it, and nothing received is used before it
returns (runtime.agree.settle_early consumes those messages on a mismatch).

Timeline: "tree fold" (ranks folded away hand over their data), one "tree
exchange" per recursive-doubling round (args: round, peer), "tree unfold".
"""
from __future__ import annotations

import numpy as np

from ..core import timeline
from ..core.ops import ReduceOp, finish_average, reduce_into
from ..transport.p2p import irecv, isend, sendrecv, waitall

_TAG = 72
PRE_TAG = 74      # the first segment of the first message, sent before the fingerprints are compared
# Large messages are exchanged in segments of this many bytes, so reducing one
# segment overlaps the transfer of the next ones (a pipelined recursive doubling).
SEGMENT_BYTES = 1 << 18


def _step(itemsize: int) -> int:
    """Elements per segment."""
    return max(1, SEGMENT_BYTES // itemsize)


def first_messages(n: int, r: int) -> tuple[int | None, int | None]:
    """(to, from): the peers of the first message rank r sends and receives, when it can
    post them before reducing anything (None: it cannot).

    A folded-away rank sends its data to its odd neighbour, which receives it; other
    ranks exchange with their first-round partner, unless that partner is a folded
    odd rank (it has to reduce the fold first).
    """
    p = 1 << (n.bit_length() - 1)
    extra = n - p
    if n == 1:
        return None, None
    if r < 2 * extra:
        return (r + 1, None) if r % 2 == 0 else (None, r - 1)
    partner = (r - extra) ^ 1
    if partner < extra:
        return None, None
    return partner + extra, partner + extra


def first_segment_bytes(count: int, itemsize: int, n: int) -> int:
    """Bytes of the first segment of the first message of a tree allreduce of `count` elements."""
    return min(count, _step(itemsize)) * itemsize


def _post_first(chan, buf: np.ndarray, tmp: np.ndarray, n: int, r: int) -> tuple[list, list]:
    """Post the first segment of this rank's first send and receive (tag PRE_TAG)."""
    to, frm = first_messages(n, r)
    step = min(_step(buf.itemsize), buf.size)
    recv = irecv(chan, tmp[:step], frm, PRE_TAG) if frm is not None else []
    send = isend(chan, buf[:step], to, PRE_TAG) if to is not None else []
    return recv, send


def _spans(buf: np.ndarray) -> list[tuple[int, int]]:
    step = _step(buf.itemsize)
    return [(lo, min(lo + step, buf.size)) for lo in range(0, buf.size, step)]


def _post(chan, post, buf: np.ndarray, peer: int, spans, first: list | None) -> list[list]:
    """post(chan, buf[span], peer, tag) for every span; the first one already posted when given."""
    if first is not None:
        return [first] + [post(chan, buf[lo:hi], peer, _TAG) for lo, hi in spans[1:]]
    return [post(chan, buf[lo:hi], peer, _TAG) for lo, hi in spans]


def _exchange_reduce(chan, buf: np.ndarray, tmp: np.ndarray, peer: int, op: ReduceOp,
                     src_first: bool, first: tuple[list, list] | None = None) -> None:
    """buf = op(buf, peer's buf) segment by segment, each reduced as soon as it has arrived.

    A segment of buf is overwritten only once our own send of it has completed.
    `first`: the (receive, send) requests of the first segment, posted before agreeing.
    """
    if buf.size <= _step(buf.itemsize) and first is None:
        sendrecv(chan, buf, peer, tmp, peer, _TAG)
        reduce_into(op, buf, tmp, src_first=src_first)
        return
    spans = _spans(buf)
    recvs = _post(chan, irecv, tmp, peer, spans, first and first[0])
    sends = _post(chan, isend, buf, peer, spans, first and first[1])
    for (lo, hi), rq, sq in zip(spans, recvs, sends):
        waitall(chan, rq + sq)
        reduce_into(op, buf[lo:hi], tmp[lo:hi], src_first=src_first)


def allreduce(chan, buf: np.ndarray, op: ReduceOp, agreed=None) -> None:
    """Recursive-doubling allreduce of the flat contiguous array `buf`, in place.

    `agreed(recv, send)`: finish the mismatch check's round once the first segment
    is in flight (see the module's docstring); it raises on a mismatch.
    """
    n, r = chan.size, chan.rank
    if n == 1 or buf.size == 0:
        if agreed is not None:
            agreed([], [])
        finish_average(op, buf, n)
        return
    p = 1 << (n.bit_length() - 1)
    extra = n - p
    tmp = chan.pool.get("tree", buf.dtype, buf.size)
    first = None
    if agreed is not None:
        recv, send = _post_first(chan, buf, tmp, n, r)
        agreed(recv, send)
        first = (recv, send) if recv or send else None
    t0 = timeline.now() if timeline.on else 0

    if r < 2 * extra:
        # The fold is one message, or segments when its first one went before agreeing.
        spans = _spans(buf) if first is not None else [(0, buf.size)]
        if r % 2 == 0:   # folded away: hand over the data, receive the answer
            for reqs in _post(chan, isend, buf, r + 1, spans, first and first[1]):
                waitall(chan, reqs)
            if t0:
                timeline.complete("tree fold", t0, {"bytes": buf.nbytes, "peer": r + 1})
                t0 = timeline.now()
            waitall(chan, irecv(chan, buf, r + 1, _TAG))
            if t0:
                timeline.complete("tree unfold", t0, {"bytes": buf.nbytes, "peer": r + 1})
            return
        for reqs in _post(chan, irecv, tmp, r - 1, spans, first and first[0]):
            waitall(chan, reqs)
        reduce_into(op, buf, tmp, src_first=True)
        first = None
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
        _exchange_reduce(chan, buf, tmp, peer, op, src_first=peer < r, first=first)
        first = None
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
