"""Helpers shared by the per-rank test cases: inputs every rank can regenerate, global verdicts."""
from __future__ import annotations

import zlib

import ml_dtypes
import numpy as np
from mpi4py import MPI

import ringreduce as rr

DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.int32, np.int64, np.int8, np.uint8]
FLOATS = {np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float32), np.dtype(np.float64)}
# Relative tolerance per float dtype for sums (the reduction order differs from numpy's).
RTOL = {np.dtype(np.float16): 2e-2, np.dtype(ml_dtypes.bfloat16): 1e-1,
        np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def make_input(rank: int, count: int, dtype, tag: str) -> np.ndarray:
    """Deterministic input for `rank`, regenerable on every rank (no communication)."""
    seed = zlib.crc32(f"{tag}:{rank}:{count}:{np.dtype(dtype)}".encode())
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    if dtype in FLOATS:
        return rng.standard_normal(count).astype(dtype)
    if dtype == np.dtype(np.uint8):
        return rng.integers(0, 40, count).astype(dtype)      # sums of 5 ranks stay < 256
    return rng.integers(-20, 20, count).astype(dtype)


def reference(op, inputs: list[np.ndarray]) -> np.ndarray:
    """numpy's answer in float64 (or the integer type itself)."""
    dtype = inputs[0].dtype
    wide = np.float64 if dtype in FLOATS else dtype
    stack = np.stack([x.astype(wide) for x in inputs]) if inputs[0].size else np.zeros((len(inputs), 0), wide)
    if op == rr.Sum:
        return stack.sum(axis=0, dtype=wide)
    if op == rr.Average:
        return stack.mean(axis=0)
    if op == rr.Min:
        return stack.min(axis=0)
    return stack.max(axis=0)


def max_error(op, result: np.ndarray, inputs: list[np.ndarray]) -> float:
    """Largest error of result vs reference, relative to the inputs' magnitude (0 for exact ops)."""
    ref = reference(op, inputs)
    if result.size == 0:
        return 0.0
    if result.dtype not in FLOATS or op in (rr.Min, rr.Max):
        return float(np.max(np.abs(result.astype(np.float64) - ref.astype(np.float64))))
    scale = np.sum([np.abs(x.astype(np.float64)) for x in inputs], axis=0)
    if op == rr.Average:
        scale = scale / len(inputs)
    return float(np.max(np.abs(result.astype(np.float64) - ref) / (scale + 1e-30)))


def all_ranks_identical(result: np.ndarray) -> bool:
    """True on every rank iff every rank's result has the same bytes."""
    comm = MPI.COMM_WORLD
    raw = np.ascontiguousarray(result).reshape(-1).view(np.uint8)
    gathered = np.empty((comm.size, raw.size), dtype=np.uint8)
    comm.Allgather([raw, MPI.BYTE], [gathered, MPI.BYTE])
    return bool((gathered == gathered[0]).all())


def everyone(flag: bool) -> bool:
    """True iff flag is true on every rank (so all ranks reach the same verdict)."""
    return bool(MPI.COMM_WORLD.allreduce(int(bool(flag)), op=MPI.MIN))


def expect_everywhere(fn, *patterns, who: str | None = None) -> str:
    """fn() must raise RingReduceError on every rank, naming this rank (as `who`, default
    "rank R"), with every pattern in it."""
    try:
        fn()
    except rr.RingReduceError as exc:
        msg = str(exc)
    else:
        msg = ""
    assert everyone(bool(msg)), f"some rank did not raise (this rank: {msg!r})"
    assert msg.startswith(f"{who or f'rank {rr.rank()}'}:"), msg
    for p in patterns:
        assert p in msg, f"{p!r} not in {msg!r}"
    return msg


def check_allreduce(algorithm, dtype, op, count, tag="matrix", **kwargs):
    """Allreduce this rank's input and check it against numpy and across ranks (kwargs: comm, ...)."""
    n = MPI.COMM_WORLD.size
    x = make_input(rr.rank(), count, dtype, tag)
    y = rr.allreduce(x, op=op, algorithm=algorithm, **kwargs)
    inputs = [make_input(r, count, dtype, tag) for r in range(n)]
    err = max_error(op, y, inputs)
    tol = RTOL.get(np.dtype(dtype), 0.0) * (n + 1) if op in (rr.Sum, rr.Average) else 0.0
    assert y.shape == x.shape and y.dtype == x.dtype
    assert everyone(err <= tol), f"error {err} > {tol} on some rank"
    assert all_ranks_identical(y), "ranks hold different bits"
    return y


def across_nodes_comm():
    """A Dup of COMM_WORLD whose ranks count as separate nodes (RINGREDUCE_NODE_ID per rank while
    its context is made): the check's rows go over MPI, as across a cluster's nodes, so the
    ring and tree send their first segment, and a two-sided compressed call compresses its
    first segments, while the fingerprints travel. The caller frees it."""
    import os

    from ringreduce.runtime import agree
    from ringreduce.runtime.context import context

    os.environ["RINGREDUCE_NODE_ID"] = f"node{rr.rank()}"
    comm = MPI.COMM_WORLD.Dup()
    try:
        ctx = context(comm)
    finally:
        del os.environ["RINGREDUCE_NODE_ID"]
    assert rr.size() == 1 or agree.rows_of(ctx.main).overlaps
    return comm
