#!/usr/bin/env python3
"""Allreduce across an emulated cluster: result vs numpy, time, and bytes on each node's link.

Run it on every rank (under cluster.py run). For each algorithm it checks the result
against a numpy reference on every rank, checks that all ranks hold identical bits, and
measures the bytes each node's link sent/received during the call (from the interface
counters, read inside the namespace). Rank 0 prints one JSON line per algorithm::

    {"algorithm": "mpi", "chosen": "mpi", "mib": 4.0, "ok": true, "max_err": 0.0, "seconds": [...],
     "node_bytes": {"rrc-ab12-n0": [sent, received], ...}, "nodes": 2, "ranks": 2,
     "shared_groups": 2, "rr_nodes": 2}

nodes counts distinct RRC_NODE values, shared_groups MPI's COMM_TYPE_SHARED groups and
rr_nodes ringreduce's node count (None when only "mpi" ran); chosen is what "auto"
resolved to (the algorithm itself otherwise).

Example::

    scripts/cluster/cluster.sh run --nodes 2 --ranks-per-node 1 -- \\
        python scripts/cluster/check_allreduce.py --mib 4 --algorithms mpi,ring
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np
from mpi4py import MPI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import node_link_bytes  # noqa: E402


def data(rank: int, n: int, dtype) -> np.ndarray:
    # Small integers: every summation order gives the exact same float result.
    return ((np.arange(n, dtype=np.int64) * (rank + 3) + rank) % 17 - 8).astype(dtype)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=4.0, help="message size in MiB")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--algorithms", default="mpi",
                   help="comma list: mpi (mpi4py Allreduce), or ringreduce algorithms "
                        "(ring, tree, auto, ...)")
    p.add_argument("--iters", type=int, default=1, help="timed calls per algorithm")
    p.add_argument("--warmup", type=int, default=0)
    a = p.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    dtype = np.dtype(a.dtype)
    n = int(a.mib * 2**20) // dtype.itemsize
    x = data(rank, n, dtype)
    ref = sum(data(r, n, np.float64) for r in range(size)).astype(dtype)
    node = os.environ.get("RRC_NODE", "?")
    # One reader of the counters per node: the lowest rank in it.
    nodes = comm.allgather(node)
    reader = nodes.index(node) == rank
    # How many nodes MPI itself sees (COMM_TYPE_SHARED), and ringreduce's node split.
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED)
    shared_groups = len(set(comm.allgather(shared.allreduce(rank, op=MPI.MIN))))
    shared.Free()
    rr, rr_nodes = None, None
    if any(alg != "mpi" for alg in a.algorithms.split(",")):
        import ringreduce as rr
        rr.init()
        rr_nodes = rr.info()["nodes"]

    failed = False
    for alg in a.algorithms.split(","):
        def call():
            if alg == "mpi":
                y = np.empty_like(x)
                comm.Allreduce(x, y, op=MPI.SUM)
                return y
            return rr.allreduce(x, op=rr.Sum, algorithm=alg)
        for _ in range(a.warmup):
            call()
        times, moved = [], np.zeros(2, dtype=np.int64)
        for _ in range(a.iters):
            comm.Barrier()
            b0 = node_link_bytes()
            t0 = time.perf_counter()
            y = call()
            t1 = time.perf_counter()
            comm.Barrier()
            b1 = node_link_bytes()
            times.append(comm.allreduce(t1 - t0, op=MPI.MAX))
            moved += np.subtract(b1, b0)
        err = float(np.max(np.abs(y.astype(np.float64) - ref.astype(np.float64)))) if n else 0.0
        digests = comm.allgather(hashlib.sha1(y.tobytes()).hexdigest())
        ok = comm.allreduce(bool(err == 0.0) and len(set(digests)) == 1, op=MPI.LAND)
        per_node = comm.gather((node, (moved // a.iters).tolist()) if reader else None, root=0)
        chosen = alg
        if alg == "auto":     # what auto resolved to (the same on every rank)
            from ringreduce.policy import plan as select
            from ringreduce.runtime.context import context
            chosen = select.choose_for(context().main, x.nbytes, x.dtype)
        if rank == 0:
            print(json.dumps({"algorithm": alg, "chosen": chosen, "mib": a.mib, "dtype": a.dtype, "ok": ok,
                              "max_err": err, "seconds": times, "nodes": len(set(nodes)),
                              "ranks": size, "shared_groups": shared_groups, "rr_nodes": rr_nodes,
                              "node_bytes": dict(v for v in per_node if v)}), flush=True)
        failed |= not ok
    if rr is not None:
        rr.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
