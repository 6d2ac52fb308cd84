"""Mismatch kinds beyond the basic fields: call order, a skipped call, async, compressed,
a call only some ranks reject. Each ends in RingReduceError on every rank, naming ranks."""
from __future__ import annotations

import numpy as np
import pytest
from _common import everyone, expect_everywhere

import ringreduce as rr

rr.init()
N = rr.size()
R = rr.rank()
LAST = N - 1
multi = pytest.mark.skipif(N < 2, reason="needs two or more ranks to disagree")



def _still_works():
    y = rr.allreduce(np.ones(7, np.float32), op=rr.Sum, name="after")
    assert everyone(np.all(y == N))


@multi
def test_call_order():
    def calls():
        order = ["a", "b"] if R == 0 else ["b", "a"]
        for name in order:
            rr.allreduce(np.ones(16, np.float32), name=name)
    expect_everywhere(calls, "name", "rank 0: 'a'", "'b'")
    _still_works()


@multi
def test_rank_skips_a_call():
    def calls():
        for name in ("step.1", "step.2"):
            if R == LAST and name == "step.1":
                continue
            rr.allreduce(np.ones(16, np.float32), name=name)
    expect_everywhere(calls, "name", f"rank {LAST}: 'step.2'")
    _still_works()


@multi
@pytest.mark.parametrize("count", [5, 300000])
def test_async_count_mismatch(count):
    x = np.ones(count + (R == LAST), np.float32)
    expect_everywhere(lambda: rr.allreduce_async(x, name="g.async").wait(), "count",
                       "tensor 'g.async'", f"rank {LAST}: {count + 1}")
    h = rr.allreduce_async(np.ones(5, np.float32), op=rr.Sum, name="async.after")
    assert everyone(np.all(h.wait() == N))


@multi
def test_async_name_mismatch():
    expect_everywhere(lambda: rr.allreduce_async(np.ones(64, np.float32), name=f"n{R % 2}").wait(), "name")


@multi
def test_compression_mismatch():
    comp = rr.Compression.int8 if R == 0 else rr.Compression.fp16
    expect_everywhere(lambda: rr.allreduce(np.ones(4096, np.float32), compression=comp, name="c"),
                       "compression", "tensor 'c'")
    _still_works()


@multi
def test_compressed_count_mismatch():
    x = np.ones(4096 + (R == LAST), np.float32)
    expect_everywhere(lambda: rr.allreduce(x, compression=rr.Compression.int8, name="cc"),
                       "count", f"rank {LAST}: 4097")


@multi
def test_compressed_vs_uncompressed_async():
    comp = rr.Compression.fp16 if R == LAST else None
    expect_everywhere(lambda: rr.allreduce_async(np.ones(1000, np.float32), compression=comp,
                                                  name="ca").wait(), "compression")


@multi
def test_input_rejected_on_one_rank():
    """A rank that rejects its own input still reaches the others: nobody waits for it."""
    x = np.ones(8, np.complex64) if R == LAST else np.ones(8, np.float32)
    msg = expect_everywhere(lambda: rr.allreduce(x, name="bad.one"), "tensor 'bad.one'")
    if R == LAST:
        assert "complex64" in msg
    else:
        assert f"rank {LAST} rejected" in msg and "complex64" in msg, msg
    _still_works()


@multi
def test_unknown_algorithm_on_one_rank_async():
    algo = "butterfly" if R == 0 else "ring"
    msg = expect_everywhere(lambda: rr.allreduce_async(np.ones(8, np.float32), algorithm=algo,
                                                        name="algo.one").wait(), "butterfly")
    if R != 0:
        assert "rank 0 rejected" in msg, msg


@multi
def test_broadcast_rejected_on_one_rank():
    root = N if R == LAST else 0
    expect_everywhere(lambda: rr.broadcast_(np.ones(4), root_rank=root, name="b.one"), "out of range")
    _still_works()


def test_all_ranks_reject_alike():
    """Every rank rejecting the same call raises its own error (one error exchange, no hang)."""
    expect_everywhere(lambda: rr.allreduce(np.ones(3, np.complex64), name="all.bad"), "complex64")
    _still_works()
