"""LocalSGD: train locally, average the parameters across ranks every H steps.

Partial synchronisation for slow links. Every rank runs its own optimizer on
its own data; every ``sync_every`` optimizer steps the parameters (and the
floating-point buffers, e.g. BatchNorm statistics) are averaged across ranks,
so the ranks send ``sync_every`` times less than per-step gradient averaging.
:class:`~ringreduce.torch.DiLoCo` (``ringreduce/torch/diloco.py``) adds an outer
optimizer on top of the averaged change, which converges much better at large H.

Example
-------
>>> import torch, ringreduce.torch as rrt
>>> model = torch.nn.Linear(4, 2)
>>> opt = rrt.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=8)
>>> for step in range(32):
...     opt.zero_grad()
...     model(torch.randn(8, 4)).sum().backward()
...     opt.step()                      # every 8th step also averages the parameters
>>> opt.sync_totals.syncs
4
"""

from __future__ import annotations

import dataclasses
import logging
import time

import numpy as np
import torch

import ringreduce as rr

from ._convert import from_array, to_array
from .functions import broadcast_optimizer_state, broadcast_parameters

__all__ = ["LocalSGD", "SyncRecord", "SyncTotals"]

log = logging.getLogger(__name__)

_STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class SyncRecord:
    """One synchronisation, as seen by this rank.

    Attributes
    ----------
    step : the optimizer step after which the exchange started (1-based count)
    bytes : bytes this rank put on the wire for it (exact for compressed calls,
        from ``rr.last_stats``; the ring's 2(n-1)/n x payload for uncompressed ones)
    seconds : time this rank was blocked by it (launch + wait + update)
    fragments : the fragments it covered (``(0,)`` with one fragment)
    """

    step: int
    bytes: int
    seconds: float
    fragments: tuple = (0,)


@dataclasses.dataclass
class SyncTotals:
    """Running totals over every synchronisation since construction (or the loaded state)."""

    syncs: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _error(rank, msg: str) -> rr.RingReduceError:
    return rr.RingReduceError(f"rank {rank}: {msg}")


def _is_none_compression(compression) -> bool:
    if compression is None:
        return True
    none = getattr(getattr(rr, "Compression", None), "none", None)
    return none is not None and (compression is none or repr(compression) == repr(none))


class _Group:
    """Tensors of one fragment that share dtype and device: one packed message."""

    __slots__ = ("device", "dtype", "index", "nbytes", "numel", "tensors")

    def __init__(self, index, tensors):
        self.index = index                      # indices into the owner's tensor list
        self.tensors = tensors
        self.numel = sum(t.numel() for t in tensors)
        self.dtype = tensors[0].dtype
        self.device = tensors[0].device
        self.nbytes = self.numel * tensors[0].element_size()


def _groups(indices, tensors):
    """Split tensors[i] for i in indices into dtype/device groups (order kept)."""
    by_key: dict = {}
    for i in indices:
        t = tensors[i]
        by_key.setdefault((t.dtype, str(t.device)), []).append(i)
    return [_Group(idx, [tensors[i] for i in idx]) for idx in by_key.values()]


def _pack(tensors):
    """One fresh contiguous 1-D tensor holding ``tensors`` back to back."""
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _unpack(flat, shapes_of):
    """Views of ``flat`` shaped like each tensor of ``shapes_of``."""
    out, off = [], 0
    for t in shapes_of:
        n = t.numel()
        out.append(flat[off:off + n].view(t.shape))
        off += n
    return out


def _fragment_split(params, fragments):
    """Contiguous fragments of the parameter list, balanced by element count.

    Contiguous runs keep whole layers together (as Streaming DiLoCo does), and
    every rank derives the same split from the same model.
    """
    total = sum(p.numel() for p in params) or 1
    out = [[] for _ in range(fragments)]
    cum = 0
    for i, p in enumerate(params):
        f = min(fragments - 1, int(fragments * (cum + p.numel() / 2) / total))
        out[f].append(i)
        cum += p.numel()
    # An empty fragment (one huge tensor swallowing two slots) borrows from a neighbour,
    # so every fragment holds at least one parameter when there are enough of them.
    for f in range(fragments):
        if out[f]:
            continue
        donor = max(range(fragments), key=lambda j: len(out[j]))
        if len(out[donor]) < 2:
            break
        if donor < f:
            out[f].insert(0, out[donor].pop())
        else:
            out[f].append(out[donor].pop(0))
    return [sorted(x) for x in out]


class _PeriodicSync:
    """What LocalSGD and DiLoCo share: wrapping, step counting, agreement, stats, residuals."""

    _kind = "periodic"

    def __init__(self, model, optimizer, sync_every, compression, comm, fragments, name,
                 extra_settings=None):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{self._kind}: model must be a torch.nn.Module, got {type(model).__name__}")
        if not hasattr(optimizer, "step") or not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{self._kind}: optimizer must be a torch.optim optimizer")
        self.comm = comm
        self._rank = rr.rank() if comm is None else comm.Get_rank()
        self._size = rr.size() if comm is None else comm.Get_size()
        if int(sync_every) != sync_every or sync_every < 1:
            raise _error(self._rank, f"{self._kind}: sync_every must be a positive integer, "
                                     f"got {sync_every!r}")
        self.model = model
        self.optimizer = optimizer
        self.sync_every = int(sync_every)
        self.compression = None if _is_none_compression(compression) else compression
        self.name = name
        self._params = [p for p in model.parameters() if p.is_floating_point()]
        self._buffers = [b for b in model.buffers() if b.is_floating_point()]
        nfrag = int(fragments)
        if nfrag < 1 or nfrag > self.sync_every:
            raise _error(self._rank, f"{self._kind}: fragments must be between 1 and sync_every="
                                     f"{self.sync_every}, got {fragments!r}")
        if self._params and nfrag > len(self._params):
            raise _error(self._rank, f"{self._kind}: fragments={nfrag} but the model has only "
                                     f"{len(self._params)} floating-point parameter tensors")
        self.fragments = nfrag
        #: parameter indices (into ``list(model.parameters())``, floating ones) of each fragment
        self.fragment_params = _fragment_split(self._params, nfrag)
        buf_frag = [[] for _ in range(nfrag)]
        for j in range(len(self._buffers)):
            buf_frag[j % nfrag].append(j)
        self.fragment_buffers = buf_frag
        self._pgroups = [_groups(ix, self._params) for ix in self.fragment_params]
        self._bgroups = [_groups(ix, self._buffers) for ix in self.fragment_buffers]
        self._step = 0
        self._last_synced = [0] * nfrag   # step of each fragment's last exchange
        self.last_sync: SyncRecord | None = None
        self.sync_totals = SyncTotals()
        settings = {"kind": self._kind, "sync_every": self.sync_every, "fragments": nfrag,
                    "parameters": (len(self._params), sum(p.numel() for p in self._params)),
                    "buffers": (len(self._buffers), sum(b.numel() for b in self._buffers)),
                    "compression": repr(self.compression), "name": name}
        settings.update(extra_settings or {})
        self._agree(settings)
        # Every rank starts from rank 0's model and optimizer state.
        broadcast_parameters(model.state_dict(), root_rank=0, comm=comm)
        broadcast_optimizer_state(optimizer, root_rank=0, comm=comm)

    # ------------------------------------------------------------ helpers
    def _kw(self):
        return {} if self.comm is None else {"comm": self.comm}

    def _agree(self, settings: dict) -> None:
        """Raise on every rank, naming the ranks and values, if the ranks' settings differ."""
        every = rr.allgather_object(settings, **self._kw())
        diffs = []
        for key in settings:
            vals = [s.get(key) for s in every]
            if any(v != vals[0] for v in vals):
                who = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(vals))
                diffs.append(f"{key} ({who})")
        if diffs:
            raise _error(self._rank, f"{self._kind} settings differ across ranks, so their "
                                     f"synchronisations would not match: " + "; ".join(diffs))

    def _due(self, step):
        """Fragments whose exchange starts after optimizer step ``step``."""
        H, F = self.sync_every, self.fragments
        return [f for f in range(F) if step % H == ((f + 1) * H // F) % H]

    def _wire_bytes(self, name, nbytes, compressed):
        if self._size == 1:
            return 0.0
        if compressed:
            st = rr.last_stats(name)
            if st is not None and st.name == name:
                return float(st.wire_bytes)
        return 2.0 * (self._size - 1) / self._size * nbytes

    def _start_allreduce(self, flat, name, compression, async_):
        """Average ``flat`` across ranks: in place now, or return a handle (async)."""
        kw = dict(op=rr.Average, name=name, **self._kw())
        if compression is not None:
            kw["compression"] = compression
        arr = to_array(flat)
        if async_:
            return rr.allreduce_async(arr, **kw)
        rr.allreduce_(arr, **kw)
        return None

    @staticmethod
    def _result_into(flat, handle):
        """Wait for ``handle`` and put its result into ``flat`` (if not already there)."""
        res = handle.wait()
        if res is None:
            return flat
        t = from_array(np.ascontiguousarray(res) if isinstance(res, np.ndarray) else res)
        if t.data_ptr() != flat.data_ptr():
            flat.copy_(t.reshape(-1).to(flat.device))
        return flat

    def _record(self, step, nbytes, seconds, fragments):
        nb = round(nbytes)
        self.last_sync = SyncRecord(step, nb, seconds, tuple(fragments))
        self.sync_totals.syncs += 1
        self.sync_totals.bytes += nb
        self.sync_totals.seconds += seconds

    def _residuals_state(self):
        """This rank's error-feedback residuals of our tensors, as torch tensors (weights_only-safe)."""
        if self.compression is None:
            return {}
        sd = rr.compression_state(**self._kw()).state_dict()
        out = {}
        for n, d in sd["tensors"].items():
            if n == self.name or n.startswith(self.name + "."):
                out[n] = {k: (torch.from_numpy(np.array(v, dtype=np.float32, copy=True))
                              if isinstance(v, np.ndarray) else v) for k, v in d.items()}
        return {"rank": sd["rank"], "size": sd["size"], "version": sd["version"], "tensors": out}

    def _load_residuals(self, saved):
        if not saved:
            return
        cs = rr.compression_state(**self._kw())
        if saved.get("size") != self._size or saved.get("rank") != self._rank:
            raise _error(self._rank, f"{self._kind}: the state holds error-feedback residuals of "
                                     f"rank {saved.get('rank')} of {saved.get('size')}; load each "
                                     f"rank's own state with the same number of ranks "
                                     f"({self._size} now)")
        cur = cs.state_dict()
        tensors = {n: d for n, d in cur["tensors"].items()
                   if not (n == self.name or n.startswith(self.name + "."))}
        tensors.update(saved["tensors"])
        cur["tensors"] = tensors
        cs.load_state_dict(cur)

    def _check_loaded(self, state):
        if not isinstance(state, dict) or state.get("kind") != self._kind:
            raise _error(self._rank, f"{self._kind}.load_state_dict: not a {self._kind} state "
                                     f"(kind {state.get('kind') if isinstance(state, dict) else None!r})")
        if state.get("version") != _STATE_VERSION:
            raise _error(self._rank, f"{self._kind}.load_state_dict: state version "
                                     f"{state.get('version')!r} is not supported")
        for key in ("sync_every", "fragments"):
            if state.get(key) != getattr(self, key):
                raise _error(self._rank, f"{self._kind}.load_state_dict: the state was saved with "
                                         f"{key}={state.get(key)} but this one has {key}="
                                         f"{getattr(self, key)}")
        steps = rr.allgather_object(int(state["step"]), **self._kw())
        if len(set(steps)) != 1:
            raise _error(self._rank, f"{self._kind}.load_state_dict: the ranks loaded states of "
                                     f"different steps ({', '.join(f'rank {r}: {s}' for r, s in enumerate(steps))})")

    def _totals_state(self):
        return {"syncs": self.sync_totals.syncs, "bytes": self.sync_totals.bytes,
                "seconds": self.sync_totals.seconds}

    def _load_totals(self, d):
        self.sync_totals = SyncTotals(int(d.get("syncs", 0)), int(d.get("bytes", 0)),
                                      float(d.get("seconds", 0.0)))

    # ------------------------------------------------------------ the optimizer-like surface
    @property
    def param_groups(self):
        """The inner optimizer's param groups (learning rates live here)."""
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    @property
    def step_count(self) -> int:
        """Optimizer steps taken so far (the sync schedule counts these)."""
        return self._step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients (the inner optimizer's ``zero_grad``)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None, inner: bool = True):
        """Take one local optimizer step; after every ``sync_every``-th, synchronise.

        Gradient clipping and accumulation are plain torch: clip or run several
        backward passes before calling ``step()``. ``inner=False`` only counts
        the step (use it after ``scaler.step(opt.optimizer)`` with a GradScaler,
        which may skip the inner step on one rank but not on another: every rank
        must count the same steps). Returns the closure's loss, if any.
        """
        loss = self.optimizer.step(closure) if inner else None
        self._step += 1
        self._after_step(self._step)
        return loss

    def _after_step(self, step):  # pragma: no cover - overridden
        raise NotImplementedError

    def __repr__(self):
        return (f"{type(self).__name__}(sync_every={self.sync_every}, fragments={self.fragments}, "
                f"compression={self.compression!r}, step={self._step}, "
                f"optimizer={type(self.optimizer).__name__})")


class LocalSGD(_PeriodicSync):
    """Local optimizer steps, with parameters averaged across ranks every ``sync_every`` steps.

    Each rank steps ``optimizer`` on its own gradients (no per-step
    communication). After every ``sync_every``-th ``step()`` the parameters and
    floating-point buffers are averaged across ranks, in one packed allreduce
    per dtype (``compression`` applies to the parameters; buffers go
    uncompressed). The optimizer's own state (momentum, Adam moments) stays
    local. Parameters, buffers and optimizer state are broadcast from rank 0
    at construction, and the ranks' settings are compared there: different
    ``sync_every`` values (or models) on different ranks raise a
    :class:`ringreduce.RingReduceError` on every rank, naming each rank's value.

    Parameters
    ----------
    model : torch.nn.Module
    optimizer : torch.optim.Optimizer over ``model``'s parameters (LR schedulers
        attach to it as usual)
    sync_every : int
        H, optimizer steps between synchronisations (H=1 with plain SGD is
        per-step averaged SGD).
    compression : rr.Compression.*, optional
        Compresses the averaged parameters (error feedback keeps per-tensor
        residuals under the names ``f"{name}.0.{group}"``). Parameters are
        large values, not small deltas: prefer DiLoCo to compress.
    comm : mpi4py communicator, optional
        The data-parallel group; default the one given to ``rr.init()``.
    name : str
        Prefix of the tensor names used for the exchanges (two instances in one
        job need different names).

    Example
    -------
    >>> opt = rrt.LocalSGD(model, torch.optim.SGD(model.parameters(), lr=0.1), sync_every=8)
    >>> sched = torch.optim.lr_scheduler.StepLR(opt.optimizer, step_size=100)
    >>> loss_fn(model(x), y).backward(); opt.step(); opt.zero_grad(); sched.step()
    >>> opt.last_sync        # SyncRecord(step=8, bytes=..., seconds=..., fragments=(0,))
    """

    _kind = "LocalSGD"

    def __init__(self, model, optimizer, sync_every: int, compression=None, comm=None,
                 name: str = "localsgd"):
        super().__init__(model, optimizer, sync_every, compression, comm, fragments=1, name=name)

    def _after_step(self, step):
        if step % self.sync_every == 0:
            self._sync(step)

    def sync(self) -> None:
        """Average the parameters now, unless this step already did (e.g. at the end of training).

        Collective: call it on every rank at the same step.
        """
        if self._last_synced[0] != self._step or self._step == 0:
            self._sync(self._step)

    @torch.no_grad()
    def _sync(self, step):
        t0 = time.perf_counter()
        nbytes = 0.0
        for g in self._pgroups[0]:
            flat = _pack(g.tensors)
            name = f"{self.name}.0.{g.index[0]}"
            self._start_allreduce(flat, name, self.compression, False)
            for p, v in zip(g.tensors, _unpack(flat, g.tensors)):
                p.copy_(v)
            nbytes += self._wire_bytes(name, g.nbytes, self.compression is not None)
        for g in self._bgroups[0]:
            flat = _pack(g.tensors)
            name = f"{self.name}.buffers.0.{g.index[0]}"
            self._start_allreduce(flat, name, None, False)
            for b, v in zip(g.tensors, _unpack(flat, g.tensors)):
                b.copy_(v)
            nbytes += self._wire_bytes(name, g.nbytes, False)
        self._last_synced[0] = step
        self._record(step, nbytes, time.perf_counter() - t0, (0,))

    def state_dict(self) -> dict:
        """This rank's state: step counter, inner optimizer state, residuals, totals.

        Plain Python and tensors only, so ``torch.load(path, weights_only=True)``
        reads it. The model's parameters are not included: save
        ``model.state_dict()`` next to it. Between synchronisations the ranks'
        models and inner optimizer states differ, so for an exact resume every
        rank saves (and later loads) its own pair.
        """
        return {"kind": self._kind, "version": _STATE_VERSION, "rank": self._rank,
                "size": self._size, "step": self._step, "sync_every": self.sync_every,
                "fragments": self.fragments, "last_synced": list(self._last_synced),
                "optimizer": self.optimizer.state_dict(), "residuals": self._residuals_state(),
                "totals": self._totals_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (collective: every rank loads its own, same step)."""
        self._check_loaded(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._step = int(state["step"])
        self._last_synced = [int(s) for s in state["last_synced"]]
        self._load_residuals(state.get("residuals"))
        self._load_totals(state.get("totals", {}))
