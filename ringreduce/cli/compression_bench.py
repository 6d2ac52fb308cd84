"""Compressed vs uncompressed allreduce on this machine: time, wire bytes, ratio, error.

Run under mpirun (rank 0 prints); ``ringreduce-bench --compression`` can call
:func:`measure` for its columns. Each case reduces a Gaussian float32 tensor
(a different one per rank) ``--iters`` times after one warm-up call, the methods
interleaved (ring, mpi, fp16, ... then again), so a machine that slows down for
a while slows every method alike; the time is the median over iterations of
the slowest rank. The relative L2 error is
that of one call with fresh residuals (first step of a run), measured with an
extra exact allreduce outside the timing. ``codec ms`` is this rank's
compress (with residual) plus decompress of the whole tensor, no
communication: the compute cost of the format alone.

Example::

    mpirun -np 2 python -m ringreduce.cli.compression_bench --sizes 1 16 64
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from ..core.mpi import MPI

__all__ = ["measure", "main"]

METHODS = ("ring", "mpi", "fp16", "bf16", "int8", "int4", "onebit")


def _time_interleaved(comm, fns: dict, iters: int) -> dict:
    """Median seconds (slowest rank) of each fn, the fns run in turn (A B C A B C ...)."""
    for fn in fns.values():                # warm-up: scratch buffers, residuals
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(iters):
        for k, fn in fns.items():
            comm.Barrier()
            t0 = time.perf_counter()
            fn()
            times[k].append(comm.allreduce(time.perf_counter() - t0, op=MPI.MAX))
    return {k: statistics.median(v) for k, v in times.items()}


def _codec_seconds(comp, x: np.ndarray, iters: int) -> float:
    """compress (with a residual) + decompress of the whole tensor on this rank."""
    packed = np.empty(comp.packed_nbytes(x.size), np.uint8)
    res = np.zeros(x.size, np.float32)
    out = np.empty_like(x)
    times = []
    for _ in range(iters + 1):
        t0 = time.perf_counter()
        comp.compress(x, packed, res)
        comp.decompress(packed, x.size, out)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def measure(sizes_mib=(1, 16, 64), methods=METHODS, iters: int = 5) -> list[dict]:
    """One row per (size, method), identical on every rank.

    Keys: mib, method, ms, wire_mb (bytes sent per rank), ratio, rel_error,
    codec_ms, speedup_vs_ring, speedup_vs_mpi.
    """
    import ringreduce as rr

    from ..compression import Compression, measure_error

    rr.init()
    comm = MPI.COMM_WORLD
    n, r = rr.size(), rr.rank()
    rows = []
    for mib in sizes_mib:
        count = int(mib * 2**20) // 4
        x = np.random.default_rng([r, count]).standard_normal(count).astype(np.float32)
        out = np.empty_like(x)
        base: dict[str, float] = {}
        fns, comps = {}, {}
        for method in methods:
            comp = None if method in ("ring", "mpi") else getattr(Compression, method)
            algo = method if comp is None else "auto"
            comps[method] = comp
            fns[method] = (lambda c=comp, a=algo, nm=f"bench-{method}-{mib}":
                           rr.allreduce(x, compression=c, algorithm=a, name=nm, out=out))
        secs_by = _time_interleaved(comm, fns, iters)
        for method in methods:
            comp, secs = comps[method], secs_by[method]
            name = f"bench-{method}-{mib}"
            row = {"mib": mib, "method": method, "ms": 1e3 * secs}
            if comp is None:
                row.update(wire_mb=2 * (n - 1) / n * x.nbytes / 1e6, ratio=1.0, rel_error=0.0,
                           codec_ms=0.0)
                base[method] = secs
            else:
                measure_error(True)
                try:
                    rr.allreduce(x, compression=comp, name=name + "-fresh", out=out)
                finally:
                    measure_error(False)
                s = rr.last_stats()
                codec = comm.allreduce(_codec_seconds(comp, x, 3), op=MPI.MAX)
                row.update(wire_mb=s.wire_bytes / 1e6, ratio=s.ratio, rel_error=s.rel_error,
                           codec_ms=1e3 * codec)
            rows.append(row)
        rr.compression_state().clear()
        for row in rows:
            if row["mib"] == mib:
                for peer in ("ring", "mpi"):
                    if peer in base:
                        row[f"speedup_vs_{peer}"] = base[peer] / (row["ms"] / 1e3)
    return rows


def format_table(rows: list[dict], n: int) -> str:
    head = (f"{'MiB':>5} {'method':>7} {'ms':>9} {'wire MB/rank':>12} {'ratio':>7} "
            f"{'rel err':>9} {'codec ms':>9} {'x ring':>7} {'x mpi':>7}")
    lines = [f"# np={n}, float32 Gaussian, Average", head, "-" * len(head)]
    for w in rows:
        lines.append(f"{w['mib']:>5} {w['method']:>7} {w['ms']:>9.2f} {w['wire_mb']:>12.2f} "
                     f"{w['ratio']:>7.2f} {w['rel_error']:>9.2e} {w['codec_ms']:>9.2f} "
                     f"{w.get('speedup_vs_ring', float('nan')):>7.2f} "
                     f"{w.get('speedup_vs_mpi', float('nan')):>7.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=float, nargs="+", default=[1, 16, 64], help="MiB of float32")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--json", help="also write the rows here (rank 0)")
    args = p.parse_args(argv)
    rows = measure(args.sizes, args.methods, args.iters)
    if MPI.COMM_WORLD.rank == 0:
        print(format_table(rows, MPI.COMM_WORLD.size), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
