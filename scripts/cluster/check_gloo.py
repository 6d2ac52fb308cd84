#!/usr/bin/env python3
"""torch.distributed (gloo) across the emulated nodes: rendezvous, allreduce, bytes on the link.

Run on every rank under ``cluster.py run``. torch DDP's peer for the training comparison
needs gloo to meet at node 0's address (MASTER_ADDR, which cluster.py sets; 127.0.0.1 is
per namespace) and to bind to the node's interface (GLOO_SOCKET_IFNAME, which the ssh
stand-in sets; the namespace's hostname does not resolve). ringreduce.torch.gloo does
the rendezvous (rank 0 picks a free port and broadcasts it through MPI). Prints one JSON line on rank 0.

Example::

    scripts/cluster/cluster.sh run --nodes 2 -- python scripts/cluster/check_gloo.py --mib 1
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import node_link_bytes  # noqa: E402

from ringreduce.torch.gloo import init_gloo  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=1.0)
    a = p.parse_args()
    import torch
    import torch.distributed as dist

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    addr = os.environ["MASTER_ADDR"]
    init_gloo(comm, addr)
    count = int(a.mib * 2**20) // 4
    x = torch.full((count,), float(rank + 1))
    dist.all_reduce(x)                                  # warm-up: connections are set up lazily
    node = os.environ.get("RRC_NODE", "?")
    nodes = comm.allgather(node)
    reader = nodes.index(node) == rank
    comm.Barrier()
    b0 = node_link_bytes() if reader else (0, 0)
    x = torch.full((count,), float(rank + 1))
    dist.all_reduce(x)
    comm.Barrier()
    b1 = node_link_bytes() if reader else (0, 0)
    want = size * (size + 1) / 2
    ok = bool(torch.all(x == want))
    per_node = comm.gather((node, [b1[0] - b0[0], b1[1] - b0[1]]) if reader else None, root=0)
    oks = comm.gather(ok, root=0)
    dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"ok": all(oks), "ranks": size, "master_addr": addr,
                          "ifname": os.environ.get("GLOO_SOCKET_IFNAME"),
                          "node_bytes": dict(v for v in per_node if v)}), flush=True)
    return 0 if rank != 0 or all(oks) else 1


if __name__ == "__main__":
    sys.exit(main())
