"""DDP, FSDP2 and the compression hook on the "ringreduce" backend (tests/test_backend.py).

Initialised with ``rrt.init_process_group()`` (ranks from MPI, no rendezvous).
DDP is checked against single-process full-batch training of the same model on
every rank, for the flags users set; FSDP2 against DDP; the compression hook for
decreasing loss, identical ranks and an exact checkpoint/resume.
"""
from __future__ import annotations

import copy
import datetime
import types

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import ringreduce as rr
import ringreduce.torch as rrt
from ringreduce.core.mpi import MPI
from ringreduce.torch import backend

rrt.init_process_group(timeout=datetime.timedelta(seconds=120))
R, N = dist.get_rank(), dist.get_world_size()
torch.set_num_threads(1)
PER = 4                                     # samples per rank and step


class Net(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.a = torch.nn.Linear(6, 32)
        self.b = torch.nn.Linear(32, 3)
        self.unused = torch.nn.Linear(32, 3) if unused else None   # never in forward

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


TEACHER = torch.randn(6, 3, generator=torch.Generator().manual_seed(7))


def batch(step: int, n: int, micro: int = 0):
    """A fresh global batch of a learnable task (a fixed linear teacher, plus noise)."""
    g = torch.Generator().manual_seed(1000 + 10 * step + micro)
    x = torch.randn(n, 6, generator=g)
    return x, x @ TEACHER + 0.01 * torch.randn(n, 3, generator=g)


def mine(t):
    return t[R * PER:(R + 1) * PER]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()


def make_opt(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, lr=0.1, momentum=0.9)
    return torch.optim.Adam(params, lr=0.01)


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_everywhere(t: torch.Tensor) -> None:
    every = MPI.COMM_WORLD.allgather(t.contiguous().view(torch.uint8).numpy().tobytes())
    assert all(e == every[0] for e in every), f"rank {R}: parameters differ across ranks"


CONFIGS = {
    "plain": {},
    "find_unused_parameters": {"find_unused_parameters": True},
    "static_graph": {"static_graph": True},
    "gradient_as_bucket_view": {"gradient_as_bucket_view": True},
    "small_buckets": {"bucket_cap_mb": 0.001},
    "no_sync": {},
}


@pytest.mark.parametrize("opt_kind", ["sgd", "adam"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_ddp_matches_full_batch_training(config, opt_kind):
    torch.manual_seed(0)
    ref = Net(unused=config == "find_unused_parameters")
    model = copy.deepcopy(ref)
    ddp = DDP(model, **CONFIGS[config])
    opt, ropt = make_opt(opt_kind, ddp.parameters()), make_opt(opt_kind, ref.parameters())
    micros = 2 if config == "no_sync" else 1
    for step in range(4):
        for m in range(micros):
            x, y = batch(step, PER * N, m)
            if m < micros - 1:
                with ddp.no_sync():
                    loss_of(ddp, mine(x), mine(y)).backward()
            else:
                loss_of(ddp, mine(x), mine(y)).backward()
            loss_of(ref, x, y).backward()
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
    torch.testing.assert_close(flat(model), flat(ref), rtol=0, atol=1e-5)
    same_everywhere(flat(model))


def test_fsdp2_matches_ddp():
    fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard
    torch.manual_seed(0)
    base = Net()
    ddp_model = copy.deepcopy(base)
    ddp = DDP(ddp_model)
    sharded = copy.deepcopy(base)
    fully_shard(sharded.a)
    fully_shard(sharded.b)
    fully_shard(sharded)
    opt_d, opt_s = make_opt("adam", ddp.parameters()), make_opt("adam", sharded.parameters())
    for step in range(5):
        x, y = batch(step, PER * N)
        ld, ls = loss_of(ddp, mine(x), mine(y)), loss_of(sharded, mine(x), mine(y))
        ld.backward()
        ls.backward()
        opt_d.step()
        opt_s.step()
        opt_d.zero_grad()
        opt_s.zero_grad()
        assert abs(ld.item() - ls.item()) <= 1e-4, (step, ld.item(), ls.item())
    full = torch.cat([v.full_tensor().reshape(-1) for v in sharded.state_dict().values()])
    want = torch.cat([v.reshape(-1) for v in ddp_model.state_dict().values()])
    torch.testing.assert_close(full, want, rtol=0, atol=1e-4)


def train_with_hook(state, steps, model=None, opt=None, start=0):
    torch.manual_seed(0)
    model = model or Net()
    ddp = DDP(model, bucket_cap_mb=0.002)        # several buckets
    ddp.register_comm_hook(state, rrt.compression_hook)
    opt = opt or torch.optim.SGD(ddp.parameters(), lr=0.02, momentum=0.5)
    losses = []
    for step in range(start, start + steps):
        x, y = batch(step, PER * N)
        loss = loss_of(ddp, mine(x), mine(y))
        loss.backward()
        opt.step()
        opt.zero_grad()
        full = loss_of(model, x, y).item()
        losses.append(full)
    return model, opt, losses


@pytest.mark.parametrize("fmt", ["int8", "onebit", "fp16", "bf16", "int4"])
def test_compression_hook_trains_and_ranks_agree(fmt):
    state = rrt.HookState(compression=getattr(rr.Compression, fmt), warmup_steps=2,
                          prefix=f"hook.{fmt}.")
    model, _, losses = train_with_hook(state, 25)
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5]), losses
    same_everywhere(flat(model))
    assert state.step == 25
    names = state.state_dict()["residuals"]["tensors"]
    assert len(names) >= 1 and all(n.startswith(f"hook.{fmt}.") for n in names), names


def test_compression_hook_with_auto():
    # the test model is small: let auto consider its one bucket (323 elements)
    state = rrt.HookState(compression=rr.Compression.auto(min_elements=0), prefix="hook.auto.")
    assert state.compression.one_dim
    model, _, losses = train_with_hook(state, 12)
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    same_everywhere(flat(model))
    report = rr.compression_state().auto_report()
    assert any(name.startswith("hook.auto.") for name in report), report


def test_compression_hook_warmup_is_uncompressed():
    # During the warm-up, the hook is exactly DDP's own averaging.
    torch.manual_seed(0)
    plain = Net()
    hooked = copy.deepcopy(plain)
    ddp_p, ddp_h = DDP(plain), DDP(hooked)
    ddp_h.register_comm_hook(rrt.HookState(rr.Compression.onebit, warmup_steps=3, prefix="warm."),
                             rrt.compression_hook)
    for step in range(3):
        x, y = batch(step, PER * N)
        loss_of(ddp_p, mine(x), mine(y)).backward()
        loss_of(ddp_h, mine(x), mine(y)).backward()
        for a, b in zip(plain.parameters(), hooked.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
        plain.zero_grad()
        hooked.zero_grad()


def test_compression_hook_checkpoint_resume_is_exact():
    state = rrt.HookState(rr.Compression.int8, warmup_steps=1, prefix="ckpt.")
    model, opt, _ = train_with_hook(state, 6)
    saved = {"model": copy.deepcopy(model.state_dict()), "opt": copy.deepcopy(opt.state_dict()),
             "hook": copy.deepcopy(state.state_dict())}
    _, _, later = train_with_hook(state, 4, model, opt, start=6)
    after = flat(model).clone()

    torch.manual_seed(0)
    model2 = Net()
    model2.load_state_dict(saved["model"])
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.02, momentum=0.5)
    opt2.load_state_dict(saved["opt"])
    state2 = rrt.HookState(rr.Compression.int8, warmup_steps=1, prefix="ckpt.")
    state2.load_state_dict(saved["hook"])
    _, _, again = train_with_hook(state2, 4, model2, opt2, start=6)
    assert again == later
    assert torch.equal(flat(model2), after)


def test_hook_state_rejects_bad_settings():
    with pytest.raises(rr.RingReduceError, match="warmup_steps"):
        rrt.HookState(rr.Compression.int8, warmup_steps=-1)
    with pytest.raises(rr.RingReduceError, match="HookState"):
        rrt.HookState().load_state_dict({"version": 99})


def test_bucket_size_mismatch_is_a_named_error():
    if N == 1:
        return
    # One rank's model has an extra parameter: DDP's own verification, on our backend, says so.
    model = Net(unused=R == N - 1)
    with pytest.raises(RuntimeError, match="params|[Pp]arameter|shape"):
        DDP(model)
    dist.barrier()


def test_torch_ranks_must_be_mpi_ranks():
    # What torchrun would do: torch says 2 ranks, MPI (each process its own world) says 1.
    opts = types.SimpleNamespace(group_size=N + 1, group_rank=0, global_ranks_in_group=[],
                                 timeout=datetime.timedelta(seconds=60))
    with pytest.raises(rr.RingReduceError, match="MPI's"):
        backend._create(opts, None)


def test_timeout_maps_onto_ringreduce():
    from ringreduce.runtime.context import RUNTIME
    assert RUNTIME.supervisor.timeout == 120     # init_process_group(timeout=120 s) above
