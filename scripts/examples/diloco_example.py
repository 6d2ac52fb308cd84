#!/usr/bin/env python
"""DiLoCo with ringreduce: a small regression model trained on every rank's own data.

Every rank takes AdamW inner steps on its own shard; every 8 steps the ranks
average the parameter change (int8, error feedback) and take an outer
Nesterov step on the shared global copy. Each of the 2 fragments syncs at its
own step, behind one inner step (overlap). A checkpoint is written mid-period
and reloaded (each rank its own file) to show that resuming is exact.

    mpirun -np 2 python scripts/examples/diloco_example.py
    mpirun -np 4 --oversubscribe python scripts/examples/diloco_example.py --local-sgd
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch import nn

import ringreduce as rr
import ringreduce.torch as rrt


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))


def batch(rank, step, n=32):
    g = torch.Generator().manual_seed(1000 * rank + step)   # every rank its own data
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :4].sum(1, keepdim=True) - x[:, 4:8].prod(1, keepdim=True)).tanh()


def make(model, args):
    inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    if args.local_sgd:
        return rrt.LocalSGD(model, inner, sync_every=args.sync_every), inner
    return rrt.DiLoCo(model, inner, sync_every=args.sync_every, fragments=2, overlap=True,
                      compression=rr.Compression.int8), inner


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sync-every", type=int, default=8)
    p.add_argument("--local-sgd", action="store_true", help="LocalSGD instead of DiLoCo")
    args = p.parse_args()
    rr.init()
    rank = rr.rank()
    torch.set_num_threads(1)

    model = make_model()
    opt, inner = make(model, args)            # broadcasts rank 0's model
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=args.steps)
    ckdir = Path(tempfile.mkdtemp(prefix="diloco-example-"))
    cut = args.steps // 2 + 3                 # mid-period on purpose
    for step in range(args.steps):
        x, y = batch(rank, step)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step + 1 == cut:                   # each rank saves its own state
            torch.save({"model": model.state_dict(), "sync": opt.state_dict(),
                        "sched": sched.state_dict()}, ckdir / f"rank{rank}.pt")
            model = make_model()              # throw everything away and reload
            opt, inner = make(model, args)
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=args.steps)
            ck = torch.load(ckdir / f"rank{rank}.pt", weights_only=True)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["sync"])
            sched.load_state_dict(ck["sched"])
    opt.sync()                                # every rank ends on the global model
    x, y = batch(12345, 0, n=1024)
    loss = nn.functional.mse_loss(model(x), y).item()
    sums = rr.allgather_object(float(sum(p.detach().double().sum() for p in model.parameters())))
    if rank == 0:
        t = opt.sync_totals
        print(f"{type(opt).__name__}: {rr.size()} ranks, {args.steps} steps, H={args.sync_every}: "
              f"held-out loss {loss:.4f}, {t.syncs} syncs, {t.bytes / 2**20:.3f} MiB sent per rank, "
              f"{t.seconds:.3f} s blocked; ranks identical: {len(set(sums)) == 1}")


if __name__ == "__main__":
    main()
