"""Kernel benchmark: GB/s of the fused compression kernels beside a numpy copy.

For each format and direction (``compress``, ``decompress_accumulate``) it
times the kernel on one core and, interleaved with it (kernel, copy, kernel,
copy, ...; best of each), numpy's copy of the same number of bytes (an array
of half the bytes copied: read + write), and prints both with their ratio.  Bytes counted are everything the kernel reads
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


def _calls_for(fn, min_time: float) -> int:
    fn()  # warm up: page in the buffers
    t0 = time.perf_counter()
    fn()
    return max(1, int(min_time / max(time.perf_counter() - t0, 1e-7)))


def _best_times(fns, repeats: int, min_time: float = 0.05) -> list[float]:
    """Best per-call seconds of each fn over `repeats` rounds, the fns alternating (A B A B ...)
    so a machine that slows down for a while slows all of them alike."""
    calls = [_calls_for(fn, min_time) for fn in fns]
    best = [float("inf")] * len(fns)
    for _ in range(repeats):
        for k, fn in enumerate(fns):
            t0 = time.perf_counter()
            for _ in range(calls[k]):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / calls[k])
    return best


def _copy_fn(nbytes: int):
    """A numpy copy moving nbytes in total (read + write)."""
    half = max(nbytes // 2, 1)
    src = np.ones(half, np.uint8)
    dst = np.empty_like(src)
    return (lambda: np.copyto(dst, src)), 2 * half


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
            copy, cbytes = _copy_fn(moved)
            t, tc = _best_times([lambda: kernels.compress(fmt, x, packed, residual=res,
                                                          block_size=block_size), copy], repeats)
            rows.append(_row(fmt, "compress", n, residual, moved, t, cbytes / tc / 1e9))
            moved = nbytes + 8 * n
            copy, cbytes = _copy_fn(moved)
            t, tc = _best_times([lambda: kernels.decompress_accumulate(
                fmt, packed, n, acc, block_size=block_size), copy], repeats)
            rows.append(_row(fmt, "decompress_accumulate", n, False, moved, t, cbytes / tc / 1e9))
    return rows


def _row(fmt, direction, n, residual, moved, t, copy):
    gbps = moved / t / 1e9
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
