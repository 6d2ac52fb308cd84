"""A numpy-backed stand-in for cupy: runs the GPU path's Python on a machine without a GPU.

Only for tests (tests/test_gpu.py puts this folder first on PYTHONPATH of an
mpirun it launches). Arrays hold numpy memory but refuse implicit conversion
to numpy, as cupy's do, so host-only code paths fail loudly. Kernels and
streams are modelled just enough to check the stream rule: every elementwise
operation counts as a kernel on the current stream, and handing an array to
MPI (DLPack export) or to a copy stream while the current stream has
unfinished kernels that nothing waited for raises.

What it cannot show: real asynchrony, device memory, CUDA-aware MPI
transport, the CUDA kernels. Those need scripts/gpu_check.sh on a GPU.
"""
from __future__ import annotations

import ctypes
import threading

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

_RINGREDUCE_FAKE = True
__version__ = "0.0-fake"

float16, float32, float64 = np.float16, np.float32, np.float64
int8, int32, int64, uint8, uint16 = np.int8, np.int32, np.int64, np.uint8, np.uint16


class StreamOrderError(AssertionError):
    """A device buffer was read while kernels that wrote it might still run."""


# ---- streams and events ----------------------------------------------------------

class Stream:
    def __init__(self, non_blocking: bool = False, null: bool = False):
        self.ptr = 0 if null else id(self)
        self.launched = 0       # kernels launched on this stream
        self.finished = 0       # kernels known complete (synchronize)
        self.waited: dict[int, int] = {}   # stream ptr -> kernels of it this stream waits for

    def synchronize(self) -> None:
        self.finished = self.launched

    def wait_event(self, event) -> None:
        if event.stream is not None:
            key = id(event.stream)
            self.waited[key] = max(self.waited.get(key, 0), event.count)

    def __enter__(self):
        _tls.stack = getattr(_tls, "stack", []) + [self]
        return self

    def __exit__(self, *exc):
        _tls.stack.pop()


class _Null(Stream):
    pass


_tls = threading.local()


class _CudaNS:
    pass


cuda = _CudaNS()
cuda.Stream = Stream
cuda.Stream.null = _Null(null=True)


def _current() -> Stream:
    stack = getattr(_tls, "stack", None)
    return stack[-1] if stack else Stream.null


def _kernel() -> None:
    _current().launched += 1


def _check_readable(reader: Stream | None, what: str) -> None:
    cur = _current()
    if cur.finished >= cur.launched:
        return
    if reader is not None and reader.waited.get(id(cur), 0) >= cur.launched:
        return
    raise StreamOrderError(f"{what} while the current stream has {cur.launched - cur.finished} "
                           "unfinished kernel(s) nobody waited for")


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
        self.stream, self.count = None, 0

    def record(self, stream=None) -> None:
        self.stream = stream if stream is not None else _current()
        self.count = self.stream.launched

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.finished = max(self.stream.finished, self.count)


class _Runtime:
    memcpyHostToDevice, memcpyDeviceToHost, memcpyDeviceToDevice = 1, 2, 3

    @staticmethod
    def memcpyAsync(dst: int, src: int, nbytes: int, kind: int, stream: int) -> None:
        if kind == _Runtime.memcpyDeviceToHost:
            _check_readable(_streams.get(stream), "a D2H copy read a device buffer")
        ctypes.memmove(dst, src, nbytes)

    @staticmethod
    def getDeviceCount() -> int:
        return 1

    @staticmethod
    def getDeviceProperties(i: int) -> dict:
        return {"name": b"fake cupy (numpy)"}

    @staticmethod
    def runtimeGetVersion() -> int:
        return 0


_streams: dict[int, Stream] = {}
_orig_init = Stream.__init__


def _register_init(self, non_blocking: bool = False, null: bool = False):
    _orig_init(self, non_blocking, null)
    _streams[self.ptr] = self


Stream.__init__ = _register_init


def get_current_stream() -> Stream:
    return _current()


class Device:
    def __init__(self, device_id: int = 0):
        self.id = device_id

    def use(self) -> None:
        pass

    def synchronize(self) -> None:
        _current().synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def alloc_pinned_memory(nbytes: int):
    return bytearray(nbytes)


cuda.Event = Event
cuda.runtime = _Runtime
cuda.get_current_stream = get_current_stream
cuda.Device = Device
cuda.alloc_pinned_memory = alloc_pinned_memory
cuda.get_elapsed_time = lambda a, b: 0.0


# ---- arrays -----------------------------------------------------------------------

def _un(x):
    return x._a if isinstance(x, ndarray) else x


def _wrap(r):
    if isinstance(r, np.ndarray):
        return ndarray(r)
    if isinstance(r, tuple):
        return tuple(_wrap(v) for v in r)
    return r


class _Flags:
    def __init__(self, a):
        self.c_contiguous = a.flags.c_contiguous
        self.f_contiguous = a.flags.f_contiguous
        self.owndata = a.flags.owndata


class _Ptr:
    def __init__(self, a):
        self.ptr = a.ctypes.data


class ndarray(NDArrayOperatorsMixin):
    __slots__ = ("_a",)

    def __init__(self, a: np.ndarray):
        self._a = a

    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    ndim = property(lambda self: self._a.ndim)
    flags = property(lambda self: _Flags(self._a))
    data = property(lambda self: _Ptr(self._a))
    device = property(lambda self: Device(0))

    def __repr__(self):
        return f"fake_cupy.{self._a!r}"

    def __len__(self):
        return len(self._a)

    def __array__(self, *args, **kwargs):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:
            kwargs["out"] = tuple(_un(o) for o in kwargs["out"])
        r = getattr(ufunc, method)(*(_un(x) for x in inputs), **kwargs)
        _kernel()
        return _wrap(r)

    def __array_function__(self, func, types, args, kwargs):
        r = func(*(_un(a) for a in args), **{k: _un(v) for k, v in kwargs.items()})
        _kernel()
        return _wrap(r)

    def __getitem__(self, key):
        return _wrap(self._a[key])

    def __setitem__(self, key, value):
        self._a[key] = _un(value)
        _kernel()

    def __bool__(self):
        return bool(self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __dlpack__(self, **kwargs):
        _check_readable(None, "MPI was handed a device buffer")
        return self._a.__dlpack__(**kwargs)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()

    def reshape(self, *shape, **kw):
        return ndarray(self._a.reshape(*shape, **kw))

    def view(self, dtype):
        return ndarray(self._a.view(dtype))

    def astype(self, dtype, copy=True):
        _kernel()
        return ndarray(self._a.astype(dtype, copy=copy))

    def copy(self):
        _kernel()
        return ndarray(self._a.copy())

    def fill(self, value):
        self._a.fill(value)
        _kernel()

    def get(self):
        _current().synchronize()
        return self._a.copy()

    def all(self):
        return ndarray(np.asarray(self._a.all()))

    def item(self):
        return self._a.item()


def asarray(x, dtype=None):
    if isinstance(x, ndarray) and (dtype is None or x.dtype == dtype):
        return x
    _kernel()
    return ndarray(np.array(_un(x), dtype=dtype, copy=True))


def array(x, dtype=None, order="C", copy=True):
    _kernel()
    return ndarray(np.array(_un(x), dtype=dtype, order=order, copy=True))


def asnumpy(x):
    _current().synchronize()
    return np.array(_un(x), copy=True)


def _maker(fn):
    def make(*args, **kwargs):
        _kernel()
        return ndarray(fn(*args, **kwargs))
    return make


zeros, ones, full, arange = (_maker(f) for f in (np.zeros, np.ones, np.full, np.arange))


def empty(*args, **kwargs):
    return ndarray(np.empty(*args, **kwargs))    # an allocation, not a kernel


def empty_like(a, dtype=None):
    return ndarray(np.empty_like(_un(a), dtype=dtype))


def zeros_like(a, dtype=None):
    _kernel()
    return ndarray(np.zeros_like(_un(a), dtype=dtype))


def copyto(dst, src):
    np.copyto(dst._a, _un(src))
    _kernel()


def array_equal(a, b):
    return ndarray(np.asarray(np.array_equal(_un(a), _un(b))))


def allclose(a, b, rtol=1e-5, atol=1e-8):
    return ndarray(np.asarray(np.allclose(_un(a), _un(b), rtol=rtol, atol=atol)))


def get_array_module(*args):
    import sys
    return sys.modules[__name__] if any(isinstance(a, ndarray) for a in args) else np


def from_dlpack(x):
    raise TypeError("fake cupy cannot import DLPack tensors")
