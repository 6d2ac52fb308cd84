"""The learning auto under mpirun: every rank runs the same algorithm on every call, results
are exact and bit-identical during exploration, a band settles after a bounded number of
calls, and what was learned is written to the cache and read back by the next context."""
from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, everyone
from mpi4py import MPI

import ringreduce as rr
from ringreduce.policy import learn
from ringreduce.policy import plan as select
from ringreduce.runtime import context as _comm
from ringreduce.runtime.context import context

rr.init()
N = rr.size()
R = rr.rank()
WORLD = MPI.COMM_WORLD

pytestmark = pytest.mark.skipif(N == 1, reason="one rank: nothing to learn")


def _shared_path(tmp_path_factory, name: str) -> str:
    """A path rank 0 picks, the same string on every rank (only rank 0 reads and writes it)."""
    mine = str(tmp_path_factory.mktemp("learn") / name) if R == 0 else None
    return WORLD.bcast(mine, root=0)


class _Sub:
    """A fresh context on a Dup of the world: made after the environment is set, freed after."""

    def __enter__(self):
        self.comm = WORLD.Dup()
        self.ctx = context(self.comm)
        return self

    def __exit__(self, *exc):
        _comm.RUNTIME.contexts.pop(_comm._key(self.comm)).free()
        self.comm.Free()


def _inputs(count: int, dtype, call: int) -> list[np.ndarray]:
    """Every rank's input for one call: small integers, so any summation order is exact."""
    return [np.random.default_rng(1000 * call + r).integers(-8, 8, count).astype(dtype)
            for r in range(N)]


def _run_until_settled(sub, count: int, dtype, op, limit: int = 400) -> tuple[list[str], int]:
    """Call auto until the band settles; checks every result. Returns (picks, calls)."""
    learner = sub.ctx.main.learner
    half = select.without_native(np.dtype(dtype), op)
    picks = []
    for call in range(limit):
        if learner.settled(count * np.dtype(dtype).itemsize, half):
            return picks, call
        picks.append(learner.pick(count * np.dtype(dtype).itemsize, half))
        xs = _inputs(count, dtype, call)
        y = rr.allreduce(xs[R], op=op, comm=sub.comm)
        want = np.sum(np.stack([x.astype(np.float64) for x in xs]), axis=0)
        if op == rr.Max:
            want = np.max(np.stack(xs), axis=0).astype(np.float64)
        assert np.array_equal(y.astype(np.float64), want), f"call {call} ({picks[-1]}) is not exact"
        assert all_ranks_identical(y)
    raise AssertionError(f"the band of {count} x {np.dtype(dtype)} never settled in {limit} calls")


def _schedule(learner, nbytes: int, candidates: int) -> int:
    """The calls a band's first exploration takes: its rounds, plus a runoff's if one was held."""
    runoff = [e["runoff"] for e in learner.events if "runoff" in e]
    return learn.explore_calls(nbytes, candidates) + (learn.runoff_calls(nbytes, len(runoff[0])) if runoff else 0)


@pytest.mark.parametrize("check", ["1", "0"])
@pytest.mark.parametrize("count,dtype,op", [(2048, np.float32, rr.Sum), (65536, np.float32, rr.Sum),
                                            (600000, np.float64, rr.Sum),
                                            (20000, ml_dtypes.bfloat16, rr.Sum),
                                            (30000, np.float32, rr.Max)])
def test_explores_agrees_and_settles(count, dtype, op, check, tmp_path_factory, monkeypatch):
    path = _shared_path(tmp_path_factory, "learned.json")
    monkeypatch.setenv("RINGREDUCE_LEARNED", path)
    monkeypatch.delenv("RINGREDUCE_LEARN", raising=False)
    monkeypatch.setenv("RINGREDUCE_CHECK", check)
    nbytes = count * np.dtype(dtype).itemsize
    half = select.without_native(np.dtype(dtype), op)
    with _Sub() as sub:
        learner = sub.ctx.main.learner
        assert learner is not None and sub.ctx.plan.learn
        picks, calls = _run_until_settled(sub, count, dtype, op)
        cands = sub.ctx.plan.candidates(nbytes, half)
        # Exactly the schedule: the rounds of runs over every candidate, and a runoff's
        # longer runs over the close ones when the first round was a close call.
        assert calls == _schedule(learner, nbytes, len(cands))
        assert set(picks) == set(cands)
        if half:
            assert "mpi" not in picks
        # Every rank ran the same algorithm on every call and chose the same.
        choice = learner.pick(nbytes, half)
        assert everyone(WORLD.allgather((picks, choice)) == [(picks, choice)] * N)
        assert choice in cands
        described = learner.describe()
        assert any(v.startswith(choice + " (learned") for v in described.values())
        if R == 0:
            saved = json.loads(Path(path).read_text())
            shape = learn.shape_key(N, sub.ctx.plan.nodes, sub.ctx.plan.max_local, sub.ctx.plan.node_local)
            entry = saved["shapes"][shape]["half" if half else "full"][str(learn.band(nbytes))]
            assert entry["algorithm"] == choice
    # A new context (the next launch, as far as the plan goes) starts settled from the cache.
    with _Sub() as sub:
        learner = sub.ctx.main.learner
        assert learner.pick(nbytes, half) == choice
        assert learner.settled(nbytes, half)
        assert "learned cache" in next(iter(learner.describe().values()))
        xs = _inputs(count, dtype, 0)
        y = rr.allreduce(xs[R], op=op, comm=sub.comm)
        assert all_ranks_identical(y)


def test_off_switch_and_no_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RINGREDUCE_LEARN", "0")
    with _Sub() as sub:
        assert not sub.ctx.plan.learn and sub.ctx.main.learner is None
    monkeypatch.delenv("RINGREDUCE_LEARN")
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    assert learn.cache_path() is None
    with _Sub() as sub:
        assert sub.ctx.main.learner is not None
        _run_until_settled(sub, 4096, np.float32, rr.Sum)   # 16 KiB: learns, writes nothing


def test_a_tuning_file_that_measured_this_shape_turns_learning_off(tmp_path_factory, monkeypatch):
    path = _shared_path(tmp_path_factory, "tuning.json")
    if R == 0:
        Path(path).write_text(json.dumps({"version": 1, "measured": {
            "ranks": N, "node_local": bool(context().plan.node_local), "points": [[1024, "tree"]]}}))
    WORLD.Barrier()
    monkeypatch.setenv("RINGREDUCE_TUNING", path)
    monkeypatch.delenv("RINGREDUCE_LEARN", raising=False)
    with _Sub() as sub:
        assert sub.ctx.main.learner is None
    monkeypatch.setenv("RINGREDUCE_LEARN", "1")
    with _Sub() as sub:
        assert sub.ctx.main.learner is not None


def test_engine_thread_learns_on_its_own_channel(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    with _Sub() as sub:
        x = np.full(50000, R + 1, np.float32)
        bg = sub.ctx.background.learner
        cands = sub.ctx.plan.candidates(x.nbytes, False)
        calls = 0
        while not bg.settled(x.nbytes) and calls < 1000:
            y = rr.allreduce_async(x, op=rr.Sum, comm=sub.comm).wait()
            assert np.all(y == N * (N + 1) / 2)
            calls += 1
        assert calls == _schedule(bg, x.nbytes, len(cands))          # exactly the schedule
        assert bg.settled(x.nbytes) and not sub.ctx.main.learner.bands
        assert everyone(WORLD.allgather(bg.describe()) == [bg.describe()] * N)


def test_info_and_timeline_show_what_was_learned(monkeypatch):
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    from ringreduce.core import timeline
    monkeypatch.setattr(timeline, "on", True)
    before = len(timeline.events())
    x = np.full(3000, 1.0, np.float32)           # 12 KiB on the world context
    learner = context().main.learner
    learner.band_for(x.nbytes, False).explore()      # earlier cases may have learned it: again
    while not learner.settled(x.nbytes):
        rr.allreduce(x, op=rr.Sum)
    learned = [e for e in timeline.events()[before:] if e.get("name") == "auto learned"]
    assert len(learned) == 1 and learned[0]["args"]["choice"] == learner.pick(x.nbytes, False)
    info = rr.info()
    assert info["learning"].startswith("on")
    assert info["learned"]["main"]["full 16 KiB"].startswith(learned[0]["args"]["choice"] + " (learned")
