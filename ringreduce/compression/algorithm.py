"""The compressed allreduce: two-sided error feedback (int8/int4/onebit) and half-type rings.

Two-sided scheme, on n ranks, for a tensor split into n block-aligned chunks
(chunk j is owned by rank j):

1. scatter: every rank compresses (its tensor + its worker residual) chunk by
   chunk and sends chunk j to rank j as soon as it is packed (Isend), so the
   transfers run while the next chunk is being compressed;
2. reduce: the owner decompresses-and-accumulates the n pieces of its chunk in
   fp32, in rank order (so the sum is the same whoever computes it), divides
   by n for Average, and compresses the result with its own server residual
   (the division is done by the compress kernel as it reads the sum: x / n, then
   + residual, the same bits as dividing first);
3. gather: each owner sends its compressed chunk to every other rank, and every
   rank decompresses the same bytes into the output, so all ranks hold
   bit-identical results.

The three phases are pipelined: each chunk is cut into block-aligned segments
(SEGMENT_BYTES of input each, NODE_SEGMENT_BYTES when every rank is on one node;
at most MAX_SEGMENTS), and while segment k+1 is
compressed and on the wire, the owners reduce and re-compress segment k and send
it back, and every rank decompresses the results that have arrived. A slow link
then carries the scatter and the gather back to back instead of idling while the
owners reduce; segmentation changes neither blocks nor rounding, so the bits are
those of the unsegmented scheme.

Exactly two quantisations stand between the input and the output, whatever n.
Each rank sends about 2(n-1)/n of the compressed size. Chunks are whole blocks
(the last one may be short), so the block layout, and hence the worker's
compressed bytes, does not depend on n; stochastic rounding uses the element's
index in the tensor as the RNG offset for the same reason.

A block holding NaN/Inf decodes to NaN (the kernels' rule): it reaches the
output on every rank, and the kernels reset that block's residual, so it
never leaks into later calls. Such resets are counted and logged once per tensor.
"""
from __future__ import annotations

import time

import numpy as np

from ..algorithms import registry
from ..core.device import array_module
from ..core.dtypes import HALF_DTYPES
from ..core.errors import RingReduceError
from ..core.log import logger
from ..core.mpi import MPI
from ..core.ops import ReduceOp
from ..policy import plan as policy_plan
from ..transport.p2p import chunk_bounds, irecv, isend, waitall
from . import kernels
from . import stats as _stats
from .state import state_for

__all__ = ["TwoSided", "chunk_layout", "compressed_allreduce", "segment_layout", "validate"]

_TAG_SCATTER = 81
_TAG_GATHER = 82
_FLOATS = (np.dtype(np.float32),) + HALF_DTYPES


def _label(name) -> str:
    return f"tensor '{name}'" if name else "an unnamed tensor"


def validate(chan, flat: np.ndarray, op: ReduceOp, comp, name) -> None:
    if op not in (ReduceOp.SUM, ReduceOp.AVERAGE):
        raise RingReduceError(f"{chan.who}: op {op!r} is not supported with compression {comp!r} "
                              f"on {_label(name)}; use rr.Sum or rr.Average, or compression=None")
    if flat.dtype not in _FLOATS:
        raise RingReduceError(f"{chan.who}: compression {comp!r} needs a float32, float16 or bfloat16 "
                              f"tensor, but {_label(name)} is {flat.dtype}; use compression=None")
    if comp.error_feedback and not name:
        raise RingReduceError(
            f"{chan.who}: compression {comp!r} keeps error-feedback residuals per tensor, so the "
            "allreduce needs a stable name=... (or pass error_feedback=False)")
    if not kernels.available():
        try:   # the kernels module words the build hint
            kernels.compress(comp.format, np.zeros(0, np.float32), np.zeros(0, np.uint8))
        except RingReduceError as exc:
            raise RingReduceError(f"{chan.who}: compression {comp!r} of {_label(name)} needs the "
                                  f"C++ kernels: {exc}") from None


def chunk_layout(count: int, n: int, block_size: int) -> np.ndarray:
    """Element offsets (n + 1) of the n owner chunks: whole blocks, balanced to within one block."""
    nblocks = -(-count // block_size)
    return np.minimum(chunk_bounds(nblocks, n) * block_size, count)


def compressed_allreduce(chan, flat: np.ndarray, op: ReduceOp, algorithm: str, comp, name,
                         src: np.ndarray | None = None) -> None:
    """Reduce the flat float buffer in place with compression `comp` (Sum or Average).

    Called by the engine after the mismatch check; every rank gets the same bits.
    Out of place, ``src`` (flat, same dtype and size as ``flat``) holds the input and
    ``flat`` only receives the result: the first compression reads ``src`` directly,
    which saves copying the input into the result first. The bits are the same.

    Example::

        y = rr.allreduce(g, op=rr.Average, compression=rr.Compression.int8, name="w")
    """
    validate(chan, flat, op, comp, name)
    start = time.perf_counter()
    ts = state_for(chan).tensor(name, flat.size) if name else None
    calls = ts.calls if ts is not None else chan.seq
    if ts is not None:
        ts.calls += 1
    if src is not None and (src.dtype != flat.dtype or src.size != flat.size):
        raise RingReduceError(f"{chan.who}: the input of {_label(name)} ({src.dtype}, {src.size} "
                              f"elements) does not match its result ({flat.dtype}, {flat.size})")
    exact = _exact(chan, flat if src is None else src, op) if comp.measure_error else None
    if comp.two_sided:
        bad, used = _two_sided(chan, flat, op, comp, name, ts, calls, src), "two-sided"
        wire = 2 * (chan.size - 1) * comp.packed_nbytes(flat.size) / chan.size
    else:
        bad, used = _half_ring(chan, flat, op, algorithm, comp, name, ts, src)
        wire = _traffic(used, 2 * flat.size, chan.size)
    _after_nonfinite(chan, ts, name, bad, comp)
    _record(chan, flat, comp, name, ts, bad, wire, used, exact, time.perf_counter() - start)


# -- int8 / int4 / onebit ----------------------------------------------------------------

# Input bytes (fp32) per pipeline segment of an owner's chunk: small enough that the
# scatter of segment k+1 is on the wire while segment k is reduced and re-compressed,
# large enough that a segment's Python and MPI overheads (tens of microseconds) stay
# small against its compression and wire time.
SEGMENT_BYTES = 1 << 20
# ... and when every rank is on one node, where the "link" is memory and a process has no
# spare core to overlap a transfer with compression: fewer, larger steps (each wait that
# misses its spin costs a sleep on a loaded machine; one large message is one single-copy
# transfer). At np=2, 16 and 64 MiB, int8 with error feedback took 0.75-0.9x the time of
# 1 MiB segments with 16 MiB ones (4 interleaved launches, 1/4/8/16/32 MiB tried; see
# docs/compression.md); the bits do not change.
NODE_SEGMENT_BYTES = 16 << 20
# ... and at least this many packed bytes, so onebit's segments (1/28 of the input) do not
# shrink to messages whose per-segment overheads outweigh their wire time.
MIN_SEGMENT_PACKED = 1 << 18
MAX_SEGMENTS = 64


def segment_layout(bounds: np.ndarray, block_size: int, packed_per_element: float = 0.0,
                   segment_bytes: int | None = None) -> np.ndarray:
    """Element offsets (n, S + 1) of the S pipeline segments of each owner chunk.

    Segments are whole blocks, so every block (its scale, its rounding offsets) is
    the same as without segmentation: the result does not depend on S. S is the
    same for every chunk (set by the largest); a short chunk gets empty segments.
    A segment covers segment_bytes (default SEGMENT_BYTES) of fp32 input, or more
    when its packed form (packed_per_element bytes per element) would be under
    MIN_SEGMENT_PACKED.
    """
    sizes = np.diff(bounds)
    largest = int(sizes.max()) if sizes.size else 0
    per = max((SEGMENT_BYTES if segment_bytes is None else segment_bytes) // 4, block_size)
    if packed_per_element > 0:
        per = max(per, int(MIN_SEGMENT_PACKED / packed_per_element))
    S = max(1, min(MAX_SEGMENTS, -(-largest // per)))
    out = np.empty((sizes.size, S + 1), np.int64)
    for j in range(sizes.size):
        a, b = int(bounds[j]), int(bounds[j + 1])
        nblocks = -(-(b - a) // block_size)
        out[j] = np.minimum(a + chunk_bounds(nblocks, S) * block_size, b)
    return out


def _two_sided(chan, flat, op, comp, name, ts, calls, src=None) -> int:
    """The pipelined two-sided allreduce; returns the non-finite blocks met."""
    return TwoSided(chan, flat, op, comp, name, ts, calls, src).run()


class TwoSided:
    """One pipelined two-sided allreduce, as its steps: scatter, reduce, decode.

    Each owner chunk is cut into S block-aligned segments and the three phases run
    per segment, overlapped: round s compresses and sends segment s of every chunk
    (``scatter``), then reduces, re-compresses and sends back whichever of this
    rank's segments have all their pieces (``reduce_mine``), and decompresses
    whichever results have arrived (``decode``). Per segment the arithmetic is that
    of the unsegmented scheme (pieces accumulated in rank order, the same blocks,
    counters and offsets).
    """

    def __init__(self, chan, flat, op, comp, name, ts, calls, src=None):
        self.chan, self.flat, self.op, self.comp, self.name = chan, flat, op, comp, name
        self.x = flat if src is None else src      # the input (flat itself when in place)
        n, r = self.n, self.r = chan.size, chan.rank
        bounds = chunk_layout(flat.size, n, comp.block_size)
        B = comp.block_size
        ctx = chan.context
        one_node = ctx is not None and getattr(ctx, "num_nodes", 0) == 1
        self.segs = segs = segment_layout(bounds, B, comp.packed_nbytes(64 * B) / (64 * B),
                                          NODE_SEGMENT_BYTES if one_node else SEGMENT_BYTES)
        self.S = S = segs.shape[1] - 1
        psz = [[comp.packed_nbytes(int(segs[j, s + 1] - segs[j, s])) for s in range(S)]
               for j in range(n)]
        # Packed offsets of segment (j, s) in the by-owner buffers, and of my segments in a piece.
        self.off = off = np.concatenate(([0], np.cumsum([p for row in psz for p in row]))).astype(np.int64)
        self.lo, self.hi = lo, hi = int(bounds[r]), int(bounds[r + 1])
        self.moff = off[r * S:(r + 1) * S + 1] - off[r * S]
        self.mine = int(self.moff[-1])
        pool = chan.pool
        self.send = pool.get("cmp-send", np.uint8, int(off[-1]))          # worker-packed, by owner
        self.pieces = pool.get("cmp-pieces", np.uint8, n * self.mine)     # my chunk from every rank
        self.gather = pool.get("cmp-gather", np.uint8, int(off[-1]))      # server-packed, by owner
        self.acc = pool.get("cmp-acc", np.float32, hi - lo)
        ef = comp.error_feedback and ts is not None
        xp = array_module(flat)
        self.wres = ts.worker_residual(flat.size, xp) if ef else None
        self.sres = ts.server_residual(lo, hi, xp) if ef else None
        # Distinct RNG streams per call, per rank (workers) and for the server side.
        base = (calls % 2**32) << 32
        self.wcounter, self.scounter = base | (r + 1), base
        self.what = f"compressed allreduce of {_label(name)}"
        # Every receive is posted up front; messages of one pair and tag match in order.
        precv = [[irecv(chan, self.piece(i, s), i, _TAG_SCATTER) if i != r and psz[r][s] else []
                  for s in range(S)] for i in range(n)]
        self.grecv = [[irecv(chan, self.packed(self.gather, j, s), j, _TAG_GATHER)
                       if j != r and psz[j][s] else [] for s in range(S)] for j in range(n)]
        self.my_pieces = [[q for i in range(n) for q in precv[i][s]] for s in range(S)]
        self.sends: list = []
        self.reduced = 0             # my segments reduced, re-compressed and sent so far
        self.decoded = [0] * n       # results decompressed so far, per owner
        # Ranks 0 and 1 of an int8/int4 call have their own piece decoded into the
        # accumulator by the kernel that packs it (see reduce_mine for why the bits hold).
        self.own_first = comp.format in _NO_NEGATIVE_ZERO and r < 2

    def piece(self, i: int, s: int) -> np.ndarray:
        """Rank i's compressed piece of segment s of my chunk."""
        lo = i * self.mine
        return self.pieces[lo + self.moff[s]:lo + self.moff[s + 1]]

    def packed(self, buf: np.ndarray, j: int, s: int) -> np.ndarray:
        """Segment s of owner j's chunk in a by-owner packed buffer."""
        k = j * self.S + s
        return buf[self.off[k]:self.off[k + 1]]

    def run(self) -> int:
        bad = 0
        for s in range(self.S):
            bad += self.scatter(s)
            bad += self.advance(s + 1)
        while self.reduced < self.S:         # the others are waiting for these: first
            bad += self.reduce_mine(self.reduced)
            self.reduced += 1
            bad += self.advance(self.S)
        for j in range(self.n):
            if j != self.r:
                for s in range(self.decoded[j], self.S):
                    self.decode(j, s)
        waitall(self.chan, self.sends, self.what)
        return bad

    def scatter(self, s: int) -> int:
        """Compress segment s of every owner's chunk (+ worker residual) and send it to its owner.

        A result segment (j, s) arrives only after owner j had this rank's piece (j, s),
        i.e. after flat[segment] was compressed here, so decoding into flat is safe.
        """
        bad, n, r, comp = 0, self.n, self.r, self.comp
        for k in range(1, n + 1):            # the other owners first, mine last
            j = (r + k) % n
            a, b = int(self.segs[j, s]), int(self.segs[j, s + 1])
            if a == b:
                continue
            dst = self.piece(r, s) if j == r else self.packed(self.send, j, s)
            vals = self.acc[a - self.lo:b - self.lo] if j == r and self.own_first else None
            bad += comp.compress(self.x[a:b], dst, None if self.wres is None else self.wres[a:b],
                                 counter=self.wcounter, offset=a, name=self.name, values=vals)
            if j != r:
                self.sends.extend(isend(self.chan, dst, j, _TAG_SCATTER))
        return bad

    def reduce_mine(self, s: int) -> int:
        """Average the n pieces of my segment s in fp32, re-compress it, send it to every rank."""
        n, r, comp, lo = self.n, self.r, self.comp, self.lo
        a, b = int(self.segs[r, s]), int(self.segs[r, s + 1])
        if a == b:
            return 0
        waitall(self.chan, self.my_pieces[s], self.what)
        part = self.acc[a - lo:b - lo]
        # The sum is ((0 + d0) + d1) + ... + d(n-1) in rank order, so it is the same whoever
        # computes it. For int8/int4, 0.0 + d0 == d0 bit for bit (they never decode to -0.0,
        # NaN payloads pass through), so rank 0's piece is decoded instead of added to a
        # zero fill; and d0 + d1 == d1 + d0 (IEEE addition commutes; their only NaN is the
        # one quiet NaN of a non-finite block), so rank 1 starts from its own piece, which
        # scatter already decoded into the accumulator, and adds rank 0's.
        if self.own_first:
            rest = [i for i in range(n) if i != r]
        elif comp.format in _NO_NEGATIVE_ZERO:
            comp.decompress(self.piece(0, s), b - a, part, name=self.name)
            rest = range(1, n)
        else:
            part.fill(0.0)
            rest = range(n)
        for i in rest:
            comp.decompress(self.piece(i, s), b - a, part, accumulate=True, name=self.name)
        out = self.packed(self.gather, r, s)
        # The kernel writes the decoded result into the output as it packs it (the bits
        # decompress would write), so the owner's own segment needs no decoding pass.
        nb = comp.compress(part, out, None if self.sres is None else self.sres[a - lo:b - lo],
                           counter=self.scounter, offset=a, name=self.name,
                           divisor=n if self.op == ReduceOp.AVERAGE and n > 1 else 1,
                           values=self.flat[a:b])
        for k in range(1, n):
            self.sends.extend(isend(self.chan, out, (r + k) % n, _TAG_GATHER))
        return nb

    def decode(self, j: int, s: int) -> None:
        """Decompress owner j's result for segment s into the output."""
        a, b = int(self.segs[j, s]), int(self.segs[j, s + 1])
        if a < b:
            waitall(self.chan, self.grecv[j][s], self.what)
            self.comp.decompress(self.packed(self.gather, j, s), b - a, self.flat[a:b], name=self.name)

    def advance(self, limit: int) -> int:
        """Without blocking: reduce my segments below limit whose pieces are in, decode results."""
        nb = 0
        while self.reduced < limit and _ready(self.my_pieces[self.reduced]):
            nb += self.reduce_mine(self.reduced)
            self.reduced += 1
        for j in range(self.n):
            while j != self.r and self.decoded[j] < self.S and _ready(self.grecv[j][self.decoded[j]]):
                self.decode(j, self.decoded[j])
                self.decoded[j] += 1
        return nb


# Formats whose decoded values are never -0.0: a level q (an integer, +0.0 for 0) times
# a block scale >= +0.0 (or NaN for a non-finite block). onebit decodes a zero-scale
# block's 0 bits to -scale = -0.0, so it keeps the zero fill.
_NO_NEGATIVE_ZERO = frozenset({"int8", "int4"})


def _ready(reqs: list) -> bool:
    return not reqs or MPI.Request.Testall(reqs)


# -- fp16 / bf16 ----------------------------------------------------------------------------

def _half_ring(chan, flat, op, algorithm, comp, name, ts, src=None) -> tuple[int, str]:
    """Convert to the half type, run the engine's algorithm on it, convert back."""
    count = flat.size
    wire_dtype = comp.wire_dtype
    if algorithm == "auto":
        # The shipped defaults' plan (no shm): the half-type ring's traffic is what it reports.
        algorithm = policy_plan.choose(None, 2 * count, wire_dtype, chan.size)
    if flat.dtype == wire_dtype and not comp.error_feedback and comp.clip is None:
        if src is not None:
            np.copyto(flat, src)
        registry.run(chan, algorithm, flat, op)     # already in the wire type
        return 0, algorithm
    raw = chan.pool.get("cmp-half", np.uint8, 2 * count)
    wres = ts.worker_residual(count, array_module(flat)) \
        if comp.error_feedback and ts is not None else None
    bad = comp.compress(flat if src is None else src, raw, wres, name=name)
    # Average: the ring sums in the half type and the conversion back divides, in fp32 on
    # the (identical) summed bits of every rank, so no separate pass over the result.
    average = op == ReduceOp.AVERAGE and chan.size > 1
    registry.run(chan, algorithm, raw.view(wire_dtype), ReduceOp.SUM if average else op)
    comp.decompress(raw, count, flat, name=name, divisor=chan.size if average else 1)
    return bad, algorithm


def _traffic(algorithm: str, nbytes: int, n: int) -> float:
    """Bytes each rank sends on average in an uncompressed allreduce of nbytes."""
    if n == 1:
        return 0.0
    if algorithm == "ring":
        return 2 * (n - 1) * nbytes / n
    if algorithm == "allgather":
        return (n - 1) * nbytes
    if algorithm == "tree":
        p = 1 << (n.bit_length() - 1)
        return (2 * (n - p) + p * (p.bit_length() - 1)) * nbytes / n
    return float("nan")    # shm/hierarchical/native: not counted here


# -- bookkeeping -----------------------------------------------------------------------------

def _exact(chan, flat, op) -> np.ndarray:
    """The uncompressed result in fp32, for the relative-error statistic."""
    exact = chan.pool.get("cmp-exact", np.float32, flat.size)
    exact[...] = flat
    registry.run(chan, "ring", exact, op)
    return exact


def _after_nonfinite(chan, ts, name, bad: int, comp) -> None:
    if not bad:
        return
    if ts is not None and comp.error_feedback:
        ts.resets += bad
    owner = ts if ts is not None else state_for(chan)   # unnamed tensors: once per state
    if not owner.warned:
        owner.warned = True
        logger.warning("rank %d: %s held NaN/Inf in %d block(s) under %r: they propagate to the "
                       "result as NaN%s (counted in rr.last_stats(); logged once per tensor)",
                       chan.rank, _label(name), bad, comp,
                       ", and their error-feedback residuals were reset" if comp.error_feedback
                       else "")


def _record(chan, flat, comp, name, ts, bad, wire, algorithm, exact, seconds) -> None:
    n = chan.size
    payload = flat.nbytes
    uncompressed = _traffic("ring" if comp.two_sided else algorithm, payload, n)
    if n > 1:
        ratio = uncompressed / wire if wire else float("nan")
    else:
        cbytes = comp.packed_nbytes(flat.size)
        ratio = payload / cbytes if cbytes else float("nan")
    rel = None
    if exact is not None:
        with np.errstate(invalid="ignore", over="ignore"):
            diff = flat.astype(np.float64) - exact
            norm = float(np.linalg.norm(exact.astype(np.float64)))
            rel = float(np.linalg.norm(diff)) / norm if norm else float(np.linalg.norm(diff))
    _stats.record(_stats.CompressionStats(
        name=name, compression=repr(comp), dtype=str(flat.dtype), count=int(flat.size), ranks=n,
        algorithm=algorithm, payload_bytes=int(payload), wire_bytes=float(wire),
        uncompressed_wire_bytes=float(uncompressed), ratio=float(ratio), rel_error=rel,
        nonfinite_blocks=int(bad), residual_resets=ts.resets if ts is not None else 0,
        seconds=seconds))
