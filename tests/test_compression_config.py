"""Compression configuration objects, resolve(), the state object and stats (one process)."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest

import ringreduce as rr
from ringreduce.compression import Compressor, resolve
from ringreduce.compression.algorithm import chunk_layout
from ringreduce.compression.state import CompressionState

ALL = ["none", "fp16", "bf16", "int8", "int4", "onebit"]


def test_defaults_and_repr_are_stable():
    assert repr(rr.Compression.int8) == ("Compression.int8(block_size=256, error_feedback=True, "
                                         "clip=None, stochastic=False, seed=0)")
    assert repr(rr.Compression.fp16) == "Compression.fp16(error_feedback=False, clip=None)"
    assert repr(rr.Compression.none) == "Compression.none()"
    for fmt in ("int8", "int4", "onebit"):
        assert getattr(rr.Compression, fmt).error_feedback is True
    for fmt in ("fp16", "bf16"):
        assert getattr(rr.Compression, fmt).error_feedback is False


def test_call_returns_a_configured_copy():
    base = rr.Compression.int4
    c = base(block_size=128, stochastic=True, seed=5, clip=3)
    assert c is not base and base.block_size == 256
    assert (c.block_size, c.stochastic, c.seed, c.clip) == (128, True, 5, 3.0)
    assert c(seed=6).block_size == 128            # calling keeps the other options
    assert c == rr.Compression.int4(block_size=128, stochastic=True, seed=5, clip=3.0)
    assert hash(c) == hash(rr.Compression.int4(block_size=128, stochastic=True, seed=5, clip=3.0))
    assert rr.Compression.int8() == rr.Compression.int8


def test_immutable_and_picklable():
    with pytest.raises(dataclasses.FrozenInstanceError):
        rr.Compression.int8.block_size = 8
    for fmt in ALL:
        c = getattr(rr.Compression, fmt)
        assert pickle.loads(pickle.dumps(c)) == c


@pytest.mark.parametrize("bad", [
    dict(block_size=0), dict(block_size=12), dict(block_size=2**21), dict(block_size=8.0),
    dict(clip=0), dict(clip=-1.0), dict(clip=float("inf")), dict(clip="x"),
    dict(seed=-1), dict(seed=2**64), dict(stochastic="yes"), dict(error_feedback=1),
    dict(blocksize=256),
])
def test_bad_options(bad):
    with pytest.raises(rr.RingReduceError, match="Compression.int8"):
        rr.Compression.int8(**bad)


def test_half_formats_have_no_block_options():
    with pytest.raises(rr.RingReduceError, match="unknown option"):
        rr.Compression.fp16(block_size=256)
    assert rr.Compression.bf16(error_feedback=True).error_feedback


def test_resolve():
    assert resolve(None, 0) is None
    assert resolve(rr.Compression.none, 0) is None
    assert resolve("none", 0) is None
    assert resolve("int8", 0) == rr.Compression.int8
    assert resolve(type(rr.Compression.onebit), 0) == rr.Compression.onebit
    c = rr.Compression.int4(block_size=64)
    assert resolve(c, 0) is c
    with pytest.raises(rr.RingReduceError, match="rank 3: .*must be None or one of"):
        resolve(object(), 3)
    with pytest.raises(rr.RingReduceError, match="rank 1: unknown compression 'int2'"):
        resolve("int2", 1)


def test_measure_error_request_is_in_the_fingerprint(monkeypatch):
    monkeypatch.setenv("RINGREDUCE_STATS_ERROR", "1")
    c = resolve(rr.Compression.int8, 0)
    assert c.measure_error and "measure_error=True" in repr(c)
    monkeypatch.delenv("RINGREDUCE_STATS_ERROR")
    assert not resolve(rr.Compression.int8, 0).measure_error


def test_compressor_interface_round_trip():
    x = np.linspace(-1, 1, 1000, dtype=np.float32)
    for fmt in ("fp16", "bf16", "int8", "int4", "onebit"):
        c: Compressor = getattr(rr.Compression, fmt)
        packed = np.empty(c.packed_nbytes(x.size), np.uint8)
        res = np.zeros_like(x)
        assert c.compress(x, packed, res) == 0
        y = np.empty_like(x)
        c.decompress(packed, x.size, y)
        assert np.allclose(y + res, x, atol=1e-6), fmt


@pytest.mark.parametrize("count,n,B", [(0, 3, 256), (1, 4, 256), (1000, 3, 256), (257, 2, 8),
                                       (5 * 64 + 3, 5, 64), (10**6 + 1, 7, 256)])
def test_chunks_are_whole_blocks(count, n, B):
    b = chunk_layout(count, n, B)
    assert len(b) == n + 1 and b[0] == 0 and b[-1] == count
    assert np.all(np.diff(b) >= 0)
    assert np.all(b[:-1][b[:-1] < count] % B == 0)      # every chunk starts on a block
    blocks = -(-np.diff(b) // B)
    assert blocks.max() - blocks.min() <= 1


def test_state_dict_checks():
    cs = CompressionState(rank=1, size=4)
    t = cs.tensor("w", 10)
    t.worker_residual(10)[:] = 1.5
    t.server_residual(4, 8)[:] = 2.5
    t.calls = 7
    sd = cs.state_dict()
    assert sd["size"] == 4 and sd["rank"] == 1
    sd["tensors"]["w"]["worker"][0] = 99   # a copy, not the live array
    assert cs.tensor("w", 10).worker[0] == 1.5

    other = CompressionState(rank=1, size=4)
    other.load_state_dict(cs.state_dict())
    t2 = other.tensor("w", 10)
    assert t2.calls == 7 and np.all(t2.worker == 1.5) and np.all(t2.server_residual(4, 8) == 2.5)

    with pytest.raises(rr.RingReduceError, match="rank 1: .*saved with 4 ranks but this "
                                                 "communicator has 3"):
        CompressionState(rank=1, size=3).load_state_dict(cs.state_dict())
    with pytest.raises(rr.RingReduceError, match="rank 2: .*saved by rank 1"):
        CompressionState(rank=2, size=4).load_state_dict(cs.state_dict())
    with pytest.raises(rr.RingReduceError, match="not a compression state"):
        other.load_state_dict({"foo": 1})


def test_state_resets_when_a_tensor_changes_size():
    cs = CompressionState(rank=0, size=1)
    cs.tensor("w", 10).worker_residual(10)[:] = 1
    assert cs.tensor("w", 11).worker is None
    assert cs.names() == ["w"]
    cs.clear()
    assert cs.names() == []


def test_missing_extension_is_a_clear_error(monkeypatch):
    from ringreduce.compression import kernels
    monkeypatch.setattr(kernels, "_C", None)
    with pytest.raises(rr.RingReduceError, match=r"rank 0: .*tensor 'w' needs the C\+\+ kernels.*pip install"):
        rr.allreduce(np.ones(4, np.float32), compression=rr.Compression.int8, name="w")
