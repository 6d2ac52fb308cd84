"""Compression.auto under mpirun: agreed decisions, identical results, fallback, checkpoints."""
from __future__ import annotations

import numpy as np
import pytest
from _common import all_ranks_identical, everyone, expect_everywhere

import ringreduce as rr
from ringreduce.compression import auto as auto_mod

rr.init()
N = rr.size()
R = rr.rank()
SHAPE = (64, 1024)          # 2**16 elements: above min_elements, 2-D


@pytest.fixture(autouse=True)
def fresh_state():
    rr.compression_state().clear()
    yield
    rr.compression_state().clear()


def grads(step: int, shape=SHAPE, signal=0.5) -> np.ndarray:
    """A rank's gradient: a shared signal plus per-rank noise (different on every rank)."""
    sig = np.random.default_rng(1234).standard_normal(shape).astype(np.float32)
    noise = np.random.default_rng([R, step]).standard_normal(shape).astype(np.float32)
    return (np.float32(signal) * sig + noise).astype(np.float32)


def run(name: str, steps: int, comp=rr.Compression.auto, start=0, **kw) -> list[np.ndarray]:
    out = []
    for s in range(start, start + steps):
        out.append(rr.allreduce(grads(s, **kw), op=rr.Average, compression=comp, name=name))
    return out


def no_pruning(monkeypatch):
    """Every candidate gets its trial (the kernels' cost predicted as zero)."""
    monkeypatch.setattr(auto_mod, "_codec_seconds_per_element", lambda fmt: 0.0)


def test_same_decisions_and_bit_identical_results(monkeypatch):
    no_pruning(monkeypatch)
    ys = run("w", 40)
    for y in ys:
        assert all_ranks_identical(y)
    rep = rr.compression_state().auto_report()["w"]
    reports = rr.allgather_object(rep)
    assert all(r == reports[0] for r in reports), reports
    tried = [h["format"] for h in rep["history"] if h["why"] == "trial"]
    order = ["onebit", "int4", "int8", "fp16"]           # coarsest first
    compressed = [f for f in tried if f != "none"]
    assert compressed == [f for f in order if f in compressed], tried
    # Early on, onebit's predicted error (one call's over the short sum) is far above 1 %:
    # it waits instead of being tried.
    assert "onebit" in rep["deferred"] and "onebit" not in tried
    assert rep["phase"] == "settled"
    # The choice is the fastest measured format within quality (none always qualifies).
    choice = rep["format"]
    assert rep["median_ms"][choice] <= rep["median_ms"]["none"]
    assert choice == "none" or rep["errors"][choice] <= 0.01


def test_accumulated_result_close_to_exact(monkeypatch):
    # Whatever auto tries and picks, the sum of its results is the sum of the exact means up
    # to the pending residuals: the error it estimates (single onebit trial steps are far off).
    no_pruning(monkeypatch)
    ys = run("close", 30)
    total = np.sum([y.astype(np.float64) for y in ys], axis=0)
    exact = sum(rr.allreduce(grads(s).astype(np.float64), op=rr.Average) for s in range(30))
    rel = np.linalg.norm(total - exact) / np.linalg.norm(exact)
    est = rr.compression_state().auto_report()["close"]["error"]
    assert everyone(rel < 0.05), (rel, est)
    assert everyone(rel <= 2 * est + 1e-6), (rel, est)


def test_picks_none_on_shared_memory():
    # One machine: after the warm-up the predicted compressed calls (kernels + scaled wire)
    # are no faster than shm, so nothing is tried, or what is chosen measured faster.
    run("shm", 24, shape=(512, 1024))
    rep = rr.compression_state().auto_report()["shm"]
    assert rep["format"] == "none" or rep["median_ms"][rep["format"]] < rep["median_ms"]["none"]
    assert everyone(True)


def test_small_and_one_dim_tensors_stay_uncompressed():
    for name, x in (("small", np.ones((8, 8), np.float32)), ("bias", np.ones(1 << 16, np.float32))):
        rr.allreduce(x, compression=rr.Compression.auto, name=name)
        assert rr.compression_state().auto_report().get(name) is None
    rr.allreduce(np.ones(1 << 16, np.float32), compression=rr.Compression.auto(one_dim=True),
                 name="bucket")
    assert "bucket" in rr.compression_state().auto_report()


def settle_on(name: str, fmt: str, steps: int = 5):
    """Run a few calls, then put the tensor's auto state on `fmt` (the same on every rank)."""
    run(name, steps)
    t = rr.compression_state().auto_tensor_if_any(name, int(np.prod(SHAPE)))
    t.phase, t.choice, t.trial = "settled", fmt, []
    t.medians = {"none": 1.0, "int8": 0.5, "onebit": 0.1}
    t.errors = {"none": 0.0, "int8": 0.0, "onebit": 0.0}
    t.err_sum = {k: 1.0 for k in t.errors}
    t.next_check = t.calls + 4
    return t


def test_falls_back_when_the_error_grows():
    # Pure noise (no shared signal): the sum of results stays short, onebit's pending
    # residual is far above 1 % of it, so the first check moves to a finer format.
    t = settle_on("fb", "onebit")
    run("fb", 8, start=5, signal=0.0)
    why = [h["why"] for h in t.history]
    assert "fallback" in why, t.history
    assert t.choice in ("none", "int8")
    rep = rr.allgather_object(rr.compression_state().auto_report()["fb"])
    assert all(r == rep[0] for r in rep)


def test_falls_back_on_nonfinite():
    t = settle_on("nan", "int8")
    for s in range(5, 12):
        g = grads(s)
        if s == 6 and R == 0:
            g[0, 0] = np.nan
        rr.allreduce(g, op=rr.Average, compression=rr.Compression.auto, name="nan")
    assert t.history and t.history[-1]["why"] == "fallback"
    assert t.errors["int8"] == float("inf")
    assert everyone(True)


def test_checkpoint_resume_is_exact(monkeypatch):
    # Saved once settled: from there on the decisions depend on the data only (error
    # estimates at the checks), so a resumed run repeats every choice and every bit.
    # The algorithm learner is not checkpointed: while it explores, the uncompressed
    # calls run other algorithms (another summation order from 3 ranks up), so here
    # auto follows the plan.
    from ringreduce.runtime.context import context
    monkeypatch.setattr(context().main, "learner", None)
    no_pruning(monkeypatch)
    run("ck", 26)
    assert rr.compression_state().auto_report()["ck"]["phase"] == "settled"
    saved = rr.compression_state().state_dict()
    after = run("ck", 24, start=26)
    rep = rr.compression_state().auto_report()["ck"]
    rr.compression_state().clear()
    rr.compression_state().load_state_dict(saved)
    again = run("ck", 24, start=26)
    assert rr.compression_state().auto_report()["ck"]["history"] == rep["history"]
    for a, b in zip(after, again):
        assert np.array_equal(a.view(np.uint8), b.view(np.uint8))


def test_needs_a_name_and_validates_options():
    expect_everywhere(lambda: rr.allreduce(np.ones(SHAPE, np.float32),
                                           compression=rr.Compression.auto), "name")
    for bad in ({"quality": 0}, {"formats": ("gzip",)}, {"min_elements": -1}):
        with pytest.raises(rr.RingReduceError):
            rr.Compression.auto(**bad)
    assert rr.Compression.auto(formats=("int8",)).formats == ("none", "int8")


def test_tightens_to_a_deferred_format_as_the_sum_grows():
    # Strong shared signal: the accumulated result grows like the call count, so onebit's
    # predicted error (one call's over the sum) falls under quality / 2 and auto tries it.
    comp = rr.Compression.auto(quality=0.2)
    run("tight", 5, comp=comp, signal=20.0)
    t = rr.compression_state().auto_tensor_if_any("tight", int(np.prod(SHAPE)))
    t.phase, t.choice, t.trial = "settled", "int8", []
    t.medians = {"none": 1.0, "int8": 0.5}
    t.errors, t.err_sum = {"none": 0.0, "int8": 0.0}, {"none": 1.0, "int8": 1.0}
    t.deferred, t.predicted = ["onebit"], {"onebit": 0.1}
    t.next_check = t.calls + 1
    run("tight", 40, comp=comp, start=5, signal=20.0)
    assert any(h["why"] == "tighten" and h["format"] == "onebit" for h in t.history), t.history
    rep = rr.allgather_object(rr.compression_state().auto_report()["tight"])
    assert all(r == rep[0] for r in rep)


def test_distributed_optimizer_with_auto(monkeypatch):
    # Buckets (flat) are judged as tensors; every rank ends with the same parameters and the
    # optimizer's state_dict carries auto's state with the residuals.
    torch = pytest.importorskip("torch")
    import ringreduce.torch as rrt

    no_pruning(monkeypatch)
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 128)
    opt = rrt.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.01),
                                   named_parameters=model.named_parameters(),
                                   compression=rr.Compression.auto)
    rrt.broadcast_parameters(model.state_dict(), root_rank=0)
    gen = torch.Generator().manual_seed(R)
    for _ in range(30):
        opt.zero_grad()
        model(torch.randn(8, 256, generator=gen)).pow(2).mean().backward()
        opt.step()
    rep = rr.compression_state().auto_report()
    assert rep and all(r["phase"] == "settled" for r in rep.values()), rep
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()
    assert all_ranks_identical(flat)
    saved = opt.state_dict()["ringreduce"]["compression_state"][R]
    assert set(saved["auto"]) == set(rep)
