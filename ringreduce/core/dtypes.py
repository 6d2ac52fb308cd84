"""The one dtype table (codes shared with the fingerprint and the C++ kernels) and input validation."""
from __future__ import annotations

import ml_dtypes
import numpy as np

from . import device
from .errors import RingReduceError, who

__all__ = ["SUPPORTED_DTYPES", "HALF_DTYPES", "dtype_code", "dtype_name", "itemsize_of", "is_integer", "check_array",
           "as_bytes"]

# Codes travel in the mismatch-check fingerprint, so they must never change.
SUPPORTED_DTYPES = {
    np.dtype(np.float16): 1,
    np.dtype(ml_dtypes.bfloat16): 2,
    np.dtype(np.float32): 3,
    np.dtype(np.float64): 4,
    np.dtype(np.int32): 5,
    np.dtype(np.int64): 6,
    np.dtype(np.int8): 7,
    np.dtype(np.uint8): 8,
}
_BY_CODE = {code: dt for dt, code in SUPPORTED_DTYPES.items()}
HALF_DTYPES = (np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16))


def dtype_code(dtype: np.dtype) -> int:
    return SUPPORTED_DTYPES[np.dtype(dtype)]


def dtype_name(code: int) -> str:
    dt = _BY_CODE.get(int(code))
    return str(dt) if dt is not None else f"<dtype code {code}>"


def itemsize_of(code: int) -> int:
    """Bytes per element of the dtype with this code (0 for an unknown code)."""
    dt = _BY_CODE.get(int(code))
    return dt.itemsize if dt is not None else 0


def is_integer(dtype: np.dtype) -> bool:
    return np.dtype(dtype).kind in "iu"


def check_array(x, rank: int, name: str | None, what: str = "input", writable: bool = False):
    """Validate a numpy (host) or cupy (device) array for a collective and return it.

    Raises RingReduceError naming the rank, the tensor and the problem.
    """
    label = f"{who(rank)}: {what}" + (f" of tensor '{name}'" if name else "")
    if not isinstance(x, np.ndarray) and not device.is_device_array(x):
        if hasattr(x, "__cuda_array_interface__") or hasattr(x, "__dlpack__"):
            raise RingReduceError(
                f"{label} is a {type(x).__name__}; device buffers must be cupy arrays "
                "(cupy.from_dlpack(x) is zero-copy; torch tensors go through ringreduce.torch)")
        raise RingReduceError(f"{label} must be a numpy array (or a cupy array), got {type(x).__name__}")
    if x.dtype not in SUPPORTED_DTYPES:
        supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise RingReduceError(f"{label} has unsupported dtype {x.dtype} (supported: {supported})")
    if writable:
        if not getattr(x.flags, "writeable", True):   # cupy arrays are always writable
            raise RingReduceError(f"{label} is read-only; in-place collectives need a writable array")
        if not x.flags.c_contiguous:
            raise RingReduceError(
                f"{label} is not C-contiguous; in-place collectives need a contiguous array "
                "(use the out-of-place call, which copies)")
    return x


def as_bytes(a: np.ndarray) -> np.ndarray:
    """A flat uint8 view of a contiguous array (what MPI moves)."""
    return a.reshape(-1).view(np.uint8)
