"""Native MPI_Allreduce: the MPI library's own tuned algorithm, our reference peer.

Unless the ranks have already agreed on this very call, it runs as
MPI_Iallreduce waited through the supervisor, so it gets the same stall warning,
timeout and liveness checks as our own algorithms. After the mismatch check's
(supervised) exchange has shown every rank inside this call (``agreed=True``), it
runs blocking: Open MPI's non-blocking allreduce takes its generic schedule, at
2-3x the blocking one's time from 64 KiB up (measured: 156 vs 51 us at 256 KiB, np=2),
and a call every rank has entered cannot be left waiting for a missing peer.

MPI's MIN and MAX do not propagate NaN (Open MPI and MPICH both drop a NaN held
by the lower rank: max(NaN, 0) is 0 there), while numpy's and ours do. So for
float Min/Max the NaN positions travel too (a MAX of per-element flags) and the
result holds NaN wherever any rank had one: never a hidden NaN.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from ..core import device
from ..core.dtypes import HALF_DTYPES
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..core.ops import ReduceOp, finish_average
from ..transport import p2p

__all__ = ["allreduce", "supports"]

_MPI_TYPES = {
    np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
    np.dtype(np.int32): MPI.INT32_T, np.dtype(np.int64): MPI.INT64_T,
    np.dtype(np.int8): MPI.INT8_T, np.dtype(np.uint8): MPI.UINT8_T,
}
_MPI_OPS = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVERAGE: MPI.SUM, ReduceOp.MIN: MPI.MIN,
            ReduceOp.MAX: MPI.MAX, ReduceOp.PRODUCT: MPI.PROD}
_HALF = frozenset(HALF_DTYPES) | {np.dtype(ml_dtypes.bfloat16)}
_MIN_MAX = (ReduceOp.MIN, ReduceOp.MAX)


MPI_IN_PLACE = MPI.IN_PLACE


def native_call(dtype, op: ReduceOp, nbytes: int):
    """(MPI datatype, MPI op) when one blocking MPI_Allreduce does the agreed call, else None
    (half types, float Min/Max with their NaN fix, messages over the MPI count limit)."""
    dtype = np.dtype(dtype)
    if (dtype not in _MPI_TYPES or op not in _MPI_OPS or nbytes > p2p.MAX_MESSAGE_BYTES
            or (op in _MIN_MAX and dtype.kind == "f")):
        return None
    return _MPI_TYPES[dtype], _MPI_OPS[op]


def supports(dtype) -> bool:
    return np.dtype(dtype) in _MPI_TYPES


def allreduce(chan, buf: np.ndarray, op: ReduceOp, name: str | None = None,
              src: np.ndarray | None = None, agreed: bool = False) -> None:
    """MPI_Allreduce in place (or from `src` into `buf`), split so no count exceeds the MPI limit."""
    dtype = buf.dtype
    if dtype in _HALF:
        label = f" of tensor '{name}'" if name else ""
        raise RingReduceError(
            f"{chan.who}: algorithm 'mpi' cannot reduce {dtype}{label}: MPI has no "
            "reduction for half types; use 'ring', 'tree' or 'auto'")
    mpitype = _MPI_TYPES[dtype]
    mpiop = _MPI_OPS[op]
    flat = buf.reshape(-1)
    src = None if src is None else src.reshape(-1)
    nan_fix = op in _MIN_MAX and dtype.kind == "f" and chan.size > 1
    if agreed and not nan_fix and flat.nbytes <= p2p.MAX_MESSAGE_BYTES:
        # The common case, kept short: one blocking call (every rank is in this call).
        chan.count(flat.nbytes, flat.nbytes)
        chan.comm.Allreduce(MPI.IN_PLACE if src is None else [src, mpitype], [flat, mpitype], mpiop)
        finish_average(op, buf, chan.size)
        return
    nans = None
    if nan_fix:
        nans = np.isnan(flat if src is None else src).view(np.uint8)
        if type(nans) is not np.ndarray:
            device.synchronize(nans)      # the stream rule: MPI reads it next
    step = max(1, p2p.MAX_MESSAGE_BYTES // buf.itemsize)
    if src is not None and flat.nbytes > p2p.MAX_MESSAGE_BYTES:
        np.copyto(flat, src)
        src = None
    calls = [(MPI.IN_PLACE if src is None else [src[lo:lo + step], mpitype], [flat[lo:lo + step], mpitype],
              mpiop) for lo in range(0, max(flat.size, 1), step)]
    if nans is not None:
        chunk = p2p.MAX_MESSAGE_BYTES
        calls += [(MPI.IN_PLACE, [nans[lo:lo + chunk], MPI.UINT8_T], MPI.MAX)
                  for lo in range(0, max(nans.size, 1), chunk)]
    chan.count(flat.nbytes, flat.nbytes)    # the payload handed to MPI's own algorithm
    if agreed:
        for sendbuf, recvbuf, mop in calls:
            chan.comm.Allreduce(sendbuf, recvbuf, mop)
    else:
        chan.wait([chan.comm.Iallreduce(*c) for c in calls],
                  "native MPI_Allreduce" + (f" of tensor '{name}'" if name else ""))
    if nans is not None and bool(np.any(nans)):
        np.copyto(flat, np.nan, where=nans.view(bool))
    finish_average(op, buf, chan.size)
