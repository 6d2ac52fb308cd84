"""Hierarchical allreduce: shared memory inside each node, a ring across one leader per node.

On a cluster the links between nodes are the scarce resource. A flat ring over
all ranks sends 2(n-1)/n of the message over each node's link (ranks in blocks
per node); with one leader per node talking across nodes only 2(N-1)/N does
(N nodes), e.g. 1.0x instead of 1.5x the message for 2 nodes x 2 ranks. Three
steps:

1. node-local reduce to the leader (local rank 0) through an MPI-3 shared window
   (shm.SharedWindow): every rank reduces one chunk straight from its peers'
   slots, the leader collects the chunks;
2. the leaders allreduce across nodes: the pipelined ring, or the compressed
   two-sided allreduce when a compression is given;
3. node-local broadcast: the leader puts the result in its slot, the others
   copy it out.

Every rank ends with the leader's bytes and applies the same final division
(Average), so all ranks hold identical bits, for any layout (uneven ranks per
node, nodes of one rank, a single node). Average travels as a sum until the end
and is divided by the total rank count, not per level.

"auto" picks it when the ranks span several nodes, some node holds more than
one rank and the cost model (policy.cost.predict_across, with cost_terms below)
prices it cheapest: on 2 nodes x 2 ranks, above about 128 KiB.

The node and leaders' sub-communicators are split once per channel (collectively,
on the first hierarchical call, which every rank makes in the same order) and
kept in chan.node_channels; chan.free() frees them.

Example::

    import numpy as np, ringreduce as rr
    rr.init()
    y = rr.allreduce(np.ones(1 << 20, np.float32), op=rr.Sum, algorithm="hierarchical")
"""
from __future__ import annotations

import numpy as np

from ..core import config
from ..core.mpi import MPI
from ..core.ops import ReduceOp, finish_average, reduce_into
from ..transport.channel import Channel
from ..transport.p2p import bcast_bytes, chunk_bounds
from ..transport.topology import split_by_node
from . import ring, shm

# The copy during the agreement goes in blocks of this many bytes, the fingerprints'
# exchange progressed between them.
STAGE_BLOCK_BYTES = 1 << 18

__all__ = ["allreduce", "stage", "unstage", "NodeChannels", "node_channels", "cost_terms"]


class NodeChannels:
    """A channel's node split: its node's channel, the leaders' channel, and counts.

    ``node`` is a Channel over the ranks of this rank's node; ``leaders`` a Channel
    over local rank 0 of every node (None on the other ranks). ``shared`` says
    whether the node's ranks can map each other's memory (else the node-local steps
    use messages).
    """

    def __init__(self, chan, node_index: int):
        comm = chan.comm
        node_comm = comm.Split(node_index, chan.rank)
        self.node = Channel(node_comm, f"{chan.label}/node", chan.supervisor, parent=chan)
        is_leader = self.node.rank == 0
        leaders_comm = comm.Split(0 if is_leader else MPI.UNDEFINED, chan.rank)
        self.leaders = (Channel(leaders_comm, f"{chan.label}/leaders", chan.supervisor, parent=chan)
                        if is_leader else None)
        self.num_nodes = comm.allreduce(int(is_leader), op=MPI.SUM)
        self.max_local = comm.allreduce(self.node.size, op=MPI.MAX)
        # Can the node's ranks map each other's memory? (RINGREDUCE_NODE_ID may group
        # ranks MPI sees on different hosts; then fall back to messages inside the node.)
        sub = node_comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.node.rank)
        self.shared = bool(comm.allreduce(int(sub.Get_size() == self.node.size), op=MPI.MIN))
        sub.Free()

    def close(self) -> None:
        for c in (self.node, self.leaders):
            if c is not None:
                c.free()
        self.node = self.leaders = None


def _node_index(chan) -> int:
    """This rank's node number: the owning context's topology, else a split of the channel's own."""
    topo = chan.root.topology
    if topo is not None:
        return topo.node_index
    node_comm, index, _ = split_by_node(chan.comm, config.text("RINGREDUCE_NODE_ID"))
    node_comm.Free()
    return index


def node_channels(chan) -> NodeChannels:
    """The channel's NodeChannels (split collectively on first use, then cached in chan.node_channels)."""
    if chan.node_channels is None:
        chan.node_channels = NodeChannels(chan, _node_index(chan))
    return chan.node_channels


def allreduce(chan, buf: np.ndarray, op: ReduceOp, across=None, agreed=None) -> None:
    """Hierarchical allreduce of the flat contiguous array `buf` in place.

    Parameters
    ----------
    chan : Channel
    buf : numpy.ndarray, flat and contiguous
    op : ReduceOp
    across : callable(channel, buf, op), optional
        The leaders' allreduce instead of the ring: the compressed two-sided
        allreduce, given by the runtime (which validated the compression on every
        rank, since only the leaders reach it). The node-local steps stay exact.
    agreed : callable(recv, send), optional
        The mismatch check's round, started by the caller over MPI rows (ranks on
        several nodes). This rank copies its input into its node's window while the
        fingerprints travel (stage()), then calls ``agreed([], [])``, which raises on a
        mismatch: nothing was read from a peer and nothing written outside this rank's
        own slot, and the slot's parity is taken back (unstage()).
    """
    staged = None
    if agreed is not None:
        try:
            staged = stage(chan, buf, getattr(agreed, "progress", None))
        except BaseException:
            agreed([], [])          # the peers are in the exchange: finish it, then raise
            raise
        try:
            agreed([], [])          # no early messages: only this rank's slot was written
        except BaseException:
            if staged is not None:
                unstage(chan)
            raise
    n = chan.size
    if n == 1 or buf.size == 0:
        finish_average(op, buf, n)
        return
    if not isinstance(buf, np.ndarray):
        # Device arrays cannot go through a host shared window: flat algorithms instead.
        if across is not None:
            across(chan, buf, op)
        else:
            ring.allreduce(chan, buf, op)
        return
    lay = node_channels(chan)
    inner = ReduceOp.SUM if op == ReduceOp.AVERAGE else op
    node, leaders = lay.node, lay.leaders
    if lay.num_nodes == 1 and across is None:
        # One node: the whole job is node-local.
        (shm.allreduce if lay.shared else ring.allreduce)(node, buf, op)
        return
    if lay.shared and node.size > 1:
        win = shm.window(node)
        slots = staged
        if slots is None:
            slots = win.views(buf.dtype, buf.size)[win.next_parity()]
            _copy_in(node, slots, buf)
        _reduce_to_leader(win, node, slots, buf, inner)
        if leaders is not None:
            _across(leaders, buf, inner, across)
            np.copyto(slots[0], buf)
        win.sync()
        if leaders is None:
            np.copyto(buf, slots[0])
    else:
        if node.size > 1:
            ring.allreduce(node, buf, inner)
        if leaders is not None:
            _across(leaders, buf, inner, across)
        if node.size > 1:
            _bcast_from_leader(node, buf)
    finish_average(op, buf, n)


def _across(leaders, buf, op, across) -> None:
    """The leaders' allreduce (op is never Average here: it is divided at the end)."""
    if across is not None and leaders.size > 1:
        across(leaders, buf, op)
    else:
        ring.allreduce(leaders, buf, op)


def stage(chan, buf: np.ndarray, progress=None):
    """Copy this rank's input into its node's window before the agreement ends: the slots
    (allreduce's ``staged``), or None where that does not apply (the first hierarchical
    call, whose node split is collective; a window too small, whose growth is collective;
    one node; messages inside the node).

    Whether it applies depends on the call's size and the node's window, the same on
    every rank of the node once the fingerprints agree; unstage() undoes it when they
    do not. Nobody reads the slot before the node's first barrier, which comes after
    the agreement. `progress` (optional) is called between blocks of the copy: MPI
    advances the fingerprints' MPI_Iallgather past its first round only inside an
    MPI call, so without it the copy would hide that round alone.
    """
    lay = chan.node_channels
    if lay is None or lay.num_nodes == 1 or not lay.shared or type(buf) is not np.ndarray:
        return None
    node = lay.node
    win = node.window
    if node.size == 1 or win is None or win.win is None or buf.size == 0 or buf.nbytes > win.half:
        return None
    slots = win.views(buf.dtype, buf.size)[win.next_parity()]
    _copy_in(node, slots, buf, progress)
    return slots


def unstage(chan) -> None:
    """Take back a stage() whose call was not agreed (the parity is the node's shared count)."""
    chan.node_channels.node.window.calls -= 1


def _copy_in(node, slots, buf, progress=None) -> None:
    """This rank's part of buf into its slot: what the node's peers will read (calling
    `progress` between blocks of STAGE_BLOCK_BYTES, when given)."""
    r, count = node.rank, buf.size
    mine = slots[r]
    if buf.nbytes <= shm.REPLICATED_MAX_BYTES:
        if r != 0:                      # the leader reduces into its own buf
            np.copyto(mine, buf)
        return
    bounds = chunk_bounds(count, node.size)
    lo, hi = int(bounds[r]), int(bounds[r + 1])
    # Peers read only the chunks they reduce; ours stays in buf.
    step = count if progress is None else max(1, STAGE_BLOCK_BYTES // buf.itemsize)
    for a, b in ((0, lo), (hi, count)):
        for start in range(a, b, step):
            stop = min(b, start + step)
            np.copyto(mine[start:stop], buf[start:stop])
            if progress is not None:
                progress()


def _reduce_to_leader(win, node, slots, buf, op) -> None:
    """Leave op(all node ranks' buf) in the leader's buf (node rank 0); others' buf unchanged.

    Each rank's part is already in its slot (_copy_in).
    """
    n, r = node.size, node.rank
    mine = slots[r]
    count = buf.size
    if buf.nbytes <= shm.REPLICATED_MAX_BYTES:
        win.sync()
        if r == 0:
            for j in range(1, n):      # rank order, as in every other reduction here
                reduce_into(op, buf, slots[j])
        return
    bounds = chunk_bounds(count, n)
    lo, hi = int(bounds[r]), int(bounds[r + 1])
    win.sync()
    if hi > lo:
        acc = buf[lo:hi] if r == 0 else mine[lo:hi]
        shm.reduce_chunk(op, buf, slots, r, lo, hi, acc)
    win.sync()
    if r == 0:
        for j in range(1, n):
            a, b = int(bounds[j]), int(bounds[j + 1])
            if b > a:
                np.copyto(buf[a:b], slots[j][a:b])


def _bcast_from_leader(node, buf) -> None:
    """The leader's buf to every rank of the node, by messages (no shared memory)."""
    bcast_bytes(node, buf, 0, "hierarchical broadcast inside the node")


def cost_terms(m: float, n: int, nodes: int, max_local: int) -> tuple[float, float, float]:
    """(L, B, G) for the cost model (policy.cost's form) of m bytes on n ranks in `nodes` nodes.

    B counts only the bytes a leader sends across its node's link, 2(N-1)/N * m,
    to be priced at the inter-node beta; the node-local work (a reduce-scatter, a
    gather and a broadcast through shared memory: about 3m copied plus
    (M-1)/M * m reduced per rank) goes into G at the local gamma. Compare with the
    flat ring, whose B is 2(n-1)/n * m over the same links when ranks sit in
    blocks per node.
    """
    if n <= 1:
        return 0.0, 0.0, 0.0
    m_local = max_local
    latency = 2.0 * (nodes - 1) + (3.0 if m_local > 1 else 0.0)
    link = 2.0 * (nodes - 1) / nodes * m if nodes > 1 else 0.0
    local = ((m_local - 1) / m_local + 3.0) * m if m_local > 1 else 0.0
    return latency, link, local + (nodes - 1) / max(nodes, 1) * m
