"""DistributedOptimizer: wrap any torch.optim optimizer for data-parallel training.

Gradients are averaged across ranks while backward is still running:
post-accumulate-grad hooks copy each ready gradient into a fusion bucket, and a
bucket is handed to ``rr.allreduce_async`` as soon as it is full. Buckets have a
fixed layout (reverse registration order, a small first bucket, then up to
``fusion_threshold`` bytes, one dtype per bucket) and are launched strictly in
bucket order, so every rank issues the same collectives in the same order no
matter in which order autograd finishes the gradients. ``step()`` waits for the
buckets, copies the averages back into ``.grad`` and runs the wrapped step.
With RINGREDUCE_TIMELINE set, each launch records a "bucket ready" event
(bucket index, name, bytes, tensor count).

Example
-------
>>> import torch, ringreduce.torch as rrt
>>> model = torch.nn.Linear(4, 2)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
>>> model(torch.randn(8, 4)).sum().backward()
>>> opt.step()
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import weakref
import zlib

import numpy as np
import torch
from torch.autograd import Variable

import ringreduce as rr
from ringreduce import timeline

from ._convert import to_array

__all__ = ["DistributedOptimizer"]

log = logging.getLogger(__name__)

_FIRST_BUCKET_BYTES = 1 << 20
_created = itertools.count()
# Live wrapped optimizers in creation order; join() replays their collectives.
_registry: list[weakref.ref] = []


def _live_optimizers():
    alive = [r() for r in _registry]
    _registry[:] = [r for r, o in zip(_registry, alive) if o is not None]
    return [o for o in alive if o is not None]


def _error(msg: str) -> rr.RingReduceError:
    try:
        who = f"rank {rr.rank()}"
    except Exception:  # engine not initialised / broken: still report the problem
        who = "rank ?"
    return rr.RingReduceError(f"{who}: {msg}")


def _hook_for(opt):
    ref = weakref.ref(opt)

    def hook(p):
        o = ref()
        if o is not None:
            o._rr_on_grad(p)

    return hook


def _remove_hooks(handles):
    for h in handles.values():
        h.remove()
    handles.clear()


class _Bucket:
    """One fusion bucket: a flat send buffer, a flat result buffer, its params."""

    def __init__(self, index, dtype, device, cap):
        self.index = index
        self.dtype = dtype
        self.device = device
        self.cap = cap
        self.members = []  # (param index, offset, numel)
        self.numel = 0
        self.nbytes = 0
        self.name = None
        self.buf = self.out = None
        self.buf_arr = self.out_arr = None
        # per-pass state
        self.missing = 0
        self.handle = None

    def add(self, idx, numel, itemsize):
        self.members.append((idx, self.numel, numel))
        self.numel += numel
        self.nbytes += numel * itemsize

    def allocate(self, prefix, names):
        crc = zlib.crc32("\0".join(names[i] for i, _, _ in self.members).encode())
        dt = str(self.dtype).replace("torch.", "")
        self.name = f"{prefix}.bucket.{self.index}.{dt}.{crc:08x}"
        self.buf = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.out = torch.zeros_like(self.buf)
        self.buf_arr = to_array(self.buf)
        self.out_arr = to_array(self.out)


class _Layout:
    """Bucket assignment for one set of gradient-carrying parameters."""

    def __init__(self, idxs, params, names, prefix, first_cap, cap):
        self.buckets: list[_Bucket] = []
        self.where = {}  # param index -> (bucket, offset, numel)
        open_by_key = {}
        # Reverse registration order: the last layers' gradients are ready first.
        for i in reversed(idxs):
            p = params[i]
            key = (p.dtype, p.device)
            nbytes = p.numel() * p.element_size()
            b = open_by_key.get(key)
            if b is not None and b.nbytes > 0 and b.nbytes + nbytes > b.cap:
                b = None
            if b is None:
                index = len(self.buckets)
                b = _Bucket(index, p.dtype, p.device, first_cap if index == 0 else cap)
                self.buckets.append(b)
                open_by_key[key] = b
            b.add(i, p.numel(), p.element_size())
        for b in self.buckets:
            b.allocate(prefix, names)
            for i, off, n in b.members:
                self.where[i] = (b, off, n)


class _DistributedOptimizerMixin:
    """Methods mixed in front of the wrapped optimizer's own class."""

    # ------------------------------------------------------------------ setup
    def _rr_setup(self, named_parameters, compression, op, backward_passes_per_step, algorithm,
                  fusion_threshold, gradient_predivide_factor, sparse_as_dense, comm,
                  first_bucket_bytes, overlap):
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        if gradient_predivide_factor != 1.0 and op is not rr.Average:
            raise ValueError("gradient_predivide_factor needs op=rr.Average")
        self._rr_compression = compression
        self._rr_op = op
        self._rr_bpps = int(backward_passes_per_step)
        self._rr_algorithm = algorithm
        self._rr_cap = int(fusion_threshold)
        self._rr_first_cap = min(int(first_bucket_bytes), self._rr_cap)
        self._rr_predivide = float(gradient_predivide_factor)
        self._rr_sparse_as_dense = bool(sparse_as_dense)
        self._rr_comm = comm
        self._rr_serial = next(_created)
        if overlap not in ("auto", True, False):
            raise ValueError("overlap must be 'auto', True or False")
        self._rr_overlap_opt = overlap
        self._rr_overlap = None  # resolved at the first pass (needs the gradients' device)

        group_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            named = list(named_parameters)
            seen = {}
            for name, p in named:
                if name in seen:
                    raise _error(f"parameter name {name!r} appears twice in named_parameters; "
                                 "names must be unique")
                seen[name] = p
            by_param = {p: n for n, p in named}
            unnamed = [p for p in group_params if p not in by_param]
            if unnamed:
                raise _error(f"named_parameters was given but {len(unnamed)} of the optimizer's "
                             f"parameters are not in it (first shape {tuple(unnamed[0].shape)})")
            self._rr_prefix = "grad"
            self._rr_name_of = by_param
        else:
            self._rr_prefix = f"opt{self._rr_serial}"
            self._rr_name_of = {}
        for other in _live_optimizers():
            shared = set(other._rr_index) & set(group_params)
            if shared:
                raise _error(f"{len(shared)} parameter(s) are already managed by another "
                             "DistributedOptimizer; one parameter may belong to one only")

        self._rr_params: list[torch.Tensor] = []
        self._rr_names: list[str] = []
        self._rr_index = {}
        self._rr_hooks = {}
        self._rr_layouts = {}
        # Hooks hold only a weak reference: dropping the optimizer removes them.
        weakref.finalize(self, _remove_hooks, self._rr_hooks)
        for p in group_params:
            self._rr_add_param(p)

        # pass / step state
        self._rr_in_pass = False
        self._rr_comm_pass = False
        self._rr_passes = 0
        self._rr_layout = None
        self._rr_next = 0
        self._rr_launched = []
        self._rr_status = None
        self._rr_active = None  # ranks still training (None: all)
        self._rr_synchronized = True
        self._rr_should_sync = True
        _registry.append(weakref.ref(self))

    def _rr_add_param(self, p):
        if p in self._rr_index:
            return
        i = len(self._rr_params)
        self._rr_index[p] = i
        self._rr_params.append(p)
        self._rr_names.append(self._rr_name_of.get(p, f"{self._rr_prefix}.param.{i}"))
        self._rr_hook(p)

    def _rr_hook(self, p):
        if p.requires_grad and p not in self._rr_hooks:
            self._rr_hooks[p] = p.register_post_accumulate_grad_hook(_hook_for(self))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if hasattr(self, "_rr_index"):
            for p in self.param_groups[-1]["params"]:
                self._rr_add_param(p)

    # ------------------------------------------------------------ layouts
    def _rr_current_layout(self):
        idxs = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad:
                    self._rr_hook(p)  # requires_grad may have been switched on since
                    idxs.append(self._rr_index[p])
        key = tuple(idxs)
        lay = self._rr_layouts.get(key)
        if lay is None:
            lay = _Layout(idxs, self._rr_params, self._rr_names, self._rr_prefix,
                          self._rr_first_cap, self._rr_cap)
            self._rr_layouts[key] = lay
            log.debug("rank %d: %s layout with %d bucket(s) for %d parameter(s)", rr.rank(),
                      self._rr_prefix, len(lay.buckets), len(idxs))
        return lay

    def _rr_begin_comm(self):
        lay = self._rr_current_layout()
        for b in lay.buckets:
            b.missing = len(b.members)
            b.handle = None
        self._rr_layout = lay
        self._rr_next = 0
        self._rr_launched = []
        self._rr_arrived = set()
        self._rr_comm_pass = True

    # -------------------------------------------------------------- hooks
    def _rr_on_grad(self, p):
        if not self._rr_in_pass:
            if self._rr_passes >= self._rr_bpps:
                raise _error(f"backward() ran more than backward_passes_per_step="
                             f"{self._rr_bpps} time(s) before step(); call step() (or "
                             "synchronize()) in between or raise backward_passes_per_step")
            self._rr_in_pass = True
            self._rr_synchronized = False
            Variable._execution_engine.queue_callback(self._rr_end_pass)
            if self._rr_passes + 1 == self._rr_bpps:
                self._rr_begin_comm()
        if not self._rr_comm_pass:
            return  # accumulating locally; communicate on the k-th pass
        i = self._rr_index.get(p)
        where = self._rr_layout.where.get(i)
        if where is None:  # requires_grad switched on after this pass's layout was fixed
            return
        if i in self._rr_arrived:
            raise _error(f"gradient of {self._rr_names[i]} arrived twice in one backward pass")
        self._rr_arrived.add(i)
        b, off, n = where
        self._rr_pack(p, b, off, n)
        b.missing -= 1
        if b.missing == 0 and self._rr_overlapping(b):
            self._rr_launch_ready()

    def _rr_overlapping(self, b):
        if self._rr_overlap is None:
            self._rr_overlap = _resolve_overlap(self._rr_overlap_opt, b.device)
            log.debug("rank %d: %s launches buckets %s", rr.rank(), self._rr_prefix,
                      "during backward" if self._rr_overlap else "when backward ends")
        return self._rr_overlap

    def _rr_end_pass(self):
        self._rr_in_pass = False
        self._rr_passes += 1
        if self._rr_comm_pass:
            self._rr_flush()

    def _rr_pack(self, p, b, off, n):
        dst = b.buf[off:off + n]
        g = p.grad
        if g is None:
            dst.zero_()  # no gradient here; another rank may have one (as Horovod)
            return
        if g.is_sparse:
            if not self._rr_sparse_as_dense:
                raise _error(f"parameter {self._rr_names[self._rr_index[p]]} has a sparse "
                             "gradient; pass sparse_as_dense=True to DistributedOptimizer")
            g = g.to_dense()
        g = g.reshape(-1)
        if self._rr_predivide != 1.0:
            # Divide before summing so large gradients do not overflow in half precision.
            torch.mul(g, 1.0 / self._rr_predivide, out=dst)
        else:
            dst.copy_(g)

    def _rr_engine_op(self):
        return rr.Sum if self._rr_predivide != 1.0 else self._rr_op

    def _rr_launch(self, b):
        if timeline.on:   # its last gradient is in (or backward ended): the allreduce starts now
            timeline.instant("bucket ready", {"bucket": b.index, "name": b.name, "bytes": b.nbytes,
                                              "tensors": len(b.members)})
        b.handle = rr.allreduce_async(b.buf_arr, op=self._rr_engine_op(),
                                      algorithm=self._rr_algorithm,
                                      compression=self._rr_compression, name=b.name,
                                      out=b.out_arr, comm=self._rr_comm)
        self._rr_launched.append(b)

    def _rr_launch_ready(self):
        # Strict bucket order: identical collective sequence on every rank.
        bs = self._rr_layout.buckets
        while self._rr_next < len(bs) and bs[self._rr_next].missing == 0:
            self._rr_launch(bs[self._rr_next])
            self._rr_next += 1

    def _rr_flush(self):
        """Launch what backward left: parameters whose gradient did not arrive."""
        lay = self._rr_layout
        for b in lay.buckets[self._rr_next:]:
            if b.missing:
                for i, off, n in b.members:
                    if i not in self._rr_arrived:
                        self._rr_pack(self._rr_params[i], b, off, n)
                b.missing = 0
        self._rr_launch_ready()
        self._rr_comm_pass = False
        self._rr_launch_status(active=True)

    def _rr_launch_status(self, active):
        """One-hot 'still training' flags, reduced after the buckets (used by join())."""
        size = rr.size() if self._rr_comm is None else self._rr_comm.Get_size()
        if size == 1:
            self._rr_status = None
            return
        rank = rr.rank() if self._rr_comm is None else self._rr_comm.Get_rank()
        flags = np.zeros(size, dtype=np.int32)
        flags[rank] = 1 if active else 0
        self._rr_status = rr.allreduce_async(flags, op=rr.Sum, algorithm=self._rr_algorithm,
                                             name=f"{self._rr_prefix}.join", comm=self._rr_comm)

    # ------------------------------------------------------- compression
    @property
    def compression(self):
        """The compression the gradient buckets use (None: uncompressed)."""
        return self._rr_compression

    def set_compression(self, compression):
        """Switch the gradient compression from the next backward pass on.

        Every rank must switch at the same step (the buckets' collectives must
        agree). The usual use is an uncompressed warm-up before a coarse
        compression such as onebit (as 1-bit Adam does): error-feedback
        residuals start from zero at the switch.

        Example
        -------
        >>> opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters())
        >>> for step in range(steps):
        ...     if step == warmup:
        ...         opt.set_compression(rr.Compression.onebit)
        ...     train_one_step()
        """
        if self._rr_launched or self._rr_in_pass:
            raise _error("set_compression() called while gradient allreduces are in flight; "
                         "call step() or synchronize() first")
        self._rr_compression = compression

    # ------------------------------------------------------- synchronize
    def synchronize(self):
        """Finish the gradient allreduce and write the averages into ``.grad``.

        Call it before reading or changing gradients between backward and
        ``step()`` (clipping, ``GradScaler.unscale_``), then step inside
        ``with opt.skip_synchronize():``. A no-op when no backward pass ran
        since the last synchronize.

        Example
        -------
        >>> loss.backward()
        >>> opt.synchronize()
        >>> torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        >>> with opt.skip_synchronize():
        ...     opt.step()
        """
        if self._rr_in_pass:
            raise _error("synchronize()/step() called from inside backward")
        if self._rr_synchronized:
            return
        if self._rr_layout is None or self._rr_passes < self._rr_bpps:
            # step() before the k-th backward pass: reduce what has accumulated so far.
            self._rr_begin_comm()
            self._rr_flush()
        launched, self._rr_launched = self._rr_launched, []
        status, self._rr_status = self._rr_status, None
        errors = []
        for b in launched:
            try:
                b.handle.wait()
            except BaseException as exc:  # keep draining so nothing stays in flight
                errors.append((b, exc))
            b.handle = None
        active = None
        if status is not None:
            try:
                active = np.asarray(status.wait())
            except BaseException as exc:
                errors.append((None, exc))
        self._rr_passes = 0
        self._rr_layout = None
        self._rr_synchronized = True
        if errors:
            b, exc = errors[0]
            if isinstance(exc, rr.RingReduceError):
                raise exc
            what = b.name if b is not None else f"{self._rr_prefix}.join"
            raise _error(f"allreduce of {what} failed: {exc!r}") from exc
        scale = self._rr_post_scale(active)
        for b in launched:
            res = b.out
            if scale != 1.0:
                res.mul_(scale)
            for i, off, n in b.members:
                p = self._rr_params[i]
                g = res[off:off + n].view_as(p)
                # A copy, not a view of the bucket: a view measured no faster here
                # (interleaved A/B, large preset) and would alias the next step's result.
                if p.grad is None or p.grad.is_sparse:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

    def _rr_post_scale(self, active):
        size = rr.size() if self._rr_comm is None else self._rr_comm.Get_size()
        n = size
        if active is not None:
            self._rr_active = active
            n = int(active.sum())
        if self._rr_predivide != 1.0:
            return self._rr_predivide / max(n, 1)
        if self._rr_op is rr.Average and n != size and n > 0:
            return size / n  # joined ranks sent zeros; average over the ranks still training
        return 1.0

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Make ``step()`` skip its own ``synchronize()`` (already called by the user)."""
        self._rr_should_sync = False
        try:
            yield
        finally:
            self._rr_should_sync = True

    def step(self, closure=None):
        if self._rr_should_sync:
            self.synchronize()
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._rr_launched:
            raise _error("zero_grad() called while gradient allreduces are in flight; call "
                         "step() or synchronize() first")
        return super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------- join
    def _rr_join_round(self):
        """Contribute zero gradients for one step of the ranks still training."""
        lay = self._rr_current_layout()
        self._rr_launched = []
        for b in lay.buckets:
            b.buf.zero_()
            self._rr_launch(b)
        self._rr_launch_status(active=False)
        launched, self._rr_launched = self._rr_launched, []
        status, self._rr_status = self._rr_status, None
        for b in launched:
            b.handle.wait()
            b.handle = None
        active = np.asarray(status.wait()) if status is not None else None
        return active

    # ------------------------------------------------------- state dict
    def state_dict(self):
        """The wrapped optimizer's state dict plus this rank's error-feedback residuals."""
        sd = super().state_dict()
        cs = getattr(rr, "compression_state", None)
        if cs is not None:
            sd["ringreduce"] = {"size": rr.size(),
                                "compression_state": {rr.rank(): cs().state_dict()}}
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict; residuals are restored for the ranks it holds.

        ``state_dict["ringreduce"]["compression_state"]`` maps rank -> residuals;
        a checkpoint may hold every rank's (see scripts/train.py).
        """
        sd = dict(state_dict)
        extra = sd.pop("ringreduce", None)
        super().load_state_dict(sd)
        cs = getattr(rr, "compression_state", None)
        if extra is None or cs is None:
            return
        per_rank = extra.get("compression_state", {})
        if extra.get("size") != rr.size() and any(per_rank.values()):
            raise _error(f"optimizer state holds error-feedback residuals from "
                         f"{extra.get('size')} ranks but this job has {rr.size()}; resume with "
                         "the same number of ranks")
        mine = per_rank.get(rr.rank())
        if mine is None:
            if per_rank:
                log.warning("rank %d: optimizer state holds no residuals for this rank; "
                            "error feedback restarts from zero", rr.rank())
            return
        cs().load_state_dict(mine)


def _resolve_overlap(option, device) -> bool:
    """overlap="auto": launch during backward unless CPU ranks already fill every core.

    With as many CPU ranks on a node as cores, the engine thread has no core of
    its own: a bucket's allreduce then only takes CPU from backward, and the
    rank that arrives first spins while its peer is still computing. Launching
    the buckets when backward ends costs one wait instead of one per bucket.
    """
    if option != "auto":
        return bool(option)
    if device.type != "cpu":
        return True
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    # Every rank on the node competes for its cores, whatever communicator this optimizer uses.
    return rr.local_size() * max(1, torch.get_num_threads()) < cores


def DistributedOptimizer(optimizer, named_parameters=None, compression=None, op=None,
                         backward_passes_per_step=1, algorithm="auto",
                         fusion_threshold=25 * 2**20, gradient_predivide_factor=1.0,
                         sparse_as_dense=False, comm=None,
                         first_bucket_bytes=_FIRST_BUCKET_BYTES, overlap="auto"):
    """Wrap ``optimizer`` so that ``step()`` uses gradients averaged over all ranks.

    The result is still an instance of ``type(optimizer)`` (a subclass built at
    run time) and shares its state and parameter groups, so schedulers,
    ``state_dict``, ``zero_grad`` and GradScaler keep working.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        The optimizer to wrap (use the returned object from now on).
    named_parameters : iterable of (str, Tensor), optional
        ``model.named_parameters()``: names make bucket names stable across runs
        (error-feedback residuals are saved under them) and errors readable.
    compression : rr.Compression config, optional
        Passed to the engine for every bucket (``rr.Compression.fp16`` etc.).
    op : rr.Average (default) or rr.Sum
    backward_passes_per_step : int
        Accumulate this many backward passes locally, then communicate once.
    algorithm : str
        Engine algorithm ("auto", "ring", "tree", "mpi", "shm", "hierarchical").
    fusion_threshold : int
        Bucket size in bytes (the first bucket is at most ``first_bucket_bytes``).
    gradient_predivide_factor : float
        Divide by this before the sum and by ``size / factor`` after (op=Average).
    sparse_as_dense : bool
        Densify sparse gradients (else they are an error).
    comm : mpi4py communicator, optional
        A sub-communicator (e.g. the data-parallel group).
    first_bucket_bytes : int
        Size of the first (small) bucket, so communication starts early.
    overlap : "auto", True or False
        True launches each bucket as soon as its gradients are in (overlapping
        the rest of backward); False launches them all when backward ends.
        "auto" overlaps unless the tensors are on CPU and this node's ranks
        times torch's threads already use every core (then there is nothing
        to overlap with, only a core to share).

    Example
    -------
    >>> opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    >>> opt = rrt.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
    ...                                compression=rr.Compression.fp16)
    """
    if isinstance(optimizer, _DistributedOptimizerMixin):
        raise _error("optimizer is already a DistributedOptimizer")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if op is None:
        op = rr.Average
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizerMixin, base),
               {"__module__": base.__module__, "__doc__": base.__doc__})
    obj = cls.__new__(cls)
    obj.__dict__.update(optimizer.__dict__)  # same state, groups, defaults, hooks
    obj._rr_setup(named_parameters, compression, op, backward_passes_per_step, algorithm,
                  fusion_threshold, gradient_predivide_factor, sparse_as_dense, comm,
                  first_bucket_bytes, overlap)
    return obj
