"""The learning auto's schedule, decision, drift and cache, on one process (a fake channel whose
agreement rounds run on COMM_SELF); the multi-rank behaviour is in mpi_cases/cases_learn.py."""
from __future__ import annotations

import json

import pytest
from mpi4py import MPI

from ringreduce.policy import learn, tuning
from ringreduce.policy import plan as select


class FakeChannel:
    comm = MPI.COMM_SELF
    label = "main"
    seq = 0
    rounds = 0

    def count(self, sent, received):
        pass

    def wait(self, reqs, what="", inspector=None):
        self.rounds += 1
        MPI.Request.Waitall(reqs)


def _plan():
    return select.make_plan(tuning.DEFAULTS, 2, True)


def _learner(plan, save=False):
    """A fresh learner on `plan`, nothing cached, for the shape "shape"."""
    return learn.Learner(plan, "shape", [], select.NAMES, save=save)


def _feed(learner, chan, nbytes, cost, calls):
    """Run `calls` calls whose time is cost[algorithm]; returns the algorithms run."""
    ran = []
    for _ in range(calls):
        a = learner.pick(nbytes, False)
        chan.seq += 1
        learner.done(chan, a, nbytes, False, cost[a])
        ran.append(a)
    return ran


def test_explores_round_robin_then_keeps_the_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv("RINGREDUCE_LEARNED", str(tmp_path / "learned.json"))
    plan, chan = _plan(), FakeChannel()
    nbytes = 1 << 20
    cands = plan.candidates(nbytes, False)
    learner = _learner(plan, save=True)
    cost = {a: 1e-3 * (i + 2) for i, a in enumerate(cands)}
    cost["ring"] = 1e-4
    need = learn.explore_calls(nbytes, len(cands))
    ran = _feed(learner, chan, nbytes, cost, need)
    order = [plan.choose(nbytes, False)] + [a for a in cands if a != ran[0]]
    one_round = [a for a in order for _ in range(learn.run_length(nbytes))]   # runs of calls
    assert ran == one_round * (need // len(one_round))              # interleaved rounds
    assert learner.settled(nbytes) and learner.pick(nbytes, False) == "ring"
    assert chan.rounds == 1                                          # one agreed round
    saved = json.loads((tmp_path / "learned.json").read_text())
    assert saved["shapes"]["shape"]["full"]["20"]["algorithm"] == "ring"
    assert learn.load_cache("shape", select.NAMES, tmp_path / "learned.json") == \
        [(0, 20, select.NAMES.index("ring"))]
    assert learn.forget(tmp_path / "learned.json") == tmp_path / "learned.json"
    assert not (tmp_path / "learned.json").exists()


def test_a_close_call_goes_to_a_runoff(monkeypatch):
    # ring and tree explore within RUNOFF of each other: they explore again in runs twice
    # as long, the others sit out, and the runoff's times decide (here tree, which lost the
    # first round by 4 %); afterwards the band keeps every candidate and every median.
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    plan, chan = _plan(), FakeChannel()
    nbytes = 1 << 20
    cands = plan.candidates(nbytes, False)
    learner = _learner(plan)
    cost = {a: 1e-3 for a in cands}
    cost.update(ring=1.00e-4, tree=1.04e-4)
    _feed(learner, chan, nbytes, cost, learn.explore_calls(nbytes, len(cands)))
    assert not learner.settled(nbytes) and chan.rounds == 1
    close = [a for a in cands if a in ("ring", "tree")]
    assert learner.events[-1]["runoff"] == close
    cost.update(ring=1.2e-4, tree=0.9e-4)
    ran = _feed(learner, chan, nbytes, cost, learn.runoff_calls(nbytes, 2))
    run = 2 * learn.run_length(nbytes)
    assert ran == [a for _ in range(learn.samples(nbytes)) for a in close for _ in range(run)]
    assert learner.settled(nbytes) and learner.pick(nbytes, False) == "tree" and chan.rounds == 2
    band = learner.bands[(0, learn.band(nbytes))]
    assert band.candidates == [plan.choose(nbytes, False)] + [a for a in cands if a != plan.choose(nbytes, False)]
    assert band.run == learn.run_length(nbytes) and set(band.medians) == set(cands)
    assert band.medians["tree"] == pytest.approx(0.9e-4)
    assert learner.events[-1]["choice"] == "tree"
    # Far apart (more than RUNOFF): decided in one round.
    learner2 = _learner(plan)
    cost.update(ring=1e-4, tree=1.2e-4)
    _feed(learner2, chan, nbytes, cost, learn.explore_calls(nbytes, len(cands)))
    assert learner2.settled(nbytes) and learner2.pick(nbytes, False) == "ring"


def test_drift_explores_again_and_is_bounded(monkeypatch):
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    plan, chan = _plan(), FakeChannel()
    nbytes = 1 << 16
    cands = plan.candidates(nbytes, False)
    learner = _learner(plan)
    cost = {a: 1e-4 for a in cands}
    cost["tree"] = 1e-5
    need = learn.explore_calls(nbytes, len(cands))
    _feed(learner, chan, nbytes, cost, need)
    assert learner.pick(nbytes, False) == "tree"
    _feed(learner, chan, nbytes, cost, learn.FIRST_CHECK)           # the baseline check
    band = learner.bands[(0, learn.band(nbytes))]
    assert band.baseline == pytest.approx(1e-5)
    # Steady: the checks thin out.
    _feed(learner, chan, nbytes, cost, 2 * learn.FIRST_CHECK)
    assert band.interval == 2 * learn.FIRST_CHECK and learner.settled(nbytes)
    # tree gets 10x slower: the next check explores again and finds shm.
    cost["tree"], cost["shm"] = 1e-4, 2e-5
    _feed(learner, chan, nbytes, cost, band.interval - band.since_check)
    assert learner.settled(nbytes) and band.slow == 1       # one slow check: maybe a burst
    _feed(learner, chan, nbytes, cost, learn.FIRST_CHECK)
    assert not learner.settled(nbytes)
    assert learner.events[-1]["drift"] and learner.events[-1]["was"] == "tree"
    _feed(learner, chan, nbytes, cost, need)
    assert learner.pick(nbytes, False) == "shm"
    # A burst (one slow check) passes without exploring.
    _feed(learner, chan, nbytes, cost, 4 * learn.LAST_CHECK)
    base = band.baseline
    cost2 = dict(cost, shm=10 * cost["shm"])
    _feed(learner, chan, nbytes, cost2, band.interval - band.since_check)
    assert band.slow == 1
    _feed(learner, chan, nbytes, cost, learn.FIRST_CHECK)
    assert band.slow == 0 and learner.settled(nbytes) and band.baseline == base
    # A flapping machine stops re-exploring after MAX_REEXPLORE times.
    for i in range(learn.MAX_REEXPLORE + 2):
        slow = 1e-3 * 10 ** i
        _feed(learner, chan, nbytes, {a: slow for a in cands}, 2 * learn.LAST_CHECK + need + 1)
    assert band.reexplored == learn.MAX_REEXPLORE and learner.settled(nbytes)


def test_untimed_calls_change_nothing(monkeypatch):
    # The fast path times a settled band's call only when band.timed() says the drift check
    # will read it (the last RECENT calls before a check) and counts the others with
    # band.untimed(). Fed the same call times, such a learner makes every decision, drift
    # check and re-exploration at the same call as one that times every call.
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    plan, nbytes = _plan(), 1 << 16
    cands = plan.candidates(nbytes, False)
    every, chan_a = _learner(plan), FakeChannel()
    some, chan_b = _learner(plan), FakeChannel()
    untimed = 0
    for i in range(6000):
        slow = 1.0 if i < 2500 else 3.0                      # the machine changes at call 2500
        cost = {a: (1e-4 if a == "tree" else 3e-4) * slow * (1 + (i % 7) / 50) for a in cands}
        for learner, chan, all_timed in ((every, chan_a, True), (some, chan_b, False)):
            chan.seq += 1
            a = learner.pick(nbytes, False)
            band = learner.band_for(nbytes, False)
            if all_timed or band.timed():
                learner.done(chan, a, nbytes, False, cost[a], band)
            else:
                band.untimed()
                untimed += 1
    a, b = every.bands[(0, learn.band(nbytes))], some.bands[(0, learn.band(nbytes))]
    assert every.events == some.events and any(e.get("drift") for e in every.events)
    assert (a.calls, a.since_check, a.interval, a.baseline, a.choice) == \
        (b.calls, b.since_check, b.interval, b.baseline, b.choice)
    assert untimed > 4000 and chan_a.rounds == chan_b.rounds


def test_drift_explores_only_the_contenders(monkeypatch):
    # shm wins at 1e-5 s, mpi at 1.5e-5 is a contender, the rest (1e-3) are not. When shm
    # drifts to 3e-5, only candidates within CONTENDERS x 3e-5 are explored again.
    monkeypatch.setenv("RINGREDUCE_LEARNED", "off")
    plan, chan = _plan(), FakeChannel()
    nbytes = 1 << 14
    cands = plan.candidates(nbytes, False)
    assert {"shm", "mpi", "ring"} <= set(cands)
    learner = _learner(plan)
    cost = {a: 1e-3 for a in cands}
    cost.update(shm=1e-5, mpi=1.5e-5)
    _feed(learner, chan, nbytes, cost, learn.explore_calls(nbytes, len(cands)))
    assert learner.pick(nbytes, False) == "shm"
    band = learner.bands[(0, learn.band(nbytes))]
    _feed(learner, chan, nbytes, cost, learn.FIRST_CHECK)               # the baseline
    cost["shm"] = 3e-5
    while learner.settled(nbytes):
        _feed(learner, chan, nbytes, cost, 1)
    assert learner.events[-1]["drift"]
    assert sorted(band.candidates) == ["mpi", "shm"]
    ran = _feed(learner, chan, nbytes, cost, learn.explore_calls(nbytes, 2))
    assert set(ran) == {"mpi", "shm"} and learner.pick(nbytes, False) == "mpi"


def test_cached_bands_start_settled_and_unknown_entries_are_ignored(tmp_path):
    path = tmp_path / "learned.json"
    path.write_text(json.dumps({"version": 1, "shapes": {"s": {"full": {
        "14": {"algorithm": "mpi"}, "15": {"algorithm": "nonsense"}, "x": {"algorithm": "tree"}},
        "half": {"14": {"algorithm": "ring"}}}}}))
    cached = learn.load_cache("s", select.NAMES, path)
    assert cached == [(0, 14, select.NAMES.index("mpi")), (1, 14, select.NAMES.index("ring"))]
    learner = learn.Learner(_plan(), "s", cached, select.NAMES, save=False)
    assert learner.pick(1 << 14, False) == "mpi" and learner.settled(1 << 14)
    assert learner.pick(1 << 14, True) == "ring"
    assert not learner.settled(1 << 15) or learner.pick(1 << 15, False) != "nonsense"
    path.write_text("{broken")
    assert learn.load_cache("s", select.NAMES, path) == []
    assert learn.load_cache("other", select.NAMES, tmp_path / "absent.json") == []


def test_plan_encoding_carries_learning(tmp_path):
    plan = _plan()
    plan.learn, plan.cached = True, [(0, 20, 3), (1, 14, 2)]
    back = select._decode(select._encode(plan), "x")
    assert back.learn and back.cached == plan.cached and back.size == 2
    assert back.candidates(1 << 20, True) == plan.candidates(1 << 20, True)
