"""DDP communication hooks: DDP's gradient buckets through ringreduce's compressed allreduce.

Whatever process-group backend DDP itself uses (ringreduce or gloo), the hook
sends each gradient bucket through the engine's compressed allreduce with
two-sided error feedback, and returns the average DDP expects::

    import ringreduce as rr
    import ringreduce.torch as rrt

    state = rrt.HookState(compression=rr.Compression.onebit, warmup_steps=50)
    ddp.register_comm_hook(state, rrt.compression_hook)
    ...
    torch.save({"model": ddp.state_dict(), "hook": state.state_dict()}, path)
    state.load_state_dict(torch.load(path, weights_only=False)["hook"])   # exact resume

The residuals live in the engine's error-feedback state under one name per
bucket (``ddp.bucket<index>.<elements>``), so a bucket whose index or size
differs across ranks is a named mismatch error, never a silent wrong sum. DDP
rebuilds its buckets after the first iteration; residuals of the first
layout are dropped then.
"""
# No "from __future__ import annotations": DDP checks the hook's annotations as objects.
import torch
import torch.distributed as dist

import ringreduce as rr

from ..core.errors import RingReduceError
from ..runtime.collectives import allreduce_on
from ..runtime.process_sets import resolve_comm
from ._convert import to_array
from .backend import ProcessGroupRingReduce, engine_work

__all__ = ["HookState", "compression_hook"]

STATE_VERSION = 1


class HookState:
    """What the compression hook keeps between steps: its settings, its step and its residuals.

    Parameters
    ----------
    compression : an rr.Compression (fp16, bf16, int8, int4, onebit, or a configured
        one such as ``rr.Compression.int8.with_options(...)``), ``rr.Compression.auto``
        (which picks per bucket from what it measures; buckets are flat, so its
        ``one_dim`` is turned on), or None for plain allreduce.
    warmup_steps : iterations that run uncompressed before compression starts
        (error feedback starts from zero at the first compressed step).
    process_group : DDP's process group when it is not the default one; a
        "ringreduce" group's communicator is used directly. With gloo, the
        ringreduce init communicator must hold the same ranks.
    process_set : an rr.ProcessSet to reduce over instead (Horovod's spelling).
    prefix : the tensor-name prefix of the buckets (two DDP models in one job
        need different prefixes).
    """

    def __init__(self, compression=rr.Compression.int8, warmup_steps: int = 0, process_group=None,
                 process_set=None, prefix: str = "ddp.bucket"):
        rr.init()
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise RingReduceError(f"rank {rr.rank()}: warmup_steps must be a non-negative int, "
                                  f"got {warmup_steps!r}")
        if isinstance(compression, type(rr.Compression.auto)) and not compression.one_dim:
            compression = compression(one_dim=True)     # DDP's buckets are flat: let auto compress them
        self.compression = compression
        self.warmup_steps = warmup_steps
        self.prefix = prefix
        self.step = 0                 # DDP iterations completed (a bucket marked last ends one)
        self.comm = self._comm(process_group, process_set)
        self._names: dict[int, str] = {}

    @staticmethod
    def _comm(process_group, process_set):
        if isinstance(process_group, ProcessGroupRingReduce):
            return process_group._engine_comm
        return resolve_comm(None, process_set, f"rank {rr.rank()}")

    def compressing(self) -> bool:
        """Whether this step's buckets are compressed (False during the warm-up)."""
        return self.compression is not None and self.step >= self.warmup_steps

    def _name(self, bucket) -> str:
        index, count = bucket.index(), bucket.buffer().numel()
        name = f"{self.prefix}{index}.{count}"
        old = self._names.get(index)
        if old is not None and old != name:
            self._forget([old])       # DDP rebuilt its buckets: the old layout's residuals go
        self._names[index] = name
        return name

    def _residuals(self):
        return rr.compression_state(self.comm)

    def _forget(self, names) -> None:
        cs = self._residuals()
        state = cs.state_dict()
        for n in names:
            state["tensors"].pop(n, None)
        cs.load_state_dict(state)

    def state_dict(self) -> dict:
        """This rank's hook state (step and its buckets' residuals), for torch.save."""
        saved = self._residuals().state_dict()
        mine = {n: t for n, t in saved["tensors"].items() if n.startswith(self.prefix)}
        return {"version": STATE_VERSION, "step": self.step, "warmup_steps": self.warmup_steps,
                "prefix": self.prefix, "names": dict(self._names),
                "residuals": dict(saved, tensors=mine)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() (same rank, same number of ranks)."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise RingReduceError(f"rank {rr.rank()}: not a HookState state dict of version "
                                  f"{STATE_VERSION}")
        cs = self._residuals()
        current = cs.state_dict()
        others = {n: t for n, t in current["tensors"].items() if not n.startswith(self.prefix)}
        saved = state["residuals"]
        cs.load_state_dict(dict(saved, tensors={**others, **saved["tensors"]}))
        self.step = int(state["step"])
        self.warmup_steps = int(state["warmup_steps"])
        self.prefix = state["prefix"]
        self._names = {int(k): v for k, v in state["names"].items()}

    def __repr__(self) -> str:
        return (f"HookState(compression={self.compression!r}, warmup_steps={self.warmup_steps}, "
                f"step={self.step})")


def compression_hook(state: HookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the bucket with ringreduce's compressed allreduce.

    Register with ``ddp.register_comm_hook(rrt.HookState(...), rrt.compression_hook)``.
    """
    buf = bucket.buffer()
    name = state._name(bucket)
    compression = state.compression if state.compressing() else None
    if bucket.is_last():
        state.step += 1
    arr = to_array(buf)

    def fn(chan):
        allreduce_on(chan, arr, rr.Average, "auto", compression, name, None, True, 1.0, 1.0)

    return engine_work(state.comm, f"DDP bucket {bucket.index()}", fn, [buf], lambda: buf).get_future()
