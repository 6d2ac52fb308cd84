"""Compressed allreduce under mpirun: vs a numpy simulation, error bounds, error feedback, state.

The simulation rebuilds the two-sided algorithm from the kernels' numpy
reference (tests/quantize_reference.py), so the engine's output must match it
bit for bit, residuals and stochastic rounding included.
"""
from __future__ import annotations

import os
import sys

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, everyone, make_input, expect_everywhere

import ringreduce as rr
from ringreduce.compression import measure_error

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
import quantize_reference as ref  # noqa: E402

rr.init()
N = rr.size()
R = rr.rank()
F32 = np.float32
QUANT = ["int8", "int4", "onebit"]
HALF = ["fp16", "bf16"]
DTYPES = [np.float32, np.float16, ml_dtypes.bfloat16]
# 0, 1, fewer than ranks, odd, one partial block, several blocks with a short last one
SIZES = [0, 1, max(N - 1, 1), 7, 300, 5 * 64 + 3]


# ---------------------------------------------------------------- the numpy simulation

def sim_chunks(count: int, n: int, B: int) -> list[tuple[int, int]]:
    """Owner chunks: whole blocks, the first (nblocks % n) owners one block more."""
    nblocks = -(-count // B)
    base, extra = divmod(nblocks, n)
    out, lo = [], 0
    for j in range(n):
        hi = lo + (base + (j < extra)) * B
        out.append((min(lo, count), min(hi, count)))
        lo = hi
    return out


class Simulation:
    """The two-sided compressed allreduce of all ranks, step by step, in numpy."""

    def __init__(self, fmt: str, count: int, n: int, B: int = 256, ef: bool = True,
                 stochastic: bool = False, seed: int = 0, clip=None):
        self.fmt, self.count, self.n, self.B = fmt, count, n, B
        self.ef, self.stochastic, self.seed, self.clip = ef, stochastic, seed, clip
        self.worker = [np.zeros(count, F32) for _ in range(n)]
        self.server = np.zeros(count, F32)     # owners' residuals, side by side
        self.calls = 0

    def _compress(self, x, res, counter, offset):
        packed, new, bad = ref.compress(self.fmt, x, res if self.ef else None, self.B,
                                        clip=self.clip, stochastic=self.stochastic,
                                        seed=self.seed, counter=counter, offset=offset)
        if self.ef:
            res[...] = new
        return ref.decompress(self.fmt, packed, x.size, self.B)

    def step(self, inputs: list[np.ndarray], op) -> np.ndarray:
        base = (self.calls % 2**32) << 32
        self.calls += 1
        out = np.zeros(self.count, F32)
        for a, b in sim_chunks(self.count, self.n, self.B):
            if a == b:
                continue
            acc = np.zeros(b - a, F32)
            for i in range(self.n):
                d = self._compress(inputs[i][a:b], self.worker[i][a:b], base | (i + 1), a)
                acc = (acc + d).astype(F32)
            if op == rr.Average and self.n > 1:
                acc = (acc / F32(self.n)).astype(F32)
            out[a:b] = self._compress(acc, self.server[a:b], base, a)
        return out.astype(inputs[0].dtype)


def assert_bits_equal(a: np.ndarray, b: np.ndarray):
    assert a.dtype == b.dtype and a.shape == b.shape
    bad = np.flatnonzero(a.reshape(-1).view(np.uint8) != b.reshape(-1).view(np.uint8))
    assert everyone(bad.size == 0), f"differs from the simulation at bytes {bad[:8]}"


def rel_l2(y, exact) -> float:
    y, exact = np.asarray(y, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(y - exact) / np.linalg.norm(exact))


# ---------------------------------------------------------------- vs the simulation

@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("fmt", QUANT)
def test_matches_simulation(fmt, count):
    comp = getattr(rr.Compression, fmt)(block_size=64)
    sim = Simulation(fmt, count, N, B=64)
    for step, op in enumerate([rr.Average, rr.Sum, rr.Average]):   # residuals carry over
        tag = f"sim{step}"
        x = make_input(R, count, np.float32, tag)
        y = rr.allreduce(x, op=op, compression=comp, name=f"sim-{fmt}-{count}")
        expect = sim.step([make_input(r, count, np.float32, tag) for r in range(N)], op)
        assert_bits_equal(y, expect)
        assert all_ranks_identical(y)


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("fmt", QUANT)
def test_half_inputs_match_simulation(fmt, dtype):
    comp = getattr(rr.Compression, fmt)(block_size=32, stochastic=True, seed=7, clip=2.5)
    sim = Simulation(fmt, 203, N, B=32, stochastic=True, seed=7, clip=2.5)
    for step in range(2):
        x = make_input(R, 203, dtype, f"h{step}")
        y = rr.allreduce(x, compression=comp, name=f"half-in-{fmt}-{np.dtype(dtype).name}")
        assert y.dtype == np.dtype(dtype)
        assert_bits_equal(y, sim.step([make_input(r, 203, dtype, f"h{step}") for r in range(N)],
                                      rr.Average))


@pytest.mark.parametrize("segment_bytes", [256, 3 * 256])
@pytest.mark.parametrize("fmt", QUANT)
def test_pipelined_segments_match_simulation(fmt, segment_bytes, monkeypatch):
    # Many segments per chunk (one or three blocks of 64 each, some chunks shorter than
    # others so their last segments are empty; stochastic rounding and residuals carried
    # over): the pipelined scheme must give the unsegmented simulation's bits.
    from ringreduce.compression import algorithm
    monkeypatch.setattr(algorithm, "SEGMENT_BYTES", segment_bytes)
    monkeypatch.setattr(algorithm, "NODE_SEGMENT_BYTES", segment_bytes)   # ranks on one node
    monkeypatch.setattr(algorithm, "MIN_SEGMENT_PACKED", 0)
    count = 64 * (7 * N + 2) + 5
    segs = algorithm.segment_layout(algorithm.chunk_layout(count, N, 64), 64)
    assert segs.shape[1] - 1 > 1
    comp = getattr(rr.Compression, fmt)(block_size=64, stochastic=True, seed=5)
    sim = Simulation(fmt, count, N, B=64, stochastic=True, seed=5)
    for step, op in enumerate([rr.Average, rr.Sum]):
        tag = f"seg{step}"
        x = make_input(R, count, np.float32, tag)
        y = rr.allreduce(x, op=op, compression=comp, name=f"seg-{fmt}-{segment_bytes}")
        assert_bits_equal(y, sim.step([make_input(r, count, np.float32, tag) for r in range(N)],
                                      op))
        assert all_ranks_identical(y)


def test_segment_layout_is_block_aligned_and_capped(monkeypatch):
    from ringreduce.compression import algorithm
    bounds = algorithm.chunk_layout(10**6 + 3, 3, 256)
    segs = algorithm.segment_layout(bounds, 256)
    assert np.array_equal(segs[:, 0], bounds[:-1]) and np.array_equal(segs[:, -1], bounds[1:])
    inner = segs[:, 1:-1] - segs[:, :1]
    assert np.all(inner % 256 == 0) and np.all(np.diff(segs, axis=1) >= 0)
    monkeypatch.setattr(algorithm, "SEGMENT_BYTES", 1024)
    assert algorithm.segment_layout(bounds, 256).shape[1] - 1 == algorithm.MAX_SEGMENTS
    # A packed floor of 2**18 bytes at 1/8 byte per element: segments of 2**21 elements.
    assert algorithm.segment_layout(bounds, 256, 1 / 8).shape[1] - 1 == 1
    # An explicit segment size (one node's NODE_SEGMENT_BYTES) wins over SEGMENT_BYTES.
    assert algorithm.segment_layout(bounds, 256, 0.0, 16 << 20).shape[1] - 1 == 1


@pytest.mark.parametrize("fmt", QUANT + HALF)
def test_out_of_place_source_gives_the_same_bits(fmt):
    # compressed_allreduce(..., src=x) reads the input from x and writes only the result
    # buffer: the same bits as the in-place call on a copy, x untouched.
    from ringreduce.compression.algorithm import compressed_allreduce
    from ringreduce.core.ops import ReduceOp
    from ringreduce.runtime.context import context
    chan = context().main
    comp = getattr(rr.Compression, fmt)(error_feedback=False)
    count = 64 * 1024 * N + 77
    x = make_input(R, count, np.float32, "src")
    keep = x.copy()
    for op in (ReduceOp.AVERAGE, ReduceOp.SUM):
        inplace = x.copy()
        compressed_allreduce(chan, inplace, op, "auto", comp, f"src-{fmt}")
        out = np.full_like(x, np.nan)
        compressed_allreduce(chan, out, op, "auto", comp, f"src-{fmt}", src=x)
        assert_bits_equal(out, inplace)
        assert_bits_equal(x, keep)
        assert all_ranks_identical(out)


@pytest.mark.parametrize("fmt", QUANT)
def test_no_error_feedback_matches_simulation(fmt):
    comp = getattr(rr.Compression, fmt)(error_feedback=False, stochastic=True, seed=3)
    sim = Simulation(fmt, 1000, N, ef=False, stochastic=True, seed=3)
    for step in range(2):
        x = make_input(R, 1000, np.float32, "noef")
        y = rr.allreduce(x, compression=comp, name=f"noef-{fmt}")
        assert_bits_equal(y, sim.step([make_input(r, 1000, np.float32, "noef")
                                       for r in range(N)], rr.Average))
    assert f"noef-{fmt}" in rr.compression_state().names()


def test_unnamed_without_error_feedback():
    comp = rr.Compression.int8(error_feedback=False)
    x = make_input(R, 777, np.float32, "unnamed")
    y = rr.allreduce(x, compression=comp)
    sim = Simulation("int8", 777, N, ef=False)
    assert_bits_equal(y, sim.step([make_input(r, 777, np.float32, "unnamed") for r in range(N)],
                                  rr.Average))


def test_in_place_and_shape():
    x = make_input(R, 12 * 50, np.float32, "inplace").reshape(12, 50)
    y = rr.allreduce(x, compression=rr.Compression.int4, name="shape-a")
    z = x.copy()
    assert rr.allreduce_(z, compression=rr.Compression.int4, name="shape-b") is z
    assert y.shape == (12, 50) and np.array_equal(y, z)
    assert np.array_equal(x, make_input(R, 600, np.float32, "inplace").reshape(12, 50))


# ---------------------------------------------------------------- error bounds

# Relative L2 error of one call vs the exact average, Gaussian inputs, block 256, any n.
# Two quantisations: e.g. int8 ~ sqrt(2) x 0.7 % (levels of max|v|/127 in a block of 256).
BOUNDS = {"fp16": 1e-3, "bf16": 8e-3, "int8": 0.012, "int4": 0.21, "onebit": 0.95}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("fmt", HALF + QUANT)
def test_error_bound(fmt, dtype):
    count = 20000
    inputs = [make_input(r, count, dtype, "bound") for r in range(N)]
    exact = np.mean([x.astype(np.float64) for x in inputs], axis=0)
    y = rr.allreduce(inputs[R], compression=getattr(rr.Compression, fmt), name=f"bound-{fmt}-{np.dtype(dtype).name}")
    err = rel_l2(y, exact)
    bound = BOUNDS[fmt] + (4e-3 if np.dtype(dtype) == np.dtype(ml_dtypes.bfloat16) else 0)
    assert everyone(err < bound), f"relative error {err} >= {bound}"
    assert all_ranks_identical(y)


@pytest.mark.parametrize("fmt", HALF)
@pytest.mark.parametrize("op", [rr.Sum, rr.Average], ids=["Sum", "Average"])
@pytest.mark.parametrize("count", SIZES + [70001])
def test_half_formats(fmt, op, count):
    x = make_input(R, count, np.float32, "halfring")
    y = rr.allreduce(x, op=op, compression=getattr(rr.Compression, fmt), name=f"hr-{count}")
    inputs = [make_input(r, count, np.float32, "halfring") for r in range(N)]
    exact = np.sum(inputs, axis=0, dtype=np.float64) / (N if op == rr.Average else 1)
    tol = (2e-3 if fmt == "fp16" else 1.6e-2) * N * (np.abs(exact).max(initial=0) + 1)
    assert y.dtype == np.float32
    assert everyone(np.all(np.abs(y - exact) <= tol)), "half-type ring out of bounds"
    assert all_ranks_identical(y)


# ---------------------------------------------------------------- error feedback

def _running_mean_errors(comp, name, steps):
    """Allreduce the same gradient `steps` times; relative error of the running mean at each step."""
    g = make_input(R, 4096, np.float32, "fixed")
    exact = np.mean([make_input(r, 4096, np.float32, "fixed").astype(np.float64)
                     for r in range(N)], axis=0)
    total = np.zeros(4096, np.float64)
    errs = []
    for t in range(1, steps + 1):
        total += rr.allreduce(g, compression=comp, name=name)
        errs.append(rel_l2(total / t, exact))
    return errs


@pytest.mark.parametrize("fmt", QUANT)
def test_error_feedback_converges(fmt):
    on = _running_mean_errors(getattr(rr.Compression, fmt), f"ef-{fmt}", 64)
    off = _running_mean_errors(getattr(rr.Compression, fmt)(error_feedback=False), None, 64)
    # With feedback the running mean approaches the exact average, like 1/T for int8/int4.
    # onebit is slower (about T**-0.6 here): its residual must first grow until the block
    # scale, mean |v|, covers the block's largest elements.
    fast, total = (1.7, 4) if fmt == "onebit" else (3, 30)
    assert everyone(on[63] < on[15] / fast and on[63] < on[0] / total), on[::8]
    # ... without it, deterministic rounding repeats the same bias every step.
    assert everyone(off[63] > 0.7 * off[0]), off[::8]
    assert everyone(on[63] < off[63] / total)


# ---------------------------------------------------------------- checkpointing

def test_state_dict_round_trip():
    comp = rr.Compression.int4(stochastic=True, seed=11)
    cs = rr.compression_state()
    for step in range(3):
        rr.allreduce(make_input(R, 999, np.float32, f"ck{step}"), compression=comp, name="ckpt")
    saved = cs.state_dict()
    assert saved["size"] == N and saved["rank"] == R and "ckpt" in saved["tensors"]
    first = [rr.allreduce(make_input(R, 999, np.float32, f"ck{s}"), compression=comp, name="ckpt")
             for s in range(3, 6)]
    cs.load_state_dict(saved)
    again = [rr.allreduce(make_input(R, 999, np.float32, f"ck{s}"), compression=comp, name="ckpt")
             for s in range(3, 6)]
    for a, b in zip(first, again):
        assert_bits_equal(a, b)
    assert everyone(not np.array_equal(first[0], first[1]))


def test_state_dict_wrong_rank_count():
    rr.allreduce(np.ones(10, F32), compression=rr.Compression.int8, name="wrong-n")
    saved = rr.compression_state().state_dict()
    saved["size"] = N + 1
    with pytest.raises(rr.RingReduceError, match=f"saved with {N + 1} ranks .* has {N}"):
        rr.compression_state().load_state_dict(saved)


def test_state_per_communicator():
    from mpi4py import MPI
    sub = MPI.COMM_WORLD.Split(R % 2, R)
    x = make_input(R, 500, np.float32, "sub")
    rr.allreduce(x, compression=rr.Compression.int8, name="sub-only", comm=sub)
    assert "sub-only" in rr.compression_state(comm=sub).names()
    assert "sub-only" not in rr.compression_state().names()
    assert rr.compression_state(comm=sub).size == sub.Get_size()
    sub.Free()


# ---------------------------------------------------------------- non-finite values

def _nonfinite_input(r: int, count: int, B: int, tag: str) -> np.ndarray:
    # NaN/Inf in the same block on every rank (block 0), on ranks 0 and 1 only (block 2),
    # on one rank (block 4 + r), and a zero block, which decodes to zero-scale levels.
    x = make_input(r, count, np.float32, tag)
    x[3] = np.nan if r % 2 else -np.inf
    if r < 2:
        x[2 * B + 1] = np.nan
    x[(4 + r) * B + 2] = np.inf
    x[3 * B:4 * B] = -0.0
    return x


@pytest.mark.parametrize("fmt", QUANT)
def test_nonfinite_blocks_match_simulation(fmt):
    # The owners' sums over pieces with NaN blocks, in rank order, bit for bit.
    B = 64
    count = (8 + N) * B + 9
    comp = getattr(rr.Compression, fmt)(block_size=B)
    sim = Simulation(fmt, count, N, B=B)
    for step, op in enumerate([rr.Average, rr.Sum]):
        tag = f"nfsim{step}"
        y = rr.allreduce(_nonfinite_input(R, count, B, tag), op=op, compression=comp,
                         name=f"nfsim-{fmt}")
        with np.errstate(invalid="ignore", over="ignore"):
            expect = sim.step([_nonfinite_input(r, count, B, tag) for r in range(N)], op)
        assert_bits_equal(y, expect)
        assert all_ranks_identical(y)


@pytest.mark.parametrize("fmt", QUANT)
def test_nonfinite_propagates_but_not_into_residuals(fmt):
    B = 64
    comp = getattr(rr.Compression, fmt)(block_size=B)
    name = f"nan-{fmt}"
    x = make_input(R, 10 * B, np.float32, "nan")
    if R == 0:
        x[5] = np.nan
    if R == N - 1:
        x[3 * B + 1] = np.inf
    y = rr.allreduce(x, compression=comp, name=name)
    assert np.isnan(y[:B]).all() and np.isnan(y[3 * B:4 * B]).all()
    rest = np.r_[B:3 * B, 4 * B:10 * B]
    assert np.isfinite(y[rest]).all()
    assert all_ranks_identical(y)
    stats = rr.last_stats()
    assert stats.nonfinite_blocks >= (1 if R in (0, N - 1) else 0)
    # The next, finite, call is finite everywhere: no NaN survived in a residual.
    y2 = rr.allreduce(make_input(R, 10 * B, np.float32, "nan2"), compression=comp, name=name)
    assert everyone(np.isfinite(y2).all())
    st = rr.compression_state().state_dict()["tensors"][name]
    assert np.isfinite(st["worker"]).all() and np.isfinite(st["server"]).all()
    assert everyone(True) and st["resets"] >= (1 if R in (0, N - 1) else 0)


def test_fp16_overflow_and_nan_elementwise():
    x = np.ones(100, F32)
    x[7] = 1e6 if R == 0 else 1.0
    x[9] = np.nan if R == N - 1 else 1.0
    y = rr.allreduce(x, op=rr.Sum, compression=rr.Compression.fp16, name="fp16-ovf")
    assert np.isinf(y[7]) and np.isnan(y[9])
    assert np.all(y[np.r_[0:7, 8, 10:100]] == N)
    assert all_ranks_identical(y)


# ---------------------------------------------------------------- async

def test_async_matches_sync():
    comp = rr.Compression.int8
    for step in range(3):
        x = make_input(R, 3001, np.float32, f"as{step}")
        h = rr.allreduce_async(x, compression=comp, name="async-a")
        y_sync = rr.allreduce(x, compression=comp, name="async-b")
        assert_bits_equal(h.wait(), y_sync)
    names = rr.compression_state().names()
    assert "async-a" in names and "async-b" in names
    assert rr.last_stats("async-a").count == 3001


# ---------------------------------------------------------------- statistics

@pytest.mark.parametrize("fmt", HALF + QUANT)
def test_stats(fmt):
    count, B = 10000, 256
    comp = getattr(rr.Compression, fmt)
    measure_error(True)
    try:
        x = make_input(R, count, np.float32, "stats")
        y = rr.allreduce(x, compression=comp, name=f"stats-{fmt}")
    finally:
        measure_error(False)
    s = rr.last_stats()
    assert s.name == f"stats-{fmt}" and s.count == count and s.ranks == N
    assert s.payload_bytes == 4 * count
    packed = ref.packed_nbytes(fmt, count, B)
    if fmt in QUANT:
        assert s.wire_bytes == pytest.approx(2 * (N - 1) * packed / N)
        assert s.algorithm == "two-sided"
    assert s.ratio == pytest.approx(4 * count / packed)
    exact = np.mean([make_input(r, count, np.float32, "stats").astype(np.float64)
                     for r in range(N)], axis=0)
    assert s.rel_error == pytest.approx(rel_l2(y, exact), rel=1e-3, abs=1e-6)
    rr.allreduce(x, compression=comp, name=f"stats-{fmt}")
    assert rr.last_stats().rel_error is None
    if fmt == "onebit":
        assert s.ratio == pytest.approx(32 / (1 + 32 / B), rel=5e-3)   # 28.4: one scale per 256 signs


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("fmt", QUANT)
def test_missing_name(fmt):
    expect_everywhere(lambda: rr.allreduce(np.ones(10, F32), compression=getattr(rr.Compression, fmt)),
                       "name", "error_feedback")


@pytest.mark.parametrize("op", [rr.Min, rr.Max], ids=["Min", "Max"])
@pytest.mark.parametrize("fmt", ["fp16", "int8"])
def test_unsupported_op(fmt, op):
    expect_everywhere(lambda: rr.allreduce(np.ones(10, F32), op=op, name="mm",
                                            compression=getattr(rr.Compression, fmt)),
                       "rr.Sum or rr.Average", "tensor 'mm'")


@pytest.mark.parametrize("dtype", [np.int32, np.float64])
def test_unsupported_dtype(dtype):
    expect_everywhere(lambda: rr.allreduce(np.ones(10, dtype), op=rr.Sum, name="ints",
                                            compression=rr.Compression.int8),
                       "float32, float16 or bfloat16", str(np.dtype(dtype)))


@pytest.mark.skipif(N < 2, reason="needs two ranks to disagree")
def test_config_mismatch_is_caught():
    comp = rr.Compression.int8 if R == 0 else rr.Compression.int8(block_size=128)
    expect_everywhere(lambda: rr.allreduce(np.ones(1000, F32), compression=comp, name="cfg"),
                       "compression", "block_size=128")
