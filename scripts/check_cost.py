"""Cost of the mismatch check: allreduce time with RINGREDUCE_CHECK on vs off, interleaved.

    flock /work/bench.lock mpirun -np 2 python scripts/check_cost.py

Also times the fingerprint exchange's own wait (non-blocking Iallgather polled by
the supervised wait) against a plain blocking Allgather of the same bytes, so the
polling's latency cost is visible. Prints medians per call and on/off ratios.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np

import ringreduce as rr   # before mpi4py.MPI: it quiets Open MPI's osc/ucx warnings
from ringreduce.runtime.context import RUNTIME
from mpi4py import MPI  # noqa: E402


def timed(fn, iters: int) -> float:
    MPI.COMM_WORLD.Barrier()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.25, help="per measurement")
    args = ap.parse_args()
    rr.init()
    comm = MPI.COMM_WORLD
    rows = []
    for label, nbytes in (("4 B", 4), ("4 KiB", 4096), ("16 MiB", 16 << 20)):
        x = np.ones(nbytes // 4, np.float32)
        out = np.empty_like(x)

        def call():
            rr.allreduce(x, op=rr.Sum, out=out, name="w")
        call()
        t1 = timed(call, 3)
        iters = max(3, int(args.seconds / max(t1, 1e-7)))
        iters = comm.bcast(iters)
        samples = {"on": [], "off": []}
        for _ in range(args.reps):
            for mode in ("on", "off"):
                os.environ["RINGREDUCE_CHECK"] = "1" if mode == "on" else "0"
                samples[mode].append(timed(call, iters))
        on, off = (statistics.median(samples[m]) for m in ("on", "off"))
        rows.append((label, on, off))
    os.environ["RINGREDUCE_CHECK"] = "1"
    width = 72 + 1024
    send = np.zeros(width, np.uint8)
    recv = np.zeros(width * comm.size, np.uint8)
    blocking = lambda: comm.Allgather([send, MPI.BYTE], [recv, MPI.BYTE])          # noqa: E731
    polled = lambda: RUNTIME.supervisor.wait([comm.Iallgather([send, MPI.BYTE], [recv, MPI.BYTE])])  # noqa: E731
    exch = {"blocking": [], "polled": []}
    for _ in range(args.reps):
        exch["blocking"].append(timed(blocking, 5000))
        exch["polled"].append(timed(polled, 5000))
    if comm.rank == 0:
        print(f"ranks {comm.size}, MPI {rr.info()['mpi_vendor']}")
        print(f"{'size':>8} {'check on':>12} {'check off':>12} {'on/off':>8}")
        for label, on, off in rows:
            print(f"{label:>8} {on * 1e6:10.1f}us {off * 1e6:10.1f}us {on / off:8.3f}")
        b, p = (statistics.median(exch[k]) for k in ("blocking", "polled"))
        print(f"fingerprint exchange: blocking Allgather {b * 1e6:.1f}us, Iallgather + supervised wait "
              f"{p * 1e6:.1f}us, ratio {p / b:.3f}")


if __name__ == "__main__":
    main()
