"""join() for every collective, under mpirun: ranks run different numbers of steps, then join.

Rank r runs r + 1 steps, so at step s the ranks still working are s..N-1 and
rank N-1 joins last. Joined ranks contribute the op's identity (nothing, for
the gathers) and ops are unchanged: Average divides by every rank (Horovod's
rule); each result is checked against numpy. Disagreements among the working ranks,
and a broadcast from a joined root, end in named errors on every rank, the
joined ones included. Runs at np = 1..5 (tests/test_mpi.py).
"""
from __future__ import annotations

import numpy as np
import pytest
from _common import expect_everywhere

import ringreduce as rr

rr.init()
N, R = rr.size(), rr.rank()
STEPS = R + 1
multi = pytest.mark.skipif(N < 2, reason="needs two or more ranks")


def _active(step):
    return [r for r in range(N) if r >= step]


def _run(body):
    """body(step) on each of this rank's steps, then join(); returns the last rank to join."""
    results = [body(s) for s in range(STEPS)]
    last = rr.join()
    assert last == N - 1
    return results


@pytest.mark.parametrize("op", [rr.Sum, rr.Average, rr.Min, rr.Max, rr.Product], ids=lambda o: o.name)
@pytest.mark.parametrize("count", [3, 5000], ids=["tiny", "large"])
def test_allreduce(op, count):
    def body(s):
        x = np.full(count, R + 1.0, np.float32)
        return rr.allreduce(x, op=op, name="join.ar")
    for s, got in enumerate(_run(body)):
        vals = np.array([r + 1.0 for r in _active(s)])
        want = {rr.Sum: vals.sum(), rr.Average: vals.sum() / N, rr.Min: vals.min(), rr.Max: vals.max(),
                rr.Product: vals.prod()}[op]
        np.testing.assert_allclose(got, np.full(count, want, np.float32), rtol=1e-6)


def test_allreduce_inplace_scaled_and_async():
    def body(s):
        x = np.full(10, R + 1.0, np.float64)
        rr.allreduce_(x, op=rr.Sum, prescale_factor=2.0, postscale_factor=0.5, name="join.inplace")
        h = rr.allreduce_async(np.full(10, R + 1.0, np.float64), op=rr.Average, name="join.async")
        return x, h.wait()
    for s, (x, avg) in enumerate(_run(body)):
        vals = np.array([r + 1.0 for r in _active(s)])
        np.testing.assert_allclose(x, vals.sum())
        np.testing.assert_allclose(avg, vals.sum() / N)


def test_grouped_allreduce():
    def body(s):
        return rr.grouped_allreduce([np.full(3, R + 1.0, np.float32), np.full(2, R + 1, np.int64)],
                                    op=rr.Sum, name="join.grouped")
    for s, (a, b) in enumerate(_run(body)):
        total = sum(r + 1 for r in _active(s))
        assert np.array_equal(a, np.full(3, total, np.float32))
        assert np.array_equal(b, np.full(2, total, np.int64))


@pytest.mark.parametrize("algorithm", ["auto", "ring", "mpi"])
def test_allgather(algorithm):
    def body(s):
        return rr.allgather(np.full((R + 1, 2), R, np.int32), name="join.ag", algorithm=algorithm)
    for s, got in enumerate(_run(body)):
        want = np.concatenate([np.full((r + 1, 2), r, np.int32) for r in _active(s)])
        assert np.array_equal(got, want)


@pytest.mark.parametrize("op", [rr.Sum, rr.Average, rr.Max], ids=lambda o: o.name)
def test_reducescatter(op):
    def body(s):
        return rr.reducescatter(np.full((2 * N + 1, 2), R + 1.0, np.float64), op=op, name="join.rs")
    rows = [(2 * N + 1) // N + (i < (2 * N + 1) % N) for i in range(N)]
    for s, got in enumerate(_run(body)):
        vals = np.array([r + 1.0 for r in _active(s)])
        want = {rr.Sum: vals.sum(), rr.Average: vals.sum() / N, rr.Max: vals.max()}[op]
        np.testing.assert_allclose(got, np.full((rows[R], 2), want))


def test_alltoall():
    def body(s):
        x = np.array([[R * 10 + j] for j in range(N)], np.int64)      # one row for each rank
        return rr.alltoall(x, name="join.a2a")
    for s, (got, splits) in enumerate(_run(body)):
        senders = _active(s)
        assert list(splits) == [1 if r in senders else 0 for r in range(N)]
        assert np.array_equal(got.reshape(-1), np.array([r * 10 + R for r in senders]))


def test_broadcast_barrier_and_objects():
    def body(s):
        rr.barrier()
        y = rr.broadcast(np.full(4, float(R)), root_rank=N - 1)
        obj = rr.broadcast_object({"from": R}, root_rank=N - 1)
        objs = rr.allgather_object(R)
        return y, obj, objs
    for s, (y, obj, objs) in enumerate(_run(body)):
        assert np.array_equal(y, np.full(4, float(N - 1)))
        assert obj == {"from": N - 1}
        assert objs == [r if r in _active(s) else None for r in range(N)]


def test_training_goes_on_after_join():
    _run(lambda s: rr.allreduce(np.ones(4), op=rr.Sum))
    assert np.array_equal(rr.allreduce(np.ones(4), op=rr.Sum), np.full(4, float(N)))
    assert rr.join() == N - 1         # everyone joins at once: the highest rank


@multi
def test_working_ranks_that_disagree_fail_everywhere():
    """Rank 0 has joined; the others call allreduces of different lengths. They raise at
    once; rank 0 keeps serving and its join() raises the same error once all have joined."""
    if N == 2:
        pytest.skip("one working rank cannot disagree with itself")

    def call():
        if R == 0:
            rr.join()
        else:
            try:
                rr.allreduce(np.ones(R + 1, np.float32), name="join.bad")
            finally:
                rr.join()
    expect_everywhere(call, "disagree", "join.bad")


@multi
def test_broadcast_from_a_joined_root_fails_everywhere():
    def call():
        if R == 0:
            rr.join()
        else:
            try:
                rr.broadcast(np.ones(3), root_rank=0)
            finally:
                rr.join()
    expect_everywhere(call, "root rank 0", "join")
    assert np.array_equal(rr.allreduce(np.ones(2), op=rr.Sum), np.full(2, float(N)))
