#!/usr/bin/env python
"""A plain torch DDP training script on the "ringreduce" backend.

Written as a DDP user writes it; the lines marked ``ringreduce`` are the whole
switch: the backend (MPI, our algorithms and mismatch check instead of gloo) and,
optionally, the compression hook on DDP's gradient buckets. Synthetic data, so it
runs anywhere::

    mpirun -np 2 python scripts/examples/ddp_ringreduce.py
    mpirun -np 2 python scripts/examples/ddp_ringreduce.py --hook onebit --warmup 20
    mpirun -np 2 python scripts/examples/ddp_ringreduce.py --fsdp
"""
from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import ringreduce as rr
import ringreduce.torch as rrt     # ringreduce: registers the backend


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--hook", choices=["none", "fp16", "bf16", "int8", "int4", "onebit"],
                   default="none")
    p.add_argument("--warmup", type=int, default=0, help="uncompressed steps before the hook compresses")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP2 instead of DDP")
    args = p.parse_args()

    rrt.init_process_group()          # ringreduce: was dist.init_process_group("gloo") + MASTER_ADDR
    rank, size = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    else:
        model = DDP(model)
        if args.hook != "none":       # ringreduce: compressed buckets with error feedback
            state = rrt.HookState(compression=getattr(rr.Compression, args.hook),
                                  warmup_steps=args.warmup)
            model.register_comm_hook(state, rrt.compression_hook)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    teacher = torch.randn(32, 10, generator=torch.Generator().manual_seed(1))
    for step in range(args.steps):
        g = torch.Generator().manual_seed(step * size + rank)      # this rank's shard
        x = torch.randn(64, 32, generator=g)
        loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and step % 20 == 0:
            print(f"step {step} loss {loss.item():.4f}", flush=True)
    total = torch.tensor([loss.item()])
    dist.all_reduce(total, op=dist.ReduceOp.AVG)
    if rank == 0:
        print(f"final loss {total.item():.4f} (mean over {size} ranks)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
