"""The engine's other collectives, over the matrix: collective x dtype x op x shape x process set.

allgather, reducescatter, alltoall, broadcast, barrier, grouped allreduce, Product
and the scale factors, each checked against numpy and bit-identical across ranks
where a reduction is involved; mismatches end in named errors, never a hang.
Runs unchanged at any rank count (tests/test_mpi.py: np = 1..5).
"""
from __future__ import annotations

import numpy as np
import pytest
from _common import DTYPES, FLOATS, all_ranks_identical, everyone, expect_everywhere, make_input

import ringreduce as rr

rr.init()
N = rr.size()
R = rr.rank()
multi = pytest.mark.skipif(N < 2, reason="needs two or more ranks to disagree")
OPS = [rr.Sum, rr.Average, rr.Min, rr.Max, rr.Product]
# Process sets: everyone, and (from 3 ranks) the odd ranks, numbered differently from the world.
ODD = rr.add_process_set(rr.ProcessSet(range(1, N, 2))) if N >= 3 else None
SETS = {"global": None, "odd": ODD}


def _set_ranks(name):
    return list(range(N)) if SETS[name] is None else SETS[name].ranks


def _skip_outside(name):
    ps = SETS[name]
    if name != "global" and ps is None:
        pytest.skip("process set needs 3 ranks")
    if ps is not None and not ps.included():
        pytest.skip("this rank is not in the set")    # members run it; the others skip together


def _rows(rank, first, tail, dtype, tag):
    return make_input(rank, first * int(np.prod(tail, dtype=np.int64)), dtype, tag).reshape((first,) + tail)


def _ref(op, stack):
    wide = stack.astype(np.float64) if stack.dtype in FLOATS else stack
    if op in (rr.Sum, rr.Average):
        out = wide.sum(axis=0)
        return out / len(stack) if op == rr.Average else out
    if op == rr.Product:
        return np.prod(wide, axis=0)
    return wide.min(axis=0) if op == rr.Min else wide.max(axis=0)


def _close(got, want, dtype, op):
    got = got.astype(np.float64) if np.dtype(dtype) in FLOATS else got
    if np.dtype(dtype) in FLOATS and op not in (rr.Min, rr.Max):
        tol = {2: 5e-2, 4: 1e-4, 8: 1e-10}[np.dtype(dtype).itemsize]
        return np.allclose(got, want, rtol=tol, atol=tol)
    return np.array_equal(got, want)


@pytest.mark.parametrize("pset", list(SETS))
@pytest.mark.parametrize("tail", [(), (3,), (2, 0)], ids=["1d", "rows3", "empty-rows"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_allgather(dtype, tail, pset):
    _skip_outside(pset)
    ranks = _set_ranks(pset)
    me = ranks.index(R)
    firsts = [(i % 3) for i in range(len(ranks))]           # uneven, including 0 rows
    x = _rows(R, firsts[me], tail, dtype, "ag")
    y = rr.allgather(x, name=f"ag.{pset}", process_set=SETS[pset])
    want = np.concatenate([_rows(r, firsts[i], tail, dtype, "ag") for i, r in enumerate(ranks)])
    assert y.shape == want.shape and y.dtype == x.dtype
    assert np.array_equal(y.view(np.uint8), want.view(np.uint8))


def test_allgather_noncontiguous():
    x = np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2] + R
    y = rr.allgather(x)
    assert np.array_equal(y, np.concatenate([np.arange(24, dtype=np.float32).reshape(4, 6)[:, ::2] + r
                                             for r in range(N)]))


@pytest.mark.parametrize("pset", list(SETS))
@pytest.mark.parametrize("explicit", [False, True], ids=["even", "splits"])
@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reducescatter(dtype, op, explicit, pset):
    _skip_outside(pset)
    if op == rr.Average and np.dtype(dtype).kind in "iu":
        pytest.skip("Average on integers is an error (tested below)")
    ranks = _set_ranks(pset)
    n, me = len(ranks), ranks.index(R)
    first = 2 * n + 1
    splits = [(i + 1) if i < n - 1 else first - sum(range(1, n)) for i in range(n)] if explicit else None
    if explicit and splits[-1] < 0:
        splits = [first] + [0] * (n - 1)
    inputs = [_rows(r, first, (2,), dtype, "rs") for r in ranks]
    if op == rr.Product:
        inputs = [np.where(np.abs(i.astype(np.float64)) > 2, 1, i).astype(dtype) for i in inputs]
    y = rr.reducescatter(inputs[me], op=op, splits=splits, name=f"rs.{pset}", process_set=SETS[pset])
    rows = splits if explicit else [first // n + (i < first % n) for i in range(n)]
    lo = sum(rows[:me])
    want = _ref(op, np.stack(inputs))[lo:lo + rows[me]]
    assert y.shape == (rows[me], 2) and y.dtype == np.dtype(dtype)
    assert _close(y, want, dtype, op), (y, want)
    # Every piece comes from one rank's reduction: gathered, they are the same everywhere.
    whole = rr.allgather(y, process_set=SETS[pset])
    assert whole.shape[0] == first


@pytest.mark.parametrize("pset", list(SETS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_alltoall(dtype, pset):
    _skip_outside(pset)
    ranks = _set_ranks(pset)
    n, me = len(ranks), ranks.index(R)
    splits = [(me + j) % 3 for j in range(n)]               # uneven, zeros included
    x = _rows(R, sum(splits), (2,), dtype, "a2a")
    got, recv = rr.alltoall(x, splits=splits, name=f"a2a.{pset}", process_set=SETS[pset])
    want_splits = [(i + me) % 3 for i in range(n)]
    assert list(recv) == want_splits
    parts = []
    for i, r in enumerate(ranks):
        theirs = [(i + j) % 3 for j in range(n)]
        src = _rows(r, sum(theirs), (2,), dtype, "a2a")
        lo = sum(theirs[:me])
        parts.append(src[lo:lo + theirs[me]])
    assert np.array_equal(got.view(np.uint8), np.concatenate(parts).view(np.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
def test_broadcast_out_of_place(dtype):
    x = make_input(R, 9, dtype, "bc")
    keep = x.copy()
    y = rr.broadcast(x, root_rank=N - 1, name="bc")
    assert np.array_equal(y.view(np.uint8), make_input(N - 1, 9, dtype, "bc").view(np.uint8))
    assert np.array_equal(x.view(np.uint8), keep.view(np.uint8))     # the input is untouched


@pytest.mark.parametrize("op", OPS, ids=lambda o: o.name)
def test_grouped_allreduce(op):
    shapes = [(3,), (2, 2), (0,), (5,)]
    dtypes = [np.float32, np.float32, np.float32, np.float64]
    inputs = [[make_input(r, int(np.prod(s)), d, f"g{i}").reshape(s) for i, (s, d) in
               enumerate(zip(shapes, dtypes))] for r in range(N)]
    if op == rr.Product:
        inputs = [[np.clip(a, -1.5, 1.5) for a in row] for row in inputs]
    got = rr.grouped_allreduce(inputs[R], op=op, name="grouped")
    for i, g in enumerate(got):
        assert g.shape == shapes[i] and g.dtype == np.dtype(dtypes[i])
        assert _close(g, _ref(op, np.stack([row[i] for row in inputs])), dtypes[i], op)
        assert all_ranks_identical(g)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.float16])
def test_product_is_bit_identical(dtype):
    x = make_input(R, 3000, dtype, "prod")
    if np.dtype(dtype).kind == "f":
        x = (1 + 0.01 * x.astype(np.float64)).astype(dtype)
    else:
        x = np.where(np.abs(x) > 2, 1, x).astype(dtype)
    for algorithm in ("auto", "ring", "tree", "shm") + (("mpi",) if np.dtype(dtype).itemsize > 2 else ()):
        y = rr.allreduce(x, op=rr.Product, algorithm=algorithm, name=f"prod.{algorithm}")
        want = _ref(rr.Product, np.stack([_prod_input(r, dtype) for r in range(N)]))
        assert _close(y, want, dtype, rr.Product), algorithm
        assert all_ranks_identical(y), algorithm


def _prod_input(r, dtype):
    x = make_input(r, 3000, dtype, "prod")
    if np.dtype(dtype).kind == "f":
        return (1 + 0.01 * x.astype(np.float64)).astype(dtype)
    return np.where(np.abs(x) > 2, 1, x).astype(dtype)


@pytest.mark.parametrize("count", [1, 700, 20000])
def test_scale_factors(count):
    x = make_input(R, count, np.float32, "scale")
    y = rr.allreduce(x, op=rr.Sum, prescale_factor=0.5, postscale_factor=4.0, name="scaled")
    want = sum((make_input(r, count, np.float32, "scale") * np.float32(0.5)).astype(np.float64)
               for r in range(N)) * 4.0
    assert np.allclose(y, want, rtol=1e-5, atol=1e-5)
    assert all_ranks_identical(y)


def test_barrier_and_async_forms():
    rr.barrier()
    h1 = rr.allgather_async(np.full((1, 2), R, np.int32))
    h2 = rr.reducescatter_async(np.ones((N, 2), np.float32), op=rr.Sum)
    h3 = rr.alltoall_async(np.arange(N, dtype=np.int64))
    h4 = rr.broadcast_async(np.full(2, R, np.float32), root_rank=0)
    h5 = rr.grouped_allreduce_async([np.ones(2, np.float32)], op=rr.Sum)
    h6 = rr.grouped_allgather_async([np.full((1, 2), R, np.int32), np.zeros((0, 2), np.int32)])
    h7 = rr.grouped_reducescatter_async([np.ones((N, 2), np.float32)] * 2, op=rr.Sum)
    assert np.array_equal(h1.wait()[:, 0], np.arange(N))
    assert (h2.wait() == N).all()
    got, splits = h3.wait()
    assert list(got) == [R] * N and list(splits) == [1] * N
    assert (h4.wait() == 0).all() and (h5.wait()[0] == N).all()
    g1, g2 = h6.wait()
    assert np.array_equal(g1[:, 0], np.arange(N)) and g2.shape == (0, 2)
    assert all(p.shape == (1, 2) and (p == N).all() for p in h7.wait())


@multi
def test_allgather_trailing_dims_must_agree():
    x = np.zeros((2, 3 if R == 0 else 4), np.float32)
    expect_everywhere(lambda: rr.allgather(x, name="ag.bad"), "shape", "tensor 'ag.bad'")


@multi
def test_reducescatter_different_splits_is_named():
    splits = [N] + [0] * (N - 1) if R == 0 else [0] * (N - 1) + [N]
    expect_everywhere(lambda: rr.reducescatter(np.ones((N, 2), np.float32), splits=splits, name="rs.bad"),
                      "algorithm", "tensor 'rs.bad'")


def test_bad_input_is_a_clear_error():
    with pytest.raises(rr.RingReduceError, match="splits"):
        rr.reducescatter(np.ones((3, 2), np.float32), splits=[1] * (N + 1))
    with pytest.raises(rr.RingReduceError, match="would truncate"):
        rr.reducescatter(np.ones((N, 2), np.int32), op=rr.Average)
    with pytest.raises(rr.RingReduceError, match="integer"):
        rr.allreduce(np.ones(3, np.int32), op=rr.Sum, prescale_factor=2.0)
    assert everyone(True)


@multi
def test_a_rank_that_skips_barrier_gets_named():
    def calls():
        if R != N - 1:
            rr.barrier()
        rr.allreduce(np.ones(4, np.float32), name="after.barrier")
    expect_everywhere(calls, "collective", "barrier")
