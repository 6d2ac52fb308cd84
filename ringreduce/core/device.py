"""Device (GPU) arrays: cupy detection, array modules, stream rule and CUDA-aware MPI.

cupy is optional and imported lazily: importing ringreduce never imports it, and
a numpy-only program never pays for it. A "device array" is a ``cupy.ndarray``
(torch CUDA tensors reach the engine as cupy views through DLPack, see
``ringreduce.torch``).

Two ways to move device buffers, decided once per process (:func:`mode`):

* ``cuda-aware``: the MPI library accepts device pointers; the algorithms run on
  the cupy arrays themselves (reductions are cupy kernels) and mpi4py hands
  the pointers (``__cuda_array_interface__``) to MPI.
* ``staged``: the MPI library only takes host memory; ``ringreduce.transport.staging``
  copies segments through pinned host buffers, overlapping the copies with the
  host allreduce of the neighbouring segments.

The stream rule: MPI knows nothing about CUDA streams, so before the engine
hands a device buffer to MPI, the stream that wrote it must have finished.
The engine synchronizes the calling thread's current cupy stream when a device
collective starts (the caller's writes are on it), after each of its own device
reductions (``ops.reduce_into`` / ``ops.finish_average``), and before it returns
(so the result is complete when the call returns). Work on another stream (a
torch side stream, say) must be synchronized by whoever launched it, before
the collective is called.

Example
-------
>>> import numpy as np
>>> from ringreduce.core import device
>>> device.is_device_array(np.zeros(3))
False
>>> device.array_module(np.zeros(3)) is np
True
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
import threading
from dataclasses import dataclass

import numpy as np

from . import config
from .errors import RingReduceError

__all__ = ["is_device_array", "array_module", "cupy_or_none", "synchronize", "CudaMode",
           "mode", "detect", "query_library"]

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "on", "yes")
_FALSE = ("0", "false", "off", "no")


# ---- cupy, lazily -------------------------------------------------------------

def cupy_or_none():
    """The cupy module if it imports, else None (never raises; imports cupy on first call)."""
    try:
        import cupy
    except Exception:  # ImportError, or a broken CUDA install raising at import
        return None
    return cupy


def is_device_array(x) -> bool:
    """True for a cupy array. Cheap, and never imports cupy (no cupy loaded: no cupy arrays)."""
    if isinstance(x, np.ndarray) or "cupy" not in sys.modules:
        return False
    return isinstance(x, sys.modules["cupy"].ndarray)


def array_module(x):
    """numpy for host arrays, cupy for device arrays (like cupy.get_array_module)."""
    return sys.modules["cupy"] if is_device_array(x) else np


def synchronize(x=None) -> None:
    """Wait until the calling thread's current cupy stream has finished its work.

    A no-op for host arrays (and when cupy is not loaded). Run it before MPI reads
    a device buffer that a kernel wrote (see the module docstring).
    """
    if x is not None and not is_device_array(x):
        return
    cp = sys.modules.get("cupy")
    if cp is not None:
        cp.cuda.get_current_stream().synchronize()


# ---- CUDA-aware MPI -----------------------------------------------------------

@dataclass(frozen=True)
class CudaMode:
    """How device buffers move: ``aware`` (MPI takes device pointers) or staged, and why."""

    aware: bool
    reason: str

    @property
    def name(self) -> str:
        return "cuda-aware" if self.aware else "staged"

    def as_dict(self) -> dict:
        return {"mode": self.name, "reason": self.reason}


def _libmpi_handles() -> list:
    """ctypes handles to the MPI library mpi4py loaded (already in the process)."""
    handles = []
    try:
        handles.append(ctypes.CDLL(None))  # works when libmpi was loaded RTLD_GLOBAL
    except OSError:
        pass
    paths = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1] if "/" in line else ""
                if "libmpi" in os.path.basename(path) and path not in paths:
                    paths.append(path)
    except OSError:  # no /proc (macOS): ask the loader
        found = ctypes.util.find_library("mpi")
        if found:
            paths.append(found)
    for path in paths:
        try:
            handles.append(ctypes.CDLL(path))
        except OSError:
            pass
    return handles


def query_library() -> tuple[bool | None, str]:
    """Ask the MPI library whether it takes CUDA device pointers.

    Returns (answer, how): answer is None when the library cannot tell.
    Open MPI (and MPICH >= 4.1) export ``MPIX_Query_cuda_support()``, a run-time
    answer; MPICH also has ``MPIX_GPU_query_support(MPIX_GPU_SUPPORT_CUDA, &flag)``.
    MPICH's ``MPIR_CVAR_ENABLE_GPU=0`` turns GPU support off whatever was built.
    """
    from .mpi import MPI

    vendor = MPI.get_vendor()[0]
    if vendor == "MPICH" and os.environ.get("MPIR_CVAR_ENABLE_GPU", "").strip() in ("0",):
        return False, "MPICH with MPIR_CVAR_ENABLE_GPU=0"
    for lib in _libmpi_handles():
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            ok = bool(fn())
            return ok, f"{vendor}: MPIX_Query_cuda_support() returned {int(ok)}"
        fn = getattr(lib, "MPIX_GPU_query_support", None)
        if fn is not None:
            flag = ctypes.c_int(0)
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            if fn(0, ctypes.byref(flag)) == 0:   # 0 = MPIX_GPU_SUPPORT_CUDA
                return bool(flag.value), f"{vendor}: MPIX_GPU_query_support(CUDA) = {flag.value}"
    # Libraries without a query: trust the vendor's documented switch when it is set.
    for var, label in (("MPICH_GPU_SUPPORT_ENABLED", "Cray MPICH"), ("MV2_USE_CUDA", "MVAPICH2"),
                       ("I_MPI_OFFLOAD", "Intel MPI")):
        if os.environ.get(var, "").strip() in ("1",):
            return True, f"{label}: {var}=1"
    return None, f"{vendor}: the library offers no CUDA-support query"


def detect(environ=None, query=query_library) -> CudaMode:
    """Decide the mode: RINGREDUCE_CUDA_AWARE=0/1 if set, else ask the library (unknown = staged).

    Example
    -------
    >>> detect({"RINGREDUCE_CUDA_AWARE": "0"}).name
    'staged'
    """
    env = os.environ if environ is None else environ
    raw = env.get("RINGREDUCE_CUDA_AWARE")
    if raw is not None and raw.strip():
        value = raw.strip().lower()
        if value in _TRUE:
            return CudaMode(True, "RINGREDUCE_CUDA_AWARE=1")
        if value in _FALSE:
            return CudaMode(False, "RINGREDUCE_CUDA_AWARE=0")
        raise RingReduceError(f"RINGREDUCE_CUDA_AWARE={raw!r}: expected 0 or 1")
    answer, how = query()
    if answer is None:
        return CudaMode(False, how + "; staging through pinned host memory "
                        "(set RINGREDUCE_CUDA_AWARE=1 if this MPI takes device pointers)")
    return CudaMode(answer, how)


# Bytes per staging segment (pinned host buffers of transport.staging): big enough to
# reach copy bandwidth, small enough that copies of one segment overlap the next's transfer.
DEFAULT_SEGMENT_BYTES = 4 << 20


def staging_segment_bytes() -> int:
    """RINGREDUCE_STAGING_BYTES, or the default."""

    return max(1, config.integer("RINGREDUCE_STAGING_BYTES", DEFAULT_SEGMENT_BYTES))


_mode: CudaMode | None = None
_mode_lock = threading.Lock()


def mode() -> CudaMode:
    """The process's mode, detected on first use (MPI must be initialised) and then fixed.

    Ranks are not asked to agree here: the mode is part of every device call's
    fingerprint, so ranks that disagree get a clear mismatch error, not a hang.
    """
    global _mode
    if _mode is None:
        with _mode_lock:
            if _mode is None:
                _mode = detect()
                logger.info("device buffers: %s (%s)", _mode.name, _mode.reason)
    return _mode


def reset_mode() -> None:
    """Forget the detected mode (tests; the next device call detects again)."""
    global _mode
    with _mode_lock:
        _mode = None


def describe() -> dict:
    """The GPU path's entry for rr.info(): mode, why, and which cupy is installed (not imported).

    Example
    -------
    >>> sorted(describe())                      # doctest: +SKIP
    ['cupy', 'mode', 'reason', 'staging_segment_bytes']
    """
    from importlib import metadata

    installed = None
    for dist in ("cupy-cuda13x", "cupy-cuda12x", "cupy-cuda11x", "cupy"):
        try:
            installed = f"{dist} {metadata.version(dist)}"
            break
        except metadata.PackageNotFoundError:
            continue
    m = mode()
    seg = staging_segment_bytes()
    return {"mode": m.name, "reason": m.reason, "cupy": installed,
            "staging_segment_bytes": None if m.aware else seg}
