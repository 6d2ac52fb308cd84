#!/usr/bin/env python
"""Train a small GPT-style byte-level language model with ringreduce (the main job).

The corpus is the Python standard library's own source, so it exists offline on
every machine. Files are split into train/validation by a hash of their path;
each rank reads its own shard of the training files. Runs under
``mpirun -np N python scripts/train.py``, with N=1, or without mpirun.

Example::

    mpirun -np 2 python scripts/train.py                      # tiny default run
    mpirun -np 2 python scripts/train.py --model-size large --steps 30 --compare-ddp
    mpirun -np 2 python scripts/train.py --compression int8 --plot loss.png
    mpirun -np 2 python scripts/train.py --sync diloco --sync-every 8 --compression int8
    mpirun -np 2 python scripts/train.py --ddp-backend ringreduce --ddp-hook int8 --compare-ddp
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
import zlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ringreduce as rr
import ringreduce.torch as rrt
from mpi4py import MPI  # after ringreduce, which sets MPI's thread level
from ringreduce.torch.gloo import init_gloo

PRESETS = {
    # ~0.4 M parameters: the README run, converges visibly within a minute on 2 CPU cores.
    "tiny": dict(n_layer=3, n_head=4, n_embd=96, block=64),
    # ~10.8 M parameters: communication matters.
    "large": dict(n_layer=6, n_head=6, n_embd=384, block=128),
}
COMPRESSIONS = ["none", "auto", "fp16", "bf16", "int8", "int4", "onebit"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (total, when resuming)")
    p.add_argument("--batch-size", type=int, default=16, help="sequences per rank per backward pass")
    p.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 3e-3 for adamw, 0.3 for sgd)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model-size", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--compression", choices=COMPRESSIONS, default="none",
                   help="gradient compression; auto picks per bucket from what it measures "
                        "(docs/compression.md)")
    p.add_argument("--compression-warmup", type=int, default=0, metavar="STEPS",
                   help="train this many steps uncompressed, then switch to --compression "
                        "(the 1-bit Adam recipe; every rank switches at the same step)")
    p.add_argument("--freeze-variance", action="store_true",
                   help="adamw: keep Adam's second moment fixed once compression starts "
                        "(as 1-bit Adam does), so compressed gradients do not distort it")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                   help="AdamW (weight decay 0.01) or SGD with Nesterov momentum 0.9")
    p.add_argument("--algorithm", default="auto",
                   help="auto, ring, tree, mpi, shm or hierarchical")
    p.add_argument("--backward-passes-per-step", type=int, default=1)
    p.add_argument("--overlap", choices=["auto", "on", "off"], default="auto",
                   help="launch gradient buckets during backward (on) or when it ends (off); "
                        "auto: off when the ranks already fill every CPU core")
    p.add_argument("--checkpoint", metavar="PATH", help="save model+optimizer+residuals at the end")
    p.add_argument("--resume", metavar="PATH", help="resume from a --checkpoint file (same ranks)")
    p.add_argument("--compare-ddp", action="store_true",
                   help="also train with torch DDP (gloo) and print the throughput ratio")
    p.add_argument("--ddp-backend", choices=["ringreduce", "gloo"], default=None,
                   help="the main run is torch DDP on this process-group backend instead of "
                        "rrt.DistributedOptimizer")
    p.add_argument("--ddp-hook", choices=COMPRESSIONS, default="none",
                   help="with --ddp-backend: DDP's buckets through ringreduce's compression hook "
                        "(--compression-warmup sets its uncompressed warm-up steps)")
    p.add_argument("--plot", metavar="PATH", help="write loss curves (PNG)")
    p.add_argument("--save-losses", metavar="PATH",
                   help="write this run's loss curve as JSON (for --plot-with)")
    p.add_argument("--plot-with", metavar="JSON", nargs="*", default=[],
                   help="earlier --save-losses files to draw in the --plot too")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches (all ranks)")
    p.add_argument("--data-bytes", type=int, default=4_000_000,
                   help="bytes of stdlib source to read (train, over all ranks)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument("--sync", choices=["step", "local-sgd", "diloco"], default="step",
                   help="step: average gradients every step (DistributedOptimizer); local-sgd: "
                        "average parameters every --sync-every steps; diloco: an outer Nesterov "
                        "step on the averaged parameter change every --sync-every steps "
                        "(--compression then compresses what is synchronised)")
    p.add_argument("--sync-every", type=int, default=8, metavar="H",
                   help="local-sgd/diloco: optimizer steps between synchronisations")
    p.add_argument("--outer-lr", type=float, default=0.7, help="diloco: outer learning rate")
    p.add_argument("--outer-momentum", type=float, default=0.9,
                   help="diloco: outer Nesterov momentum (0: plain outer SGD)")
    p.add_argument("--fragments", type=int, default=1, metavar="F",
                   help="diloco: sync the parameters in F fragments at staggered steps")
    p.add_argument("--overlap-sync", type=int, nargs="?", const=1, default=0, metavar="K",
                   help="diloco: run each fragment's exchange behind the next K inner steps "
                        "(default K=1; unrelated to --overlap, the per-step bucket launch)")
    return p.parse_args(argv)


# ---------------------------------------------------------------- data
def stdlib_files():
    """The stdlib's .py files in a fixed pseudo-random order (by a hash of the path)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py")
             if "site-packages" not in f.parts and "dist-packages" not in f.parts]
    rel = sorted(str(f.relative_to(root)) for f in files)
    rel.sort(key=lambda r: zlib.crc32(r.encode()))
    return root, rel


def read_stream(root, rels, limit):
    chunks, total = [], 0
    for r in rels:
        if total >= limit:
            break
        try:
            b = (root / r).read_bytes()
        except OSError:
            continue
        chunks.append(b + b"\n\n")
        total += len(b) + 2
    data = np.frombuffer(b"".join(chunks)[:limit], dtype=np.uint8)
    return torch.from_numpy(data.astype(np.int64))


def load_data(args, rank, size):
    root, rels = stdlib_files()
    val = [r for r in rels if zlib.crc32(r.encode()) % 20 == 0]
    train = [r for r in rels if zlib.crc32(r.encode()) % 20 != 0]
    mine = train[rank::size]  # this rank's shard: only its own files are read
    shard = read_stream(root, mine, max(args.data_bytes // size, 10_000))
    valid = read_stream(root, val, max(args.data_bytes // 10, 10_000))
    return shard, valid


def get_batch(stream, rng, batch, block):
    ix = rng.integers(0, len(stream) - block - 1, size=batch)
    x = torch.stack([stream[i:i + block] for i in ix])
    y = torch.stack([stream[i + 1:i + block + 1] for i in ix])
    return x, y


# ---------------------------------------------------------------- model
class Block(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln1 = nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.ln2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(), nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, c))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, n_layer, n_head, n_embd, block, vocab=256):
        super().__init__()
        self.block = block
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx, targets):
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        logits = self.head(self.ln(self.blocks(x)))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


def make_model(args):
    torch.manual_seed(args.seed)
    return GPT(**PRESETS[args.model_size])


def make_optimizer(model, args):
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)


class FrozenVariance:
    """Hold Adam's second moment (exp_avg_sq) at its value from the step compression starts.

    Sign (onebit) compression keeps a block's mean magnitude but not each
    element's, so Adam's per-element variance estimate drifts; 1-bit Adam
    freezes it after an uncompressed warm-up. Restored after every step, so a
    step sees the frozen value plus one step's (1 - beta2) share of the new one.
    """

    def __init__(self, opt, start):
        self.opt, self.start, self.saved = opt, start, None

    def after_step(self, step):
        if step + 1 < self.start:
            return
        states = [self.opt.state[p] for g in self.opt.param_groups for p in g["params"]
                  if "exp_avg_sq" in self.opt.state.get(p, {})]
        if self.saved is None:
            self.saved = [st["exp_avg_sq"].clone() for st in states]
            return
        for st, v in zip(states, self.saved):
            st["exp_avg_sq"].copy_(v)


def make_schedule(opt, steps):
    warm = max(1, steps // 10)

    def factor(s):
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def evaluate(model, valid, args, rank, size, reduce_sum):
    """Mean validation loss over a fixed set of windows, split over the ranks."""
    model.eval()
    block = PRESETS[args.model_size]["block"]
    rng = np.random.default_rng(args.seed + 12345)
    total, count = 0.0, 0
    for j in range(args.eval_batches):
        x, y = get_batch(valid, rng, args.batch_size, block)  # every rank draws all: same windows
        if j % size == rank:
            total += model(x, y).item()
            count += 1
    model.train()
    total, count = reduce_sum([total, float(count)])
    return total / max(count, 1.0)


def checksum(model):
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    return f"{zlib.crc32(flat.numpy().tobytes()):08x}"


def bar(args, rank, total, initial=0):
    if rank != 0 or args.no_progress:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, dynamic_ncols=True, file=sys.stderr)


# ---------------------------------------------------------------- ringreduce run
def compression_of(name):
    if name == "none":
        return None
    comp = getattr(rr, "Compression", None)
    if comp is None or not hasattr(comp, name):
        raise rr.RingReduceError(f"rank {rr.rank()}: compression {name!r} is not available in "
                                 "this build of ringreduce")
    return getattr(comp, name)


def make_sync(model, args, target):
    """--sync local-sgd / diloco: the periodic synchroniser around the inner optimizer."""
    inner = make_optimizer(model, args)
    if args.sync == "local-sgd":
        return rrt.LocalSGD(model, inner, sync_every=args.sync_every, compression=target)
    return rrt.DiLoCo(model, inner, sync_every=args.sync_every, outer_lr=args.outer_lr,
                      outer_momentum=args.outer_momentum, nesterov=args.outer_momentum > 0,
                      compression=target, fragments=args.fragments, overlap=args.overlap_sync)


class WireMeter:
    """Bytes this rank sent through ringreduce since start(): rr.wire_stats() where the engine
    has it, else the synchroniser's own count (local-sgd/diloco) or, for per-step sync, the
    ring's 2(n-1)/n x the gradient bytes per step divided by the compression ratio."""

    def __init__(self, sync, grad_bytes, size):
        self.sync, self.grad_bytes, self.size = sync, grad_bytes, size
        self.exact = hasattr(rr, "wire_stats")
        self.steps, self.base = 0, 0.0

    def _raw(self):
        if self.exact:
            return float(rr.wire_stats()["total"]["sent"])
        if self.sync is not None:
            return float(self.sync.sync_totals.bytes)
        st = rr.last_stats() if hasattr(rr, "last_stats") else None
        ratio = st.ratio if st is not None and st.ratio else 1.0
        return 2.0 * (self.size - 1) / self.size * self.grad_bytes / ratio * self.steps

    def start(self):
        self.base = self._raw()

    def step(self):
        self.steps += 1

    def sent(self):
        return self._raw() - self.base


def train_ringreduce(args, shard, valid, rank, size):
    preset = PRESETS[args.model_size]
    model = make_model(args)
    nparams = sum(p.numel() for p in model.parameters())
    target = compression_of(args.compression)
    warm = args.compression_warmup if target is not None else 0
    sync = None
    if args.sync != "diloco" and (args.fragments != 1 or args.overlap_sync):
        raise SystemExit("--fragments and --overlap-sync apply to --sync diloco only")
    if args.sync != "step":
        if warm > 0:
            raise SystemExit("--compression-warmup applies to --sync step only")
        sync = make_sync(model, args, target)   # broadcasts rank 0's model and state
        opt = sync
        inner = sync.optimizer
    else:
        opt = inner = make_optimizer(model, args)
        opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=None if warm > 0 else target,
                                       algorithm=args.algorithm,
                                       overlap={"on": True, "off": False}.get(args.overlap, "auto"),
                                       backward_passes_per_step=args.backward_passes_per_step)
        inner = opt
    sched = make_schedule(inner, args.steps)
    rng = np.random.default_rng([args.seed, rank])
    start = 0
    if args.resume:
        start = resume(args, model, opt, sched, rank, size, sync)
        rng.bit_generator.state = STATE["rng"]
    if sync is None:   # local modes broadcast at construction; after a resume ranks differ
        rrt.broadcast_parameters(model.state_dict(), root_rank=0)
        rrt.broadcast_optimizer_state(opt, root_rank=0)

    def reduce_sum(vals):
        t = rrt.allreduce(torch.tensor(vals, dtype=torch.float64), op=rr.Sum, name="eval")
        return t.tolist()

    if rank == 0:
        after = f" after {warm} uncompressed steps" if warm else ""
        how = {"step": "per-step sync", "local-sgd": f"local-sgd every {args.sync_every} steps",
               "diloco": f"diloco every {args.sync_every} steps (outer lr {args.outer_lr}, "
                         f"momentum {args.outer_momentum}, {args.fragments} fragment(s), "
                         f"overlap {args.overlap_sync})"}[args.sync]
        print(f"ringreduce: {size} rank(s), model {args.model_size} ({nparams / 1e6:.2f} M params), "
              f"{how}, compression {args.compression}{after}, "
              f"optimizer {args.optimizer}, algorithm {args.algorithm}, "
              f"{len(shard)} train bytes on rank 0, {len(valid)} validation bytes", flush=True)
    init_loss = evaluate(model, valid, args, rank, size, reduce_sum)
    if rank == 0:
        print(f"initial loss {init_loss:.4f}", flush=True)
    k = args.backward_passes_per_step
    per_step = args.batch_size * k * size
    losses, timed_from, busy = [], min(2, max(args.steps - start - 1, 0)), 0.0
    step_times = []   # (step, seconds) of the timed steps: throughput after a warm-up too
    frozen = FrozenVariance(inner, warm) if args.freeze_variance and target is not None else None
    wire = WireMeter(sync, sum(p.numel() * p.element_size() for p in model.parameters()), size)
    wire.start()
    wire_curve = []   # (step, bytes sent so far): loss vs wire bytes
    pb = bar(args, rank, args.steps, start)
    for step in range(start, args.steps):
        yield  # --compare-ddp interleaves the two frameworks step by step
        t_step = time.perf_counter()
        if warm > 0:  # same step on every rank: the buckets' collectives must agree
            opt.set_compression(None if step < warm else target)
        opt.zero_grad(set_to_none=True)
        loss_val = 0.0
        for _ in range(k):
            x, y = get_batch(shard, rng, args.batch_size, preset["block"])
            loss = model(x, y) / k
            loss.backward()
            loss_val += loss.item()
        opt.step()
        wire.step()
        if frozen is not None:
            frozen.after_step(step)
        sched.step()
        losses.append((step + 1, loss_val))
        wire_curve.append((step + 1, wire.sent()))
        done = step - start + 1 - timed_from
        if done > 0:  # the first steps (allocation, layouts) are not timed
            dt = time.perf_counter() - t_step
            busy += dt
            step_times.append((step, dt))
        if pb is not None:
            sps = per_step * done / busy if done > 0 else 0.0
            pb.set_postfix(loss=f"{loss_val:.3f}", samples_s=f"{sps:.0f}")
            pb.update(1)
    if sync is not None and start < args.steps:
        t_sync = time.perf_counter()
        sync.sync()   # fragments not synced at the last step: every rank ends on the global model
        busy += time.perf_counter() - t_sync
    wire_sent = wire.sent()
    elapsed = busy
    if pb is not None:
        pb.close()
    timed_steps = args.steps - start - timed_from
    sps = per_step * timed_steps / elapsed if timed_steps > 0 else float("nan")
    final = evaluate(model, valid, args, rank, size, reduce_sum)

    auto = None
    if args.compression == "auto" and rank == 0:
        print(rr.compression_state().auto_summary(), flush=True)
        auto = {name: {"history": r["history"], "format": r["format"], "calls": r["calls"]}
                for name, r in rr.compression_state().auto_report().items()}
    mine = checksum(model)
    every = rr.allgather_object(mine)
    print(f"rank {rank} checksum {mine}", flush=True)
    if len(set(every)) != 1:
        raise rr.RingReduceError(f"rank {rank}: parameters differ across ranks: {every}")
    if args.checkpoint:
        save_checkpoint(args, model, opt, sched, rng, rank, size, sync)
    return dict(init=init_loss, final=final, sps=sps, losses=losses, nparams=nparams,
                checksum=mine, step_times=step_times, per_step=per_step, wire=wire_curve,
                wire_sent=wire_sent, wire_exact=wire.exact,
                sync_totals=None if sync is None else sync.sync_totals.as_dict(), auto=auto)


STATE = {}


def save_checkpoint(args, model, opt, sched, rng, rank, size, sync=None):
    """Model and optimizer from rank 0, every rank's residuals and data-RNG state.

    local-sgd/diloco: every rank's model and synchroniser state (they differ between syncs).
    """
    if sync is not None:
        gathered = rr.allgather_object((model.state_dict(), sync.state_dict(),
                                        rng.bit_generator.state))
        if rank == 0:
            ckpt = {"step": args.steps, "size": size, "sync": args.sync,
                    "local": [(m, s) for m, s, _ in gathered], "scheduler": sched.state_dict(),
                    "rng": [r for _, _, r in gathered], "model_size": args.model_size}
            tmp = args.checkpoint + ".tmp"
            torch.save(ckpt, tmp)
            os.replace(tmp, args.checkpoint)
            print(f"checkpoint written to {args.checkpoint}", flush=True)
        return
    sd = opt.state_dict()
    extra = sd.pop("ringreduce", None)
    residuals = extra["compression_state"] if extra else {}
    gathered = rr.allgather_object((residuals, rng.bit_generator.state))
    if rank == 0:
        merged = {}
        for res, _ in gathered:
            merged.update(res)
        ckpt = {"step": args.steps, "size": size, "model": model.state_dict(), "optimizer": sd,
                "ringreduce": {"size": size, "compression_state": merged},
                "scheduler": sched.state_dict(), "rng": [s for _, s in gathered],
                "model_size": args.model_size}
        tmp = args.checkpoint + ".tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, args.checkpoint)
        print(f"checkpoint written to {args.checkpoint}", flush=True)


def resume(args, model, opt, sched, rank, size, sync=None):
    ckpt = None
    if rank == 0:
        ckpt = torch.load(args.resume, map_location="cpu", weights_only=False)
    ckpt = rr.broadcast_object(ckpt, root_rank=0)
    if ckpt["size"] != size:
        raise rr.RingReduceError(f"rank {rank}: checkpoint {args.resume} was written by "
                                 f"{ckpt['size']} ranks; resume with mpirun -np {ckpt['size']}")
    if ckpt["model_size"] != args.model_size:
        raise rr.RingReduceError(f"rank {rank}: checkpoint holds a {ckpt['model_size']!r} model")
    if ckpt.get("sync", "step") != args.sync:
        raise rr.RingReduceError(f"rank {rank}: checkpoint {args.resume} was written with --sync "
                                 f"{ckpt.get('sync', 'step')}, not {args.sync}")
    if sync is not None:
        model_sd, sync_sd = ckpt["local"][rank]     # the local modes: each rank its own state
        model.load_state_dict(model_sd)
        sync.load_state_dict(sync_sd)
    else:
        model.load_state_dict(ckpt["model"])
        sd = dict(ckpt["optimizer"])
        sd["ringreduce"] = ckpt["ringreduce"]  # each rank restores its own residuals
        opt.load_state_dict(sd)
    sched.load_state_dict(ckpt["scheduler"])
    STATE["rng"] = ckpt["rng"][rank]
    if rank == 0:
        print(f"resumed from step {ckpt['step']}", flush=True)
    return ckpt["step"]


# ---------------------------------------------------------------- torch DDP runs
def init_torch_distributed(args):
    """One torch.distributed default group for the DDP runs; returns (main group, gloo group).

    With --ddp-backend ringreduce the default group is ringreduce's and the gloo peer
    gets its own group over the same ranks (one shared tcp:// store for both).
    """
    import torch.distributed as dist

    backend = args.ddp_backend or "gloo"
    init_gloo(MPI.COMM_WORLD, os.environ.get("MASTER_ADDR"), backend=backend)
    gloo = dist.new_group(backend="gloo") if backend != "gloo" else None
    return None, gloo


def finish_torch_distributed():
    import gc

    import torch.distributed as dist

    dist.barrier()
    # The DDP models are gone by now: destroying the group under a live Reducer can deadlock.
    gc.collect()
    dist.destroy_process_group()


def train_ddp(args, shard, valid, rank, size, group=None, hook=None, main=False):
    """Step-by-step DDP training (a generator, like train_ringreduce) on `group`.

    main=True: this is the job's main run (--ddp-backend): progress bar, evaluation
    before and after, the checksum across ranks, and the wire bytes ringreduce moved.
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    preset = PRESETS[args.model_size]
    model = DDP(make_model(args), process_group=group)
    state = None
    if hook is not None:
        warm = args.compression_warmup
        state = rrt.HookState(compression=hook, warmup_steps=warm, process_group=group)
        model.register_comm_hook(state, rrt.compression_hook)
    opt = make_optimizer(model, args)
    sched = make_schedule(opt, args.steps)
    rng = np.random.default_rng([args.seed, rank])
    k = args.backward_passes_per_step
    per_step = args.batch_size * k * size

    def reduce_sum(vals):
        t = torch.tensor(vals, dtype=torch.float64)
        dist.all_reduce(t, group=group)
        return t.tolist()

    init_loss = None
    if main:
        nparams = sum(p.numel() for p in model.parameters())
        if rank == 0:
            print(f"torch DDP on {args.ddp_backend}: {size} rank(s), model {args.model_size} "
                  f"({nparams / 1e6:.2f} M params), comm hook {args.ddp_hook}"
                  + (f" after {args.compression_warmup} uncompressed steps"
                     if hook is not None and args.compression_warmup else "")
                  + f", optimizer {args.optimizer}", flush=True)
        init_loss = evaluate(model.module, valid, args, rank, size, reduce_sum)
        if rank == 0:
            print(f"initial loss {init_loss:.4f}", flush=True)
    wire = WireMeter(None, 0, size) if main else None
    if wire is not None:
        wire.start()
    wire_curve = []
    losses, timed_from, busy = [], min(2, max(args.steps - 1, 0)), 0.0
    step_times = []
    pb = bar(args, rank, args.steps) if main or not args.compare_ddp else None
    for step in range(args.steps):
        yield
        t_step = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_val = 0.0
        for micro in range(k):
            x, y = get_batch(shard, rng, args.batch_size, preset["block"])
            ctx = model.no_sync() if micro < k - 1 else _null()
            with ctx:
                loss = model(x, y) / k
                loss.backward()
            loss_val += loss.item()
        opt.step()
        sched.step()
        losses.append((step + 1, loss_val))
        if wire is not None:
            wire_curve.append((step + 1, wire.sent()))
        if step >= timed_from:
            dt = time.perf_counter() - t_step
            busy += dt
            step_times.append((step, dt))
        if pb is not None:
            pb.set_postfix(loss=f"{loss_val:.3f}", ddp=args.ddp_backend or "gloo")
            pb.update(1)
    if pb is not None:
        pb.close()
    sps = per_step * (args.steps - timed_from) / busy
    final = evaluate(model.module, valid, args, rank, size, reduce_sum)
    res = dict(final=final, sps=sps, losses=losses, step_times=step_times, per_step=per_step)
    if main:
        mine = checksum(model.module)
        every = rr.allgather_object(mine)
        print(f"rank {rank} checksum {mine}", flush=True)
        if len(set(every)) != 1:
            raise rr.RingReduceError(f"rank {rank}: parameters differ across ranks: {every}")
        # gloo's own traffic is not counted: only what ringreduce moved (the hook's buckets)
        res.update(init=init_loss, checksum=mine, wire=wire_curve, wire_sent=wire.sent(),
                   wire_exact=wire.exact and (args.ddp_backend == "ringreduce" or hook is not None),
                   sync_totals=None, nparams=sum(p.numel() for p in model.parameters()))
    return res


def sps_from(res, first_step):
    """Samples/s over the timed steps from first_step on (nan if none)."""
    dts = [dt for step, dt in res["step_times"] if step >= first_step]
    return res["per_step"] * len(dts) / sum(dts) if dts else float("nan")


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def run_to_end(gen):
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def interleave(a, b):
    """Run two step-by-step trainings alternately (A B, B A, ...): both see the same machine load.

    Each times only its own steps, so the throughput ratio compares like with like.
    """
    gens, results, i = [a, b], [None, None], 0
    while any(r is None for r in results):
        order = (0, 1) if i % 2 == 0 else (1, 0)
        for j in order:
            if results[j] is None:
                try:
                    next(gens[j])
                except StopIteration as stop:
                    results[j] = stop.value
        i += 1
    return results


def plot(path, runs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, res in runs.items():
        steps, vals = zip(*res["losses"])
        w = max(1, len(vals) // 40)  # moving average: per-step train loss is noisy
        vals = np.convolve(vals, np.ones(w) / w, mode="valid")
        steps = steps[w - 1:]
        ax.plot(steps, vals, label=f"{label} (final val {res['final']:.3f})", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss (rank 0, moving average)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}", flush=True)


def main(argv=None):
    args = parse_args(argv)
    if args.lr is None:
        args.lr = 0.3 if args.optimizer == "sgd" else 3e-3
    rr.init()
    rank, size = rr.rank(), rr.size()
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    elif rr.local_size() > 1:
        # Ranks sharing a node would oversubscribe its cores with torch's default threads.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rr.local_size()))
    shard, valid = load_data(args, rank, size)
    if args.compare_ddp and args.resume:
        raise SystemExit("--compare-ddp trains both from step 0; leave out --resume")
    if args.ddp_backend and (args.resume or args.checkpoint or args.sync != "step"
                             or args.compression != "none"):
        raise SystemExit("--ddp-backend trains torch DDP from step 0 with --ddp-hook for "
                         "compression; leave out --resume, --checkpoint, --sync and --compression")
    if args.ddp_hook != "none" and not args.ddp_backend:
        raise SystemExit("--ddp-hook needs --ddp-backend ringreduce or gloo")
    torch_dist = args.compare_ddp or args.ddp_backend
    main_group, gloo_group = init_torch_distributed(args) if torch_dist else (None, None)
    if args.ddp_backend:
        ours = train_ddp(args, shard, valid, rank, size, main_group,
                         compression_of(args.ddp_hook), main=True)
    else:
        ours = train_ringreduce(args, shard, valid, rank, size)
    if args.compare_ddp:
        res, ddp = interleave(ours, train_ddp(args, shard, valid, rank, size, gloo_group))
    else:
        res = run_to_end(ours)
    if torch_dist:
        finish_torch_distributed()
    if rank == 0:
        print(f"final loss {res['final']:.4f}")
        print(f"samples/s {res['sps']:.1f}")
        print(f"wire MiB/rank {res['wire_sent'] / 2**20:.3f}"
              + ("" if res["wire_exact"] else " (ringreduce's own count; rr.wire_stats absent)"))
        if res["sync_totals"] is not None:
            t = res["sync_totals"]
            print(f"syncs {t['syncs']}, {t['seconds']:.3f} s blocked in them", flush=True)
        print(f"checksum {res['checksum']} (identical on all ranks)", flush=True)
    label = args.compression
    if args.compression != "none" and (args.compression_warmup or args.freeze_variance):
        label += " (" + ", ".join(
            ([f"warm-up {args.compression_warmup}"] if args.compression_warmup else [])
            + (["frozen variance"] if args.freeze_variance else [])) + ")"
    if args.sync == "local-sgd":
        label = f"local-sgd H={args.sync_every}, {label}"
    elif args.sync == "diloco":
        label = (f"diloco H={args.sync_every} outer {args.outer_lr:g}/{args.outer_momentum:g}"
                 + (f" F={args.fragments}" if args.fragments > 1 else "")
                 + (f" overlap {args.overlap_sync}" if args.overlap_sync else "") + f", {label}")
    if args.ddp_backend:
        label = f"torch DDP ({args.ddp_backend}), hook {args.ddp_hook}" + (
            f" (warm-up {args.compression_warmup})"
            if args.ddp_hook != "none" and args.compression_warmup else "")
    runs = {f"{args.optimizer}, {label}": res}
    if args.compare_ddp:
        runs["torch DDP (gloo)"] = ddp
        if rank == 0:
            print(f"ddp final loss {ddp['final']:.4f}")
            print(f"ddp samples/s {ddp['sps']:.1f}")
            print(f"throughput ratio ringreduce/ddp {res['sps'] / ddp['sps']:.3f}", flush=True)
            compressed = args.compression != "none" or args.ddp_hook != "none"
            warm = args.compression_warmup if compressed else 0
            if warm > 0:   # the compressed phase alone, the same steps for both
                ours_c, ddp_c = sps_from(res, warm), sps_from(ddp, warm)
                print(f"after warm-up (steps {warm}-{args.steps - 1}): samples/s {ours_c:.1f}, "
                      f"ddp samples/s {ddp_c:.1f}, throughput ratio ringreduce/ddp "
                      f"{ours_c / ddp_c:.3f}", flush=True)
    if args.save_losses and rank == 0:
        import json

        Path(args.save_losses).write_text(json.dumps(
            {"label": next(iter(runs)), "final": res["final"], "losses": res["losses"],
             "sync": args.sync, "sync_every": args.sync_every, "compression": args.compression,
             "wire_mib": res["wire_sent"] / 2**20, "wire": res["wire"], "sps": res["sps"],
             "steps": args.steps, "ranks": size, "outer_lr": args.outer_lr,
             "outer_momentum": args.outer_momentum, "fragments": args.fragments,
             "overlap_sync": args.overlap_sync,
             "ddp_losses": ddp["losses"] if args.compare_ddp else None,
             "ddp_final": ddp["final"] if args.compare_ddp else None,
             "auto": res.get("auto")}))
    if args.plot and rank == 0:
        import json

        for f in args.plot_with:
            d = json.loads(Path(f).read_text())
            runs.setdefault(d["label"], d)
        plot(args.plot, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
