"""LocalSGD and DiLoCo under a real mpirun: every rank runs these (see tests/test_localsgd.py).

The equivalences pin the maths: LocalSGD at H=1 with plain SGD is full-batch
gradient descent; DiLoCo with outer_lr=1, no momentum, is LocalSGD. The global
copy must be bit-identical across ranks after every sync, a resume mid-period
(even with an exchange in flight) must continue exactly, every parameter must
be synced exactly once per H steps with fragments, an overlapped exchange must
average the values captured when it started, and ranks with different settings
must get a named error.
"""
from __future__ import annotations

import functools
import itertools
import zlib

import pytest
import torch
from torch import nn

import _data
import ringreduce as rr
import ringreduce.torch as rrt

rr.init()
R, N = rr.rank(), rr.size()
BATCH = 12  # divisible by 1, 2, 3 and 4 ranks
torch.set_num_threads(1)
_names = itertools.count()


def fresh_name(kind="t"):
    """A tensor-name prefix of its own for each instance, so no residuals carry over."""
    return f"{kind}{next(_names)}"


def make_model(seed=0, bn=False):
    torch.manual_seed(seed)
    layers = [nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3)]
    if bn:
        layers.insert(1, nn.BatchNorm1d(16))
    return nn.Sequential(*layers)


def batch(step, n=BATCH):
    return _data.batch(step, n)


def shard(t, rank=R, size=N):
    return _data.shard(t, rank, size)


loss_of = _data.loss_of


def flat(tensors):
    if isinstance(tensors, nn.Module):
        tensors = list(tensors.parameters())
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def crc(tensors) -> int:
    return zlib.crc32(flat(tensors).numpy().tobytes())


def identical_across_ranks(tensors) -> bool:
    return len(set(rr.allgather_object(crc(tensors)))) == 1


def local_step(model, opt, step, accumulate=1, clip=None):
    """One optimizer step of `model` on this rank's shard (accumulated over micro-batches)."""
    opt.zero_grad()
    for micro in range(accumulate):
        x, y = batch(100 * step + micro)
        xs, ys = shard(x), shard(y)
        (loss_of(model, xs, ys) / accumulate).backward()
    if clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


# ---------------------------------------------------------------- equivalences
@pytest.mark.parametrize("accumulate", [1, 2])
def test_localsgd_h1_sgd_is_full_batch_sgd(accumulate):
    ref, dist = make_model(seed=7), make_model(seed=R + 7)   # the broadcast makes rank 0's the start
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    inner = torch.optim.SGD(dist.parameters(), lr=0.05)
    opt = rrt.LocalSGD(dist, inner, sync_every=1, name=fresh_name())
    ref_s = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=4, gamma=0.5)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=4, gamma=0.5)
    for step in range(10):
        ref_opt.zero_grad()
        for micro in range(accumulate):
            x, y = batch(100 * step + micro)
            (loss_of(ref, x, y) / accumulate).backward()
        ref_opt.step()
        ref_s.step()
        local_step(dist, opt, step, accumulate)
        sched.step()
        err = (flat(ref) - flat(dist)).abs().max().item()
        assert err <= 1e-5, f"rank {R}: step {step}: {err:g} from full-batch SGD"
        assert identical_across_ranks(dist)
    assert inner.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"] < 0.05
    assert opt.sync_totals.syncs == 10


@pytest.mark.parametrize("H", [1, 3])
def test_diloco_lr1_no_momentum_is_localsgd(H):
    a, b = make_model(), make_model()
    lsgd = rrt.LocalSGD(a, torch.optim.Adam(a.parameters(), lr=1e-2), sync_every=H,
                        name=fresh_name())
    dil = rrt.DiLoCo(b, torch.optim.Adam(b.parameters(), lr=1e-2), sync_every=H, outer_lr=1.0,
                     outer_momentum=0.0, nesterov=False, name=fresh_name())
    for step in range(4 * H + 1):
        local_step(a, lsgd, step)
        local_step(b, dil, step)
        err = (flat(a) - flat(b)).abs().max().item()
        assert err <= 1e-6, f"rank {R}: step {step}: DiLoCo(lr=1) is {err:g} from LocalSGD"
        if (step + 1) % H == 0:
            assert identical_across_ranks(b)
            assert torch.equal(flat(b), flat(dil.global_parameters()))
    assert dil.sync_totals.syncs == lsgd.sync_totals.syncs == (4 * H + 1) // H


def _compressions():
    c = rr.Compression
    return {"none": None, "fp16": c.fp16, "int8": c.int8, "int4": c.int4}


@pytest.mark.parametrize("comp", ["none", "fp16", "int8", "int4"])
@pytest.mark.parametrize("fragments,overlap", [(1, False), (3, False), (2, True)])
def test_global_copy_identical_after_every_sync(comp, fragments, overlap):
    model = make_model(seed=R)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(inner, step_size=5, gamma=0.5)
    opt = rrt.DiLoCo(model, inner, sync_every=4, fragments=fragments, overlap=overlap,
                     compression=_compressions()[comp], name=fresh_name())
    assert identical_across_ranks(model), "the model was not broadcast from rank 0"
    seen = 0
    for step in range(12):
        local_step(model, opt, step, clip=0.5)
        sched.step()
        if opt.sync_totals.syncs != seen:
            seen = opt.sync_totals.syncs
            assert identical_across_ranks(opt.global_parameters()), f"step {step + 1}"
        elif N > 1 and step + 1 == 1:
            assert not identical_across_ranks(model), "inner steps are not local"
    assert seen == 3 * fragments - (1 if overlap else 0)   # the last exchange is still in flight
    assert inner.param_groups[0]["lr"] < 1e-2
    opt.sync()
    assert identical_across_ranks(model)
    assert torch.equal(flat(model), flat(opt.global_parameters()))


def test_buffers_averaged_with_parameters():
    model = make_model(bn=True)
    opt = rrt.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=2,
                       name=fresh_name())
    bn = model[1]
    for step in range(4):
        before = torch.cat([bn.running_mean, bn.running_var]).clone()
        local_step(model, opt, step)
        after = torch.cat([bn.running_mean, bn.running_var])
        if (step + 1) % 2 == 0:
            assert identical_across_ranks([bn.running_mean, bn.running_var])
            assert identical_across_ranks(model)
        elif N > 1:
            assert not identical_across_ranks([after]), "buffers should be local between syncs"
        assert not torch.equal(before, after)


# ---------------------------------------------------------------- stats
def test_sync_stats_bytes():
    model = make_model()
    nbytes = sum(p.numel() * 4 for p in model.parameters())
    plain = rrt.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=2,
                         name=fresh_name())
    for step in range(4):
        local_step(model, plain, step)
    assert plain.last_sync.step == 4 and plain.sync_totals.syncs == 2
    assert plain.last_sync.bytes == round(2 * (N - 1) / N * nbytes)
    assert plain.sync_totals.bytes == 2 * plain.last_sync.bytes
    assert plain.last_sync.seconds > 0
    m2 = make_model()
    comp = rrt.DiLoCo(m2, torch.optim.SGD(m2.parameters(), lr=0.05), sync_every=2,
                      compression=rr.Compression.int8, name=fresh_name())
    for step in range(4):
        local_step(m2, comp, step)
    if N > 1:
        assert 0 < comp.last_sync.bytes < 0.35 * plain.last_sync.bytes, (comp.last_sync, plain.last_sync)
    sd = comp.state_dict()
    assert sd["totals"]["syncs"] == 2 and sd["residuals"]["tensors"], "int8 residuals missing"


# ---------------------------------------------------------------- resume
CONFIGS = {
    "localsgd": lambda m, name: rrt.LocalSGD(m, torch.optim.Adam(m.parameters(), lr=1e-2),
                                             sync_every=4, name=name),
    "localsgd_int8": lambda m, name: rrt.LocalSGD(m, torch.optim.SGD(m.parameters(), lr=0.05,
                                                                     momentum=0.9),
                                                  sync_every=3, compression=rr.Compression.int8,
                                                  name=name),
    "diloco": lambda m, name: rrt.DiLoCo(m, torch.optim.AdamW(m.parameters(), lr=1e-2),
                                         sync_every=4, name=name),
    "diloco_frag_int8_overlap": lambda m, name: rrt.DiLoCo(
        m, torch.optim.AdamW(m.parameters(), lr=1e-2), sync_every=4, fragments=2, overlap=2,
        compression=rr.Compression.int8, name=name),
    "diloco_custom_outer_int4": lambda m, name: rrt.DiLoCo(
        m, torch.optim.Adam(m.parameters(), lr=1e-2), sync_every=4, fragments=4,
        outer_optimizer=functools.partial(torch.optim.Adam, lr=0.1),
        compression=rr.Compression.int4, name=name),
}


@pytest.mark.parametrize("config", list(CONFIGS))
def test_resume_mid_period_is_exact(config, tmp_path_factory):
    steps, cut = 11, 6                 # 6 is mid-period (and mid-exchange with overlap=2)
    a = make_model()
    opt_a = CONFIGS[config](a, fresh_name())
    for step in range(steps):
        local_step(a, opt_a, step)

    name = fresh_name()
    b = make_model()
    opt_b = CONFIGS[config](b, name)
    for step in range(cut):
        local_step(b, opt_b, step)
    path = tmp_path_factory.mktemp(f"r{R}") / "ckpt.pt"
    torch.save({"model": b.state_dict(), "sync": opt_b.state_dict()}, path)
    if config == "diloco_frag_int8_overlap":
        assert opt_b.state_dict()["pending"], "expected an exchange in flight at the cut"

    c = make_model(seed=99)
    opt_c = CONFIGS[config](c, name)
    ckpt = torch.load(path, weights_only=True)          # plain tensors and Python only
    c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["sync"])
    assert opt_c.step_count == cut
    for step in range(cut, steps):
        local_step(c, opt_c, step)
    assert torch.equal(flat(a), flat(c)), f"rank {R}: resumed run differs"
    if hasattr(opt_a, "global_parameters"):
        assert torch.equal(flat(opt_a.global_parameters()), flat(opt_c.global_parameters()))
    assert opt_a.sync_totals.syncs == opt_c.sync_totals.syncs


# ---------------------------------------------------------------- fragments and overlap
@pytest.mark.parametrize("H,F", [(6, 3), (4, 4), (5, 2)])
def test_fragments_each_parameter_synced_once_per_period(H, F):
    model = make_model()
    opt = rrt.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=H,
                     fragments=F, outer_lr=1.0, outer_momentum=0.0, nesterov=False,
                     name=fresh_name())
    params = list(model.parameters())
    frags = opt.fragment_params
    assert len(frags) == F and all(frags)
    assert sorted(i for f in frags for i in f) == list(range(len(params)))
    synced = {i: [] for i in range(len(params))}
    steps = 3 * H
    for step in range(1, steps + 1):
        local_step(model, opt, step)
        rec = opt.last_sync
        if rec is not None and rec.step == step:
            (f,) = rec.fragments
            for i in frags[f]:
                synced[i].append(step)
            mine = [params[i] for i in frags[f]]
            assert identical_across_ranks(mine), f"fragment {f} differs after its sync"
            assert torch.equal(flat(mine), flat([opt.global_parameters()[i] for i in frags[f]]))
            others = [params[i] for g in range(F) if g != f for i in frags[g]]
            if N > 1 and step > 1:
                assert not identical_across_ranks(others), "other fragments should stay local"
    for i, when in synced.items():
        assert len(when) == 3, f"parameter {i} synced at {when}"
        assert 1 <= when[0] <= H and all(b - a == H for a, b in itertools.pairwise(when)), when
    assert opt.sync_totals.syncs == 3 * F


def test_overlap_exchanges_captured_values():
    H, k = 4, 2
    model = make_model()
    inner = torch.optim.SGD(model.parameters(), lr=0.05)
    opt = rrt.DiLoCo(model, inner, sync_every=H, overlap=k, outer_lr=1.0, outer_momentum=0.0,
                     nesterov=False, name=fresh_name())
    captured = None
    for step in range(1, 3 * H + 1):
        x, y = batch(step)
        opt.zero_grad()
        loss_of(model, shard(x), shard(y)).backward()
        inner.step()
        now = flat(model).clone()       # the local values the merge will see
        opt.step(inner=False)           # count the step: start or merge an exchange
        if step % H == 0:               # an exchange starts here, from these values
            assert torch.equal(flat(model), now), "the exchange must not touch the model yet"
            captured = now
        elif step > H and step % H == k:   # ... and is merged k steps later
            caps = rr.allgather_object(captured)
            expected = torch.stack(caps).mean(0)
            glob = flat(opt.global_parameters())
            assert (glob - expected).abs().max().item() <= 1e-6, "global != mean of captured values"
            if N > 1:
                later = torch.stack(rr.allgather_object(now)).mean(0)
                assert (glob - later).abs().max().item() > 1e-4, \
                    "the exchange averaged the current values, not the captured ones"
            # the merge rule: local = global_new + (local now - local captured)
            rule = glob + (now - captured)
            assert (flat(model) - rule).abs().max().item() <= 1e-6
            assert identical_across_ranks(opt.global_parameters())
            assert opt.last_sync.step == step - k
    assert opt.sync_totals.syncs == 2 and len(opt.state_dict()["pending"]) == 1


# ---------------------------------------------------------------- mismatch
@pytest.mark.skipif(N < 2, reason="needs two ranks to disagree")
def test_mismatched_sync_every_is_named():
    model = make_model()
    with pytest.raises(rr.RingReduceError, match="sync_every") as exc:
        rrt.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4 + R,
                     name=fresh_name())
    assert "rank 0: 4" in str(exc.value) and "rank 1: 5" in str(exc.value)


@pytest.mark.skipif(N < 2, reason="needs two ranks to disagree")
def test_mismatched_fragments_is_named():
    model = make_model()
    with pytest.raises(rr.RingReduceError, match="fragments") as exc:
        rrt.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=4,
                   fragments=1 + R % 2, name=fresh_name())
    assert "rank 0: 1" in str(exc.value) and "rank 1: 2" in str(exc.value)
    # Still usable afterwards: the next instance, agreed, works.
    ok = rrt.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=2,
                    name=fresh_name())
    for step in range(2):
        local_step(model, ok, step)
    assert identical_across_ranks(model)


def test_bad_arguments():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(rr.RingReduceError, match="fragments"):
        rrt.DiLoCo(model, sgd, sync_every=2, fragments=3)
    with pytest.raises(ValueError, match="overlap"):
        rrt.DiLoCo(model, sgd, sync_every=2, overlap=3)
    with pytest.raises(TypeError, match="callable"):
        rrt.DiLoCo(model, sgd, sync_every=2, outer_optimizer=torch.optim.SGD(model.parameters(), 0.1))
    with pytest.raises(rr.RingReduceError, match="sync_every"):
        rrt.LocalSGD(model, sgd, sync_every=0)


@pytest.mark.skipif(not hasattr(rr, "wire_stats"), reason="the engine has no rr.wire_stats yet")
@pytest.mark.parametrize("comp", ["int8", "int4"])
def test_sync_bytes_match_engine_wire_stats(comp):
    # Compressed exchanges only: uncompressed ones may go through node-local shared memory
    # (algorithm "shm"), which the engine rightly does not count as wire bytes, while
    # sync_totals counts the ring's volume.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 3))  # ~260 KB: a ring
    opt = rrt.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=2,
                     compression=_compressions()[comp], name=fresh_name())
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(R))
    for step in range(4):
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        before = rr.wire_stats()["total"]["sent"]
        opt.step()
        sent = rr.wire_stats()["total"]["sent"] - before
        if (step + 1) % 2 == 0 and N > 1:
            ours = opt.last_sync.bytes
            assert abs(sent - ours) <= 0.25 * sent, f"rank {R}: engine counted {sent}, DiLoCo {ours}"


@pytest.mark.skipif(N < 2, reason="needs two ranks")
def test_sub_communicator():
    from mpi4py import MPI

    sub = MPI.COMM_WORLD.Split(R % 2, R)     # two data-parallel groups (one rank each at np=2)
    try:
        model = make_model(seed=R)
        opt = rrt.DiLoCo(model, torch.optim.Adam(model.parameters(), lr=1e-2), sync_every=2,
                         compression=rr.Compression.int8, comm=sub, name=fresh_name())
        for step in range(4):
            local_step(model, opt, step)
        mine = crc(opt.global_parameters())
        every = rr.allgather_object((R % 2, mine))
        for color in (0, 1):
            group = {c for g, c in every if g == color}
            assert len(group) <= 1, f"global copies differ inside group {color}: {every}"
        if sub.Get_size() == 1 and N >= 2:
            assert opt.last_sync.bytes == 0
    finally:
        sub.Free()


def test_grad_scaler_with_inner_false():
    """AMP: the scaler may skip the inner step on one rank only; every rank still counts it."""
    model = make_model()
    opt = rrt.DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), sync_every=2,
                     name=fresh_name())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(4):
        x, y = batch(step)
        opt.zero_grad()
        bad = step == 1 and R == 0                 # only rank 0 overflows at step 1
        loss = loss_of(model, shard(x), shard(y)) * (float("inf") if bad else 1.0)
        before = flat(model).clone()
        scaler.scale(loss).backward()
        scaler.step(opt.optimizer)
        scaler.update()
        skipped = torch.equal(before, flat(model))
        opt.step(inner=False)
        if bad:
            assert skipped, "the overflowing inner step was not skipped"
        if (step + 1) % 2 == 0:
            assert identical_across_ranks(model)
    assert opt.step_count == 4 and opt.sync_totals.syncs == 2
