#!/usr/bin/env python3
"""Allreduce in a loop for a while (ringreduce calls only): the job for the link-down test.

Rank 0 prints one line per second. With RINGREDUCE_TIMEOUT set, a link taken down
during the loop must end the job with ringreduce's timeout error instead of a hang.

Example::

    RINGREDUCE_TIMEOUT=5 scripts/cluster/cluster.sh run --nodes 2 --linkdown 1@3 --timeout 60 \\
        -- python scripts/cluster/loop_allreduce.py --seconds 30 --algorithm ring
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import ringreduce as rr


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--mib", type=float, default=4.0)
    p.add_argument("--algorithm", default="ring")
    a = p.parse_args()
    rr.init()
    x = np.ones(int(a.mib * 2**20) // 4, np.float32)
    start = last = time.perf_counter()
    calls = 0
    # Every rank decides to stop the same way: through a (tiny) allreduce of the elapsed time.
    while rr.allreduce(np.array([time.perf_counter() - start]), op=rr.Max)[0] < a.seconds:
        y = rr.allreduce(x, op=rr.Sum, algorithm=a.algorithm)
        assert y[0] == rr.size()
        calls += 1
        if rr.rank() == 0 and time.perf_counter() - last >= 1.0:
            last = time.perf_counter()
            print(f"{last - start:6.1f} s: {calls} allreduces", flush=True)
    if rr.rank() == 0:
        print(f"done: {calls} allreduces", flush=True)


if __name__ == "__main__":
    main()
