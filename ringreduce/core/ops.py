"""Reduction operations and the local (on-rank) arithmetic behind them."""
from __future__ import annotations

import enum
import importlib

import ml_dtypes
import numpy as np

from . import device as _device

__all__ = ["ReduceOp", "Sum", "Average", "Min", "Max", "Product", "reduce_into", "combine"]


class ReduceOp(enum.IntEnum):
    """How contributions from all ranks combine."""

    SUM = 0
    AVERAGE = 1
    MIN = 2
    MAX = 3
    PRODUCT = 4

    def __repr__(self) -> str:
        return f"rr.{self.name.capitalize()}"


Sum = ReduceOp.SUM
Average = ReduceOp.AVERAGE
Min = ReduceOp.MIN
Max = ReduceOp.MAX
Product = ReduceOp.PRODUCT

# Average travels as a sum; the division happens once, on the reduced result.
_UFUNC = {ReduceOp.SUM: np.add, ReduceOp.AVERAGE: np.add,
          ReduceOp.MIN: np.minimum, ReduceOp.MAX: np.maximum, ReduceOp.PRODUCT: np.multiply}


def ufunc(op: ReduceOp):
    return _UFUNC[op]


def reduce_into(op: ReduceOp, dst: np.ndarray, src: np.ndarray, src_first: bool = False) -> None:
    """dst = op(dst, src) in place (or op(src, dst) when src_first).

    The operand order is fixed by rank so every rank computes the same bits, NaN
    payloads included. Half types compute in fp32 inside numpy's loops.
    """
    if src_first:
        _UFUNC[op](src, dst, out=dst)
    elif op in (ReduceOp.SUM, ReduceOp.AVERAGE) and type(dst) is np.ndarray \
            and dst.dtype in _HALF_CODES and _half_sum(dst, src):
        return
    else:
        _UFUNC[op](dst, src, out=dst)
    _settle(dst)


# numpy's float16 (and ml_dtypes' bfloat16) add loops convert element by element, about
# 10x slower than float32's; the compiled kernels (ringreduce._C, a leaf extension loaded
# by name) give the same bits (fp32 add, round to nearest even) at float32's speed.
# csrc/quantize.h dtype codes, keyed by dtype: a dict lookup, where numpy 2's dtype.name
# costs 3.5 us (it was a third of a 16 KiB native-routed Average call on the 2-core VM).
_HALF_CODES = {np.dtype(np.float16): 1, np.dtype(ml_dtypes.bfloat16): 2}
_C_MODULE: list = []


def _c_module():
    """ringreduce._C, or None when it is not built."""
    if not _C_MODULE:
        try:
            _C_MODULE.append(importlib.import_module(__name__.split(".")[0] + "._C"))
        except ImportError:
            _C_MODULE.append(None)
    return _C_MODULE[0]


def _half_sum(dst: np.ndarray, src: np.ndarray) -> bool:
    """dst += src through ringreduce._C for contiguous host float16/bfloat16; False if not done."""
    C = _c_module()
    fn = None if C is None else C.reduce
    if fn is None or src.dtype != dst.dtype or src.shape != dst.shape \
            or not (dst.flags.c_contiguous and src.flags.c_contiguous and dst.flags.writeable):
        return False
    if _HALF_CODES[dst.dtype] == 2:    # bfloat16 has no buffer-protocol format: pass its bits
        fn(0, 2, dst.view(np.uint16), src.view(np.uint16), dst.size)
    else:
        fn(0, 1, dst, src, dst.size)
    return True


def combine(op: ReduceOp, a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out = op(a, b), operands in this order (out may alias either)."""
    _UFUNC[op](a, b, out=out)
    _settle(out)


def finish_average(op: ReduceOp, buf: np.ndarray, n: int) -> None:
    """Turn a sum into an average in place (no-op for other ops)."""
    if op == ReduceOp.AVERAGE and n > 1 and buf.size:
        if type(buf) is np.ndarray and buf.dtype in _HALF_CODES and buf.flags.c_contiguous:
            _half_divide(buf.reshape(-1), n)
        else:
            np.divide(buf, buf.dtype.type(n), out=buf)
    _settle(buf)


_HALF_CHUNK = 1 << 16


def _half_divide(flat: np.ndarray, n: int) -> None:
    """flat /= n for float16/bfloat16 in float32 chunks that stay in cache: the same bits as
    numpy's (and ml_dtypes') half-type divide, which computes in fp32 and rounds to nearest
    even, converting with ringreduce._C's vectorised kernels (numpy's own half loops and casts
    go element by element, about 10x slower than float32)."""
    C = _c_module()
    code = _HALF_CODES[flat.dtype]
    k = np.float32(flat.dtype.type(n))
    tmp = np.empty(min(flat.size, _HALF_CHUNK), np.float32)
    bits = flat.view(np.uint8)
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, flat.size, _HALF_CHUNK):
            m = min(_HALF_CHUNK, flat.size - lo)
            t, raw = tmp[:m], bits[2 * lo:2 * (lo + m)]
            if C is None:
                t[...] = flat[lo:lo + m]
            else:       # wire format fp16 (0) / bf16 (1) is the dtype's own bytes
                C.decompress(code - 1, raw, m, t, 0, 256)
            np.divide(t, k, out=t)
            if C is None:
                flat[lo:lo + m] = t
            else:
                C.compress(code - 1, t, 0, m, raw, None, 256, False, 0.0, False, 0, 0, 0)


def _settle(dst) -> None:
    """Finish a device reduction before returning: MPI may read dst next (device.py's stream rule)."""
    if type(dst) is not np.ndarray:
        _device.synchronize(dst)
