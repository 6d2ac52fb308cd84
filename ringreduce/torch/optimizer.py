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
import warnings
import weakref
import zlib
from typing import Protocol

import numpy as np
import torch
from torch.autograd import Variable

import ringreduce as rr
from ringreduce.core import timeline

from ._convert import from_array, to_array
from .compression import split_compression

__all__ = ["DistributedOptimizer", "Joinable"]

log = logging.getLogger(__name__)

_FIRST_BUCKET_BYTES = 1 << 20
_created = itertools.count()
# Live wrapped optimizers in creation order; join() replays their collectives.
_registry: list[weakref.ref] = []


def _live_optimizers() -> list[_DistributedOptimizerMixin]:
    """Every live DistributedOptimizer, oldest first (the registry join() serves)."""
    alive = [r() for r in _registry]
    _registry[:] = [r for r, o in zip(_registry, alive) if o is not None]
    return [o for o in alive if o is not None]


class _NamingError(rr.RingReduceError, ValueError):
    """A named_parameters problem: a RingReduceError that is also Horovod's ValueError."""


def _error(msg: str, cls=rr.RingReduceError) -> rr.RingReduceError:
    try:
        who = f"rank {rr.rank()}"
    except Exception:  # engine not initialised / broken: still report the problem
        who = "rank ?"
    return cls(f"{who}: {msg}")


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
        self.sent = None   # (compressed tensor, ctx) with a Horovod-style compressor

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


class _Buckets:
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


class Joinable(Protocol):
    """What :func:`ringreduce.torch.join` needs from an object it serves.

    A rank that has run out of data calls ``join()``; until every rank has,
    ``join()`` replays each live DistributedOptimizer's step collectives with
    zero gradients, so the ranks still training are never left waiting. Every
    DistributedOptimizer implements this protocol; ``join()`` uses nothing else.
    """

    def needs_synchronize(self) -> bool:
        """True when a backward pass ran since the last ``synchronize()``/``step()``."""

    def active_ranks(self) -> np.ndarray | None:
        """Per-rank flags from the last step (1: that rank was training), or None if unknown."""

    def join_round(self) -> np.ndarray | None:
        """Take part in one step of the ranks still training; return their flags (None: one rank)."""

    def end_join(self) -> None:
        """Forget the flags: after a join every rank counts as training again."""


class _SyncState:
    """Everything a DistributedOptimizer adds to the optimizer it wraps.

    The wrapped optimizer holds it as its one attribute ``_rr``, so nothing we
    keep can clash with the wrapped class's own attributes (the mixin's private
    methods carry a ``_rr_`` prefix for the same reason).

    Configuration (fixed at construction; ``compression`` changes through
    ``set_compression()`` between steps):

    compression : rr.Compression config or None
        What every bucket's allreduce uses (None: uncompressed).
    compressor : Horovod-style compressor or None
        A user's ``compress(tensor) -> (tensor, ctx)`` / ``decompress(tensor, ctx)``
        object, run on each bucket around its allreduce (None: none).
    op : rr.Average or rr.Sum
        The reduction the user asked for.
    passes_per_step : int
        backward_passes_per_step: local backward passes accumulated per allreduce.
    algorithm : str
        Engine algorithm for the buckets and the join flags.
    bucket_cap, first_bucket_cap : int
        Bucket size limits in bytes (the first bucket is the small one).
    predivide : float
        gradient_predivide_factor; with a factor other than 1 the engine sums and
        the optimizer scales by ``factor / ranks`` afterwards.
    sparse_as_dense : bool
        Densify sparse gradients instead of raising.
    comm : mpi4py communicator or None
        The data-parallel communicator (None: the one ``rr.init`` was given).
    prefix : str
        Start of every engine tensor name: "grad" with named_parameters (names
        then survive restarts, and residuals are saved under them), else
        "opt<creation number>".
    overlap_option : "auto", True or False
        The ``overlap`` argument; ``overlap`` is what it resolved to (None until
        the first pass shows the gradients' device).

    Parameters (grow with ``add_param_group``):

    params, names : list
        Every managed parameter and its name, by parameter index.
    index : dict
        Parameter -> parameter index.
    name_of : dict
        Parameter -> user-given name (empty without named_parameters).
    hooks : dict
        Parameter -> its post-accumulate-grad hook handle.
    layouts : dict
        Bucket layouts by the tuple of gradient-carrying parameter indices, so a
        requires_grad pattern seen before reuses its buffers.

    The current backward pass and step:

    in_pass : bool
        A backward pass is running (its end-of-backward callback is queued).
    comm_pass : bool
        The running pass is the one that communicates (the last of
        ``passes_per_step``); earlier passes only accumulate into ``.grad``.
    passes : int
        Backward passes since the last synchronize.
    layout : _Buckets or None
        The layout of the communicating pass, until synchronize.
    next_bucket : int
        Index of the next bucket to launch (buckets launch strictly in order).
    launched : list of _Bucket
        Buckets whose allreduce is in flight.
    arrived : set of int
        Parameter indices whose gradient arrived in this communicating pass.
    status : rr handle or None
        The in-flight allreduce of the "still training" flags (join's; None on one rank).
    active : numpy array or None
        Those flags from the last step, kept for join() (None: unknown).
    synchronized : bool
        No backward pass ran since the last synchronize.
    should_sync : bool
        step() synchronizes first (False inside ``skip_synchronize()``).
    user_synced : bool
        ``synchronize()`` reduced gradients since the last step (step() then warns,
        as Horovod does, unless inside ``skip_synchronize()``).
    """

    __slots__ = ("compression", "compressor", "op", "passes_per_step", "algorithm", "bucket_cap",
                 "first_bucket_cap", "predivide", "sparse_as_dense", "comm", "prefix",
                 "overlap_option", "overlap",
                 "params", "names", "index", "name_of", "hooks", "layouts",
                 "in_pass", "comm_pass", "passes", "layout", "next_bucket", "launched",
                 "arrived", "status", "active", "synchronized", "should_sync", "user_synced")

    def __init__(self, compression, op, backward_passes_per_step, algorithm, fusion_threshold,
                 gradient_predivide_factor, sparse_as_dense, comm, first_bucket_bytes, overlap):
        if backward_passes_per_step < 1:
            raise ValueError("backward_passes_per_step must be >= 1")
        if gradient_predivide_factor != 1.0 and op is not rr.Average:
            raise ValueError("gradient_predivide_factor needs op=rr.Average")
        self.compressor, self.compression = _for_buckets(*split_compression(compression))
        self.op = op
        self.passes_per_step = int(backward_passes_per_step)
        self.algorithm: str = algorithm
        self.bucket_cap = int(fusion_threshold)
        self.first_bucket_cap = min(int(first_bucket_bytes), self.bucket_cap)
        self.predivide = float(gradient_predivide_factor)
        self.sparse_as_dense = bool(sparse_as_dense)
        self.comm = comm
        serial = next(_created)
        if overlap not in ("auto", True, False):
            raise ValueError("overlap must be 'auto', True or False")
        self.overlap_option = overlap
        self.overlap: bool | None = None
        self.prefix = f"opt{serial}"
        self.name_of: dict[torch.Tensor, str] = {}

        self.params: list[torch.Tensor] = []
        self.names: list[str] = []
        self.index: dict[torch.Tensor, int] = {}
        self.hooks: dict = {}
        self.layouts: dict[tuple, _Buckets] = {}

        self.in_pass = False
        self.comm_pass = False
        self.passes = 0
        self.layout: _Buckets | None = None
        self.next_bucket = 0
        self.launched: list[_Bucket] = []
        self.arrived: set[int] = set()
        self.status = None
        self.active: np.ndarray | None = None
        self.synchronized = True
        self.should_sync = True
        self.user_synced = False

    def use_names(self, named_parameters, group_params):
        """Name the parameters after ``named_parameters`` (checked against the optimizer's).

        The errors are both RingReduceError and ValueError (what Horovod raises),
        with Horovod's wording in them.
        """
        named = list(named_parameters)
        if any(not isinstance(item, tuple) or len(item) != 2 for item in named):
            raise _error("named_parameters should be a sequence of tuples (name, parameter), "
                         "usually produced by model.named_parameters().", _NamingError)
        seen = {}
        for name, p in named:
            if name in seen:
                raise _error(f"parameter name {name!r} appears twice in named_parameters; "
                             "Parameter names in named_parameters must be unique. "
                             f"Found duplicates: {name}", _NamingError)
            seen[name] = p
        by_param = {p: n for n, p in named}
        unnamed = [p for p in group_params if p not in by_param]
        if unnamed:
            raise _error(f"named_parameters was given but {len(unnamed)} of the optimizer's "
                         f"parameters are not in it (first shape {tuple(unnamed[0].shape)}): "
                         "named_parameters was specified, but one or more model parameters "
                         "were not named. Python object ids: "
                         + ", ".join(str(id(p)) for p in unnamed), _NamingError)
        self.prefix = "grad"
        self.name_of = by_param

    def comm_size_rank(self) -> tuple[int, int]:
        if self.comm is None:
            return rr.size(), rr.rank()
        return self.comm.Get_size(), self.comm.Get_rank()

    def engine_op(self):
        """With a predivide factor the engine sums; the average is taken afterwards."""
        return rr.Sum if self.predivide != 1.0 else self.op

    def post_scale(self, active) -> float:
        """Factor for the reduced buckets, given the ranks still training (None: all)."""
        size = self.comm_size_rank()[0]
        n = size if active is None else int(active.sum())
        if self.predivide != 1.0:
            return self.predivide / max(n, 1)
        if self.op is rr.Average and n != size and n > 0:
            return size / n  # joined ranks sent zeros; average over the ranks still training
        return 1.0


class _DistributedOptimizerMixin:
    """Methods mixed in front of the wrapped optimizer's own class.

    All state is in ``self._rr`` (a :class:`_SyncState`). The public methods
    here (synchronize, skip_synchronize, set_compression, the :class:`Joinable`
    methods) are the optimizer's API; the ``_rr_`` ones are internal.
    """

    _rr: _SyncState

    # ------------------------------------------------------------------ setup
    def _rr_setup(self, named_parameters, compression, op, backward_passes_per_step, algorithm,
                  fusion_threshold, gradient_predivide_factor, sparse_as_dense, comm,
                  first_bucket_bytes, overlap):
        st = _SyncState(compression, op, backward_passes_per_step, algorithm, fusion_threshold,
                        gradient_predivide_factor, sparse_as_dense, comm, first_bucket_bytes,
                        overlap)
        group_params = [p for g in self.param_groups for p in g["params"]]
        if named_parameters is not None:
            st.use_names(named_parameters, group_params)
        for other in _live_optimizers():
            shared = set(other._rr.index) & set(group_params)
            if shared:
                raise _error(f"{len(shared)} parameter(s) are already managed by another "
                             "DistributedOptimizer; one parameter may belong to one only")
        self._rr = st
        # Hooks hold only a weak reference: dropping the optimizer removes them.
        weakref.finalize(self, _remove_hooks, st.hooks)
        for p in group_params:
            self._rr_add_param(p)
        _registry.append(weakref.ref(self))

    def _rr_add_param(self, p):
        st = self._rr
        if p in st.index:
            return
        i = len(st.params)
        st.index[p] = i
        st.params.append(p)
        st.names.append(st.name_of.get(p, f"{st.prefix}.param.{i}"))
        self._rr_hook(p)

    def _rr_hook(self, p):
        hooks = self._rr.hooks
        if p.requires_grad and p not in hooks:
            hooks[p] = p.register_post_accumulate_grad_hook(_hook_for(self))

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        if getattr(self, "_rr", None) is not None:
            for p in self.param_groups[-1]["params"]:
                self._rr_add_param(p)

    # ------------------------------------------------------------ layouts
    def _rr_current_layout(self):
        st = self._rr
        idxs = []
        for g in self.param_groups:
            for p in g["params"]:
                if p.requires_grad:
                    self._rr_hook(p)  # requires_grad may have been switched on since
                    idxs.append(st.index[p])
        key = tuple(idxs)
        lay = st.layouts.get(key)
        if lay is None:
            lay = _Buckets(idxs, st.params, st.names, st.prefix, st.first_bucket_cap,
                          st.bucket_cap)
            st.layouts[key] = lay
            log.debug("rank %d: %s layout with %d bucket(s) for %d parameter(s)", rr.rank(),
                      st.prefix, len(lay.buckets), len(idxs))
        return lay

    def _rr_begin_comm(self):
        st = self._rr
        lay = self._rr_current_layout()
        for b in lay.buckets:
            b.missing = len(b.members)
            b.handle = None
        st.layout = lay
        st.next_bucket = 0
        st.launched = []
        st.arrived = set()
        st.comm_pass = True

    # -------------------------------------------------------------- hooks
    def _rr_on_grad(self, p):
        st = self._rr
        if not st.in_pass:
            self._rr_begin_pass()
        if not st.comm_pass:
            return  # accumulating locally; communicate on the k-th pass
        i = st.index.get(p)
        where = st.layout.where.get(i)
        if where is None:  # requires_grad switched on after this pass's layout was fixed
            return
        if i in st.arrived:
            raise _error(f"gradient of {st.names[i]} arrived twice in one backward pass")
        st.arrived.add(i)
        b, off, n = where
        self._rr_pack(p, b, off, n)
        b.missing -= 1
        if b.missing == 0 and self._rr_overlapping(b):
            self._rr_launch_ready()

    def _rr_begin_pass(self):
        """The first gradient of a backward pass: queue its end, maybe start communicating."""
        st = self._rr
        if st.passes >= st.passes_per_step:
            raise _error(f"backward() ran more than backward_passes_per_step="
                         f"{st.passes_per_step} time(s) before step(); call step() (or "
                         "synchronize()) in between or raise backward_passes_per_step")
        st.in_pass = True
        st.synchronized = False
        Variable._execution_engine.queue_callback(self._rr_end_pass)
        if st.passes + 1 == st.passes_per_step:
            self._rr_begin_comm()

    def _rr_overlapping(self, b):
        st = self._rr
        if st.overlap is None:
            st.overlap = _resolve_overlap(st.overlap_option, b.device)
            log.debug("rank %d: %s launches buckets %s", rr.rank(), st.prefix,
                      "during backward" if st.overlap else "when backward ends")
        return st.overlap

    def _rr_end_pass(self):
        st = self._rr
        st.in_pass = False
        st.passes += 1
        if st.comm_pass:
            self._rr_flush()

    def _rr_pack(self, p, b, off, n):
        st = self._rr
        dst = b.buf[off:off + n]
        g = p.grad
        if g is None:
            dst.zero_()  # no gradient here; another rank may have one (as Horovod)
            return
        if g.is_sparse:
            if not st.sparse_as_dense:
                raise _error(f"parameter {st.names[st.index[p]]} has a sparse "
                             "gradient; pass sparse_as_dense=True to DistributedOptimizer")
            g = g.to_dense()
        g = g.reshape(-1)
        if st.predivide != 1.0:
            # Divide before summing so large gradients do not overflow in half precision.
            torch.mul(g, 1.0 / st.predivide, out=dst)
        else:
            dst.copy_(g)

    def _rr_launch(self, b):
        st = self._rr
        if timeline.on:   # its last gradient is in (or backward ended): the allreduce starts now
            timeline.instant("bucket ready", {"bucket": b.index, "name": b.name, "bytes": b.nbytes,
                                              "tensors": len(b.members)})
        if st.compressor is not None:
            # A Horovod-style compressor: what it returns travels; decompressed at the wait.
            sent, ctx = st.compressor.compress(b.buf)
            sent = sent.detach().contiguous()
            op, scale = st.engine_op(), 1.0
            if op is rr.Average and not sent.dtype.is_floating_point:
                # The engine refuses to truncate an integer average: sum, divide once decoded.
                op, scale = rr.Sum, 1.0 / st.comm_size_rank()[0]
            b.sent = (sent, ctx, scale)
            b.handle = rr.allreduce_async(to_array(sent), op=op, algorithm=st.algorithm,
                                          compression=st.compression, name=b.name, comm=st.comm)
        else:
            b.sent = None
            b.handle = rr.allreduce_async(b.buf_arr, op=st.engine_op(), algorithm=st.algorithm,
                                          compression=st.compression, name=b.name,
                                          out=b.out_arr, comm=st.comm)
        st.launched.append(b)

    def _rr_decompress(self, b, result):
        """Write a compressor-carried bucket's reduced result into ``b.out``."""
        sent, ctx, scale = b.sent
        b.sent = None
        got = from_array(result).view(sent.shape)
        b.out.copy_(self._rr.compressor.decompress(got, ctx).reshape(-1))
        if scale != 1.0:
            b.out.mul_(scale)

    def _rr_launch_ready(self):
        # Strict bucket order: identical collective sequence on every rank.
        st = self._rr
        bs = st.layout.buckets
        while st.next_bucket < len(bs) and bs[st.next_bucket].missing == 0:
            self._rr_launch(bs[st.next_bucket])
            st.next_bucket += 1

    def _rr_flush(self):
        """Launch what backward left: parameters whose gradient did not arrive."""
        st = self._rr
        for b in st.layout.buckets[st.next_bucket:]:
            if b.missing:
                for i, off, n in b.members:
                    if i not in st.arrived:
                        self._rr_pack(st.params[i], b, off, n)
                b.missing = 0
        self._rr_launch_ready()
        st.comm_pass = False
        self._rr_launch_status(active=True)

    def _rr_launch_status(self, active):
        """One-hot 'still training' flags, reduced after the buckets (used by join())."""
        st = self._rr
        size, rank = st.comm_size_rank()
        if size == 1:
            st.status = None
            return
        flags = np.zeros(size, dtype=np.int32)
        flags[rank] = 1 if active else 0
        st.status = rr.allreduce_async(flags, op=rr.Sum, algorithm=st.algorithm,
                                       name=f"{st.prefix}.join", comm=st.comm)

    def _rr_wait(self):
        """Wait for the launched buckets and the flags; return the flags (None on one rank).

        Every handle is waited for even after one fails, so nothing stays in
        flight; then the first failure is raised, naming its tensor.
        """
        st = self._rr
        launched, st.launched = st.launched, []
        status, st.status = st.status, None
        errors = []
        for b in launched:
            try:
                res = b.handle.wait()
                if getattr(b, "sent", None) is not None:
                    self._rr_decompress(b, res)
            except BaseException as exc:  # keep draining so nothing stays in flight
                errors.append((b, exc))
            b.handle = None
        active = None
        if status is not None:
            try:
                active = np.asarray(status.wait())
            except BaseException as exc:
                errors.append((None, exc))
        return launched, active, errors

    def _rr_raise_first(self, errors):
        b, exc = errors[0]
        if isinstance(exc, rr.RingReduceError):
            raise exc
        what = b.name if b is not None else f"{self._rr.prefix}.join"
        raise _error(f"allreduce of {what} failed: {exc!r}") from exc

    # ------------------------------------------------------- compression
    @property
    def compression(self):
        """The compression the gradient buckets use (None: uncompressed).

        The engine configuration, or the Horovod-style compressor when one was given.
        """
        st = self._rr
        return st.compressor if st.compressor is not None else st.compression

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
        st = self._rr
        if st.launched or st.in_pass:
            raise _error("set_compression() called while gradient allreduces are in flight; "
                         "call step() or synchronize() first")
        st.compressor, st.compression = _for_buckets(*split_compression(compression))

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
        st = self._rr
        if st.in_pass:
            raise _error("synchronize()/step() called from inside backward")
        if st.synchronized:
            return
        if st.layout is None or st.passes < st.passes_per_step:
            # step() before the k-th backward pass: reduce what has accumulated so far.
            self._rr_begin_comm()
            self._rr_flush()
        launched, active, errors = self._rr_wait()
        st.passes = 0
        st.layout = None
        st.synchronized = True
        st.user_synced = True
        if errors:
            self._rr_raise_first(errors)
        if active is not None:
            st.active = active
        self._rr_unpack(launched, st.post_scale(active))

    def _rr_unpack(self, launched, scale):
        """Write the reduced buckets (times ``scale``) into the parameters' ``.grad``."""
        params = self._rr.params
        for b in launched:
            res = b.out
            if scale != 1.0:
                res.mul_(scale)
            for i, off, n in b.members:
                p = params[i]
                g = res[off:off + n].view_as(p)
                # A copy, not a view of the bucket: a view measured no faster here
                # (interleaved A/B, large preset) and would alias the next step's result.
                if p.grad is None or p.grad.is_sparse:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Make ``step()`` skip its own ``synchronize()`` (already called by the user)."""
        self._rr.should_sync = False
        try:
            yield
        finally:
            self._rr.should_sync = True

    def step(self, closure=None):
        st = self._rr
        if st.should_sync:
            if st.user_synced:
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(). This can cause training "
                              "slowdown. You may want to consider using "
                              "optimizer.skip_synchronize() context if you use "
                              "optimizer.synchronize() in your code.", stacklevel=2)
            self.synchronize()
        st.user_synced = False
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True):
        if self._rr.launched:
            raise _error("zero_grad() called while gradient allreduces are in flight; call "
                         "step() or synchronize() first")
        return super().zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------- join
    def needs_synchronize(self) -> bool:
        """True when a backward pass ran since the last ``synchronize()`` (or ``step()``).

        ``rrt.join()`` refuses to start then: this rank's gradients are half sent.
        """
        return not self._rr.synchronized

    def active_ranks(self) -> np.ndarray | None:
        """Which ranks contributed gradients to this optimizer's last step.

        An int32 array with one flag per rank of the optimizer's communicator
        (1: training, 0: joined), or None when unknown: on one rank, before the
        first step, or after ``end_join()``.
        """
        return self._rr.active

    def join_round(self) -> np.ndarray | None:
        """Contribute zero gradients to one step of the ranks still training.

        Used by ``rrt.join()`` on a rank that has joined: it issues the same
        collectives as a training rank's ``step()`` (every bucket, then the
        flags, with this rank's flag 0) and returns the reduced flags (None
        on one rank). This rank's ``.grad`` and parameters are untouched.
        """
        st = self._rr
        lay = self._rr_current_layout()
        st.launched = []
        for b in lay.buckets:
            b.buf.zero_()
            self._rr_launch(b)
        self._rr_launch_status(active=False)
        _, active, errors = self._rr_wait()
        if errors:
            self._rr_raise_first(errors)
        return active

    def end_join(self) -> None:
        """Forget ``active_ranks()``: once everyone has joined, every rank trains again."""
        self._rr.active = None

    # ------------------------------------------------------- state dict
    def state_dict(self):
        """The wrapped optimizer's state dict plus this rank's error-feedback residuals.

        The residuals are CPU tensors (with plain ints, strings, lists and
        dicts around them), so ``torch.load(path)`` reads a saved state dict
        with its ``weights_only=True`` default.
        """
        sd = super().state_dict()
        cs = getattr(rr, "compression_state", None)
        if cs is not None:
            sd["ringreduce"] = {"size": rr.size(),
                                "compression_state": {rr.rank(): _to_torch(cs().state_dict())}}
        return sd

    def load_state_dict(self, state_dict):
        """Load a state dict; residuals are restored for the ranks it holds.

        ``state_dict["ringreduce"]["compression_state"]`` maps rank -> residuals;
        a checkpoint may hold every rank's (see scripts/train.py). Residuals may
        be tensors or numpy arrays (checkpoints written before they were tensors).
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
        cs().load_state_dict(_to_numpy(mine))


def _to_torch(obj):
    """``obj`` with numpy arrays as CPU tensors and numpy scalars as Python numbers.

    What ``torch.load``'s weights_only unpickler accepts. The engine's
    ``state_dict()`` returns copies, so sharing their memory is safe.
    """
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_torch(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_torch(v) for v in obj)
    return obj


def _to_numpy(obj):
    """The inverse of :func:`_to_torch`: tensors back to (copied) numpy arrays."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().numpy().copy()
    if isinstance(obj, dict):
        return {k: _to_numpy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_numpy(v) for v in obj)
    return obj


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


def _check_groups(groups, num_groups) -> None:
    """Horovod's checks of ``groups=`` / ``num_groups=`` (the values do not change the result)."""
    if groups is not None and num_groups:
        raise ValueError("Parameters num_groups and groups are mutually exclusive.")
    if num_groups and int(num_groups) < 0:
        raise ValueError("num_groups must be >= 0")
    if groups is None or isinstance(groups, int) and groups >= 0:
        return
    if not isinstance(groups, (list, tuple)):
        raise ValueError("groups should be a non-negative integer or a list of list of "
                         "torch.Tensor.")
    seen = set()
    for group in groups:
        for p in group:
            if not isinstance(p, torch.Tensor):
                raise ValueError("groups must consist of torch.Tensor.")
            if p in seen:
                raise ValueError("A parameter can only appear once in groups.")
            seen.add(p)


def _for_buckets(compressor, compression):
    """Compression.auto treats a fusion bucket (flat, many tensors) as one tensor to judge, so
    its rule that 1-D tensors (biases, norms) stay uncompressed does not apply to the bucket."""
    if isinstance(compression, rr.Compression.auto.__class__) and not compression.one_dim:
        compression = compression(one_dim=True)
    return compressor, compression


def DistributedOptimizer(optimizer, named_parameters=None, compression=None, op=None,
                         backward_passes_per_step=1, algorithm="auto",
                         fusion_threshold=25 * 2**20, gradient_predivide_factor=1.0,
                         sparse_as_dense=False, comm=None,
                         first_bucket_bytes=_FIRST_BUCKET_BYTES, overlap="auto",
                         num_groups=0, groups=None, process_set=None):
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
    compression : rr.Compression config or a Horovod compressor, optional
        Passed to the engine for every bucket (``rr.Compression.fp16`` etc.).
        Horovod's ``Compression.none`` / ``.fp16`` map to the engine's; any other
        object with ``compress(tensor) -> (tensor, ctx)`` and
        ``decompress(tensor, ctx)`` runs on each fusion bucket around its allreduce.
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
    num_groups, groups : Horovod's fusion grouping
        Accepted and checked; the fusion buckets above already group the
        gradients (every rank alike), so they do not change the result.
    process_set : rr.ProcessSet, optional
        Horovod's spelling of ``comm``: the set's communicator.
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
    if type(op) is int and isinstance(backward_passes_per_step, (rr.ReduceOp, type(None))):
        # Horovod's positional order: (..., compression, backward_passes_per_step, op, ...).
        op, backward_passes_per_step = backward_passes_per_step, op
    if op is None:
        op = rr.Average
    if repr(op) == "hvd.Adasum":
        raise NotImplementedError("DistributedOptimizer(op=Adasum): Adasum is not implemented in "
                                  "ringreduce; use op=Average (default) or Sum")
    _check_groups(groups, num_groups)
    if process_set is not None and process_set is not rr.global_process_set:
        if comm is not None and comm is not process_set.comm:
            raise _error("DistributedOptimizer: both comm= and process_set= given, and they differ")
        if not process_set.included():
            raise _error(f"DistributedOptimizer: this rank is not a member of {process_set!r}")
        comm = process_set.comm
    base = type(optimizer)
    cls = type(base.__name__, (_DistributedOptimizerMixin, base),
               {"__module__": base.__module__, "__doc__": base.__doc__})
    obj = cls.__new__(cls)
    obj.__dict__.update(optimizer.__dict__)  # same state, groups, defaults, hooks
    obj._rr_setup(named_parameters, compression, op, backward_passes_per_step, algorithm,
                  fusion_threshold, gradient_predivide_factor, sparse_as_dense, comm,
                  first_bucket_bytes, overlap)
    return obj
