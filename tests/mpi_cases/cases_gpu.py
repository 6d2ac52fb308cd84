"""The GPU matrix, per rank under mpirun: cupy arrays in the mode RINGREDUCE_CUDA_AWARE forces.

Skipped as a whole without cupy or without a visible GPU. Every result is
checked against numpy, bit-identical across ranks, and bit-identical to the
host engine's answer for the same inputs (the device path must not change a
single bit, compressed formats included).
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from _common import DTYPES, FLOATS, RTOL, all_ranks_identical, everyone, make_input, max_error

cp = pytest.importorskip("cupy")
# tests/fake_cupy (numpy behind a cupy-like API) runs this file on CPU-only machines.
FAKE = getattr(cp, "_RINGREDUCE_FAKE", False)
try:
    _NGPU = cp.cuda.runtime.getDeviceCount()
except Exception as exc:  # no driver, no device
    pytest.skip(f"no usable CUDA device ({exc})", allow_module_level=True)
if _NGPU == 0:
    pytest.skip("no CUDA device", allow_module_level=True)

import ringreduce as rr  # noqa: E402
from ringreduce.core import device  # noqa: E402
from ringreduce.runtime import device_path as gpu  # noqa: E402
from ringreduce.algorithms import ring  # noqa: E402
from ringreduce.policy import plan as select  # noqa: E402
from ringreduce.runtime.context import context  # noqa: E402
from ringreduce.transport.staging import segment_bounds  # noqa: E402

rr.init()
cp.cuda.Device(rr.local_rank() % _NGPU).use()
N = rr.size()
OPS = [rr.Sum, rr.Average, rr.Min, rr.Max]
ALGORITHMS = ["auto", "ring", "tree", "mpi"]
SIZES = [0, 1, max(N - 1, 1), 7, N * (ring.SEGMENT_BYTES // 4) + 5, 2**20 + 3]
# Small staging segments so mid-size tensors cross several of them.
os.environ.setdefault("RINGREDUCE_STAGING_BYTES", str(1 << 16))


def _bf16_on_device() -> bool:
    try:
        cp.zeros(2, np.uint16).view(ml_dtypes.bfloat16)
        return True
    except Exception:
        return False


GPU_DTYPES = [d for d in DTYPES if np.dtype(d) != np.dtype(ml_dtypes.bfloat16) or _bf16_on_device()]


def _skip_reason(algorithm, dtype, op):
    if np.dtype(dtype).kind in "iu" and op == rr.Average:
        return "Average on integers is an error"
    if algorithm == "mpi" and np.dtype(dtype).itemsize == 2 and np.dtype(dtype) in FLOATS:
        return "native MPI has no half-type reduction"
    return None


def host_reference(x: np.ndarray, op, algorithm: str) -> np.ndarray:
    """The host engine's answer that the device path must match bit for bit.

    A staged call reduces each staging segment as its own allreduce, and with
    3+ ranks the summation order of an element depends on where the chunk
    boundaries fall, so the reference is the host engine run on the same
    segments with the same resolved algorithm.
    """
    resolved = algorithm
    if algorithm == "auto":
        resolved = select.choose_for(context().main, x.nbytes, x.dtype)
    staged = not device.mode().aware or resolved in gpu.HOST_ONLY
    if not staged or N <= 2 or x.size == 0:
        return rr.allreduce(x, op=op, algorithm=resolved)
    out = np.empty_like(x)
    seg = int(os.environ["RINGREDUCE_STAGING_BYTES"])
    for lo, hi in segment_bounds(x.size, x.itemsize, seg):
        out[lo:hi] = rr.allreduce(x[lo:hi], op=op, algorithm=resolved)
    return out


def _host_bits(a) -> np.ndarray:
    return np.ascontiguousarray(cp.asnumpy(a)).reshape(-1).view(np.uint8)


def test_mode_is_the_forced_one():
    want = os.environ.get("RINGREDUCE_CUDA_AWARE")
    assert want in ("0", "1"), "the launcher forces the mode"
    assert device.mode().aware == (want == "1")
    assert rr.info()["cuda"]["mode"] == ("cuda-aware" if want == "1" else "staged")


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_matrix(algorithm, dtype, op, count):
    if count == 2**20 + 3 and (op in (rr.Min, rr.Max) or np.dtype(dtype).itemsize < 4):
        pytest.skip("large size covered by float32/64 Sum/Average")
    reason = _skip_reason(algorithm, dtype, op)
    if reason:
        pytest.skip(reason)
    x = make_input(rr.rank(), count, dtype, "gpu")
    d = cp.asarray(x)
    y = rr.allreduce(d, op=op, algorithm=algorithm)
    assert isinstance(y, cp.ndarray) and y.shape == x.shape and y.dtype == x.dtype
    host = host_reference(x, op, algorithm)
    got = cp.asnumpy(y)
    inputs = [make_input(r, count, dtype, "gpu") for r in range(N)]
    err = max_error(op, got, inputs)
    tol = RTOL.get(np.dtype(dtype), 0.0) * (N + 1) if op in (rr.Sum, rr.Average) else 0.0
    assert everyone(err <= tol), f"error {err} > {tol} on some rank"
    assert all_ranks_identical(got), "ranks hold different bits"
    same = np.array_equal(_host_bits(y), host.reshape(-1).view(np.uint8))
    assert everyone(same), "device result differs from the host engine's bits"


@pytest.mark.parametrize("algorithm", ["ring", "tree", "auto"])
def test_inplace_and_out_stay_on_device(algorithm):
    x = make_input(rr.rank(), 5000, np.float32, "inplace")
    d = cp.asarray(x)
    ptr = d.data.ptr
    assert rr.allreduce_(d, op=rr.Sum, algorithm=algorithm) is d and d.data.ptr == ptr
    out = cp.empty_like(d)
    src = cp.asarray(x)
    assert rr.allreduce(src, op=rr.Sum, algorithm=algorithm, out=out) is out
    assert everyone(bool(cp.array_equal(out, d)))
    np.testing.assert_array_equal(cp.asnumpy(src), x)   # out-of-place leaves the input alone
    with pytest.raises(rr.RingReduceError, match="both"):
        rr.allreduce(src, out=np.empty(5000, np.float32))


def test_pending_kernel_on_current_stream_is_awaited():
    # The input is still being computed on a side stream when the call starts:
    # the engine must synchronize the current stream before MPI reads it.
    s = cp.cuda.Stream(non_blocking=True)
    with s:
        d = cp.zeros(1 << 24, cp.float32)
        for _ in range(20):
            d += 1.0 / 20
        d += rr.rank()
        rr.allreduce_(d, op=rr.Sum)
    want = sum(1.0 + r for r in range(N))
    assert everyone(bool(cp.allclose(d, want, rtol=1e-5)))


@pytest.mark.parametrize("count", [0, 1, 777, 300_001])
@pytest.mark.parametrize("root", sorted({0, N - 1}))
def test_broadcast(count, root):
    x = make_input(rr.rank(), count, np.float64, "bcast")
    d = cp.asarray(x)
    rr.broadcast_(d, root_rank=root)
    np.testing.assert_array_equal(cp.asnumpy(d), make_input(root, count, np.float64, "bcast"))


def test_async_on_device():
    d = cp.asarray(make_input(rr.rank(), 100_000, np.float32, "async"))
    h = rr.allreduce_async(d, op=rr.Sum, name="gpu.async")
    y = h.wait()
    assert isinstance(y, cp.ndarray)
    host = host_reference(make_input(rr.rank(), 100_000, np.float32, "async"), rr.Sum, "auto")
    assert everyone(np.array_equal(cp.asnumpy(y), host))


COMPRESSIONS = ["fp16", "bf16", "int8", "int4", "onebit"]


@pytest.mark.parametrize("fmt", COMPRESSIONS)
@pytest.mark.parametrize("count", [1, 1000, 70_001])
def test_compression_parity_with_host_bytes(fmt, count):
    if FAKE and device.mode().aware:
        pytest.skip("the CUDA compression kernels need real device arrays")
    comp = getattr(rr.Compression, fmt)
    for step in range(3):   # later steps carry error-feedback residuals
        x = make_input(rr.rank(), count, np.float32, f"comp{step}")
        y_dev = rr.allreduce(cp.asarray(x), op=rr.Average, compression=comp,
                             name=f"gpu.{fmt}.{count}")
        y_host = rr.allreduce(x, op=rr.Average, compression=comp, name=f"host.{fmt}.{count}")
        assert isinstance(y_dev, cp.ndarray)
        assert everyone(np.array_equal(_host_bits(y_dev), y_host.reshape(-1).view(np.uint8))), \
            f"{fmt} step {step}: device bytes differ from the host engine's"
        assert all_ranks_identical(cp.asnumpy(y_dev))


def test_torch_cuda_tensor_zero_copy():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch without CUDA")
    import ringreduce.torch as rrt

    t = torch.full((1000,), float(rr.rank() + 1), device="cuda")
    ptr = t.data_ptr()
    rrt.allreduce_(t, op=rr.Sum, name="torch.cuda")
    assert t.data_ptr() == ptr and t.is_cuda
    assert everyone(bool((t == sum(range(1, N + 1))).all().item()))


# -- the other collectives on device arrays: allgather, reducescatter, alltoall, broadcast ----

@pytest.mark.parametrize("first", [0, 3, 40_000])
@pytest.mark.parametrize("algorithm", ["auto", "ring", "shm", "mpi"])
def test_allgather_on_device(algorithm, first):
    rows = [first + r for r in range(N)]
    x = make_input(rr.rank(), rows[rr.rank()] * 2, np.float32, f"ag{first}").reshape(-1, 2)
    y = rr.allgather(cp.asarray(x), algorithm=algorithm, name="gpu.ag")
    assert isinstance(y, cp.ndarray) and y.shape == (sum(rows), 2)
    want = np.concatenate([make_input(r, rows[r] * 2, np.float32, f"ag{first}").reshape(-1, 2)
                           for r in range(N)])
    assert everyone(np.array_equal(cp.asnumpy(y), want))


@pytest.mark.parametrize("op", [rr.Sum, rr.Average, rr.Max], ids=lambda o: o.name)
@pytest.mark.parametrize("first", [1, 2 * N + 1, 60_001])
@pytest.mark.parametrize("algorithm", ["auto", "ring", "shm", "mpi"])
def test_reducescatter_on_device(algorithm, first, op):
    x = make_input(rr.rank(), first * 3, np.float32, f"rs{first}").reshape(first, 3)
    y = rr.reducescatter(cp.asarray(x), op=op, algorithm=algorithm, name="gpu.rs")
    host = rr.reducescatter(x, op=op, algorithm=algorithm, name="host.rs")
    assert isinstance(y, cp.ndarray) and y.shape == host.shape
    # The same algorithm on the same bits: the device result is the host engine's, bit for bit.
    assert everyone(np.array_equal(_host_bits(y), host.reshape(-1).view(np.uint8)))


@pytest.mark.parametrize("count", [0, 5, 50_000])
def test_alltoall_on_device(count):
    splits = [(rr.rank() + j) % 3 + count for j in range(N)]
    x = make_input(rr.rank(), sum(splits) * 2, np.float64, "a2a").reshape(-1, 2)
    got, recv = rr.alltoall(cp.asarray(x), splits=splits)
    assert isinstance(got, cp.ndarray)
    want_h, recv_h = rr.alltoall(x, splits=splits)
    assert list(recv) == list(recv_h)
    assert everyone(np.array_equal(cp.asnumpy(got), want_h))


@pytest.mark.parametrize("count", [0, 1, 300_001])
def test_broadcast_out_of_place_on_device(count):
    x = make_input(rr.rank(), count, np.float32, "bcast2")
    d = cp.asarray(x)
    y = rr.broadcast(d, root_rank=N - 1)
    assert isinstance(y, cp.ndarray) and y is not d
    np.testing.assert_array_equal(cp.asnumpy(y), make_input(N - 1, count, np.float32, "bcast2"))
    np.testing.assert_array_equal(cp.asnumpy(d), x)       # the input is left as it was


def test_collectives_async_on_device():
    d = cp.asarray(np.full((N * 4, 2), float(rr.rank()), np.float32))
    h1 = rr.allgather_async(d)
    h2 = rr.reducescatter_async(d, op=rr.Sum)
    g, s = h1.wait(), h2.wait()
    assert isinstance(g, cp.ndarray) and isinstance(s, cp.ndarray)
    assert everyone(bool((cp.asnumpy(s) == sum(range(N))).all()))
    assert g.shape == (N * N * 4, 2)
