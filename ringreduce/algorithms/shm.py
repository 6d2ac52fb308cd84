"""Shared-memory allreduce: node-local ranks reduce straight from each other's buffers.

All ranks of the channel share one MPI-3 shared window (MPI_Win_allocate_shared).
Each rank owns a slot in it. A call runs in at most three phases separated by
barriers:

1. every rank copies its input into its slot;
2. rank r reduces chunk r of the buffer by reading chunk r of every peer's slot
   directly (no messages), and leaves the finished chunk in its own slot;
3. every rank copies the finished chunks out of the peers' slots.

Small messages skip phase 3: after phase 1 every rank reduces the whole buffer
itself, in rank order, so all ranks still compute identical bits with one
barrier instead of two.

Each slot has two halves used by alternate calls, so a rank may start the next
call (and overwrite its slot) while a slower peer is still reading the previous
one: a barrier of call k+1 always separates call k's reads from call k+2's
writes. The window lives in chan.window, is reused across calls and grows
(collectively, as every rank sees the same sizes) when a bigger message comes.

Only valid when every rank of the channel shares memory with the others
(the topology's shares_memory); run() falls back to the ring elsewhere.

Timeline: "shm copy in" (phase 1 and its barrier), "shm reduce" (phase 2,
with its barrier), "shm gather" (phase 3), per block.
"""
from __future__ import annotations

import numpy as np

from ..core import timeline
from ..core.log import logger
from ..core.ops import ReduceOp, combine, finish_average, reduce_into
from ..transport.window import SharedWindow
from . import ring

# Up to this many bytes, every rank reduces the whole message itself (one barrier).
REPLICATED_MAX_BYTES = 1 << 16
# Larger messages go through the window in blocks of this many bytes (cache-sized).
BLOCK_BYTES = 1 << 20


def window(chan) -> SharedWindow:
    """The channel's shared window (created on first use; freed by chan.free())."""
    if chan.window is None:
        chan.window = SharedWindow(chan)
    return chan.window


def allreduce(chan, buf: np.ndarray, op: ReduceOp, src: np.ndarray | None = None) -> None:
    """Shared-memory allreduce of flat `buf` in place (or of `src` into `buf`).

    Every rank of chan.comm must share memory (one node).
    """
    n, r = chan.size, chan.rank
    src = buf if src is None else src
    count = buf.size
    if n == 1 or count == 0:
        if src is not buf:
            np.copyto(buf, src)
        finish_average(op, buf, n)
        return
    win = window(chan)
    slots = win.views(buf.dtype, count)[win.next_parity()]
    mine = slots[r]
    if buf.nbytes <= REPLICATED_MAX_BYTES:
        t0 = timeline.now() if timeline.on else 0
        np.copyto(mine, src)
        win.sync()
        if t0:
            timeline.complete("shm copy in", t0, {"bytes": buf.nbytes})
            t0 = timeline.now()
        reduce_replicated(slots, buf, op, n)
        if t0:
            timeline.complete("shm reduce", t0, {"bytes": buf.nbytes, "replicated": True})
        return
    # Block by block, so one block's copies are still in cache when the peers read them
    # and the window stays small; the parity alternates per block.
    step = max(n, BLOCK_BYTES // buf.itemsize)
    views = win.views(buf.dtype, min(step, count))
    traced = timeline.on
    for start in range(0, count, step):
        stop = min(count, start + step)
        _block(win, views[win.next_parity()], buf[start:stop], src[start:stop], op, n, r, traced)


def reduce_replicated(slots, buf: np.ndarray, op: ReduceOp, n: int) -> None:
    """buf = op over every rank's slot, in rank order on every rank: identical bits everywhere."""
    if n == 2:
        combine(op, slots[0], slots[1], buf)
    else:
        np.copyto(buf, slots[0])
        for j in range(1, n):
            reduce_into(op, buf, slots[j])
    finish_average(op, buf, n)


def stage(chan, buf: np.ndarray, src: np.ndarray | None = None):
    """Copy this rank's input into its slot for a replicated shm call whose barrier the caller
    takes (the agreement's, runtime.collectives): the slots, or None where that does not
    apply (another size band, no window yet or one too small, ranks on several nodes).

    Whether it applies depends only on the call's size and the window, the same on every
    rank once the fingerprints agree; unstage() undoes it when they do not.
    """
    win = chan.window
    nbytes = buf.nbytes
    if (win is None or win.win is None or nbytes == 0 or nbytes > REPLICATED_MAX_BYTES
            or nbytes > win.half or chan.size == 1 or type(buf) is not np.ndarray):
        return None
    topo = chan.root.topology
    if topo is None or not topo.shares_memory:
        return None
    slots = win.views(buf.dtype, buf.size)[win.next_parity()]
    np.copyto(slots[chan.rank], buf if src is None else src)
    win.win.Sync()
    return slots


def unstage(chan) -> None:
    """Take back a stage() whose call was not agreed (the parity is the ranks' shared count)."""
    chan.window.calls -= 1


def reduce_chunk(op, own: np.ndarray, slots, r: int, lo: int, hi: int, acc: np.ndarray) -> None:
    """acc = op over own[lo:hi] and every other rank's slots[j][lo:hi], peers in rank order.

    One rank computes each chunk and the others copy it, so every rank ends with
    the same bits whatever the operand order.
    """
    first = True
    for j, slot in enumerate(slots):
        if j == r:
            continue
        if first:
            combine(op, own[lo:hi], slot[lo:hi], acc)
            first = False
        else:
            reduce_into(op, acc, slot[lo:hi])


def _block(win, slots, buf, src, op, n: int, r: int, traced: bool = False) -> None:
    """Reduce-scatter then allgather one block through the window (two barriers)."""
    t0 = timeline.now() if traced else 0
    count = buf.size
    base, extra = divmod(count, n)
    lo = r * base + min(r, extra)
    hi = lo + base + (r < extra)
    mine = slots[r]
    # Phase 1: peers only need the chunks they reduce; ours stays in src.
    if lo > 0:
        np.copyto(mine[:lo], src[:lo])
    if hi < count:
        np.copyto(mine[hi:count], src[hi:])
    win.sync()
    if t0:
        timeline.complete("shm copy in", t0, {"bytes": buf.nbytes})
        t0 = timeline.now()
    # Phase 2: reduce our chunk from everyone's slot into our own slot.
    if hi > lo:
        acc = mine[lo:hi]
        reduce_chunk(op, src, slots, r, lo, hi, acc)
        finish_average(op, acc, n)
    win.sync()
    if t0:
        timeline.complete("shm reduce", t0, {"bytes": (hi - lo) * buf.itemsize})
        t0 = timeline.now()
    # Phase 3: collect every finished chunk (ours included).
    for j in range(n):
        a = j * base + min(j, extra)
        b = a + base + (j < extra)
        if b > a:
            np.copyto(buf[a:b], slots[j][a:b])
    if t0:
        timeline.complete("shm gather", t0, {"bytes": buf.nbytes})


def usable(chan) -> bool:
    """Whether every rank of the channel shares memory; warns once per channel when not."""
    topo = chan.root.topology
    if topo is not None and topo.shares_memory:
        return True
    if not chan.warned_shm_fallback:
        chan.warned_shm_fallback = True
        logger.warning("%s: 'shm' needs every rank on one node; using 'ring' instead", chan.who)
    return False


def run(chan, buf: np.ndarray, op: ReduceOp, src: np.ndarray | None = None) -> None:
    """The "shm" runner: shared memory when the ranks share a node, else the ring.

    `src` (optional, host, flat, same size): reduce it into `buf` instead of `buf` itself.
    """
    # Device arrays (CUDA-aware path) cannot be copied into a host window.
    if type(buf) is np.ndarray and usable(chan):
        allreduce(chan, buf, op, src)
        return
    if src is not None:
        np.copyto(buf, src)
    ring.allreduce(chan, buf, op)
