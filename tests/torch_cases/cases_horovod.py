"""Horovod's torch API (ringreduce.torch) under a real mpirun: every rank runs these.

Launched by tests/test_horovod.py at np = 1 to 5. Loops over the matrix as
mpi4py's tests do: collective x dtype x shape (empty, uneven first dimension,
non-contiguous) x process set (global, and this rank's half of an even/odd
split). Expected values are computed on every rank from what every rank would
send (the data is a function of the sender's rank), gradients from Horovod's
definitions (horovod/torch/mpi_ops.py) by hand.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import ringreduce as rr
import ringreduce.torch as hvd

hvd.init()
R, N = hvd.rank(), hvd.size()
torch.set_num_threads(1)

EVEN = hvd.add_process_set([r for r in range(N) if r % 2 == 0])
ODD = hvd.add_process_set([r for r in range(N) if r % 2 == 1]) if N > 1 else None
MINE = EVEN if R % 2 == 0 else ODD
SETS = {"global": None, "parity": MINE}

FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
DTYPES = FLOATS + [torch.int32, torch.int64]
# data movement only (gather, broadcast, alltoall); int16 and bool travel as bytes
MOVE_DTYPES = DTYPES + [torch.uint8, torch.int8, torch.int16, torch.bool]
SHAPES = {"empty": (0,), "vector": (5,), "matrix": (3, 4), "cube": (2, 3, 2),
          "noncontig": "noncontig"}


def members(ps):
    """Global ranks of the set, in set-rank order."""
    return list(range(N)) if ps is None else list(ps.ranks)


def set_rank(ps):
    return R if ps is None else ps.rank()


def data(rank, shape, dtype, salt=0):
    """What ``rank`` contributes: small integers (exact in every dtype), a function of rank."""
    if shape == "noncontig":
        return data(rank, (4, 3), dtype, salt).t()   # 3x4, not contiguous
    n = int(np.prod(shape))
    base = (torch.arange(n, dtype=torch.float64) * (salt + 3) + rank * 5 + salt) % 11 - 3
    return base.reshape(shape).to(dtype)


def ref(t):
    return t.to(torch.float64).numpy() if t.dtype not in (torch.uint8, torch.int8) \
        else t.to(torch.int64).numpy()


# Relative tolerance per dtype for results that are not exact (averages); integers exact.
RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def assert_equal(got, expected, what):
    assert got.shape == tuple(expected.shape), f"rank {R}: {what}: shape {got.shape} != {expected.shape}"
    g = ref(got)
    rtol = RTOL.get(got.dtype, 0)
    ok = np.allclose(g, expected, rtol=rtol, atol=rtol) if rtol else np.array_equal(g, expected)
    assert ok, f"rank {R}: {what}: {g} != {expected}"


def reduce_np(arrays, op, integer=False):
    stack = np.stack(arrays)
    if op == hvd.Sum:
        return stack.sum(0)
    if op == hvd.Average:
        # Horovod averages integers as sum * (1 / size) in float64, truncated
        return np.trunc(stack.sum(0) * (1.0 / len(arrays))) if integer else stack.mean(0)
    if op == hvd.Min:
        return stack.min(0)
    if op == hvd.Max:
        return stack.max(0)
    return stack.prod(0)


def ids(v):
    return str(v).replace("torch.", "")


# ------------------------------------------------------------------ allreduce
@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_allreduce_ops(dtype, shape, set_name):
    ps = SETS[set_name]
    for op in [hvd.Sum, hvd.Average, hvd.Min, hvd.Max]:
        mine = data(R, SHAPES[shape], dtype)
        expected = reduce_np([ref(data(r, SHAPES[shape], dtype)) for r in members(ps)], op,
                             integer=not dtype.is_floating_point)
        got = hvd.allreduce(mine, op=op, process_set=ps, name=f"ar.{op!r}")
        assert got.dtype == dtype
        assert_equal(got, expected, f"allreduce {op!r}")
        assert_equal(mine, ref(data(R, SHAPES[shape], dtype)), "allreduce input untouched")
        # in place, async, async in place: same answer
        t = data(R, SHAPES[shape], dtype).clone()
        assert hvd.allreduce_(t, op=op, process_set=ps) is t
        assert_equal(t, expected, f"allreduce_ {op!r}")
        h = hvd.allreduce_async(mine, op=op, process_set=ps)
        assert_equal(hvd.synchronize(h), expected, f"allreduce_async {op!r}")
        t = data(R, SHAPES[shape], dtype)
        h = hvd.allreduce_async_(t, op=op, process_set=ps)
        assert hvd.synchronize(h) is t
        assert_equal(t, expected, f"allreduce_async_ {op!r}")


def test_allreduce_defaults_and_average_keyword():
    x = data(R, (4,), torch.float32)
    mean = reduce_np([ref(data(r, (4,), torch.float32)) for r in range(N)], hvd.Average)
    assert_equal(hvd.allreduce(x), mean, "default op is Average")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        summed = hvd.allreduce(x, average=False)
        assert_equal(summed, mean * N, "average=False sums")
        assert_equal(hvd.allreduce(x, average=True), mean, "average=True averages")
    with pytest.raises(ValueError, match="supersedes"):
        hvd.allreduce(x, average=True, op=hvd.Sum)
    got = hvd.allreduce(x, op=hvd.Sum, prescale_factor=2.0, postscale_factor=0.5)
    assert_equal(got, mean * N, "prescale 2 and postscale 1/2 cancel")
    got = hvd.allreduce(x, op=hvd.Sum, postscale_factor=3.0, ignore_name_scope=True)
    assert_equal(got, mean * N * 3, "postscale 3")
    # Integers with factors, as Horovod: scaled in float64 and truncated, before and after.
    xi = data(R, (6,), torch.int32)
    pre = np.trunc(np.stack([ref(data(r, (6,), torch.int32)) for r in range(N)]) * 0.5)
    got = hvd.allreduce(xi, op=hvd.Sum, prescale_factor=0.5, postscale_factor=1.5)
    assert_equal(got, np.trunc(pre.sum(0) * 1.5), "int32 pre/post scale")
    got = hvd.allreduce(xi, op=hvd.Average, prescale_factor=0.5)
    assert_equal(got, np.trunc(pre.sum(0) * (1.0 / N)), "int32 average with prescale")


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_grouped_allreduce(dtype, set_name):
    ps = SETS[set_name]
    shapes = [(3,), (0,), (2, 2), "noncontig"]
    mine = [data(R, s, dtype, salt=i) for i, s in enumerate(shapes)]
    expected = [reduce_np([ref(data(r, s, dtype, salt=i)) for r in members(ps)], hvd.Sum)
                for i, s in enumerate(shapes)]
    for got, e in zip(hvd.grouped_allreduce(mine, op=hvd.Sum, process_set=ps), expected):
        assert_equal(got, e, "grouped_allreduce")
    h = hvd.grouped_allreduce_async(mine, op=hvd.Sum, process_set=ps)
    for got, e in zip(hvd.synchronize(h), expected):
        assert_equal(got, e, "grouped_allreduce_async")
    means = [reduce_np([ref(data(r, s, dtype, salt=i)) for r in members(ps)], hvd.Average,
                       integer=not dtype.is_floating_point) for i, s in enumerate(shapes)]
    for got, e in zip(hvd.grouped_allreduce(mine, process_set=ps), means):
        assert_equal(got, e, "grouped_allreduce average")
    ts = [m.clone() for m in mine]
    hvd.grouped_allreduce_(ts, op=hvd.Sum, process_set=ps)
    for got, e in zip(ts, expected):
        assert_equal(got, e, "grouped_allreduce_")
    ts = [m.clone() for m in mine]
    hvd.synchronize(hvd.grouped_allreduce_async_(ts, op=hvd.Sum, process_set=ps))
    for got, e in zip(ts, expected):
        assert_equal(got, e, "grouped_allreduce_async_")


# ------------------------------------------------------------------ allgather
def uneven(rank, shape):
    """An uneven first dimension: rank r sends (base + r) rows (rank 0 none for 'empty')."""
    if shape == "noncontig":
        return "noncontig_rows"
    if shape == (0,):
        return (rank % 2,)          # some ranks send nothing
    return (shape[0] + rank,) + tuple(shape[1:])


def gdata(rank, shape, dtype, salt=0):
    s = uneven(rank, shape)
    if s == "noncontig_rows":
        return data(rank, (3, 2 + rank), dtype, salt).t()   # (2 + rank) x 3, non-contiguous
    return data(rank, s, dtype, salt)


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", MOVE_DTYPES, ids=ids)
def test_allgather(dtype, shape, set_name):
    ps = SETS[set_name]
    mine = gdata(R, SHAPES[shape], dtype)
    expected = np.concatenate([ref(gdata(r, SHAPES[shape], dtype)) for r in members(ps)])
    assert_equal(hvd.allgather(mine, process_set=ps), expected, "allgather")
    h = hvd.allgather_async(mine, process_set=ps)
    assert_equal(hvd.synchronize(h), expected, "allgather_async")
    other = gdata(R, (2,), dtype, salt=1)
    got = hvd.grouped_allgather([mine, other], process_set=ps)
    assert_equal(got[0], expected, "grouped_allgather[0]")
    assert_equal(got[1], np.concatenate([ref(gdata(r, (2,), dtype, salt=1)) for r in members(ps)]),
                 "grouped_allgather[1]")


# ------------------------------------------------------------------ broadcast
@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", MOVE_DTYPES, ids=ids)
def test_broadcast(dtype, shape, set_name):
    ps = SETS[set_name]
    for root in range(len(members(ps))):
        expected = ref(data(members(ps)[root], SHAPES[shape], dtype))
        mine = data(R, SHAPES[shape], dtype)
        assert_equal(hvd.broadcast(mine, root, process_set=ps), expected, "broadcast")
        assert_equal(mine, ref(data(R, SHAPES[shape], dtype)), "broadcast input untouched")
        t = data(R, SHAPES[shape], dtype).clone()
        assert hvd.broadcast_(t, root, process_set=ps) is t
        assert_equal(t, expected, "broadcast_")
        assert_equal(hvd.synchronize(hvd.broadcast_async(mine, root, process_set=ps)), expected,
                     "broadcast_async")
        t = data(R, SHAPES[shape], dtype)       # non-contiguous stays so: copied back into it
        assert hvd.synchronize(hvd.broadcast_async_(t, root, process_set=ps)) is t
        assert_equal(t, expected, "broadcast_async_")


# ------------------------------------------------------------------- alltoall
def a2a_splits(rank, n):
    """Rank ``rank`` sends (rank + dest) % 3 rows to each dest (zeros included)."""
    return [(rank + d) % 3 for d in range(n)]


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("trailing", [(), (2,), "noncontig"], ids=["1d", "2d", "noncontig"])
@pytest.mark.parametrize("dtype", MOVE_DTYPES, ids=ids)
def test_alltoall(dtype, trailing, set_name):
    ps = SETS[set_name]
    ranks, n, me = members(ps), len(members(ps)), set_rank(ps)

    def rows(sender_set_rank, k):
        g = ranks[sender_set_rank]
        if trailing == "noncontig":
            return data(g, (3, k), dtype).t()
        return data(g, (k,) + tuple(trailing), dtype)

    def chunk(sender, dest):
        sp = a2a_splits(sender, n)
        full = ref(rows(sender, sum(sp)))
        off = sum(sp[:dest])
        return full[off:off + sp[dest]]

    splits = a2a_splits(me, n)
    mine = rows(me, sum(splits))
    expected = np.concatenate([chunk(s, me) for s in range(n)])
    out, received = hvd.alltoall(mine, splits=torch.tensor(splits, dtype=torch.int32),
                                 process_set=ps)
    assert_equal(out, expected, "alltoall")
    assert received.dtype == torch.int32
    assert received.tolist() == [a2a_splits(s, n)[me] for s in range(n)]
    out2, _ = hvd.synchronize(hvd.alltoall_async(mine, splits=splits, process_set=ps))
    assert_equal(out2, expected, "alltoall_async")
    # no splits: rows divided evenly, and only the tensor comes back (Horovod)
    even = rows(me, 2 * n)
    got = hvd.alltoall(even, process_set=ps)
    assert isinstance(got, torch.Tensor)
    exp = np.concatenate([ref(rows(s, 2 * n))[2 * me:2 * me + 2] for s in range(n)])
    assert_equal(got, exp, "alltoall even")


# -------------------------------------------------------------- reducescatter
@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("rows", ["even", "uneven", "fewer"])
@pytest.mark.parametrize("dtype", DTYPES, ids=ids)
def test_reducescatter(dtype, rows, set_name):
    ps = SETS[set_name]
    n, me = len(members(ps)), set_rank(ps)
    first = {"even": 2 * n, "uneven": 2 * n + 1, "fewer": max(n - 1, 0)}[rows]
    pieces = np.array_split(np.arange(first), n)
    lo, hi = (pieces[me][0], pieces[me][-1] + 1) if len(pieces[me]) else (0, 0)
    for op in [hvd.Sum, hvd.Average]:
        full = reduce_np([ref(data(r, (first, 3), dtype)) for r in members(ps)], op,
                         integer=not dtype.is_floating_point)
        got = hvd.reducescatter(data(R, (first, 3), dtype), op=op, process_set=ps)
        assert_equal(got, full[lo:hi], f"reducescatter {op!r}")
        h = hvd.reducescatter_async(data(R, (first, 3), dtype), op=op, process_set=ps)
        assert_equal(hvd.synchronize(h), full[lo:hi], f"reducescatter_async {op!r}")
        got = hvd.grouped_reducescatter([data(R, (first, 3), dtype), data(R, (first,), dtype)],
                                        op=op, process_set=ps)
        assert_equal(got[0], full[lo:hi], "grouped_reducescatter")
    if dtype.is_floating_point:
        # non-contiguous input
        x = data(R, (3, first), dtype).t()
        full = reduce_np([ref(data(r, (3, first), dtype).t()) for r in members(ps)], hvd.Sum)
        assert_equal(hvd.reducescatter(x, op=hvd.Sum, process_set=ps), full[lo:hi],
                     "reducescatter non-contiguous")


# ------------------------------------------------------------------ autograd
def upstream(rank, shape, salt=7):
    """A rank-dependent upstream gradient, so sums and averages differ."""
    return data(rank, shape, torch.float64, salt) + 0.25 * rank


GRAD_DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=ids)
def test_allreduce_grad(dtype, set_name):
    ps = SETS[set_name]
    for op, pre, post in [(hvd.Sum, 1.0, 1.0), (hvd.Average, 1.0, 1.0), (hvd.Sum, 2.0, 0.25)]:
        x = data(R, (3, 2), dtype).requires_grad_()
        y = hvd.allreduce(x, op=op, prescale_factor=pre, postscale_factor=post, process_set=ps)
        y.backward(upstream(R, (3, 2)).to(dtype))
        # Horovod: the gradient is the same allreduce of the upstream gradients.
        expected = reduce_np([ref(upstream(r, (3, 2)).to(dtype)) for r in members(ps)], op)
        expected = expected * pre * post
        np.testing.assert_allclose(ref(x.grad), expected, rtol=1e-6)


@pytest.mark.parametrize("set_name", list(SETS))
def test_grouped_allreduce_grad(set_name):
    ps = SETS[set_name]
    xs = [data(R, (3,), torch.float64, salt=i).requires_grad_() for i in range(3)]
    ys = hvd.grouped_allreduce(xs, op=hvd.Sum, process_set=ps)
    torch.autograd.backward(ys, [upstream(R, (3,), salt=i) for i in range(3)])
    for i, x in enumerate(xs):
        expected = reduce_np([ref(upstream(r, (3,), salt=i)) for r in members(ps)], hvd.Sum)
        np.testing.assert_allclose(ref(x.grad), expected)


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=ids)
def test_allgather_grad(dtype, set_name):
    ps = SETS[set_name]
    ranks = members(ps)
    rows = [1 + (r % 3) for r in ranks]          # uneven first dimensions
    me = set_rank(ps)
    x = data(R, (rows[me], 2), dtype).requires_grad_()
    y = hvd.allgather(x, process_set=ps)
    assert y.shape == (sum(rows), 2)
    y.backward(upstream(R, (sum(rows), 2)).to(dtype))
    # Horovod: average the upstream gradients, keep this rank's rows.
    avg = reduce_np([ref(upstream(r, (sum(rows), 2)).to(dtype)) for r in ranks], hvd.Average)
    off = sum(rows[:me])
    np.testing.assert_allclose(ref(x.grad), avg[off:off + rows[me]], rtol=1e-6)
    # grouped form: the same rule per tensor
    xs = [data(R, (rows[me],), dtype).requires_grad_(), data(R, (1, 3), dtype).requires_grad_()]
    ys = hvd.grouped_allgather(xs, process_set=ps)
    torch.autograd.backward(ys, [upstream(R, tuple(y_.shape)).to(dtype) for y_ in ys])
    avg0 = reduce_np([ref(upstream(r, (sum(rows),)).to(dtype)) for r in ranks], hvd.Average)
    np.testing.assert_allclose(ref(xs[0].grad), avg0[off:off + rows[me]], rtol=1e-6)
    avg1 = reduce_np([ref(upstream(r, (len(ranks), 3)).to(dtype)) for r in ranks], hvd.Average)
    np.testing.assert_allclose(ref(xs[1].grad), avg1[me:me + 1], rtol=1e-6)


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=ids)
def test_broadcast_grad(dtype, set_name):
    ps = SETS[set_name]
    ranks = members(ps)
    for root in range(len(ranks)):
        x = data(R, (4,), dtype).requires_grad_()
        y = hvd.broadcast(x, root, process_set=ps)
        y.backward(upstream(R, (4,)).to(dtype))
        # Horovod: the averaged upstream gradient on the root, zero elsewhere.
        avg = reduce_np([ref(upstream(r, (4,)).to(dtype)) for r in ranks], hvd.Average)
        expected = avg if set_rank(ps) == root else np.zeros_like(avg)
        np.testing.assert_allclose(ref(x.grad), expected, rtol=1e-6)


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=ids)
def test_alltoall_grad(dtype, set_name):
    ps = SETS[set_name]
    n, me = len(members(ps)), set_rank(ps)
    splits = a2a_splits(me, n)
    x = data(R, (sum(splits), 2), dtype).requires_grad_()
    y, received = hvd.alltoall(x, splits=torch.tensor(splits, dtype=torch.int32), process_set=ps)
    assert not received.requires_grad
    # Upstream gradient row values name (sender set rank, row within its chunk): the
    # gradient that comes back must put each row where it came from.
    recv = received.tolist()
    g = torch.cat([torch.full((k, 2), 100.0 * s + me, dtype=dtype) for s, k in enumerate(recv)])
    g = g + torch.arange(g.shape[0], dtype=dtype).unsqueeze(1) * 0   # same shape as y
    y.backward(g)
    # My chunk for dest d came back from d with d's value 100 * me + d.
    expected = np.concatenate([np.full((k, 2), 100.0 * me + d) for d, k in enumerate(splits)])
    np.testing.assert_allclose(ref(x.grad), expected)
    # even split (no splits): the output alone, and its gradient
    x = data(R, (2 * n,), dtype).requires_grad_()
    y = hvd.alltoall(x, process_set=ps)
    y.backward(torch.arange(2 * n, dtype=dtype) + 10 * me)
    expected = np.concatenate([np.arange(2 * me, 2 * me + 2) + 10.0 * d for d in range(n)])
    np.testing.assert_allclose(ref(x.grad), expected)


@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", GRAD_DTYPES, ids=ids)
def test_reducescatter_grad(dtype, set_name):
    ps = SETS[set_name]
    ranks, n, me = members(ps), len(members(ps)), set_rank(ps)
    first = 2 * n + 1
    pieces = np.array_split(np.arange(first), n)
    for op in [hvd.Sum, hvd.Average]:
        x = data(R, (first, 2), dtype).requires_grad_()
        y = hvd.reducescatter(x, op=op, process_set=ps)
        y.backward(upstream(R, (len(pieces[me]), 2)).to(dtype))
        # Horovod: allgather of the upstream gradients, times the set size for Sum.
        gathered = np.concatenate([ref(upstream(ranks[s], (len(pieces[s]), 2)).to(dtype))
                                   for s in range(n)])
        expected = gathered * (n if op == hvd.Sum else 1)
        np.testing.assert_allclose(ref(x.grad), expected, rtol=1e-6)
    xs = [data(R, (first,), dtype).requires_grad_() for _ in range(2)]
    ys = hvd.grouped_reducescatter(xs, op=hvd.Average, process_set=ps)
    torch.autograd.backward(ys, [torch.ones_like(y_) for y_ in ys])
    for x in xs:
        np.testing.assert_allclose(ref(x.grad), np.ones(first))


def test_gradcheck_allreduce():
    """torch.autograd.gradcheck (float64), every rank in lockstep: with identical inputs
    the allreduce-Average gradient is the true one of the replicated function.
    (Not for allgather: there Horovod's rule averages, the lockstep function sums.)"""
    x = torch.linspace(-1, 1, 6, dtype=torch.float64).reshape(3, 2).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: hvd.allreduce(t * t, op=hvd.Average), (x,))
    assert torch.autograd.gradcheck(
        lambda t: hvd.grouped_allreduce([t.sin(), t * 2], op=hvd.Average)[0], (x,))


# -------------------------------------------------------- handles, sparse, barrier
def test_poll_synchronize_and_duplicate_names():
    hs = [hvd.allreduce_async(torch.ones([17] * 3) * R, op=hvd.Sum) for _ in range(15)]
    polled = [hvd.poll(h) for h in hs]
    assert all(isinstance(p, bool) for p in polled)
    if N > 1:   # Horovod's check that the async forms really are asynchronous
        assert not all(polled), "poll() always returned True: not an async op?"
    for h in hs:
        out = hvd.synchronize(h)
        assert float(out[0, 0, 0]) == sum(range(N))
    with pytest.raises(ValueError, match="unknown handle"):
        hvd.poll(hs[0])
    assert hvd.synchronize(123456789) is None
    h = hvd.allreduce_async(torch.ones(2), name="dup")
    with pytest.raises(ValueError, match="dup"):
        hvd.allreduce_async(torch.ones(2), name="dup")
    hvd.synchronize(h)
    hvd.synchronize(hvd.allreduce_async(torch.ones(2), name="dup"))   # free again


def test_sparse_allreduce_async():
    i = torch.tensor([[R % 4], [0]])
    v = torch.tensor([float(R + 1)])
    t = torch.sparse_coo_tensor(i, v, (4, 2))
    h = hvd.sparse_allreduce_async(t, name="sp", op=hvd.Sum)
    got = hvd.synchronize(h).to_dense()
    expected = torch.zeros(4, 2)
    for r in range(N):
        expected[r % 4, 0] += r + 1
    assert torch.equal(got, expected)


def test_join_serves_every_collective():
    """A joined rank serves the others' allreduce (zeros; Average still divides by every
    rank, as Horovod's), allgather (no rows) and broadcast (receiving)."""
    if N == 1:
        pytest.skip("needs two ranks")
    if R == 0:
        assert hvd.join() == N - 1
    else:
        s = hvd.synchronize(hvd.allreduce_async(torch.ones(5) * R, name="tensor_a", op=hvd.Sum))
        assert torch.equal(s, torch.full((5,), float(sum(range(1, N)))))
        avg = hvd.allreduce(torch.ones(3) * R, name="tensor_b")
        assert torch.allclose(avg, torch.full((3,), sum(range(1, N)) / N))
        g = hvd.allgather(torch.full((1, 2), float(R)))
        assert torch.equal(g, torch.tensor([[float(r)] * 2 for r in range(1, N)]))
        b = hvd.broadcast(torch.full((2,), float(R)), root_rank=N - 1)
        assert torch.equal(b, torch.full((2,), float(N - 1)))
        assert hvd.join() == N - 1
    assert float(hvd.allreduce(torch.ones(1), op=hvd.Sum)) == N


def test_broadcast_from_a_joined_root_is_a_named_error():
    """The working ranks raise at once; the joined rank's join() raises it once all joined."""
    if N == 1:
        pytest.skip("needs two ranks")
    if R == 0:
        with pytest.raises(hvd.HorovodInternalError, match="root rank 0"):
            hvd.join()
    else:
        with pytest.raises(hvd.HorovodInternalError, match="root rank 0"):
            hvd.broadcast(torch.ones(2), root_rank=0)
        hvd.join()
    assert float(hvd.allreduce(torch.ones(1), op=hvd.Sum)) == N


def test_barrier_and_join():
    hvd.barrier()
    hvd.barrier(process_set=MINE)
    assert hvd.join() == N - 1 or N == 1


# ------------------------------------------------------------- introspection
def test_introspection():
    assert hvd.is_initialized()
    assert (hvd.size(), hvd.rank()) == (rr.size(), rr.rank())
    assert 0 <= hvd.local_rank() < hvd.local_size()
    assert 0 <= hvd.cross_rank() < hvd.cross_size()
    assert hvd.cross_size() * hvd.local_size() == N or not hvd.is_homogeneous()
    assert isinstance(hvd.is_homogeneous(), bool)
    assert isinstance(hvd.mpi_threads_supported(), bool)
    assert hvd.mpi_enabled() and hvd.mpi_built()
    assert not any([hvd.gloo_enabled(), hvd.gloo_built(), hvd.nccl_built(), hvd.ddl_built(),
                    hvd.ccl_built(), hvd.rocm_built()])
    assert isinstance(hvd.cuda_built(), bool)
    assert hvd.HorovodInternalError is rr.RingReduceError
    hvd.start_timeline("/tmp/unused.json")
    hvd.stop_timeline()
    hvd.init()   # idempotent; handles and process sets survive
    assert hvd.global_process_set.size() == N


def test_refused_features_are_clear():
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.allreduce(torch.ones(2), op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="Adasum"):
        hvd.DistributedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1),
                                 op=hvd.Adasum)
    with pytest.raises(NotImplementedError, match="elastic"):
        hvd.elastic.run(lambda state: None)
    with pytest.raises(NotImplementedError, match="elastic"):
        hvd.elastic.TorchState(model=None)
    with pytest.raises(NotImplementedError, match="elastic"):
        hvd.elastic.ElasticSampler([1, 2])


# --------------------------------------------------------------------- errors
def test_mismatches_are_named_errors():
    if N == 1:
        pytest.skip("needs two ranks")
    with pytest.raises(hvd.HorovodInternalError):
        hvd.allreduce(torch.ones(3 + R))                       # shapes differ
    with pytest.raises(hvd.HorovodInternalError):
        hvd.allgather(torch.ones(2, 2 + R))                    # trailing dims differ
    with pytest.raises(hvd.HorovodInternalError):
        hvd.alltoall(torch.ones(N, 1 + R))                     # trailing dims differ
    with pytest.raises(hvd.HorovodInternalError):
        hvd.alltoall(torch.ones(N), splits=[2] * N)            # splits do not add up to the rows
    with pytest.raises(hvd.HorovodInternalError):
        hvd.reducescatter(torch.ones(2 * N + R))               # first dimensions differ
    with pytest.raises(hvd.HorovodInternalError):
        hvd.broadcast(torch.ones(2, dtype=torch.float32 if R else torch.float64), 0)
    with pytest.raises(hvd.HorovodInternalError, match="root"):
        hvd.broadcast(torch.ones(3), R)                        # roots differ
    with pytest.raises(hvd.HorovodInternalError, match="dtype"):
        hvd.allgather(torch.ones(2, dtype=torch.float32 if R else torch.int32))
    with pytest.raises(hvd.HorovodInternalError, match="op"):
        hvd.reducescatter(torch.ones(2 * N), op=hvd.Sum if R else hvd.Average)
    with pytest.raises(hvd.HorovodInternalError):
        hvd.alltoall(torch.ones(N), splits=[1] * (N + R))      # splits of the wrong length
    with pytest.raises(hvd.HorovodInternalError):
        hvd.grouped_allreduce([torch.ones(2)] * (1 + R))       # group sizes differ
    # A rank that skips a call: its next collective meets the others' and is named.
    with pytest.raises(hvd.HorovodInternalError):
        if R == 0:
            hvd.allgather(torch.ones(1))
        hvd.allreduce(torch.ones(5))
    hvd.barrier()   # still in step afterwards
    assert float(hvd.allreduce(torch.ones(1), op=hvd.Sum)) == N


# --------------------------------------------------------- compression, optimizer
class _ScaledInt32(hvd.Compressor):
    """A user-written compressor: fixed point in int32."""

    calls = 0

    @staticmethod
    def compress(tensor):
        _ScaledInt32.calls += 1
        return (tensor * 1024).round().to(torch.int32), tensor.dtype

    @staticmethod
    def decompress(tensor, ctx):
        return tensor.to(ctx) / 1024


def test_compressors_in_allreduce():
    x = data(R, (5,), torch.float32) / 4
    exact = reduce_np([ref(data(r, (5,), torch.float32) / 4) for r in range(N)], hvd.Sum)
    got = hvd.allreduce(x, op=hvd.Sum, compression=hvd.Compression.fp16)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(ref(got), exact, atol=1e-2)
    got = hvd.allreduce(x, op=hvd.Sum, compression=_ScaledInt32())
    np.testing.assert_allclose(ref(got), exact, atol=1e-2)
    got = hvd.allreduce(x, op=hvd.Sum, compression=hvd.Compression.none)
    np.testing.assert_allclose(ref(got), exact, rtol=1e-6)
    got = hvd.allreduce(x, compression=_ScaledInt32)      # integer average: summed, then divided
    np.testing.assert_allclose(ref(got), exact / N, atol=1e-2)


def _train(compression, steps=3, process_set=None, **kw):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compression=compression, process_set=process_set, **kw)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    g = torch.Generator().manual_seed(R)
    for _ in range(steps):
        x, y = torch.randn(6, 4, generator=g), torch.randn(6, 2, generator=g)
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_distributed_optimizer_compressors_and_process_set():
    plain = _train(None)
    _ScaledInt32.calls = 0
    user = _train(_ScaledInt32)                      # a class with static methods, as Horovod's
    assert _ScaledInt32.calls > 0
    assert (user - plain).abs().max() < 1e-2
    half = _train(hvd.Compression.fp16)
    assert (half - plain).abs().max() < 1e-2
    same = _train(hvd.Compression.none, groups=2)
    assert torch.equal(same, plain)
    crcs = hvd.allgather_object(plain.numpy().tobytes())
    assert len(set(crcs)) == 1
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    # Horovod's positional order (compression, backward_passes_per_step, op) works too.
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   model.named_parameters(), hvd.Compression.none, 2, hvd.Sum)
    assert opt._rr.passes_per_step == 2 and opt._rr.op == hvd.Sum
    hvd.broadcast_optimizer_state(opt, 0, model)        # Horovod's model= positional
    mine = _train(None, process_set=MINE)
    crcs = hvd.allgather_object(mine.numpy().tobytes(), process_set=MINE)
    assert len(set(crcs)) == 1


def test_synchronize_then_step_warns_as_horovod():
    model = torch.nn.Linear(1, 1)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                   named_parameters=model.named_parameters())
    for skip in (False, True):
        opt.zero_grad()
        model(torch.ones(1, 1)).sum().backward()
        opt.synchronize()
        with warnings.catch_warnings(record=True) as ws:
            warnings.simplefilter("always")
            if skip:
                with opt.skip_synchronize():
                    opt.step()
            else:
                opt.step()
        msgs = [str(w.message) for w in ws if "skip_synchronize" in str(w.message)]
        assert len(msgs) == (0 if skip else 1), msgs
    opt.zero_grad()
    model(torch.ones(1, 1)).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()          # no synchronize() of the user's: no warning


def test_distributed_optimizer_named_parameters_errors():
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="must be unique"):
        hvd.DistributedOptimizer(opt, named_parameters=[("a", model.weight), ("a", model.bias)])
    with pytest.raises(ValueError, match="were not named"):
        hvd.DistributedOptimizer(opt, named_parameters=[("w", model.weight)])
    with pytest.raises(ValueError, match="sequence of tuples"):
        hvd.DistributedOptimizer(opt, named_parameters=[model.weight, model.bias])
    with pytest.raises(ValueError, match="mutually exclusive"):
        hvd.DistributedOptimizer(opt, groups=[[model.weight]], num_groups=2)
    with pytest.raises(ValueError, match="only appear once"):
        hvd.DistributedOptimizer(opt, groups=[[model.weight], [model.weight]])
    with pytest.raises(ValueError, match="torch.Tensor"):
        hvd.DistributedOptimizer(opt, groups=[["w"]])


def test_object_collectives_with_process_set():
    got = hvd.allgather_object(R, process_set=MINE)
    assert got == members(MINE)
    assert hvd.broadcast_object(R * 10, root_rank=0, process_set=MINE) == members(MINE)[0] * 10


def test_every_horovod_name_exists():
    names = """init shutdown is_initialized size rank local_size local_rank cross_size cross_rank
    is_homogeneous mpi_threads_supported mpi_enabled mpi_built gloo_enabled gloo_built nccl_built
    ddl_built ccl_built cuda_built rocm_built start_timeline stop_timeline HorovodInternalError
    Average Sum Min Max Product Adasum ProcessSet add_process_set remove_process_set
    global_process_set allreduce allreduce_ allreduce_async allreduce_async_ grouped_allreduce
    grouped_allreduce_ grouped_allreduce_async grouped_allreduce_async_ allgather allgather_async
    grouped_allgather grouped_allgather_async broadcast broadcast_ broadcast_async broadcast_async_
    alltoall alltoall_async reducescatter reducescatter_async grouped_reducescatter
    grouped_reducescatter_async sparse_allreduce_async poll synchronize barrier join
    broadcast_object allgather_object broadcast_parameters broadcast_optimizer_state
    DistributedOptimizer SyncBatchNorm Compression Compressor elastic""".split()
    missing = [n for n in names if not hasattr(hvd, n)]
    assert not missing, missing
    assert callable(hvd.Compression.fp16.compress) and callable(hvd.Compression.none.decompress)
    assert set(names) <= set(hvd.__all__)


# -------------------------------------------------------------- SyncBatchNorm
@pytest.mark.parametrize("set_name", list(SETS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=ids)
def test_sync_batch_norm_matches_full_batch(dtype, set_name):
    """Forward, input/weight gradients and running stats equal a BatchNorm over the
    concatenation of every member's (uneven) batch."""
    ps = SETS[set_name]
    ranks = members(ps)

    def batch(r):
        return data(r, (2 + r % 3, 3, 4), dtype, salt=r) / 3

    def upstream_of(r):
        return upstream(r, (2 + r % 3, 3, 4)).to(dtype)

    bn = hvd.SyncBatchNorm(3, process_set=ps).to(dtype)
    ref_bn = torch.nn.BatchNorm1d(3).to(dtype)
    with torch.no_grad():
        for m in (bn, ref_bn):
            m.weight.copy_(torch.tensor([1.0, 2.0, -0.5]))
            m.bias.copy_(torch.tensor([0.0, 0.5, 1.0]))
    x = batch(R).requires_grad_()
    out = bn(x)
    (out * upstream_of(R)).sum().backward()
    full = torch.cat([batch(r) for r in ranks]).requires_grad_()
    ref_out = ref_bn(full)
    (ref_out * torch.cat([upstream_of(r) for r in ranks])).sum().backward()
    me = set_rank(ps)
    off = sum(2 + r % 3 for r in ranks[:me])
    rows = slice(off, off + x.shape[0])
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(out, ref_out[rows].detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(x.grad, full.grad[rows], rtol=tol, atol=tol)
    wsum = hvd.allreduce(bn.weight.grad, op=hvd.Sum, process_set=ps)
    torch.testing.assert_close(wsum, ref_bn.weight.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.running_mean, ref_bn.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(bn.running_var, ref_bn.running_var, rtol=tol, atol=tol)
    bn.eval()
    torch.testing.assert_close(bn(x.detach()), ref_bn.eval()(x.detach()), rtol=tol, atol=tol)
