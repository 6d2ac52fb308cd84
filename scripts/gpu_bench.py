"""GPU benchmark: busbw of cupy allreduce, and compression-kernel GB/s beside the device copy.

Two parts (scripts/gpu_check.sh runs both on a GPU machine):

* ``mpirun -np N python scripts/gpu_bench.py allreduce --out rows.json``:
  nccl-tests style table (size, time, algbw, busbw) of ``rr.allreduce_`` on
  cupy float32 arrays for algorithm ring, auto and mpi in the device mode of
  this run (RINGREDUCE_CUDA_AWARE forces one), with the host engine's ring on
  numpy arrays of the same size measured in the same run as the peer.
  busbw = algbw * 2 (n - 1) / n. Each time is the slowest rank's mean.
* ``python scripts/gpu_bench.py kernels --out kernels.json``: GB/s of
  ``ringreduce.compression.kernels`` on the device (compress, decompress_accumulate per
  format, and reduce_ sum) beside a device-to-device copy of the same bytes,
  all timed with CUDA events; bytes count everything read and written.

Example::

    RINGREDUCE_CUDA_AWARE=0 mpirun -np 2 python scripts/gpu_bench.py allreduce --out staged.json
    python scripts/gpu_bench.py kernels --out kernels.json
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np


def _sizes(lo: int, hi: int) -> list[int]:
    out, s = [], lo
    while s <= hi:
        out.append(s)
        s *= 4
    return out


def bench_allreduce(args) -> list[dict]:
    import cupy as cp
    from mpi4py import MPI

    import ringreduce as rr
    from ringreduce.core import device

    rr.init()
    cp.cuda.Device(rr.local_rank() % cp.cuda.runtime.getDeviceCount()).use()
    n, comm = rr.size(), MPI.COMM_WORLD
    mode = device.mode().name
    rows = []

    def timed(fn, iters):
        for _ in range(args.warmup):
            fn()
        comm.Barrier()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return comm.allreduce((time.perf_counter() - t0) / iters, op=MPI.MAX)

    for nbytes in _sizes(args.min_bytes, args.max_bytes):
        count = nbytes // 4
        iters = max(3, min(args.iters, int(args.budget_bytes // max(nbytes, 1))))
        cases = [(f"cupy {alg} ({mode})", alg, cp.ones(count, cp.float32)) for alg in ("ring", "auto", "mpi")]
        cases.append(("numpy ring (host peer)", "ring", np.ones(count, np.float32)))
        for label, alg, arr in cases:
            t = timed(lambda: rr.allreduce_(arr, op=rr.Sum, algorithm=alg), iters)
            algbw = nbytes / t / 1e9
            rows.append({"what": label, "mode": mode, "algorithm": alg, "bytes": nbytes, "ranks": n,
                         "time_us": t * 1e6, "algbw_GBs": algbw, "busbw_GBs": algbw * 2 * (n - 1) / n})
    if rr.rank() == 0:
        print(f"# allreduce float32 Sum, {n} ranks, device mode {mode} ({device.mode().reason})")
        print(f"{'bytes':>12} {'what':<34} {'time(us)':>12} {'algbw(GB/s)':>12} {'busbw(GB/s)':>12}")
        for r in rows:
            print(f"{r['bytes']:>12} {r['what']:<34} {r['time_us']:>12.1f} {r['algbw_GBs']:>12.3f} "
                  f"{r['busbw_GBs']:>12.3f}")
    return rows if rr.rank() == 0 else []


def bench_kernels(args) -> list[dict]:
    import cupy as cp

    from ringreduce.compression import kernels

    n = args.kernel_elems
    x = cp.random.default_rng(0).standard_normal(n, dtype=cp.float32)
    res = cp.zeros(n, cp.float32)
    acc = cp.zeros(n, cp.float32)
    stream = cp.cuda.get_current_stream()

    def gpu_time(fn, reps=args.kernel_reps) -> float:
        fn()
        stream.synchronize()
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record(stream)
        for _ in range(reps):
            fn()
        stop.record(stream)
        stop.synchronize()
        return cp.cuda.get_elapsed_time(start, stop) / 1e3 / reps

    rows = []

    def row(what, nbytes, t, copy_t):
        rows.append({"what": what, "elements": n, "bytes_moved": nbytes, "time_us": t * 1e6,
                     "GBs": nbytes / t / 1e9, "copy_GBs": nbytes / copy_t / 1e9,
                     "vs_copy": copy_t / t})

    def copy_time(nbytes):
        # A device-to-device copy that reads nbytes/2 and writes nbytes/2.
        src = cp.empty(nbytes // 2, cp.uint8)
        dst = cp.empty_like(src)
        return gpu_time(lambda: cp.copyto(dst, src))

    for fmt in kernels.FORMATS:
        nb = kernels.packed_nbytes(fmt, n, 256)
        packed = cp.empty(nb, cp.uint8)
        moved = 4 * n + 8 * n + nb             # x read, residual read+write, packed written
        row(f"compress {fmt}", moved, gpu_time(lambda: kernels.compress(fmt, x, packed, residual=res)),
            copy_time(moved))
        moved = nb + 8 * n                     # packed read, accumulator read+write
        row(f"decompress_accumulate {fmt}", moved,
            gpu_time(lambda: kernels.decompress_accumulate(fmt, packed, n, acc)), copy_time(moved))
    moved = 12 * n                             # dst read+write, src read
    row("reduce_ sum float32", moved, gpu_time(lambda: kernels.reduce_("sum", acc, x)), copy_time(moved))
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"]
    name = name.decode() if isinstance(name, bytes) else name
    print(f"# ringreduce.compression.kernels on {name}, {n} float32 elements, block 256")
    print(f"{'kernel':<34} {'GB/s':>10} {'copy GB/s':>10} {'x copy':>8}")
    for r in rows:
        r["gpu"] = name
        print(f"{r['what']:<34} {r['GBs']:>10.1f} {r['copy_GBs']:>10.1f} {r['vs_copy']:>8.2f}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("part", choices=["allreduce", "kernels"])
    ap.add_argument("--out", help="write the rows as JSON here")
    ap.add_argument("--min-bytes", type=int, default=1 << 12)
    ap.add_argument("--max-bytes", type=int, default=1 << 28)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--budget-bytes", type=float, default=4e9, help="bytes per case, caps iterations")
    ap.add_argument("--kernel-elems", type=int, default=1 << 26)
    ap.add_argument("--kernel-reps", type=int, default=20)
    args = ap.parse_args(argv)
    rows = bench_allreduce(args) if args.part == "allreduce" else bench_kernels(args)
    if args.out and rows:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
