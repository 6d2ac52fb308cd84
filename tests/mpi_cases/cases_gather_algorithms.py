"""Allgather and reduce-scatter per algorithm: ring, shm, mpi and auto, forced by argument or env.

Every result is checked against numpy (exactly: integer-valued inputs, so every
summation order gives the same bits) and gathered pieces are bit-identical
across ranks. Sizes cross the shm block and a lowered MPI message limit.
Runs unchanged at any rank count (tests/test_mpi.py: np = 1..5).
"""
from __future__ import annotations

import dataclasses
import zlib

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, everyone, expect_everywhere

import ringreduce as rr
from ringreduce.algorithms import registry
from ringreduce.policy.collective import choose_collective
from ringreduce.runtime.context import context

rr.init()
N, R = rr.size(), rr.rank()
ALGOS = ["ring", "shm", "mpi", "auto"]
DTYPES = [np.float16, ml_dtypes.bfloat16, np.float32, np.float64, np.int32, np.int64, np.int8, np.uint8]
OPS = [rr.Sum, rr.Average, rr.Min, rr.Max, rr.Product]
FIRSTS = [0, 1, 7, 3000]       # rows per rank (times a rank-dependent extra for allgather)


def _values(rank, shape, dtype, tag, op=rr.Sum):
    """Small integers (exact in every dtype and summation order), regenerable on every rank."""
    rng = np.random.default_rng(zlib.crc32(f"{tag}:{rank}:{shape}".encode()))
    if op == rr.Product:
        v = rng.choice([1, 1, 1, 2, -1] if np.dtype(dtype).kind != "u" else [1, 2], size=shape)
    elif np.dtype(dtype).kind == "u":
        v = rng.integers(0, 40, size=shape)
    else:
        v = rng.integers(-20, 20, size=shape)
    return v.astype(dtype)


def _numpy(op, stack):
    wide = stack.astype(np.float64)
    if op in (rr.Sum, rr.Average):
        out = wide.sum(axis=0)
        out = out / len(stack) if op == rr.Average else out
    elif op == rr.Product:
        out = np.prod(wide, axis=0)
    else:
        out = wide.min(axis=0) if op == rr.Min else wide.max(axis=0)
    return out


@pytest.mark.parametrize("first", FIRSTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_allgather(algorithm, dtype, first):
    rows = [first + (r % 3) * (first > 0) for r in range(N)]       # uneven first dimensions
    x = _values(R, (rows[R], 3), dtype, "ag")
    y = rr.allgather(x, name=f"ag.{first}", algorithm=algorithm)
    want = np.concatenate([_values(r, (rows[r], 3), dtype, "ag") for r in range(N)])
    assert y.shape == want.shape and y.dtype == want.dtype
    assert np.array_equal(y.view(np.uint8), want.view(np.uint8))
    assert all_ranks_identical(y)


@pytest.mark.parametrize("first", [0, 1, 2 * N + 1, 5000])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_reducescatter(algorithm, dtype, op, first):
    half = np.dtype(dtype).itemsize == 2 and np.dtype(dtype).kind == "f" or dtype is ml_dtypes.bfloat16
    if np.dtype(dtype).kind in "iu" and op == rr.Average:
        pytest.skip("Average on integers is an error")
    if algorithm == "mpi" and half:
        expect_everywhere(lambda: rr.reducescatter(np.ones((N, 2), dtype), op=op, algorithm="mpi"),
                          "cannot reduce-scatter")
        return
    if first == 5000 and (op not in (rr.Sum, rr.Max) or np.dtype(dtype).itemsize < 4):
        pytest.skip("the large size is covered by 4- and 8-byte Sum/Max")
    if op == rr.Product and np.dtype(dtype).kind in "iu" and np.dtype(dtype).itemsize == 1 and N > 4:
        pytest.skip("products of 5 ranks overflow 8 bits")
    inputs = [_values(r, (first, 4), dtype, "rs", op) for r in range(N)]
    y = rr.reducescatter(inputs[R], op=op, name=f"rs.{first}", algorithm=algorithm)
    rows = [first // N + (i < first % N) for i in range(N)]
    lo = sum(rows[:R])
    want = _numpy(op, np.stack(inputs))[lo:lo + rows[R]].astype(dtype)
    assert y.shape == (rows[R], 4) and y.dtype == np.dtype(dtype)
    assert np.array_equal(y.astype(np.float64), want.astype(np.float64)), (y, want)
    assert all_ranks_identical(rr.allgather(y))


@pytest.mark.parametrize("algorithm", ["ring", "shm", "mpi"])
def test_reducescatter_explicit_splits_and_nan(algorithm):
    first = 3 * N + 2
    splits = [first - (N - 1)] + [1] * (N - 1)
    x = np.full((first, 2), float(R), np.float32)
    x[first - 1, 0] = np.nan if R == 0 else 1.0          # the lowest rank holds the NaN
    got = rr.reducescatter(x, op=rr.Max, splits=splits, algorithm=algorithm)
    lo = sum(splits[:R])
    want = np.full((first, 2), float(N - 1), np.float32)
    want[first - 1, 0] = np.nan
    np.testing.assert_array_equal(got, want[lo:lo + splits[R]])


@pytest.mark.parametrize("kind", ["allgather", "reducescatter"])
@pytest.mark.parametrize("algorithm", ["ring", "shm", "mpi"])
def test_env_forces_the_algorithm(kind, algorithm, monkeypatch):
    monkeypatch.setenv(f"RINGREDUCE_{kind.upper()}_ALGORITHM", algorithm)
    seen = []
    entry = registry.COLLECTIVES[kind][algorithm]
    monkeypatch.setitem(registry.COLLECTIVES[kind], algorithm, dataclasses.replace(
        entry, run=lambda *a, **k: (seen.append(algorithm), entry.run(*a, **k))))
    x = np.ones((200 * N, 3), np.float32)      # above what rides in the agreement row
    y = rr.allgather(x) if kind == "allgather" else rr.reducescatter(x, op=rr.Sum)
    assert y.shape == ((200 * N * N, 3) if kind == "allgather" else (200, 3))
    assert seen == [algorithm]


@pytest.mark.parametrize("algorithm", ["ring", "shm", "mpi"])
def test_allgather_some_ranks_ride_in_the_agreement_row(algorithm):
    """Small inputs travel inside the agreement allgather; larger ones by the algorithm."""
    rows = [1 if r % 2 == 0 else 300 for r in range(N)]        # 12 B rides, 3600 B does not
    x = _values(R, (rows[R], 3), np.float32, "mixed")
    y = rr.allgather(x, algorithm=algorithm)
    want = np.concatenate([_values(r, (rows[r], 3), np.float32, "mixed") for r in range(N)])
    assert np.array_equal(y, want)


def test_auto_picks_from_the_plan():
    chan = context().main
    for kind in ("allgather", "reducescatter"):
        for nbytes in (0, 4, 1 << 12, 1 << 20, 1 << 26):
            got = choose_collective(chan.plan, kind, nbytes, np.float32, N)
            assert got in ("ring", "shm", "mpi")
            assert everyone(got == rr.allgather_object(got)[0])
    # Half types and float Min/Max never go to native MPI.
    assert choose_collective(chan.plan, "reducescatter", 1 << 20, np.float16, N) != "mpi"
    assert choose_collective(chan.plan, "reducescatter", 1 << 20, np.float32, N, rr.Min) != "mpi"


def test_unknown_algorithm_is_named():
    expect_everywhere(lambda: rr.allgather(np.ones(3), algorithm="tree"),
                      "unknown allgather algorithm 'tree'")


def test_large_messages_split(monkeypatch):
    from ringreduce.transport import p2p

    monkeypatch.setattr(p2p, "MAX_MESSAGE_BYTES", 1000)
    for algorithm in ("ring", "mpi"):
        x = _values(R, (700 + R, 2), np.float32, "big")
        y = rr.allgather(x, algorithm=algorithm)
        want = np.concatenate([_values(r, (700 + r, 2), np.float32, "big") for r in range(N)])
        assert np.array_equal(y, want)
        inputs = [_values(r, (700, 2), np.int64, "bigrs") for r in range(N)]
        got = rr.reducescatter(inputs[R], op=rr.Sum, algorithm=algorithm)
        rows = [700 // N + (i < 700 % N) for i in range(N)]
        lo = sum(rows[:R])
        assert np.array_equal(got, np.sum(inputs, axis=0)[lo:lo + rows[R]])


def test_mismatched_algorithm_is_a_named_error(monkeypatch):
    if N < 2:
        pytest.skip("needs two ranks to disagree")
    monkeypatch.setenv("RINGREDUCE_ALLGATHER_ALGORITHM", "ring" if R == 0 else "mpi")
    expect_everywhere(lambda: rr.allgather(np.ones(4, np.float32)), "disagree", "algorithm")
