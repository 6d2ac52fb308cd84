"""Kernel benchmark: GB/s of the fused compression kernels beside a numpy copy.

For each format and direction (``compress``, ``decompress_accumulate``) it
times the kernel on one core and, in the same run, numpy's copy of the same
number of bytes (an array of half the bytes copied: read + write), and
prints both with their ratio.  Bytes counted are everything the kernel reads
and writes: input, residual (read and written), packed output or input, and
the fp32 accumulator (read and written).

Run as ``ringreduce-bench --kernels`` or ``python -m ringreduce.cli.kernel_bench``.

Example
-------
>>> from ringreduce.cli import kernel_bench as bench_kernels
>>> rows = bench_kernels.run(sizes=[4096], formats=["int8"], repeats=2)
>>> rows[0]["format"], rows[0]["direction"]
('int8', 'compress')
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from ..compression import kernels

__all__ = ["run", "main"]


def _best_time(fn, repeats: int, min_time: float = 0.05) -> float:
    """Best per-call seconds over `repeats` rounds of enough calls to last min_time."""
    fn()  # warm up: page in the buffers
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    calls = max(1, int(min_time / one))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def _copy_gbps(nbytes: int, repeats: int) -> float:
    """numpy copy GB/s (read + write) for a copy moving nbytes in total."""
    half = max(nbytes // 2, 1)
    src = np.ones(half, np.uint8)
    dst = np.empty_like(src)
    t = _best_time(lambda: np.copyto(dst, src), repeats)
    return 2 * half / t / 1e9


def run(sizes=(1 << 20, 1 << 24), formats=kernels.FORMATS, block_size: int = 256,
        residual: bool = True, repeats: int = 5) -> list[dict]:
    """Time compress and decompress_accumulate; returns one dict per row.

    Example
    -------
    >>> rows = run(sizes=[1024], formats=["fp16"], repeats=1)
    >>> sorted(rows[0])[:3]
    ['bytes', 'copy_gbps', 'direction']
    """
    if not kernels.available():
        raise SystemExit("ringreduce._C is not built; `pip install -e .` first")
    rows = []
    rng = np.random.default_rng(0)
    for n in sizes:
        x = rng.standard_normal(n).astype(np.float32)
        res = np.zeros(n, np.float32) if residual else None
        acc = np.zeros(n, np.float32)
        for fmt in formats:
            nbytes = kernels.packed_nbytes(fmt, n, block_size)
            packed = np.empty(nbytes, np.uint8)
            moved = 4 * n + nbytes + (8 * n if residual else 0)
            t = _best_time(lambda: kernels.compress(fmt, x, packed, residual=res,
                                                    block_size=block_size), repeats)
            rows.append(_row(fmt, "compress", n, residual, moved, t, repeats))
            moved = nbytes + 8 * n
            t = _best_time(lambda: kernels.decompress_accumulate(fmt, packed, n, acc,
                                                                 block_size=block_size), repeats)
            rows.append(_row(fmt, "decompress_accumulate", n, False, moved, t, repeats))
    return rows


def _row(fmt, direction, n, residual, moved, t, repeats):
    gbps = moved / t / 1e9
    copy = _copy_gbps(moved, repeats)
    return {"format": fmt, "direction": direction, "elements": n, "residual": residual,
            "bytes": moved, "time_ms": t * 1e3, "gbps": gbps, "copy_gbps": copy,
            "ratio": gbps / copy}


def format_table(rows: list[dict]) -> str:
    head = (f"{'format':<7} {'direction':<22} {'elements':>10} {'resid':>5} {'MB moved':>9} "
            f"{'ms':>8} {'GB/s':>7} {'copy GB/s':>9} {'ratio':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['format']:<7} {r['direction']:<22} {r['elements']:>10} "
            f"{'yes' if r['residual'] else 'no':>5} {r['bytes'] / 1e6:>9.1f} {r['time_ms']:>8.3f} "
            f"{r['gbps']:>7.2f} {r['copy_gbps']:>9.2f} {r['ratio']:>6.2f}")
    return "\n".join(lines)


def main(argv=None) -> int:
    """Command line: ``python -m ringreduce.cli.kernel_bench [--sizes ...] [--json FILE]``."""
    p = argparse.ArgumentParser(prog="ringreduce-bench --kernels", description=__doc__.split(
        "\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 24],
                   help="element counts (default 2^20 2^24)")
    p.add_argument("--formats", nargs="+", default=list(kernels.FORMATS),
                   choices=kernels.FORMATS)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--no-residual", action="store_true", help="compress without error feedback")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = run(args.sizes, args.formats, args.block_size, not args.no_residual, args.repeats)
    print(f"# ringreduce kernel benchmark, one thread, block_size={args.block_size}, "
          f"{platform.processor() or platform.machine()}, numpy {np.__version__}")
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
