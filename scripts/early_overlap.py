"""The ring, the tree and the hierarchical path started while the fingerprints travel, against after them.

    mpirun -np 2 python scripts/early_overlap.py --split-nodes           # one machine
    scripts/cluster/cluster.sh run --nodes 2 --rate 10gbit -- python scripts/early_overlap.py -a ring,tree
    scripts/cluster/cluster.sh run --nodes 2 --ranks-per-node 2 --rate 10gbit -- \
        python scripts/early_overlap.py -a hierarchical

Across nodes the check's rows go by MPI_Iallgather, and the ring and the tree
post their first segment before finishing that exchange (runtime.agree.Rows.start)
when it is at most agree.EARLY_MAX_BYTES (``--early-max`` changes that, to
measure where the early send stops paying); the hierarchical path copies each
rank's input into its node's shared window meanwhile. This times
``rr.allreduce(x, algorithm=A)`` both ways, interleaved in blocks, by turning
the overlap off for the "after" blocks. ``--split-nodes`` gives each
rank its own node id, so one machine takes the across-nodes path (its "link"
is then the same memory and cores the exchange uses). Printed on rank 0: per
size, the median over blocks of the slowest rank's mean call time.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22],
                    help="bytes per call (float32)")
    ap.add_argument("--blocks", type=int, default=12, help="interleaved blocks per setting")
    ap.add_argument("-a", "--algorithms", default="ring", help="comma-separated: ring, tree, hierarchical")
    ap.add_argument("--early-max", type=int, default=None,
                    help="bytes: the largest first segment sent early (default agree.EARLY_MAX_BYTES)")
    ap.add_argument("--split-nodes", action="store_true", help="one node id per rank (one machine)")
    args = ap.parse_args()
    if args.split_nodes:
        rank = os.environ.get("OMPI_COMM_WORLD_RANK") or os.environ.get("PMI_RANK") or "0"
        os.environ["RINGREDUCE_NODE_ID"] = f"node{rank}"

    import ringreduce as rr
    from ringreduce.runtime import agree
    rr.init()
    if args.early_max is not None:
        agree.EARLY_MAX_BYTES = args.early_max
    overlap = [True]
    rows_overlap = agree.Rows.overlaps
    agree.Rows.overlaps = property(lambda rows: overlap[0] and rows_overlap.fget(rows))
    medians = {}
    for algorithm in args.algorithms.split(","):
        for nbytes in args.sizes:
            x = np.ones(nbytes // 4, np.float32)
            out = np.empty_like(x)
            calls = max(10, min(2000, (20 << 20) // nbytes))
            times = {True: [], False: []}
            for block in range(args.blocks + 1):
                for setting in (True, False):
                    overlap[0] = setting
                    rr.barrier()
                    t = time.perf_counter()
                    for _ in range(calls):
                        rr.allreduce(x, out=out, algorithm=algorithm)
                    if block:                                   # the first block warms up
                        times[setting].append((time.perf_counter() - t) / calls)
            slowest = rr.allreduce(np.array([np.median(times[True]), np.median(times[False])]), op=rr.Max)
            medians[algorithm, nbytes] = slowest
    if rr.rank() == 0:
        print(f"# np={rr.size()}  {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"{'algorithm':>9}  {'bytes':>9}  {'overlapped us':>13}  {'after us':>9}  after/overlapped")
        for (algorithm, nbytes), (early, after) in medians.items():
            print(f"{algorithm:>9}  {nbytes:>9}  {early * 1e6:13.1f}  {after * 1e6:9.1f}  {after / early:.3f}")


if __name__ == "__main__":
    main()
