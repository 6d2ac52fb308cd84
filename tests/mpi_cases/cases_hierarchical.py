"""Hierarchical allreduce on faked node layouts: vs numpy, bit-identical across ranks.

Under the test launcher every rank runs on one machine. Each layout gets its own
communicator (a Dup of COMM_WORLD) whose engine context is created while
RINGREDUCE_NODE_ID says which "node" this rank is on, so the node split, the
leaders' ring and the node-local shared-memory steps all run as on a cluster
(the ranks really share memory, so the shm path is used inside each fake node).
"""
from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, check_allreduce, everyone, expect_everywhere, make_input
from mpi4py import MPI

import ringreduce as rr
from ringreduce.algorithms import hierarchical, shm
from ringreduce.policy import cost
from ringreduce.runtime.context import context

rr.init()
N = rr.size()
R = rr.rank()

# name -> node of each rank; covers one node, a node per rank, blocks, interleaved
# (a node's ranks are not contiguous) and uneven nodes (1 + 3 + 1 ranks at np=5).
LAYOUTS = {
    "single": lambda r: 0,
    "each": lambda r: r,
    "blocks2": lambda r: r // 2,
    "interleaved": lambda r: r % 2,
    "uneven": lambda r: 0 if r == 0 else 1 + (r - 1) // 3,
}


def _faked(node_of):
    """A Dup of COMM_WORLD whose ringreduce context sees the given node layout."""
    comm = MPI.COMM_WORLD.Dup()
    saved = os.environ.get("RINGREDUCE_NODE_ID")
    os.environ["RINGREDUCE_NODE_ID"] = f"fake-node-{node_of(R)}"
    try:
        context(comm)           # the node split happens here, collectively
    finally:
        if saved is None:
            del os.environ["RINGREDUCE_NODE_ID"]
        else:
            os.environ["RINGREDUCE_NODE_ID"] = saved
    return comm


COMMS = {name: _faked(f) for name, f in LAYOUTS.items()}
# (dtype, op) pairs: every op on float32, the others on the ops their users need.
CASES = [(np.float32, rr.Sum), (np.float32, rr.Average), (np.float32, rr.Min),
         (np.float32, rr.Max), (np.float64, rr.Average), (np.float16, rr.Sum),
         (ml_dtypes.bfloat16, rr.Average), (np.int32, rr.Sum), (np.int32, rr.Max),
         (np.uint8, rr.Sum)]
# 0, 1, fewer than ranks, odd, above shm's replicated limit (chunked path)
SIZES = [0, 1, max(N - 1, 1), 7, shm.REPLICATED_MAX_BYTES // 4 + 13]


def check(comm, dtype, op, count, tag="hier", **kwargs):
    return check_allreduce("hierarchical", dtype, op, count, tag, comm=comm, **kwargs)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_seen(name):
    ctx = context(COMMS[name])
    expected = len({LAYOUTS[name](r) for r in range(N)})
    assert ctx.num_nodes == expected
    lay = hierarchical.node_channels(ctx.main)
    assert lay.num_nodes == expected
    assert lay.node.size == sum(LAYOUTS[name](r) == LAYOUTS[name](R) for r in range(N))
    assert (lay.leaders is not None) == (lay.node.rank == 0)
    assert lay.shared        # one machine: every fake node can share memory


@pytest.mark.parametrize("count", SIZES)
@pytest.mark.parametrize("dtype,op", CASES,
                         ids=[f"{np.dtype(d).name}-{o.name}" for d, o in CASES])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_matrix(name, dtype, op, count):
    check(COMMS[name], dtype, op, count)


@pytest.mark.parametrize("op", [rr.Sum, rr.Average], ids=lambda o: o.name)
@pytest.mark.parametrize("name", ["blocks2", "interleaved", "uneven"])
def test_large(name, op):
    # Several ring segments between the leaders, chunked shared-memory steps.
    check(COMMS[name], np.float32, op, 2**20 + 3)


@pytest.mark.parametrize("name", ["blocks2", "uneven"])
def test_repeated_calls_alternate_slots(name):
    # Back-to-back calls of both sizes reuse the window's two halves; results stay exact.
    for i in range(6):
        count = 7 if i % 2 else shm.REPLICATED_MAX_BYTES // 4 + 13
        check(COMMS[name], np.int32, rr.Sum, count, tag=f"rep{i}")


@pytest.mark.parametrize("fmt", ["int8", "onebit"])
@pytest.mark.parametrize("name", ["blocks2", "uneven", "each", "single"])
def test_compressed_between_leaders(name, fmt):
    comp = getattr(rr.Compression, fmt)
    count = 5000
    x = make_input(R, count, np.float32, "hcomp")
    y = rr.allreduce(x, op=rr.Average, algorithm="hierarchical", compression=comp,
                     name=f"h-{name}-{fmt}", comm=COMMS[name])
    ref = np.mean([make_input(r, count, np.float32, "hcomp") for r in range(N)], axis=0)
    rel = float(np.linalg.norm(y - ref) / np.linalg.norm(ref))
    # Node-local sums are exact; only the leaders' step quantises (twice at most).
    bound = {"int8": 0.05, "onebit": 1.5}[fmt]
    assert everyone(rel <= bound), f"relative error {rel} > {bound}"
    assert all_ranks_identical(y)
    if context(COMMS[name]).num_nodes == 1 or N == 1:
        assert everyone(rel <= 1e-6), "a single node needs no compression"


def test_compressed_needs_name_on_every_rank():
    # Every rank raises (not only the leaders that compress), so nobody is left waiting.
    x = np.ones(100, np.float32)
    with pytest.raises(rr.RingReduceError, match="name"):
        rr.allreduce(x, algorithm="hierarchical", compression=rr.Compression.int8,
                     comm=COMMS["blocks2"])


@pytest.mark.skipif(N == 1, reason="a mismatch needs two ranks")
@pytest.mark.parametrize("name", ["blocks2", "interleaved", "uneven", "each"])
def test_staged_while_agreeing(name, monkeypatch):
    # Across nodes each rank copies its input into its node's window while the fingerprints
    # travel (hierarchical.stage). On a mismatch nothing was read from a peer and the slot's
    # parity is taken back: each mismatch below raises on every rank and is followed by a
    # checked call whose values differ from every earlier one (a parity left behind would
    # pair this rank's slot with a peer's stale one, or the barrier counts would drift).
    comm = COMMS[name]
    ctx = context(comm)
    staged = []

    def stage(chan, buf, progress=None, real=hierarchical.stage):
        slots = real(chan, buf, progress)
        staged.append(slots is not None)
        return slots
    monkeypatch.setattr(hierarchical, "stage", stage)
    calls = iter(range(1, 1000))

    def checked(count, strided=False):
        v = next(calls)
        base = np.full(2 * count, v * (R + 1), np.float32)
        x = base[::2] if strided and R == 0 else base[:count]       # general path on rank 0
        y = rr.allreduce(x, op=rr.Sum, algorithm="hierarchical", name="h", comm=comm)
        assert np.all(y == v * N * (N + 1) // 2), (count, v)

    def call(count, **kw):
        kw = {"algorithm": "hierarchical", "name": "w", "comm": comm, **kw}
        return lambda: rr.allreduce(np.ones(count, np.float32), **kw)
    last = R == N - 1
    who = f"rank {R} of the sub-communicator (world rank {R})"
    for count in (1000, 300000):            # replicated and chunked node steps
        for strided in (False, True, False):
            checked(count, strided)
        cases = [
            (call(count + (1 if last else 0)), "count"),
            (call(count * 100 if last else count), "count"),      # the window too small on one side
            (call(0 if last else count), "count"),
            (call(count, algorithm="mpi") if last else call(count), "algorithm"),
            (call(count, algorithm="ring") if R % 2 else call(count), "algorithm"),
            (call(count, op=rr.Max) if last else call(count), "op"),
            (call(count, compression=rr.Compression.int8) if last else call(count), "compression"),
            (lambda c=count: rr.allreduce(np.ones(c, np.int32), comm=comm, name="w") if last
             else call(c)(), "rejected"),                          # an error row on one rank
        ]
        for fn, field in cases:
            expect_everywhere(fn, field, who=who)
            checked(count)
        # Compressed between the leaders, staged the same way inside the nodes.
        x = make_input(R, count, np.float32, "hstage")
        y = rr.allreduce(x, op=rr.Average, algorithm="hierarchical", compression=rr.Compression.int8,
                         name=f"hc{count}", comm=comm)
        ref = np.mean([make_input(r, count, np.float32, "hstage") for r in range(N)], axis=0)
        assert everyone(float(np.linalg.norm(y - ref) / np.linalg.norm(ref)) <= 0.05)
        assert all_ranks_identical(y)
        checked(count)
    # Where the ranks span nodes and this rank's node holds others, the copies did go early.
    lay = hierarchical.node_channels(ctx.main)
    if ctx.num_nodes > 1 and lay.node.size > 1:
        assert any(staged), staged


# ---------------------------------------------------------------- auto across nodes

@pytest.mark.parametrize("name", list(LAYOUTS))
def test_auto_picks_hierarchical_across_nodes(name):
    # The plan is built from the fake layout: hierarchical for large messages when the ranks
    # span nodes and some node holds several; otherwise the flat choices, and on one node
    # exactly the single-node plan.
    from ringreduce.policy import tuning
    from ringreduce.policy import plan as select
    ctx = context(COMMS[name])
    per_node = [sum(LAYOUTS[name](r) == LAYOUTS[name](q) for r in range(N)) for q in range(N)]
    across = ctx.num_nodes > 1 and max(per_node) > 1
    big = 64 << 20
    pick = select.choose_for(ctx.main, big, np.dtype(np.float32))
    assert (pick == "hierarchical") == across, (name, pick, ctx.main.plan.describe())
    if ctx.num_nodes == 1:
        plan = ctx.main.plan
        assert plan.tables == select.make_plan(tuning.load(), N, plan.node_local).tables
    if across:
        # auto runs it: bit-identical across ranks and equal to the explicit call's bits.
        count = 300_001
        x = make_input(R, count, np.float32, "auto-hier")
        y = rr.allreduce(x, op=rr.Average, comm=COMMS[name])
        z = rr.allreduce(x, op=rr.Average, algorithm="hierarchical", comm=COMMS[name])
        assert select.choose_for(ctx.main, x.nbytes, x.dtype) == "hierarchical"
        assert all_ranks_identical(y) and np.array_equal(y.view(np.uint32), z.view(np.uint32))
        ref = np.mean([make_input(r, count, np.float32, "auto-hier") for r in range(N)], axis=0)
        assert everyone(np.allclose(y, ref, rtol=1e-5, atol=1e-6))


def test_cost_model_across_nodes():
    # Pure functions: 2 nodes x 2 ranks prefer hierarchical for large messages, a node per
    # rank never gets it, and the single-node tables do not depend on the new arguments.
    from ringreduce.policy import tuning
    from ringreduce.policy import plan as select
    p = tuning.DEFAULTS
    t = select.make_plan(p, 4, False, nodes=2, max_local=2)
    assert t.choose(64 << 20, False) == "hierarchical" and t.choose(64 << 20, True) == "hierarchical"
    assert t.choose(16, False) != "hierarchical"
    flat = select.make_plan(p, 4, False, nodes=4, max_local=1)
    assert all(a != "hierarchical" for _, a in flat.tables["full"])
    assert select.make_plan(p, 4, True).tables == select.make_plan(p, 4, True, 1, 4).tables
    # A cross-node --tune's ring fit prices the links.
    tuned = dict(p, measured={"ranks": 4, "node_local": False, "points": [[1024, "ring"]]})
    assert cost.network(tuned) == {k: p["algorithms"]["ring"][k] for k in ("alpha", "beta")}
    assert cost.network(p) == cost.NETWORK_DEFAULTS
