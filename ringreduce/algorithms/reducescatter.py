"""Reduce-scatter as algorithms: ring, node-local shared memory, native MPI_Reduce_scatter.

Every runner has one signature, ``run(chan, flat, op, offsets, out)``: `flat` is
this rank's whole contiguous input (it may be used as scratch), `offsets` the
n + 1 element offsets of the pieces, and rank r's reduced piece
``flat[offsets[r]:offsets[r + 1]]`` is written to `out`. Each piece is reduced on
exactly one rank (its owner), so there is nothing to keep identical across ranks.
Average is reduced as a sum and divided once, on the finished piece.

- ``ring``: the ring allreduce's first n - 1 hops (algorithms.ring.reduce_scatter),
  segmented and pipelined.
- ``shm``: every rank copies the parts of its input that the peers own into its
  slot of the channel's shared window; one barrier; each rank reduces its own
  piece straight out of the peers' slots, in rank order (rank 0's value first,
  so a sum is numpy's left-to-right sum of the ranks' inputs). In blocks of
  :data:`BLOCK_BYTES` per piece, so every rank works in every block.
- ``mpi``: MPI_Reduce_scatter (never for float16/bfloat16, which MPI cannot
  reduce; float Min/Max carry the NaN positions along, as the native allreduce
  does, so a NaN is never hidden).

Example::

    from ringreduce.algorithms import reducescatter
    reducescatter.ring(chan, flat, rr.Sum, offsets, out)
"""
from __future__ import annotations

import numpy as np

from ..core import device, timeline
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..core.ops import ReduceOp, combine, finish_average, reduce_into
from ..transport import p2p
from . import native as _native
from . import ring as _ring
from . import shm

__all__ = ["ring", "shared", "native", "run_shm", "BLOCK_BYTES"]

# Bytes of each piece per block through the shared window.
BLOCK_BYTES = 1 << 19


def _mine(chan, flat, offsets):
    r = chan.rank
    return flat[int(offsets[r]):int(offsets[r + 1])]


def ring(chan, flat, op: ReduceOp, offsets, out) -> None:
    """The ring's reduce-scatter phase, then this rank's piece copied out."""
    _ring.reduce_scatter(chan, flat, op, offsets)
    mine = _mine(chan, flat, offsets)
    if mine.size:
        out[...] = mine


def native(chan, flat, op: ReduceOp, offsets, out, agreed: bool = False) -> None:
    """MPI_Reduce_scatter of the typed input into `out` (NaN kept for float Min/Max)."""
    dtype = flat.dtype
    if not _native.supports(dtype):
        raise RingReduceError(f"{chan.who}: algorithm 'mpi' cannot reduce-scatter {dtype}: MPI has "
                              "no reduction for it; use 'ring', 'shm' or 'auto'")
    n = chan.size
    counts = np.diff(np.asarray(offsets, np.int64))
    if n == 1 or int(counts.max(initial=0)) * dtype.itemsize > p2p.MAX_MESSAGE_BYTES:
        ring(chan, flat, op, offsets, out)     # one rank, or a count MPI cannot express
        return
    mpitype = _native._MPI_TYPES[dtype]
    nan_fix = op in (ReduceOp.MIN, ReduceOp.MAX) and dtype.kind == "f"
    calls = [([flat, mpitype], [out, mpitype], counts, _native._MPI_OPS[op])]
    if nan_fix:
        nans = np.isnan(flat).view(np.uint8)
        got = device.array_module(flat).empty(out.size, np.uint8)
        device.synchronize(nans)      # the stream rule: MPI reads it next
        calls.append(([nans, MPI.UINT8_T], [got, MPI.UINT8_T], counts, MPI.MAX))
    chan.count(flat.nbytes - out.nbytes, flat.nbytes - out.nbytes)
    if agreed and (counts == counts[0]).all():
        for s, r, _, mop in calls:            # Open MPI's Reduce_scatter_block: 2-3x its v-form
            chan.comm.Reduce_scatter_block(s, r, mop)
    elif agreed:
        for s, r, c, mop in calls:
            chan.comm.Reduce_scatter(s, r, c, mop)
    else:
        chan.wait([chan.comm.Ireduce_scatter(s, r, c, mop) for s, r, c, mop in calls],
                  "native MPI_Reduce_scatter")
    if nan_fix and bool(np.any(got)):
        np.copyto(out, np.nan, where=got.view(bool))
    finish_average(op, out, n)


def shared(chan, flat, op: ReduceOp, offsets, out) -> None:
    """Reduce-scatter through the shared window, each piece reduced by its owner in rank order."""
    n, r = chan.size, chan.rank
    counts = np.diff(np.asarray(offsets, np.int64))
    largest = int(counts.max(initial=0))
    if n == 1 or largest == 0:
        mine = _mine(chan, flat, offsets)
        if mine.size:
            out[...] = mine
        finish_average(op, out, n)
        return
    win = shm.window(chan)
    step = max(1, min(largest, BLOCK_BYTES // flat.itemsize))
    views = win.views(flat.dtype, n * step)    # slot j * step.. holds the part for rank j
    t0 = timeline.now() if timeline.on else 0
    own = int(offsets[r])
    for start in range(0, largest, step):
        slots = views[win.next_parity()]
        mine = slots[r]
        for j in range(n):
            k = min(step, int(counts[j]) - start)
            if j != r and k > 0:
                lo = int(offsets[j]) + start
                mine[j * step:j * step + k] = flat[lo:lo + k]
        win.sync()
        k = min(step, int(counts[r]) - start)
        if k > 0:
            parts = [flat[own + start:own + start + k] if j == r else slots[j][r * step:r * step + k]
                     for j in range(n)]
            acc = out[start:start + k]
            combine(op, parts[0], parts[1], acc)
            for j in range(2, n):
                reduce_into(op, acc, parts[j])
    finish_average(op, out, n)
    if t0:
        timeline.complete("shm reduce-scatter", t0, {"bytes": flat.nbytes})


def run_shm(chan, flat, op: ReduceOp, offsets, out) -> None:
    """The "shm" runner: the shared window when usable, else the ring."""
    if type(flat) is np.ndarray and shm.usable(chan):
        shared(chan, flat, op, offsets, out)
    else:
        ring(chan, flat, op, offsets, out)
