"""Cost of the mismatch check and of our per-call work: auto with RINGREDUCE_CHECK on vs off, interleaved.

    mpirun -np 2 python scripts/check_cost.py                 # 4 B .. 64 MiB, x4
    mpirun -np 2 python scripts/check_cost.py -b 16K -e 1M --shm-bandwidth

For every size, auto first runs until it has learned the size (as a job's first
calls would; no-op with a tuning file), then check on, check off and native
MPI_Allreduce (mpi4py, the same buffers) are timed in turn, A B C A B C ...;
medians per call, the slowest rank's. Printed per size: the three times, off/on
(the target is >= 0.95 from 16 KiB up), and auto's time minus native's.

--shm-bandwidth also measures, in the same run, this machine's memcpy bandwidth
(numpy copy of 64 MiB, one rank alone and both ranks at once) against shm's
busbw at 64 MiB.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import ringreduce as rr   # before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings
from mpi4py import MPI  # noqa: E402
from ringreduce.cli.bench import _settle_auto, parse_size, sizes_between  # noqa: E402


def timed(comm, fn, iters: int) -> float:
    fn()
    comm.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return comm.allreduce((time.perf_counter() - t) / iters, op=MPI.MAX)


def memcpy_bandwidth(comm, nbytes: int, together: bool, reps: int = 7) -> float:
    """GB/s of np.copyto over nbytes (bytes copied per second), rank 0 alone or every rank at once."""
    a = np.ones(nbytes, np.uint8)
    b = np.empty_like(a)
    np.copyto(b, a)
    best = []
    for _ in range(reps):
        comm.Barrier()
        if together or comm.rank == 0:
            t = time.perf_counter()
            np.copyto(b, a)
            best.append(time.perf_counter() - t)
    return comm.bcast(nbytes / statistics.median(best) / 1e9 if best else 0.0, root=0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-b", "--begin", type=parse_size, default=parse_size("4"))
    ap.add_argument("-e", "--end", type=parse_size, default=parse_size("64M"))
    ap.add_argument("-f", "--factor", type=float, default=4)
    ap.add_argument("-r", "--reps", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.05, help="per sample")
    ap.add_argument("--shm-bandwidth", action="store_true")
    args = ap.parse_args()
    rr.init()
    comm = MPI.COMM_WORLD.Dup()
    n = comm.size
    rows = []
    for nbytes in sizes_between(args.begin, args.end, args.factor):
        x = np.ones(max(1, nbytes // 4), np.float32)
        out = np.empty_like(x)
        os.environ["RINGREDUCE_CHECK"] = "1"

        def auto():
            rr.allreduce(x, op=rr.Sum, out=out)

        def native():
            comm.Allreduce(x, out)
        learned = _settle_auto(auto, x, "sum")
        os.environ["RINGREDUCE_CHECK"] = "0"
        _settle_auto(auto, x, "sum")
        once = timed(comm, auto, 1)
        iters = comm.bcast(max(1, min(200, int(args.seconds / max(once, 1e-7)))))
        samples = {"on": [], "off": [], "mpi": []}
        for _ in range(args.reps):
            for mode in ("on", "off", "mpi"):
                os.environ["RINGREDUCE_CHECK"] = "0" if mode == "off" else "1"
                samples[mode].append(timed(comm, native if mode == "mpi" else auto, iters))
        med = {k: statistics.median(v) for k, v in samples.items()}
        rows.append((x.nbytes, med, learned))
    os.environ["RINGREDUCE_CHECK"] = "1"
    if comm.rank == 0:
        print(f"# check_cost  np={n}  {rr.info()['mpi_library'].split(',')[0].strip()}  "
              f"learning={rr.info()['learning'].split(' ')[0]}  {time.strftime('%Y-%m-%d %H:%M')}")
        print(f"{'size':>10} {'check on':>10} {'check off':>10} {'native':>10} {'off/on':>7} "
              f"{'on-native':>10} {'learned in':>10}")
        for nbytes, med, learned in rows:
            print(f"{nbytes:>10} {med['on'] * 1e6:9.1f}u {med['off'] * 1e6:9.1f}u {med['mpi'] * 1e6:9.1f}u "
                  f"{med['off'] / med['on']:7.3f} {(med['on'] - med['mpi']) * 1e6:9.1f}u {learned:>10}")
    if args.shm_bandwidth:
        m = 64 << 20
        x = np.ones(m // 4, np.float32)
        out = np.empty_like(x)
        alone = memcpy_bandwidth(comm, m, together=False)
        both = memcpy_bandwidth(comm, m, together=True)
        t = statistics.median(timed(comm, lambda: rr.allreduce(x, op=rr.Sum, out=out, algorithm="shm"), 2)
                              for _ in range(args.reps))
        busbw = m / t / 1e9 * (2 * (n - 1) / n if n > 1 else 1.0)
        if comm.rank == 0:
            print(f"shm 64 MiB: {t * 1e3:.1f} ms, busbw {busbw:.2f} GB/s; memcpy 64 MiB: {alone:.2f} GB/s "
                  f"one rank alone, {both:.2f} GB/s per rank with {n} copying at once; "
                  f"busbw / memcpy = {busbw / alone:.2f} (alone), {busbw / both:.2f} (all at once)")


if __name__ == "__main__":
    main()
