"""A torch.distributed gloo process group for the ranks of an MPI job.

The peers ringreduce is measured against (torch DDP in scripts/train.py, gloo's
all_reduce in ringreduce-bench and the emulated cluster's checks) need their own
rendezvous. MPI already knows the ranks, so rank 0 picks a free TCP port and
broadcasts it: no fixed port, so parallel jobs on one machine never clash.

Example::

    from ..core.mpi import MPI
    from ringreduce.torch.gloo import init_gloo
    init_gloo(MPI.COMM_WORLD)          # then torch.distributed.all_reduce(...)
"""
from __future__ import annotations

import socket

__all__ = ["init_gloo"]


def init_gloo(comm, addr: str | None = None, backend: str = "gloo") -> None:
    """Initialise torch.distributed with gloo over `comm`'s ranks (collective).

    addr is where rank 0 listens; by default 127.0.0.1 when every rank shares
    one node, else rank 0's hostname. backend="ringreduce" makes ringreduce's
    group the default one, on the same shared store (so gloo groups can join it).
    """
    import torch.distributed as dist

    from ..core.mpi import MPI

    if addr is None:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)     # collective: every rank takes part
        one_node = node.Get_size() == comm.Get_size()
        node.Free()
        addr = "127.0.0.1" if one_node else socket.gethostname()
    where = None
    if comm.Get_rank() == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            where = (addr, s.getsockname()[1])
    host, port = comm.bcast(where, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=comm.Get_rank(),
                            world_size=comm.Get_size())
