"""The fast engine: shm blocks and window reuse, auto's decisions, the broadcast tuning table."""
from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, everyone, make_input, max_error
from cases_allreduce import check_allreduce
from mpi4py import MPI

import ringreduce as rr
from ringreduce.algorithms import shm
from ringreduce.policy import cost, tuning
from ringreduce.policy import plan as select
from ringreduce.runtime.context import context

rr.init()
N = rr.size()
R = rr.rank()


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.int64])
@pytest.mark.parametrize("op", [rr.Sum, rr.Average, rr.Max])
def test_shm_many_blocks(dtype, op, monkeypatch):
    # Small blocks: a message crosses many blocks, with ragged last block and chunks.
    if np.dtype(dtype).kind in "iu" and op == rr.Average:
        pytest.skip("Average on integers is an error")
    monkeypatch.setattr(shm, "BLOCK_BYTES", 4096)
    monkeypatch.setattr(shm, "REPLICATED_MAX_BYTES", 256)
    for count in (65, 1000, 12345):
        check_allreduce("shm", dtype, op, count, tag=f"blocks{count}")


@pytest.mark.parametrize("inplace", [True, False])
def test_shm_window_reused_and_grown(inplace):
    chan = context().main
    sizes = [10, 100000, 3, 300000, 100000]
    for i, count in enumerate(sizes):
        x = make_input(R, count, np.float32, f"grow{i}")
        keep = x.copy()
        y = rr.allreduce_(x, op=rr.Sum, algorithm="shm") if inplace else \
            rr.allreduce(x, op=rr.Sum, algorithm="shm")
        inputs = [make_input(r, count, np.float32, f"grow{i}") for r in range(N)]
        assert everyone(max_error(rr.Sum, y, inputs) <= 1e-5 * (N + 1))
        assert all_ranks_identical(y)
        if not inplace:
            assert np.array_equal(x, keep), "input modified"
    win = chan.window
    if N > 1:
        assert win is not None and win.win is not None
        assert win.half >= min(shm.BLOCK_BYTES, 4 * 300000)


def test_shm_out_of_place_reads_input_directly():
    x = make_input(R, 200003, np.float64, "direct")
    out = np.full_like(x, np.nan)
    y = rr.allreduce(x, op=rr.Average, algorithm="shm", out=out)
    assert y is out
    inputs = [make_input(r, 200003, np.float64, "direct") for r in range(N)]
    assert everyone(max_error(rr.Average, y, inputs) <= 1e-12 * (N + 1))
    assert all_ranks_identical(y)
    strided = make_input(R, 2000, np.float32, "strided")[::2]
    z = rr.allreduce(strided, op=rr.Sum, algorithm="shm")
    ref = np.sum([make_input(r, 2000, np.float32, "strided")[::2] for r in range(N)], axis=0)
    assert everyone(np.allclose(z, ref, rtol=1e-5, atol=1e-5))


@pytest.mark.skipif(N < 2, reason="needs two ranks to disagree")
def test_shm_count_mismatch_raises():
    x = np.ones(70000 + (R == N - 1), dtype=np.float32)
    try:
        rr.allreduce(x, algorithm="shm", name="s")
        msg = ""
    except rr.RingReduceError as exc:
        msg = str(exc)
    assert everyone("count" in msg and "tensor 's'" in msg)


def test_auto_decisions_identical_and_valid():
    chan = context().main
    plan = chan.plan
    picks = []
    for dtype in (np.float32, np.float16, ml_dtypes.bfloat16, np.int32):
        for k in range(0, 31):
            for nbytes in (1 << k, (1 << k) + 3):
                a = select.choose_for(chan, nbytes, np.dtype(dtype))
                assert a in select.CANDIDATES
                if np.dtype(dtype).itemsize == 2 and np.dtype(dtype).kind in "fV":
                    assert a != "mpi", "auto must never pick mpi for half types"
                if not plan.node_local:
                    assert a != "shm"
                picks.append(a)
    everyone_picks = MPI.COMM_WORLD.allgather(picks)
    assert all(p == everyone_picks[0] for p in everyone_picks)
    assert rr.info()["algorithm_table"]["full"]


def test_tuning_file_broadcast_from_rank0(tmp_path_factory, monkeypatch):
    # Each rank points at its own file; only rank 0's may count, on every rank.
    path = tmp_path_factory.mktemp(f"tune{R}") / "tuning.json"
    params = tuning.load(path)            # absent: the defaults
    assert params["algorithms"]["ring"] == tuning.DEFAULTS["algorithms"]["ring"]
    fav = "tree" if R == 0 else "ring"
    for algo, p in params["algorithms"].items():
        p["alpha"] = 1e-9 if algo == fav else 1.0
        p["beta"] = 1e-15 if algo == fav else 1.0
    tuning.save(params, path)
    assert json.loads(path.read_text())["algorithms"][fav]["alpha"] == 1e-9
    assert tuning.load(path)["algorithms"][fav]["beta"] == 1e-15
    monkeypatch.setenv("RINGREDUCE_TUNING", str(path))
    sub = MPI.COMM_WORLD.Dup()
    try:
        ctx = context(sub)
        plan = ctx.main.plan
        if N > 1:
            assert plan.choose(1 << 20, False) == "tree"
        assert plan is ctx.background.plan
        desc = MPI.COMM_WORLD.allgather(plan.describe())
        assert all(d == desc[0] for d in desc)
        y = rr.allreduce(make_input(R, 5000, np.float32, "tuned"), op=rr.Sum, comm=sub)
        assert all_ranks_identical(y)
    finally:
        from ringreduce.runtime import context as _comm
        _comm.RUNTIME.contexts.pop(_comm._key(sub)).free()
        sub.Free()


def test_broken_tuning_file_falls_back(tmp_path_factory, monkeypatch):
    path = tmp_path_factory.mktemp(f"broken{R}") / "tuning.json"
    path.write_text("{not json")
    assert tuning.load(path)["algorithms"] == tuning.DEFAULTS["algorithms"]


@pytest.mark.skipif(N < 2, reason="needs two ranks for two fake nodes")
def test_shm_falls_back_across_nodes(monkeypatch):
    # Declared nodes: auto never picks shm; an explicit "shm" runs the ring and is still right.
    monkeypatch.setenv("RINGREDUCE_NODE_ID", f"node{R % 2}")
    sub = MPI.COMM_WORLD.Dup()
    try:
        ctx = context(sub)
        assert not ctx.main.plan.node_local
        for nbytes in (4, 1 << 12, 1 << 20, 1 << 26):
            assert select.choose_for(ctx.main, nbytes, np.dtype(np.float32)) != "shm"
        x = make_input(R, 30001, np.float32, "fallback")
        y = rr.allreduce(x, op=rr.Sum, algorithm="shm", comm=sub)
        inputs = [make_input(r, 30001, np.float32, "fallback") for r in range(N)]
        assert everyone(max_error(rr.Sum, y, inputs) <= 1e-5 * (N + 1))
        assert all_ranks_identical(y)
    finally:
        from ringreduce.runtime import context as _comm
        _comm.RUNTIME.contexts.pop(_comm._key(sub)).free()
        sub.Free()


def test_cost_model_prefers_cheap_algorithms():
    # Pure functions: the model's shape, the same on every rank.
    p = tuning.DEFAULTS
    assert cost.predict(p, "ring", 0, 1) == 0.0
    for algo in select.CANDIDATES:
        assert cost.predict(p, algo, 1 << 20, 4) > cost.predict(p, algo, 1 << 10, 4)
    t = select.build_table(p, 4, node_local=False, half=True)
    assert t[-1][0] is None and all(a not in ("mpi", "shm") for _, a in t)


def test_measured_points_override_model_in_range():
    params = dict(tuning.DEFAULTS)
    params["measured"] = {"ranks": 4, "node_local": True,
                          "points": [[1024, "tree"], [1 << 20, "ring"], [1 << 24, "mpi"]]}
    t = select.make_plan(params, 4, node_local=True)
    assert t.choose(1024, False) == "tree" and t.choose(1 << 20, False) == "ring"
    assert t.choose(1 << 24, False) == "mpi"
    assert t.choose(1 << 24, True) != "mpi"            # never for half types
    other = select.make_plan(params, 3, node_local=True)   # measured on 4 ranks: model only
    assert other.tables == select.make_plan(tuning.DEFAULTS, 3, node_local=True).tables


def test_shm_on_the_background_thread(monkeypatch):
    # The engine thread has its own channel, hence its own window.
    monkeypatch.setattr(shm, "BLOCK_BYTES", 8192)
    counts = [100, 5000, 70001]
    handles = [rr.allreduce_async(make_input(R, c, np.float32, f"bg{c}"), op=rr.Sum,
                                  algorithm="shm", name=f"bg{c}") for c in counts]
    for c, h in zip(counts, handles):
        y = h.wait()
        inputs = [make_input(r, c, np.float32, f"bg{c}") for r in range(N)]
        assert everyone(max_error(rr.Sum, y, inputs) <= 1e-5 * (N + 1))
        assert all_ranks_identical(y)


@pytest.mark.parametrize("algorithm", ["ring", "tree", "shm", "mpi"])
def test_wire_stats_count_what_moves(algorithm, monkeypatch):
    """Bytes sent equal bytes received over all ranks; ring moves 2(n-1) x the message in all."""
    monkeypatch.setenv("RINGREDUCE_CHECK", "0")       # no fingerprint rows in the counts
    x = np.ones(12345, np.float32)
    rr.wire_stats(reset=True)
    rr.allreduce(x, op=rr.Sum, algorithm=algorithm)
    ws = rr.wire_stats()
    sent = MPI.COMM_WORLD.allreduce(ws["total"]["sent"])
    received = MPI.COMM_WORLD.allreduce(ws["total"]["received"])
    assert ws["per_comm"]["world"] == ws["total"]
    assert sent == received
    if N == 1 or algorithm == "shm":
        assert sent == 0                           # one rank, or shared memory: nothing on a wire
    elif algorithm == "ring":
        assert sent == 2 * (N - 1) * x.nbytes
    elif algorithm == "mpi":
        assert sent == N * x.nbytes                # the payload handed to MPI, per rank
    else:
        assert sent >= (N - 1) * x.nbytes
    rr.wire_stats(reset=True)
    assert rr.wire_stats()["total"] == {"sent": 0, "received": 0}


@pytest.mark.parametrize("value, on", [("no", False), ("off", False), ("0", False), ("1", True),
                                       ("yes", True)])
def test_info_reports_the_check_as_the_engine_reads_it(value, on, monkeypatch):
    monkeypatch.setenv("RINGREDUCE_CHECK", value)
    assert rr.info()["mismatch_check"] is on


def test_shm_window_barrier_waits_for_a_late_peer(monkeypatch):
    # The window's own barrier (flags in shared memory): a late rank is waited for through
    # the supervisor's slow phase, on both the one-barrier and the blocked path.
    import time
    monkeypatch.setenv("RINGREDUCE_CHECK", "0")        # no agreement round in front to absorb it
    for count in (100, 300000):
        if R == N - 1:
            time.sleep(0.05)
        y = rr.allreduce(np.full(count, R + 1, np.float32), op=rr.Sum, algorithm="shm")
        assert everyone(bool(np.all(y == N * (N + 1) / 2)))
