"""Ring allreduce: reduce-scatter, then allgather, pipelined by segments.

The buffer is split into n chunks (balanced to within one element) and each chunk
into m segments. A segment travels around the ring hop by hop: for the first
n-1 hops every rank adds what it receives to its own copy and forwards the sum;
after them one rank holds the finished segment, which then makes n-1 more hops
as a plain copy. Every hop of a segment is forwarded as soon as that segment is
done, so the next transfer is in flight while this one is being reduced.

Each finished chunk is computed on exactly one rank and copied to the others,
so all ranks end with identical bits.

Timeline: "ring reduce-scatter" covers the first n-1 hops, "ring allgather"
the rest (the allgather's first sends start as the last reduction ends).
"""
from __future__ import annotations

import numpy as np

from ..core import timeline
from ..core.ops import ReduceOp, finish_average, reduce_into
from ..transport.p2p import chunk_bounds, irecv, isend, waitall

# Bytes per pipeline segment: large enough to amortise Python's per-message cost,
# small enough to keep several transfers in flight. The cost model may tune it.
SEGMENT_BYTES = 1 << 18
_TAG = 71


def allreduce(chan, buf: np.ndarray, op: ReduceOp) -> None:
    """Ring-allreduce the flat contiguous array `buf` in place over chan.comm."""
    n, r = chan.size, chan.rank
    count = buf.size
    if n == 1 or count == 0:
        finish_average(op, buf, n)
        return
    right, left = (r + 1) % n, (r - 1) % n
    bounds = chunk_bounds(count, n)
    largest = int(bounds[1] - bounds[0])
    nseg = max(1, -(-largest * buf.itemsize // SEGMENT_BYTES))
    # seg_bounds[c] = element offsets of chunk c's segments (absolute in buf)
    seg_bounds = [chunk_bounds(int(bounds[c + 1] - bounds[c]), nseg) + bounds[c] for c in range(n)]
    scratch = chan.pool.get("ring", buf.dtype, 2 * largest)   # two halves, alternating by hop
    hops = 2 * (n - 1)
    pending_sends: dict[tuple[int, int], list] = {}
    t0 = timeline.now() if timeline.on else 0

    def segment(c: int, k: int) -> np.ndarray:
        return buf[seg_bounds[c][k]:seg_bounds[c][k + 1]]

    def scratch_segment(h: int, c: int, k: int) -> np.ndarray:
        lo = seg_bounds[c][k] - bounds[c] + (h % 2) * largest
        return scratch[lo:lo + seg_bounds[c][k + 1] - seg_bounds[c][k]]

    def post_recv(h: int, k: int) -> list:
        c = (r - h - 1) % n
        if h < n - 1:
            return irecv(chan, scratch_segment(h, c, k), left, _TAG)
        # Allgather hops land straight in buf: first let our own earlier send of it finish.
        waitall(chan, pending_sends.pop((c, k), []))
        return irecv(chan, segment(c, k), left, _TAG)

    def post_send(h: int, k: int) -> None:
        c = (r - h) % n
        pending_sends.setdefault((c, k), []).extend(isend(chan, segment(c, k), right, _TAG))

    recvs = [post_recv(0, k) for k in range(nseg)]
    for k in range(nseg):
        post_send(0, k)
    for h in range(hops):
        c = (r - h - 1) % n
        upcoming = []
        for k in range(nseg):
            waitall(chan, recvs[k])
            if h < n - 1:
                reduce_into(op, segment(c, k), scratch_segment(h, c, k))
                if h == n - 2:
                    finish_average(op, segment(c, k), n)
            if h + 1 < hops:
                upcoming.append(post_recv(h + 1, k))
                post_send(h + 1, k)
        recvs = upcoming
        if t0 and h == n - 2:
            timeline.complete("ring reduce-scatter", t0, {"bytes": buf.nbytes, "segments": nseg})
            t0 = timeline.now()
    for reqs in pending_sends.values():
        waitall(chan, reqs)
    if t0:
        timeline.complete("ring allgather", t0, {"bytes": buf.nbytes, "segments": nseg})
