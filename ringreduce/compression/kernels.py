"""Fused quantize-and-pack kernels: the compute heart of gradient compression.

Thin, validating wrapper over the compiled modules ``ringreduce._C`` (CPU,
C++) and ``ringreduce._C_cuda`` (CUDA, imported lazily, only when a device
array is passed).  Both produce bit-identical bytes; the wire formats are
documented in docs/kernels.md.

Arrays: host arrays are numpy arrays (or CPU torch tensors); device arrays
are anything with ``__cuda_array_interface__`` (cupy, numba) or CUDA torch
tensors.  All arrays of one call must be C-contiguous and all on the host or
all on the current CUDA device.  Sizes are element counts; ``out``/``packed``
buffers are uint8 arrays of exactly ``packed_nbytes(fmt, n, block_size)``.

Streams: device kernels are enqueued on ``stream`` (a ``cudaStream_t`` as an
int) or, when it is None, on the current stream of the array's library
(torch or cupy; the legacy default stream for others).  ``decompress``,
``decompress_accumulate`` and ``reduce_`` return without waiting;
``compress`` waits for its stream because it returns the count of non-finite
blocks.  Host kernels run synchronously without the GIL.

Timeline: with RINGREDUCE_TIMELINE set, ``compress`` records a "compress"
event and ``decompress``/``decompress_accumulate`` a "decompress" event
(args: format, elements, packed bytes); off, the cost is one attribute test.

Example
-------
>>> import numpy as np
>>> from ringreduce.compression import kernels
>>> x = np.linspace(-1, 1, 1000, dtype=np.float32)
>>> packed = np.empty(kernels.packed_nbytes("int8", x.size, 256), np.uint8)
>>> residual = np.zeros_like(x)
>>> kernels.compress("int8", x, packed, residual=residual)
0
>>> y = np.empty_like(x)
>>> kernels.decompress("int8", packed, x.size, y)
>>> bool(np.abs(y + residual - x).max() < 1e-6)
True
"""
from __future__ import annotations

import importlib
import logging
from typing import Any

import numpy as np

from ..core import timeline
from ..core.errors import RingReduceError

try:  # bfloat16 is a hard dependency, but keep import errors readable
    from ml_dtypes import bfloat16 as _bfloat16
except ImportError:  # pragma: no cover
    _bfloat16 = None

# The compiled extensions live at the package root (ringreduce._C, ringreduce._C_cuda);
# they import nothing of ours, so loading them by name keeps the layers acyclic.
_ROOT = __name__.split(".")[0]


def _extension(name: str):
    return importlib.import_module(f"{_ROOT}.{name}")


try:
    _C = _extension("_C")
except ImportError:  # not built: reduce_ falls back to numpy, compress raises
    _C = None

__all__ = [
    "FORMATS",
    "available",
    "cuda_available",
    "packed_nbytes",
    "compress",
    "decompress",
    "decompress_accumulate",
    "reduce_",
]

logger = logging.getLogger(__name__)

FORMATS = ("fp16", "bf16", "int8", "int4", "onebit")
_FMT = {f: i for i, f in enumerate(FORMATS)}  # codes of csrc/quantize.h
_OPS = {"sum": 0, "min": 1, "max": 2}
_NP_OPS = {"sum": np.add, "min": np.minimum, "max": np.maximum}

# dtype codes of csrc/quantize.h
_DT_F32, _DT_F16, _DT_BF16, _DT_F64, _DT_I8, _DT_U8, _DT_I32, _DT_I64 = range(8)
_NP_DT = {
    np.dtype(np.float32): _DT_F32,
    np.dtype(np.float16): _DT_F16,
    np.dtype(np.float64): _DT_F64,
    np.dtype(np.int8): _DT_I8,
    np.dtype(np.uint8): _DT_U8,
    np.dtype(np.int32): _DT_I32,
    np.dtype(np.int64): _DT_I64,
}
if _bfloat16 is not None:
    _NP_DT[np.dtype(_bfloat16)] = _DT_BF16
_DT_NAME = {
    _DT_F32: "float32", _DT_F16: "float16", _DT_BF16: "bfloat16", _DT_F64: "float64",
    _DT_I8: "int8", _DT_U8: "uint8", _DT_I32: "int32", _DT_I64: "int64",
}
_DT_SIZE = {_DT_F32: 4, _DT_F16: 2, _DT_BF16: 2, _DT_F64: 8, _DT_I8: 1, _DT_U8: 1,
            _DT_I32: 4, _DT_I64: 8}
_FLOAT_IO = (_DT_F32, _DT_F16, _DT_BF16)  # what compress reads and decompress writes
_CAI_DT = {"<f4": _DT_F32, "<f2": _DT_F16, "<f8": _DT_F64, "|i1": _DT_I8, "|u1": _DT_U8,
           "<i4": _DT_I32, "<i8": _DT_I64}
_MAX_BLOCK = 1 << 20

_BUILD_HINT = ("the ringreduce C++ extension (ringreduce._C) is not built; build it with "
               "`pip install -e .` (or `pip install .`) from a checkout with a C++17 compiler")

_cuda_mod: Any = None


def available() -> bool:
    """Whether the C++ extension ``ringreduce._C`` is importable.

    Example
    -------
    >>> from ringreduce.compression import kernels
    >>> kernels.available() in (True, False)
    True
    """
    return _C is not None


def cuda_available() -> bool:
    """Whether ``ringreduce._C_cuda`` imports and sees at least one GPU (never raises)."""
    try:
        return _cuda().device_count() > 0
    except RingReduceError:
        return False


def _cuda():
    global _cuda_mod
    if _cuda_mod is None:
        try:
            _C_cuda = _extension("_C_cuda")
        except ImportError as exc:
            raise RingReduceError(
                "ringreduce CUDA kernels (ringreduce._C_cuda) are not built; reinstall with "
                f"nvcc on PATH and RINGREDUCE_CUDA=1 to see why ({exc})") from exc
        _cuda_mod = _C_cuda
    return _cuda_mod


# ---- array views -------------------------------------------------------------

class _View:
    """Flat view of one argument: host ndarray or device pointer, with dtype code."""

    __slots__ = ("arr", "ptr", "n", "dt", "device", "lib")

    def __init__(self, arr, ptr, n, dt, device, lib):
        self.arr, self.ptr, self.n, self.dt, self.device, self.lib = arr, ptr, n, dt, device, lib


def _label(name: str | None, role: str) -> str:
    return f"{role} of tensor '{name}'" if name else role


def _view(obj, role: str, name: str | None, writable: bool) -> _View:
    what = _label(name, role)
    mod = type(obj).__module__.split(".")[0]
    if mod == "torch":
        return _torch_view(obj, what, writable)
    if isinstance(obj, np.ndarray):
        if not obj.flags.c_contiguous:
            raise RingReduceError(f"{what} must be C-contiguous")
        if writable and not obj.flags.writeable:
            raise RingReduceError(f"{what} must be writable")
        dt = _NP_DT.get(obj.dtype)
        if dt is None:
            raise RingReduceError(f"{what} has unsupported dtype {obj.dtype}")
        return _View(_flat(obj, dt), 0, obj.size, dt, False, "numpy")
    cai = getattr(obj, "__cuda_array_interface__", None)
    if cai is not None:
        dt = _CAI_DT.get(cai["typestr"])
        if dt is None:
            raise RingReduceError(f"{what} has unsupported device dtype {cai['typestr']}")
        n = int(np.prod(cai["shape"], dtype=np.int64))
        strides = cai.get("strides")
        if strides is not None and n > 1:
            expect = _DT_SIZE[dt]
            for dim, st in zip(reversed(cai["shape"]), reversed(strides)):
                if dim != 1 and st != expect:
                    raise RingReduceError(f"{what} must be C-contiguous")
                expect *= dim
        ptr, readonly = cai["data"]
        if writable and readonly:
            raise RingReduceError(f"{what} must be writable")
        return _View(obj, int(ptr), n, dt, True, mod)
    raise RingReduceError(
        f"{what} must be a numpy array, a torch tensor or a CUDA array, not {type(obj).__name__}")


def _torch_view(t, what: str, writable: bool) -> _View:
    import torch

    tdt = {torch.float32: _DT_F32, torch.float16: _DT_F16, torch.bfloat16: _DT_BF16,
           torch.float64: _DT_F64, torch.int8: _DT_I8, torch.uint8: _DT_U8,
           torch.int32: _DT_I32, torch.int64: _DT_I64}.get(t.dtype)
    if tdt is None:
        raise RingReduceError(f"{what} has unsupported dtype {t.dtype}")
    if not t.is_contiguous():
        raise RingReduceError(f"{what} must be contiguous")
    if t.is_cuda:
        return _View(t, t.data_ptr(), t.numel(), tdt, True, "torch")
    flat = t.detach().reshape(-1)
    if tdt == _DT_BF16:  # numpy has no bfloat16: same bytes seen as ml_dtypes.bfloat16
        arr = flat.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = flat.numpy()
    return _View(arr, 0, t.numel(), tdt, False, "torch")


def _flat(arr: np.ndarray, dt: int) -> np.ndarray:
    # numpy cannot export bfloat16 through the buffer protocol: pass its bits.
    flat = arr.reshape(-1)
    return flat.view(np.uint16) if dt == _DT_BF16 else flat


def _same_place(views, name):
    if len({v.device for v in views}) > 1:
        raise RingReduceError(f"{_label(name, 'arguments')}: mix of host and device arrays")
    return views[0].device


def _stream_of(view: _View, stream):
    if stream is not None:
        return int(stream)
    if view.lib == "torch":
        import torch

        return int(torch.cuda.current_stream().cuda_stream)
    if view.lib == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def _check_fmt(fmt: str, block_size: int) -> int:
    code = _FMT.get(fmt)
    if code is None:
        raise RingReduceError(f"unknown compression format {fmt!r}; expected one of {FORMATS}")
    if not isinstance(block_size, (int, np.integer)) or block_size <= 0 or block_size % 8 \
            or block_size > _MAX_BLOCK:
        raise RingReduceError(
            f"block_size must be a positive multiple of 8 up to {_MAX_BLOCK}, got {block_size!r}")
    return code


def _need_n(view: _View, n: int, what: str):
    if view.n != n:
        raise RingReduceError(f"{what} has {view.n} elements, expected {n}")


def _need_dt(view: _View, allowed, what: str):
    if view.dt not in allowed:
        names = ", ".join(_DT_NAME[d] for d in allowed)
        raise RingReduceError(f"{what} has dtype {_DT_NAME[view.dt]}, expected {names}")


def _host(v: _View):
    return v.arr


def _record(event: str, t0: float, fmt: str, n: int, nbytes: int, on_device: bool,
            name: str | None, accumulate: bool = False) -> None:
    """A timeline event for one kernel call (only called when the timeline is on).

    Device kernels other than compress return once enqueued, so their events
    measure the launch, not the kernel.
    """
    args = {"format": fmt, "elements": n, "bytes": nbytes}
    if name:
        args["name"] = name
    if accumulate:
        args["accumulate"] = True
    if on_device:
        args["device"] = True
    timeline.complete(event, t0, args)


def _divisor(divisor, name) -> float:
    """The divisor as the fp32 value the kernels divide by."""
    k = float(np.float32(divisor))
    if not (np.isfinite(k) and k > 0):
        raise RingReduceError(f"{_label(name, 'divisor')} must be a finite value > 0, got {divisor}")
    return k


# ---- public API ----------------------------------------------------------------

def packed_nbytes(fmt: str, n: int, block_size: int = 256) -> int:
    """Bytes of the packed form of ``n`` elements in format ``fmt``.

    fp16/bf16: ``2*n``.  int8: ``4*nblocks + n``; int4: ``4*nblocks + ceil(n/2)``;
    onebit: ``4*nblocks + ceil(n/8)``, with ``nblocks = ceil(n / block_size)``.

    Example
    -------
    >>> packed_nbytes("int8", 1000, 256)
    1016
    """
    _check_fmt(fmt, block_size)
    if n < 0:
        raise RingReduceError(f"element count must be >= 0, got {n}")
    nb = -(-n // block_size)
    return {"fp16": 2 * n, "bf16": 2 * n, "int8": 4 * nb + n, "int4": 4 * nb + (n + 1) // 2,
            "onebit": 4 * nb + (n + 7) // 8}[fmt]


def compress(fmt: str, x, out, residual=None, block_size: int = 256, clip: float | None = None,
             stochastic: bool = False, seed: int = 0, counter: int = 0, offset: int = 0,
             *, divisor: float = 1.0, values=None, stream=None, name: str | None = None) -> int:
    """Quantise and pack ``x`` (plus error feedback) into ``out`` in one fused pass.

    Per block of ``block_size`` elements: ``v = x + residual`` (fp32; ``x / divisor +
    residual`` when ``divisor`` is not 1, e.g. an Average's rank count), clip
    finite values to ``[-clip, clip]``, choose the block scale, quantise
    (round to nearest even, or stochastically), pack into ``out``, and write
    ``residual = v - dequant`` in place.  A block containing NaN/Inf encodes
    so that it decodes to non-finite values (docs/kernels.md) and its
    residual is reset to 0.

    Parameters
    ----------
    fmt : one of FORMATS
    x : float32, float16 or bfloat16 array of n elements
    out : uint8 array of ``packed_nbytes(fmt, n, block_size)`` bytes
    residual : None or float32 array of n elements, updated in place
    block_size : elements per scale block, a positive multiple of 8
    clip : None, or tau > 0: finite values are clipped to [-tau, tau]
    stochastic : stochastic rounding for int8/int4/onebit (fp16/bf16 always round to nearest even)
    seed, counter, offset : RNG key; element i uses (seed, counter, offset + i), so a
        tensor compressed in pieces at matching offsets gives the same bytes as in one call
    divisor : finite and > 0 (rounded to fp32); not 1: each element is first divided by it
        in fp32, the same bits as ``x / np.float32(divisor)``, in the same pass
    values : None, or a float32/float16/bfloat16 array of n elements that receives
        ``dequant(out)``, the bits ``decompress(fmt, out, n, values)`` would write, in the
        same pass (saves decoding the bytes just packed)
    stream : CUDA stream for device arrays (see module docstring)
    name : tensor name for error messages

    Returns
    -------
    int
        Number of blocks that contained NaN or Inf (after the overflow of
        fp16 included); the caller logs and counts them.

    Example
    -------
    >>> import numpy as np
    >>> x = np.ones(300, np.float32); x[5] = np.nan
    >>> out = np.empty(packed_nbytes("int4", 300, 256), np.uint8)
    >>> compress("int4", x, out)
    1
    """
    code = _check_fmt(fmt, block_size)
    vx = _view(x, "input", name, False)
    vo = _view(out, "packed output", name, True)
    vr = _view(residual, "residual", name, True) if residual is not None else None
    vv = _view(values, "values", name, True) if values is not None else None
    n = vx.n
    _need_dt(vx, _FLOAT_IO, _label(name, "input"))
    _need_dt(vo, (_DT_U8,), _label(name, "packed output"))
    _need_n(vo, packed_nbytes(fmt, n, block_size), _label(name, "packed output"))
    if vr is not None:
        _need_dt(vr, (_DT_F32,), _label(name, "residual"))
        _need_n(vr, n, _label(name, "residual"))
    if vv is not None:
        _need_dt(vv, _FLOAT_IO, _label(name, "values"))
        _need_n(vv, n, _label(name, "values"))
    has_clip = clip is not None
    if has_clip and not (np.isfinite(clip) and clip > 0):
        raise RingReduceError(f"{_label(name, 'clip')} must be a finite value > 0, got {clip}")
    cl = float(clip) if has_clip else 0.0
    for arg, val in (("seed", seed), ("counter", counter), ("offset", offset)):
        if not 0 <= int(val) < 2**64:
            raise RingReduceError(f"{arg} must be in [0, 2**64), got {val}")
    k = _divisor(divisor, name)
    views = [vx, vo] + [v for v in (vr, vv) if v is not None]
    t0 = timeline.now() if timeline.on else 0
    if _same_place(views, name):
        bad = int(_cuda().compress(
            code, vx.ptr, vx.dt, n, vo.ptr, vr.ptr if vr is not None else 0, int(block_size),
            has_clip, cl, bool(stochastic), int(seed), int(counter), int(offset),
            _stream_of(vx, stream), k, vv.ptr if vv is not None else 0,
            vv.dt if vv is not None else 0))
    else:
        if _C is None:
            raise RingReduceError(_BUILD_HINT)
        bad = int(_C.compress(code, vx.arr, vx.dt, n, vo.arr, vr.arr if vr is not None else None,
                              int(block_size), has_clip, cl, bool(stochastic), int(seed),
                              int(counter), int(offset), k,
                              vv.arr if vv is not None else None, vv.dt if vv is not None else 0))
    if t0:
        _record("compress", t0, fmt, n, vo.n, vx.device, name)
    return bad


def decompress(fmt: str, packed, n: int, out, block_size: int = 256, *, divisor: float = 1.0,
               stream=None, name: str | None = None) -> None:
    """Unpack ``packed`` into ``out`` (float32, float16 or bfloat16; n elements).

    ``out = dequant(packed)``, rounded to nearest even for half outputs. With
    ``divisor`` other than 1 (finite, > 0, rounded to fp32), ``out = dequant / divisor``
    computed in fp32 and then rounded, in the same pass (an Average's division).

    Example
    -------
    >>> import numpy as np
    >>> x = np.arange(8, dtype=np.float32)
    >>> p = np.empty(packed_nbytes("fp16", 8), np.uint8); _ = compress("fp16", x, p)
    >>> y = np.empty(8, np.float32); decompress("fp16", p, 8, y); y[-1]
    np.float32(7.0)
    """
    code = _check_fmt(fmt, block_size)
    vp = _view(packed, "packed input", name, False)
    vo = _view(out, "output", name, True)
    _need_dt(vp, (_DT_U8,), _label(name, "packed input"))
    _need_n(vp, packed_nbytes(fmt, n, block_size), _label(name, "packed input"))
    _need_dt(vo, _FLOAT_IO, _label(name, "output"))
    _need_n(vo, n, _label(name, "output"))
    k = _divisor(divisor, name)
    t0 = timeline.now() if timeline.on else 0
    if _same_place([vp, vo], name):
        _cuda().decompress(code, vp.ptr, n, vo.ptr, vo.dt, int(block_size), _stream_of(vo, stream),
                           k)
    else:
        if _C is None:
            raise RingReduceError(_BUILD_HINT)
        _C.decompress(code, vp.arr, n, vo.arr, vo.dt, int(block_size), k)
    if t0:
        _record("decompress", t0, fmt, n, vp.n, vo.device, name)


def decompress_accumulate(fmt: str, packed, n: int, acc, alpha: float = 1.0,
                          block_size: int = 256, *, stream=None, name: str | None = None) -> None:
    """Fused ``acc += alpha * dequant(packed)`` for a float32 accumulator of n elements.

    Each element is ``acc[i] + alpha * d[i]`` with fp32 rounding after the
    multiply and after the add (no FMA), i.e. exactly what numpy computes
    for ``acc + np.float32(alpha) * decompress(...)``.

    Example
    -------
    >>> import numpy as np
    >>> x = np.full(16, 2.0, np.float32)
    >>> p = np.empty(packed_nbytes("int8", 16), np.uint8); _ = compress("int8", x, p)
    >>> acc = np.ones(16, np.float32); decompress_accumulate("int8", p, 16, acc, alpha=0.5)
    >>> acc[0]
    np.float32(2.0)
    """
    code = _check_fmt(fmt, block_size)
    vp = _view(packed, "packed input", name, False)
    va = _view(acc, "accumulator", name, True)
    _need_dt(vp, (_DT_U8,), _label(name, "packed input"))
    _need_n(vp, packed_nbytes(fmt, n, block_size), _label(name, "packed input"))
    _need_dt(va, (_DT_F32,), _label(name, "accumulator"))
    _need_n(va, n, _label(name, "accumulator"))
    a = float(np.float32(alpha))
    t0 = timeline.now() if timeline.on else 0
    if _same_place([vp, va], name):
        _cuda().decompress_accumulate(code, vp.ptr, n, va.ptr, a, int(block_size),
                                      _stream_of(va, stream))
    else:
        if _C is None:
            raise RingReduceError(_BUILD_HINT)
        _C.decompress_accumulate(code, vp.arr, n, va.arr, a, int(block_size))
    if t0:
        _record("decompress", t0, fmt, n, vp.n, va.device, name, accumulate=True)


def reduce_(op: str, dst, src, *, stream=None, name: str | None = None) -> None:
    """In place ``dst = op(dst, src)`` for op in {"sum", "min", "max"}.

    Bit-identical to ``np.add/np.minimum/np.maximum(dst, src, out=dst)`` of
    the same dtype (float16/bfloat16 computed in fp32 and rounded to nearest
    even, integers wrap around, NaN propagates).  The one unspecified case,
    as in numpy across dtypes, is which operand is returned when both are
    NaN or when they are +0 and -0.  Falls back to numpy when the extension
    is not built.

    Example
    -------
    >>> import numpy as np
    >>> d = np.array([1, 5], np.int32); reduce_("max", d, np.array([3, 2], np.int32)); d
    array([3, 5], dtype=int32)
    """
    opc = _OPS.get(op)
    if opc is None:
        raise RingReduceError(f"unknown reduce op {op!r}; expected sum, min or max")
    vd = _view(dst, "destination", name, True)
    vs = _view(src, "source", name, False)
    if vd.dt != vs.dt:
        raise RingReduceError(f"{_label(name, 'reduce_')}: destination is {_DT_NAME[vd.dt]} "
                              f"but source is {_DT_NAME[vs.dt]}")
    _need_n(vs, vd.n, _label(name, "source"))
    if _same_place([vd, vs], name):
        _cuda().reduce(opc, vd.dt, vd.ptr, vs.ptr, vd.n, _stream_of(vd, stream))
        return
    if _C is None:
        d, s = vd.arr, vs.arr
        if vd.dt == _DT_BF16:
            d, s = d.view(_bfloat16), s.view(_bfloat16)
        _NP_OPS[op](d, s, out=d)
        return
    _C.reduce(opc, vd.dt, vd.arr, vs.arr, vd.n)
