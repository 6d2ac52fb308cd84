"""Node topology: which ranks share a node, computed once per communicator context.

A node is RINGREDUCE_NODE_ID when every rank sets it, else MPI's shared-memory
split (COMM_TYPE_SHARED). Nodes are numbered by their lowest rank, so every
rank agrees on the numbering.

Example::

    topo = NodeTopology.of(comm, node_id=None)
    topo.node_index, topo.num_nodes, topo.shares_memory
"""
from __future__ import annotations

import numpy as np

from ..core.errors import RingReduceError
from ..core.mpi import MPI

__all__ = ["NodeTopology"]


class NodeTopology:
    """The node split of one communicator (collective to build).

    Attributes
    ----------
    node_comm : communicator over this rank's node (freed by close())
    node_index, num_nodes : this rank's node number and the number of nodes
    local_rank, local_size : this rank's place on its node
    max_local : the most ranks any node holds
    shares_memory : every rank of the communicator can map every other's memory
    """

    def __init__(self, node_comm, node_index: int, num_nodes: int, max_local: int,
                 shares_memory: bool):
        self.node_comm = node_comm
        self.node_index = node_index
        self.num_nodes = num_nodes
        self.local_rank = node_comm.Get_rank()
        self.local_size = node_comm.Get_size()
        self.max_local = max_local
        self.shares_memory = shares_memory

    @classmethod
    def of(cls, comm, node_id: str | None) -> "NodeTopology":
        node_comm, index, nodes = split_by_node(comm, node_id)
        sizes = np.zeros(1, np.int64)
        comm.Allreduce(np.array([node_comm.Get_size()], np.int64), sizes, op=MPI.MAX)
        shares = nodes == 1
        if shares and node_id:
            # RINGREDUCE_NODE_ID may group ranks MPI sees on different hosts.
            sub = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
            whole = np.zeros(1, np.int64)
            comm.Allreduce(np.array([int(sub.Get_size() == comm.Get_size())], np.int64), whole,
                           op=MPI.MIN)
            sub.Free()
            shares = bool(whole[0])
        return cls(node_comm, index, nodes, int(sizes[0]), shares)

    def close(self) -> None:
        if self.node_comm != MPI.COMM_NULL:
            self.node_comm.Free()


def _allgather_text(comm, text: str | None) -> list:
    """Every rank's string (or None), as UTF-8 bytes: lengths first (-1: None), then the bytes."""
    raw = np.frombuffer((text or "").encode(), np.uint8)
    lengths = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([-1 if text is None else raw.size], np.int64), lengths)
    counts = np.maximum(lengths, 0)
    displs = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    recv = np.empty(int(counts.sum()), np.uint8)
    comm.Allgatherv([raw, MPI.BYTE], [recv, (counts, displs), MPI.BYTE])
    return [None if lengths[r] < 0 else recv[displs[r]:displs[r] + counts[r]].tobytes().decode()
            for r in range(comm.Get_size())]


def split_by_node(comm, node_id: str | None):
    """Group ranks by node: `node_id` if set on every rank, else MPI's shared-memory split.

    Returns (node communicator, index of this node, number of nodes).
    """
    ids = _allgather_text(comm, node_id)
    if all(i is not None for i in ids):
        order = list(dict.fromkeys(ids))           # first-appearance order, same on every rank
        node_comm = comm.Split(order.index(node_id), comm.Get_rank())
    else:
        if any(i is not None for i in ids):
            missing = [r for r, i in enumerate(ids) if i is None]
            raise RingReduceError(
                f"rank {comm.Get_rank()}: RINGREDUCE_NODE_ID is set on some ranks but not on ranks {missing}")
        node_comm = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    # Number the nodes by their lowest rank so every rank agrees.
    is_leader = node_comm.Get_rank() == 0
    leaders = np.empty(comm.Get_size(), np.int64)
    comm.Allgather(np.array([comm.Get_rank() if is_leader else -1], np.int64), leaders)
    leader_ranks = sorted(int(r) for r in leaders if r >= 0)
    mine = np.array([comm.Get_rank() if is_leader else 0], np.int64)
    node_comm.Bcast(mine, root=0)
    return node_comm, leader_ranks.index(int(mine[0])), len(leader_ranks)
