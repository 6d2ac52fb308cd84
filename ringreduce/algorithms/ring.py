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
PRE_TAG = 72      # the first segment, sent before the fingerprints are compared (allreduce's agreed=)


def first_messages(n: int, r: int) -> tuple[int, int]:
    """(to, from): the peers of the first segment rank r sends and receives before agreeing."""
    return (r + 1) % n, (r - 1) % n


def first_segment_bytes(count: int, itemsize: int, n: int) -> int:
    """Bytes of the largest first segment of a ring allreduce of `count` elements on n ranks."""
    largest = -(-count // n)
    nseg = max(1, -(-largest * itemsize // SEGMENT_BYTES))
    return -(-largest // nseg) * itemsize


def allreduce(chan, buf: np.ndarray, op: ReduceOp, agreed=None) -> None:
    """Ring-allreduce the flat contiguous array `buf` in place over chan.comm.

    With `agreed` (the mismatch check's round, started by the caller), the first
    segment goes out and its receive is posted before ``agreed(recv, send)``
    finishes the round, so the round's latency overlaps data instead of preceding
    it; nothing received is used before it returns, and on a mismatch it raises
    after settling those two messages (runtime.agree.settle_early).
    """
    n = chan.size
    if n == 1 or buf.size == 0:
        if agreed is not None:
            agreed([], [])
        finish_average(op, buf, n)
        return
    bounds = chunk_bounds(buf.size, n)
    _Ring(chan, buf, op, bounds[:-1], bounds[1:], 2 * (n - 1)).run(agreed)


def reduce_scatter(chan, buf: np.ndarray, op: ReduceOp, offsets: np.ndarray) -> None:
    """Ring reduce-scatter: rank r ends with the reduced buf[offsets[r]:offsets[r+1]], in place.

    The other parts of buf hold partial sums afterwards. `offsets` (n + 1, ascending)
    may split buf unevenly. After n-1 hops rank r holds the finished chunk (r+1) % n,
    so chunk c is rank (c-1)'s part.
    """
    n = chan.size
    if n == 1 or buf.size == 0:
        finish_average(op, buf, n)
        return
    owner = [(c - 1) % n for c in range(n)]
    starts = np.array([offsets[o] for o in owner], np.int64)
    stops = np.array([offsets[o + 1] for o in owner], np.int64)
    _Ring(chan, buf, op, starts, stops, n - 1).run()


class _Ring:
    """One ring pass: `hops` hops, each moving every segment of one chunk to the right.

    Hop h < n-1 (reduce-scatter) receives chunk (r-h-1) into scratch and adds it in;
    the later hops (allgather) receive finished chunks straight into buf. Chunk c is
    buf[starts[c]:stops[c]].
    """

    def __init__(self, chan, buf: np.ndarray, op: ReduceOp, starts, stops, hops: int):
        self.chan, self.buf, self.op = chan, buf, op
        n, r = self.n, self.r = chan.size, chan.rank
        self.right, self.left = (r + 1) % n, (r - 1) % n
        self.starts = starts
        self.largest = largest = int((stops - starts).max())
        self.nseg = nseg = max(1, -(-largest * buf.itemsize // SEGMENT_BYTES))
        # seg_bounds[c] = element offsets of chunk c's segments (absolute in buf)
        if nseg == 1:    # small messages: no per-chunk arithmetic
            self.seg_bounds = [(int(a), int(b)) for a, b in zip(starts, stops)]
        else:
            self.seg_bounds = [chunk_bounds(int(stops[c] - starts[c]), nseg) + starts[c]
                               for c in range(n)]
        self.scratch = chan.pool.get("ring", buf.dtype, 2 * largest)   # two halves, by hop parity
        self.hops = hops
        self.pending_sends: dict[tuple[int, int], list] = {}

    def segment(self, c: int, k: int) -> np.ndarray:
        sb = self.seg_bounds[c]
        return self.buf[sb[k]:sb[k + 1]]

    def scratch_segment(self, h: int, c: int, k: int) -> np.ndarray:
        sb = self.seg_bounds[c]
        lo = sb[k] - self.starts[c] + (h % 2) * self.largest
        return self.scratch[lo:lo + sb[k + 1] - sb[k]]

    def post_recv(self, h: int, k: int) -> list:
        c = (self.r - h - 1) % self.n
        if h < self.n - 1:
            return irecv(self.chan, self.scratch_segment(h, c, k), self.left, _TAG)
        # Allgather hops land straight in buf: first let our own earlier send of it finish.
        waitall(self.chan, self.pending_sends.pop((c, k), []))
        return irecv(self.chan, self.segment(c, k), self.left, _TAG)

    def post_send(self, h: int, k: int, tag: int = _TAG) -> list:
        c = (self.r - h) % self.n
        reqs = isend(self.chan, self.segment(c, k), self.right, tag)
        self.pending_sends.setdefault((c, k), []).extend(reqs)
        return reqs

    def run(self, agreed=None) -> None:
        n, nseg, op = self.n, self.nseg, self.op
        t0 = timeline.now() if timeline.on else 0
        if agreed is not None:
            # Our own first segment needs no agreement to leave; received ones wait for it.
            first = irecv(self.chan, self.scratch_segment(0, (self.r - 1) % n, 0), self.left, PRE_TAG)
            agreed(first, self.post_send(0, 0, PRE_TAG))
            recvs = [first] + [self.post_recv(0, k) for k in range(1, nseg)]
            for k in range(1, nseg):
                self.post_send(0, k)
        else:
            recvs = [self.post_recv(0, k) for k in range(nseg)]
            for k in range(nseg):
                self.post_send(0, k)
        for h in range(self.hops):
            c = (self.r - h - 1) % n
            upcoming = []
            for k in range(nseg):
                waitall(self.chan, recvs[k])
                if h < n - 1:
                    reduce_into(op, self.segment(c, k), self.scratch_segment(h, c, k))
                    if h == n - 2:
                        finish_average(op, self.segment(c, k), n)
                if h + 1 < self.hops:        # forward at once: the next transfer overlaps
                    upcoming.append(self.post_recv(h + 1, k))
                    self.post_send(h + 1, k)
            recvs = upcoming
            if t0 and h == n - 2 and self.hops > n - 1:
                timeline.complete("ring reduce-scatter", t0, {"bytes": self.buf.nbytes, "segments": nseg})
                t0 = timeline.now()
        for reqs in self.pending_sends.values():
            waitall(self.chan, reqs)
        if t0:
            phase = "ring allgather" if self.hops > n - 1 else "ring reduce-scatter"
            timeline.complete(phase, t0, {"bytes": self.buf.nbytes, "segments": nseg})
