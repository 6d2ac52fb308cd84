"""DiLoCo: local inner steps, and every H steps an outer optimizer step on the averaged change.

Each rank keeps a *global copy* of the parameters, identical on every rank.
Between synchronisations the inner optimizer (typically AdamW) trains the
rank's own model on its own data. Every ``sync_every`` steps the rank computes
the outer gradient ``global - local``, the ranks average it (optionally
compressed, with error feedback), the outer optimizer (default SGD with
Nesterov momentum, lr 0.7, momentum 0.9) steps the global copy with it, and
the local parameters restart from the new global copy. This is DiLoCo
(Douillard et al., 2023); ``fragments`` and ``overlap`` are Streaming DiLoCo's
staggered, overlapped fragment syncs (Douillard et al., 2025).

Merge rule for ``overlap``: fragment f's exchange starts after its sync step
s with the outer gradient captured then (``global - local(s)``); the inner
steps go on while it runs on the engine thread. After step ``s + k`` (``k`` =
``overlap`` steps, ``True`` meaning 1) the rank waits for it, steps the global
copy with the averaged outer gradient, and sets
``local = global_new + (local(s + k) - local(s))``: the inner progress made
during the exchange is kept on top of the new global value. Without overlap
(k = 0) this is ``local = global_new``.

Example
-------
>>> import torch, ringreduce as rr, ringreduce.torch as rrt
>>> model = torch.nn.Linear(4, 2)
>>> inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
>>> opt = rrt.DiLoCo(model, inner, sync_every=16, compression=rr.Compression.int8)
>>> for step in range(64):
...     opt.zero_grad()
...     model(torch.randn(8, 4)).sum().backward()
...     opt.step()                 # every 16th step is also an outer step
>>> opt.sync()                     # end of training: every rank holds the global model
"""

from __future__ import annotations

import time

import torch

from .localsgd import _STATE_VERSION, SyncRecord, SyncTotals, _error, _pack, _PeriodicSync, _unpack

__all__ = ["DiLoCo", "SyncRecord", "SyncTotals"]


class _Pending:
    """One fragment's exchange: started after ``start_step``, merged after ``merge_step``."""

    __slots__ = ("buffers", "bytes", "fragment", "merge_step", "params", "seconds", "start_step")

    def __init__(self, fragment, start_step, merge_step):
        self.fragment, self.start_step, self.merge_step = fragment, start_step, merge_step
        self.params = []    # [group, flat outer gradient (averaged in place), capture | None, handle]
        self.buffers = []   # [group, flat buffer values, capture | None, handle]
        self.seconds = 0.0
        self.bytes = None   # set once every handle is done


class DiLoCo(_PeriodicSync):
    """Wrap an inner optimizer so that ranks synchronise through an outer optimizer every H steps.

    Parameters
    ----------
    model : torch.nn.Module
    inner_optimizer : torch.optim.Optimizer over ``model``'s parameters (LR
        schedulers, gradient clipping and accumulation work on it as in plain torch)
    sync_every : int
        H, inner steps between two syncs of each parameter.
    outer_lr, outer_momentum, nesterov : the default outer optimizer,
        ``torch.optim.SGD(global_copy, lr=outer_lr, momentum=outer_momentum,
        nesterov=nesterov)`` (nesterov is dropped when the momentum is 0).
        ``outer_lr=1, outer_momentum=0, nesterov=False`` is LocalSGD.
    outer_optimizer : callable, optional
        ``params -> torch.optim.Optimizer``, built over the global copy, e.g.
        ``functools.partial(torch.optim.SGD, lr=0.5, momentum=0.8)``; replaces
        the three arguments above.
    compression : rr.Compression.*, optional
        Compresses the averaged outer gradients (int8/int4/onebit with error
        feedback, residuals under the names ``f"{name}.{fragment}.{group}"``;
        fp16/bf16). Floating-point buffers are averaged uncompressed.
    fragments : int
        F <= H: the parameters are split into F contiguous fragments balanced by
        size; fragment f syncs after steps s with ``s % H == (f + 1) * H // F % H``,
        so each fragment still syncs every H steps and the traffic is spread out.
    overlap : bool or int
        Run each fragment's exchange on the engine thread and merge it ``overlap``
        steps later (True: 1) by the merge rule in the module docstring;
        1 <= overlap <= H.
    comm : mpi4py communicator, optional
        The data-parallel group; default the one given to ``rr.init()``.
    name : str
        Prefix of the exchanges' tensor names (two instances need different names).

    Parameters, buffers and the inner optimizer state are broadcast from rank 0
    at construction, and the ranks' settings are compared there: different H,
    fragment counts, overlap or models raise a :class:`ringreduce.RingReduceError`
    on every rank, naming each rank's value, before the first sync.

    Example
    -------
    >>> inner = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(inner, T_max=1000)
    >>> opt = rrt.DiLoCo(model, inner, sync_every=32, fragments=4, overlap=True,
    ...                  compression=rr.Compression.int4)
    >>> for x, y in loader:
    ...     opt.zero_grad(); loss_fn(model(x), y).backward()
    ...     torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     opt.step(); sched.step()
    >>> opt.sync(); print(opt.sync_totals)
    """

    _kind = "DiLoCo"

    def __init__(self, model, inner_optimizer, sync_every: int, outer_lr: float = 0.7,
                 outer_momentum: float = 0.9, nesterov: bool = True, outer_optimizer=None,
                 compression=None, fragments: int = 1, overlap=False, comm=None,
                 name: str = "diloco"):
        if isinstance(outer_optimizer, torch.optim.Optimizer):
            raise TypeError("DiLoCo: outer_optimizer must be a callable params -> optimizer (it is "
                            "built over DiLoCo's global copy), e.g. "
                            "functools.partial(torch.optim.SGD, lr=0.7, momentum=0.9, nesterov=True)")
        k = int(overlap) if not isinstance(overlap, bool) else (1 if overlap else 0)
        if k < 0 or k > sync_every:
            raise ValueError(f"DiLoCo: overlap must be False, True or a step count between 1 and "
                             f"sync_every={sync_every}, got {overlap!r}")
        self.overlap_steps = k
        outer = ("custom" if outer_optimizer is not None
                 else (float(outer_lr), float(outer_momentum), bool(nesterov and outer_momentum)))
        super().__init__(model, inner_optimizer, sync_every, compression, comm, fragments, name,
                         extra_settings={"overlap": k, "outer": outer})
        with torch.no_grad():
            self._global = [p.detach().clone() for p in self._params]
        if outer_optimizer is not None:
            self.outer_optimizer = outer_optimizer(self._global)
        else:
            self.outer_optimizer = torch.optim.SGD(
                self._global, lr=outer_lr, momentum=outer_momentum,
                nesterov=bool(nesterov and outer_momentum > 0))
        self._pending: list[_Pending] = []

    @property
    def inner_optimizer(self):
        return self.optimizer

    def global_parameters(self) -> list[torch.Tensor]:
        """The global copy (identical on every rank), in ``model.parameters()`` order (floating ones)."""
        return list(self._global)

    # ------------------------------------------------------------ schedule
    def _after_step(self, step):
        for pend in [p for p in self._pending if p.merge_step == step]:
            self._finish(pend)
        for f in self._due(step):
            pend = self._start(f, step)
            if self.overlap_steps == 0:
                self._finish(pend)

    def sync(self) -> None:
        """Finish every exchange in flight, then sync each fragment not synced at this step.

        Use it at the end of training (or before evaluating): afterwards every
        rank's model equals the global copy. Collective: call it on every rank.
        """
        for pend in list(self._pending):
            self._finish(pend)
        for f in range(self.fragments):
            if self._last_synced[f] != self._step or self._step == 0:
                self._finish(self._start(f, self._step, merge_now=True))

    # ------------------------------------------------------------ exchanges
    @torch.no_grad()
    def _start(self, f, step, merge_now=False):
        t0 = time.perf_counter()
        k = 0 if merge_now else self.overlap_steps
        pend = _Pending(f, step, step + k)
        async_ = k > 0
        for g in self._pgroups[f]:
            flat = torch.cat([(self._global[i] - p.detach()).reshape(-1)
                              for i, p in zip(g.index, g.tensors)])   # the outer gradient
            cap = _pack(g.tensors) if async_ else None
            h = self._start_allreduce(flat, f"{self.name}.{f}.{g.index[0]}", self.compression, async_)
            pend.params.append([g, flat, cap, h])
        for g in self._bgroups[f]:
            flat = _pack(g.tensors)
            cap = flat.clone() if async_ else None
            h = self._start_allreduce(flat, f"{self.name}.buffers.{f}.{g.index[0]}", None, async_)
            pend.buffers.append([g, flat, cap, h])
        self._last_synced[f] = step
        pend.seconds += time.perf_counter() - t0
        if async_:
            self._pending.append(pend)
        else:
            pend.bytes = self._bytes_of(pend)
        return pend

    def _wait(self, pend):
        """Wait for a pending exchange's handles; its averaged values land in its flats."""
        if pend.bytes is not None:
            return
        t0 = time.perf_counter()
        for entry in pend.params + pend.buffers:
            if entry[3] is not None:
                self._result_into(entry[1], entry[3])
                entry[3] = None
        pend.bytes = self._bytes_of(pend)
        pend.seconds += time.perf_counter() - t0

    def _bytes_of(self, pend):
        f = pend.fragment
        nb = 0.0
        for g, *_ in pend.params:
            nb += self._wire_bytes(f"{self.name}.{f}.{g.index[0]}", g.nbytes,
                                   self.compression is not None)
        for g, *_ in pend.buffers:
            nb += self._wire_bytes(f"{self.name}.buffers.{f}.{g.index[0]}", g.nbytes, False)
        return nb

    @torch.no_grad()
    def _finish(self, pend):
        self._wait(pend)
        t0 = time.perf_counter()
        idx = [i for g, *_ in pend.params for i in g.index]
        for g, flat, _, _ in pend.params:
            for i, v in zip(g.index, _unpack(flat, g.tensors)):
                self._global[i].grad = v
        if idx:
            self.outer_optimizer.step()
        for i in idx:
            self._global[i].grad = None
        for g, _, cap, _ in pend.params:
            caps = _unpack(cap, g.tensors) if cap is not None else [None] * len(g.tensors)
            for i, p, c in zip(g.index, g.tensors, caps):
                if c is None:
                    p.copy_(self._global[i])
                else:   # keep the inner progress made while the exchange ran
                    p.copy_(self._global[i] + (p - c))
        for g, flat, cap, _ in pend.buffers:
            caps = _unpack(cap, g.tensors) if cap is not None else [None] * len(g.tensors)
            for b, v, c in zip(g.tensors, _unpack(flat, g.tensors), caps):
                b.copy_(v if c is None else v + (b - c))
        if pend in self._pending:
            self._pending.remove(pend)
        pend.seconds += time.perf_counter() - t0
        self._record(pend.start_step, pend.bytes, pend.seconds, (pend.fragment,))

    # ------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """This rank's state: step, global copy, outer and inner optimizer state, residuals,
        exchanges in flight (waited for, so their averaged values are saved) and totals.

        Plain Python and tensors only (``torch.load(path, weights_only=True)`` reads it).
        Save ``model.state_dict()`` next to it; between syncs the ranks' models
        and inner states differ, so every rank saves and loads its own pair.
        """
        for pend in self._pending:
            self._wait(pend)
        pending = []
        for pend in self._pending:
            pending.append({
                "fragment": pend.fragment, "start_step": pend.start_step,
                "merge_step": pend.merge_step, "seconds": pend.seconds, "bytes": pend.bytes,
                "params": [[flat.clone(), None if cap is None else cap.clone()]
                           for _, flat, cap, _ in pend.params],
                "buffers": [[flat.clone(), None if cap is None else cap.clone()]
                            for _, flat, cap, _ in pend.buffers]})
        return {"kind": self._kind, "version": _STATE_VERSION, "rank": self._rank,
                "size": self._size, "step": self._step, "sync_every": self.sync_every,
                "fragments": self.fragments, "overlap": self.overlap_steps,
                "last_synced": list(self._last_synced),
                "global": [g.detach().clone() for g in self._global],
                "optimizer": self.optimizer.state_dict(),
                "outer_optimizer": self.outer_optimizer.state_dict(),
                "pending": pending, "residuals": self._residuals_state(),
                "totals": self._totals_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; resuming mid-period (even mid-exchange) is exact.

        Collective: every rank loads its own state, all of the same step. Load
        ``model.state_dict()`` too; construct DiLoCo first (its broadcast from
        rank 0 would overwrite a model loaded before).
        """
        self._check_loaded(state)
        if state.get("overlap") != self.overlap_steps:
            raise _error(self._rank, f"DiLoCo.load_state_dict: the state was saved with overlap="
                                     f"{state.get('overlap')} but this one has {self.overlap_steps}")
        if len(state["global"]) != len(self._global):
            raise _error(self._rank, f"DiLoCo.load_state_dict: the state holds {len(state['global'])} "
                                     f"parameter tensors, the model {len(self._global)}")
        with torch.no_grad():
            for g, s in zip(self._global, state["global"]):
                if g.shape != s.shape:
                    raise _error(self._rank, f"DiLoCo.load_state_dict: a global parameter of shape "
                                             f"{tuple(s.shape)} does not fit {tuple(g.shape)}")
                g.copy_(s)
        self.optimizer.load_state_dict(state["optimizer"])
        self.outer_optimizer.load_state_dict(state["outer_optimizer"])
        self._step = int(state["step"])
        self._last_synced = [int(s) for s in state["last_synced"]]
        self._pending = []
        for d in state.get("pending", []):
            f = int(d["fragment"])
            pend = _Pending(f, int(d["start_step"]), int(d["merge_step"]))
            pend.seconds, pend.bytes = float(d["seconds"]), float(d["bytes"])
            for groups, saved, into in ((self._pgroups[f], d["params"], pend.params),
                                        (self._bgroups[f], d["buffers"], pend.buffers)):
                for g, (flat, cap) in zip(groups, saved):
                    into.append([g, flat.clone().to(g.device),
                                 None if cap is None else cap.clone().to(g.device), None])
            self._pending.append(pend)
        self._load_residuals(state.get("residuals"))
        self._load_totals(state.get("totals", {}))
