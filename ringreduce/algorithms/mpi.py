"""Native MPI_Allreduce: the MPI library's own tuned algorithm, our reference peer."""
from __future__ import annotations

import ml_dtypes
import numpy as np
from mpi4py import MPI

from ..buffers import HALF_DTYPES
from ..errors import RingReduceError
from ..ops import ReduceOp, finish_average
from . import _transfer

_MPI_TYPES = {
    np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE,
    np.dtype(np.int32): MPI.INT32_T, np.dtype(np.int64): MPI.INT64_T,
    np.dtype(np.int8): MPI.INT8_T, np.dtype(np.uint8): MPI.UINT8_T,
}
_MPI_OPS = {ReduceOp.SUM: MPI.SUM, ReduceOp.AVERAGE: MPI.SUM, ReduceOp.MIN: MPI.MIN,
            ReduceOp.MAX: MPI.MAX}


def supports(dtype) -> bool:
    return np.dtype(dtype) in _MPI_TYPES


_HALF = frozenset(HALF_DTYPES) | {np.dtype(ml_dtypes.bfloat16)}


def allreduce(chan, buf: np.ndarray, op: ReduceOp, name: str | None = None,
              src: np.ndarray | None = None) -> None:
    """MPI_Allreduce in place (or from `src` into `buf`), split so no count exceeds the MPI limit."""
    dtype = buf.dtype
    if dtype in _HALF:
        label = f" of tensor '{name}'" if name else ""
        raise RingReduceError(
            f"rank {chan.rank}: algorithm 'mpi' cannot reduce {dtype}{label}: MPI has no "
            "reduction for half types; use 'ring', 'tree' or 'auto'")
    mpitype = _MPI_TYPES[dtype]
    mpiop = _MPI_OPS[op]
    flat = buf.reshape(-1)
    if flat.nbytes <= _transfer.MAX_MESSAGE_BYTES:     # the common case: one call
        if src is None:
            chan.comm.Allreduce(MPI.IN_PLACE, [flat, mpitype], mpiop)
        else:
            chan.comm.Allreduce([src, mpitype], [flat, mpitype], mpiop)
    else:
        if src is not None:
            np.copyto(flat, src)
        step = max(1, _transfer.MAX_MESSAGE_BYTES // buf.itemsize)
        for lo in range(0, max(flat.size, 1), step):
            chan.comm.Allreduce(MPI.IN_PLACE, [flat[lo:lo + step], mpitype], mpiop)
    finish_average(op, buf, chan.size)
