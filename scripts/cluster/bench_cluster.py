#!/usr/bin/env python3
"""Allreduce sweep inside the emulated cluster: interleaved peers, and the bytes on the links.

Run on every rank under ``cluster.py run``. For each message size, each repetition
times every column once, in turn (A B A B ...), so noise hits all columns alike.
Around every timed sample each node's lowest rank reads its link's byte counters
(RRC_IFACE), so every column's row carries the bytes that really crossed the
emulated links per call. Rank 0 prints a table and writes JSON.

Columns: ``mpi`` (MPI_Allreduce through mpi4py: whatever Open MPI's tuned component
picks, or the algorithm forced with --mca coll_tuned_allreduce_algorithm, given to
the job by bench_cluster.sh), ``ring``, ``tree``, ``hierarchical``, ``auto``, and
compressed ``int8``/``int4``/``onebit`` (two-sided error-feedback allreduce over all
ranks) or ``hier+int8`` etc. (compressed between node leaders only). ``ring@1M`` (any
size) is the ring with ``ringreduce.algorithms.ring.SEGMENT_BYTES`` set to that size for
its calls only (a benchmark-side monkeypatch, to find the best segment size over TCP);
``int8@64M`` likewise sets the compressed allreduce's pipeline segment
(``ringreduce.compression.algorithm.SEGMENT_BYTES``, and ``NODE_SEGMENT_BYTES`` used when
every rank shares a node): 64M makes one segment per chunk at
64 MiB, i.e. scatter, reduce and gather one after the other (the unpipelined scheme).

Links: tbf rate limit only, no added delay (no netem on this kernel).

Example::

    scripts/cluster/cluster.sh run --nodes 2 --ranks-per-node 1 --rate 1gbit -- \\
        python scripts/cluster/bench_cluster.py -b 4K -e 64M -f 4 -r 5 \\
        -a mpi,ring,tree,hierarchical,int8,int4,onebit --json out.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

import ringreduce as rr    # before mpi4py.MPI: it sets up the MPI environment first
from mpi4py import MPI  # noqa: E402
from ringreduce.algorithms import ring as ring_mod  # noqa: E402
from ringreduce.compression import algorithm as comp_mod  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cluster import node_link_bytes  # noqa: E402

COMPRESSIONS = ("int8", "int4", "onebit")


def parse_size(text: str) -> int:
    t = text.strip().upper().rstrip("B")
    mult = 1
    if t and t[-1] in "KMG":
        mult, t = 1 << (10 * ("KMG".index(t[-1]) + 1)), t[:-1]
    return int(float(t) * mult)


def data(rank: int, n: int) -> np.ndarray:
    # Small integers: every summation order is exact, so uncompressed columns must be exact.
    return ((np.arange(n, dtype=np.int64) * (rank + 3) + rank) % 17 - 8).astype(np.float32)


class Column:
    """One measured thing: a callable doing one allreduce of x into y."""

    def __init__(self, name, comm, rr):
        self.name = name
        self.comm = comm
        self.rr = rr
        name, _, seg = name.partition("@")
        self.segment_bytes = parse_size(seg) if seg else None
        algo, _, fmt = name.partition("+")
        if name in COMPRESSIONS:
            algo, fmt = "auto", name
        elif name.startswith("hier+"):
            algo = "hierarchical"
        self.algorithm = algo
        self.compression = getattr(rr.Compression, fmt) if fmt else None
        self.exact = self.compression is None

    def __call__(self, x, y):
        if self.segment_bytes and self.compression is not None:
            # Both segment sizes: the node-local one applies when every rank shares a node.
            saved = comp_mod.SEGMENT_BYTES, comp_mod.NODE_SEGMENT_BYTES
            comp_mod.SEGMENT_BYTES = comp_mod.NODE_SEGMENT_BYTES = self.segment_bytes
            try:
                self.rr.allreduce(x, op=self.rr.Average, algorithm=self.algorithm,
                                  compression=self.compression, name=f"bench-{self.name}-{x.size}",
                                  out=y)
            finally:
                comp_mod.SEGMENT_BYTES, comp_mod.NODE_SEGMENT_BYTES = saved
        elif self.segment_bytes:
            saved, ring_mod.SEGMENT_BYTES = ring_mod.SEGMENT_BYTES, self.segment_bytes
            try:
                self.rr.allreduce(x, op=self.rr.Sum, algorithm=self.algorithm, out=y)
            finally:
                ring_mod.SEGMENT_BYTES = saved
        elif self.name == "mpi":
            self.comm.Allreduce(x, y, op=MPI.SUM)
        elif self.compression is not None:
            # Average keeps compressed magnitudes sane; rescaled for the error check.
            self.rr.allreduce(x, op=self.rr.Average, algorithm=self.algorithm,
                              compression=self.compression, name=f"bench-{x.size}", out=y)
        else:
            self.rr.allreduce(x, op=self.rr.Sum, algorithm=self.algorithm, out=y)


def compress_floor(rr, count: int, n: int, reps: int = 3) -> dict:
    """Seconds to compress and decompress `count` fp32 once, per format (this rank only).

    The two-sided allreduce does about (1 + 1/n) compressions and 2 decompressions
    of the whole tensor per rank, so that is the floor it reports.
    """
    x = np.random.default_rng(0).standard_normal(count).astype(np.float32)
    out = np.empty_like(x)
    res = np.zeros_like(x)
    floors = {}
    for fmt in COMPRESSIONS:
        comp = getattr(rr.Compression, fmt)
        packed = np.empty(comp.packed_nbytes(count), np.uint8)
        tc, td = [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            comp.compress(x, packed, res)
            t1 = time.perf_counter()
            comp.decompress(packed, count, out)
            td.append(time.perf_counter() - t1)
            tc.append(t1 - t0)
        c, d = float(np.median(tc)), float(np.median(td))
        floors[fmt] = {"compress_s": c, "decompress_s": d, "floor_s": (1 + 1 / n) * c + 2 * d,
                       "packed_bytes": int(packed.size)}
    return floors


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-b", "--begin", type=parse_size, default=parse_size("4K"))
    p.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"))
    p.add_argument("-f", "--factor", type=int, default=4)
    p.add_argument("-r", "--repetitions", type=int, default=5)
    p.add_argument("-w", "--warmup", type=int, default=1)
    p.add_argument("--sample-seconds", type=float, default=0.05,
                   help="small sizes repeat the call until a sample lasts this long")
    p.add_argument("-a", "--algorithms", default="mpi,ring,tree,hierarchical,int8,int4,onebit")
    p.add_argument("--label", default="", help="e.g. the forced native algorithm, for the JSON")
    p.add_argument("--rate-gbit", type=float, default=1.0, help="link rate, for the table")
    p.add_argument("--floor", action="store_true", help="also time compress+decompress alone")
    p.add_argument("--json")
    a = p.parse_args()

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    rr.init()
    node = os.environ.get("RRC_NODE", "?")
    nodes = comm.allgather(node)
    reader = nodes.index(node) == rank        # one counter reader per node
    cols = [Column(c, comm, rr) for c in a.algorithms.split(",")]
    sizes, s = [], a.begin
    while s <= a.end:
        sizes.append(s)
        s *= a.factor
    rows = []
    if rank == 0:
        print(f"# {size} ranks on {len(set(nodes))} nodes, link {a.rate_gbit:g} Gbit/s "
              "(tbf rate limit only, no added delay: no netem on this kernel) "
              f"{a.label}", flush=True)
        print(f"# {'bytes':>10} {'column':>14} {'median_s':>10} {'min_s':>9} {'busbw_Gb':>9} "
              f"{'link%':>6} {'MiB_sent/node':>13} {'ok':>3}", flush=True)
    for nbytes in sizes:
        count = nbytes // 4
        x = data(rank, count)
        ref = sum(data(r, count).astype(np.float64) for r in range(size))
        y = np.empty_like(x)
        # Calls per sample: enough for --sample-seconds at small sizes (agreed on rank 0).
        for c in cols:
            for _ in range(a.warmup):
                c(x, y)
        comm.Barrier()
        t0 = time.perf_counter()
        cols[0](x, y)
        per_call = comm.bcast(time.perf_counter() - t0, root=0)
        iters = int(max(1, min(200, a.sample_seconds / max(per_call, 1e-6))))
        times = {c.name: [] for c in cols}
        moved = {c.name: np.zeros(2, np.int64) for c in cols}
        for _ in range(a.repetitions):
            for c in cols:
                comm.Barrier()
                b0 = node_link_bytes() if reader else (0, 0)
                t0 = time.perf_counter()
                for _ in range(iters):
                    c(x, y)
                t1 = time.perf_counter()
                comm.Barrier()
                b1 = node_link_bytes() if reader else (0, 0)
                times[c.name].append(comm.allreduce((t1 - t0) / iters, op=MPI.MAX))
                moved[c.name] += np.subtract(b1, b0)
        for c in cols:
            c(x, y)
            got = y.astype(np.float64) * (size if not c.exact else 1)
            err = float(np.max(np.abs(got - ref))) if count else 0.0
            rel = float(np.linalg.norm(got - ref) / (np.linalg.norm(ref) or 1.0))
            same = len(set(comm.allgather(hashlib.sha1(y.tobytes()).hexdigest()))) == 1
            ok = comm.allreduce(int(same and (err == 0.0 if c.exact else True)), op=MPI.MIN)
            per_node = comm.gather((node, (moved[c.name] // (a.repetitions * iters)).tolist())
                                   if reader else None, root=0)
            if rank == 0:
                t = times[c.name]
                med = float(np.median(t))
                busbw = nbytes / med * 2 * (size - 1) / size * 8 / 1e9 if med else 0.0
                nb = dict(v for v in per_node if v)
                sent = float(np.mean([v[0] for v in nb.values()])) / 2**20
                row = {"bytes": nbytes, "column": c.name, "median_s": med, "min_s": min(t),
                       "max_s": max(t), "times": t, "iters": iters, "busbw_gbit": busbw,
                       "algbw_gbit": nbytes / med * 8 / 1e9 if med else 0.0,
                       "ok": bool(ok), "max_err": err, "rel_err": rel, "node_bytes": nb,
                       "mean_sent_mib": sent}
                rows.append(row)
                print(f"  {nbytes:>10} {c.name:>14} {med:>10.5f} {min(t):>9.5f} {busbw:>9.3f} "
                      f"{100 * busbw / a.rate_gbit:>5.0f}% {sent:>13.2f} {'ok' if ok else 'BAD':>3}",
                      flush=True)
    floor = compress_floor(rr, a.end // 4, size) if a.floor and rank == 0 else None
    if rank == 0:
        if floor:
            for fmt, f in floor.items():
                print(f"# floor {fmt}: compress {f['compress_s']:.4f} s, decompress "
                      f"{f['decompress_s']:.4f} s, two-sided work (1+1/n)c+2d = {f['floor_s']:.4f} s "
                      f"at {a.end} bytes", flush=True)
        if a.json:
            with open(a.json, "w") as fh:
                json.dump({"ranks": size, "nodes": len(set(nodes)), "label": a.label,
                           "rate_gbit": a.rate_gbit, "rows": rows, "floor": floor,
                           "note": "tbf rate limit only, no added delay (no netem on this kernel)",
                           "date": time.strftime("%Y-%m-%d %H:%M:%S")}, fh, indent=1)
    bad = any(not r["ok"] for r in rows) if rank == 0 else False
    rr.shutdown()
    return 1 if comm.bcast(bad, root=0) else 0


if __name__ == "__main__":
    sys.exit(main())
