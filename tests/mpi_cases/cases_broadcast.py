"""broadcast_, broadcast_object, allgather_object, info."""
from __future__ import annotations

import numpy as np
import pytest
from _common import DTYPES, all_ranks_identical, everyone, make_input

import ringreduce as rr
from ringreduce.transport import p2p as _transfer

rr.init()
N = rr.size()
R = rr.rank()


@pytest.mark.parametrize("count", [0, 1, 17, 300001])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_broadcast(dtype, count):
    for root in sorted({0, N - 1}):
        x = make_input(R, count, dtype, "bcast").reshape(-1, 1) if count else make_input(R, 0, dtype, "b")
        expected = make_input(root, count, dtype, "bcast").reshape(x.shape) if count else x
        assert rr.broadcast_(x, root_rank=root) is x
        assert everyone(np.array_equal(x.view(np.uint8), expected.view(np.uint8)))


def test_broadcast_split_messages(monkeypatch):
    monkeypatch.setattr(_transfer, "MAX_MESSAGE_BYTES", 999)
    x = make_input(R, 5000, np.float64, "bsplit")
    rr.broadcast_(x, root_rank=0)
    assert all_ranks_identical(x)
    assert everyone(np.array_equal(x, make_input(0, 5000, np.float64, "bsplit")))


def test_objects():
    obj = rr.broadcast_object({"rank": R, "data": [1, 2]} if R == 0 else None, root_rank=0)
    assert obj == {"rank": 0, "data": [1, 2]}
    assert rr.allgather_object(("r", R)) == [("r", r) for r in range(N)]


def test_rank_size_local():
    assert rr.size() == N and rr.rank() == R
    assert 0 <= rr.local_rank() < rr.local_size() <= N
    assert sum(rr.allgather_object(rr.local_rank() == 0)) == rr.info()["nodes"]


def test_info():
    info = rr.info()
    for key in ("mpi_vendor", "mpi_version", "thread_level", "size", "nodes", "extensions",
                "algorithm_table"):
        assert key in info
    assert info["thread_level"] == "multiple"
