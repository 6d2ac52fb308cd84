"""Horovod's torch collectives, name for name, on the ringreduce engine.

Every collective of ``horovod.torch`` with Horovod's arguments (``name=``,
``op=``, the deprecated ``average=``, ``prescale_factor``/``postscale_factor``,
``process_set=``; ``ignore_name_scope`` is accepted and has no effect), its
``_async`` form returning an integer handle for :func:`poll` /
:func:`synchronize`, its in-place ``_`` form where Horovod has one, and the
autograd rules of Horovod's ``horovod/torch/mpi_ops.py``:

=================  ==============================================================
forward            gradient
=================  ==============================================================
allreduce          allreduce of the gradient (same op and factors)
grouped_allreduce  grouped allreduce of the gradients
allgather          allreduce (average) of the gradient, this rank's rows of it
broadcast          allreduce (average) of the gradient on the root, zero elsewhere
alltoall           alltoall of the gradient with the received splits
reducescatter      allgather of the gradient (times the set size for op=Sum)
=================  ==============================================================

CPU tensors reach the engine as numpy views and CUDA tensors as cupy views
(:mod:`ringreduce.torch._convert`), float16 and bfloat16 included; a
non-contiguous tensor is copied once into a contiguous one first.

Example
-------
>>> import torch, ringreduce.torch as hvd
>>> hvd.init()
>>> total = hvd.allreduce(torch.ones(3), op=hvd.Sum)          # == size everywhere
>>> rows = hvd.allgather(torch.full((hvd.rank() + 1, 2), hvd.rank()))
>>> h = hvd.allreduce_async(torch.ones(3), name="metric")
>>> avg = hvd.synchronize(h)
"""

from __future__ import annotations

import itertools
import threading
import warnings

import numpy as np
import torch

import ringreduce as rr

from ._convert import from_array, to_array
from .compression import Compression, split_compression

__all__ = [
    "Adasum", "Average", "Sum", "Min", "Max", "Product",
    "allreduce", "allreduce_", "allreduce_async", "allreduce_async_",
    "grouped_allreduce", "grouped_allreduce_", "grouped_allreduce_async", "grouped_allreduce_async_",
    "allgather", "allgather_async", "grouped_allgather", "grouped_allgather_async",
    "broadcast", "broadcast_", "broadcast_async", "broadcast_async_",
    "alltoall", "alltoall_async",
    "reducescatter", "reducescatter_async", "grouped_reducescatter", "grouped_reducescatter_async",
    "sparse_allreduce_async", "poll", "synchronize", "barrier",
]

Average, Sum, Min, Max, Product = rr.Average, rr.Sum, rr.Min, rr.Max, rr.Product

_ADASUM = ("Adasum is not implemented in ringreduce: use op=hvd.Average (or hvd.Sum); "
           "ringreduce's own answer to Adasum's use case is gradient compression "
           "(rr.Compression.int8 / onebit with error feedback)")


class _Adasum:
    """Horovod's Adasum op: accepted as a name, refused with NotImplementedError when used."""

    def __repr__(self):
        return "hvd.Adasum"

    def __reduce__(self):
        return "Adasum"


Adasum = _Adasum()


# ----------------------------------------------------------------- arguments
def _op(op, average=None):
    """Horovod's op rule: ``op`` wins, ``average=`` (deprecated) maps to Average/Sum, default Average."""
    if isinstance(average, rr.ReduceOp) and op is None:
        op, average = average, None   # rrt.allreduce(t, rr.Sum): the pre-Horovod positional op
    if op is not None and average is not None:
        raise ValueError("The op parameter supersedes average. Please provide only one of them.")
    if average is not None:
        warnings.warn("Parameter `average` has been replaced with `op` and will be removed",
                      DeprecationWarning, stacklevel=3)
        op = Average if average else Sum
    if op is None:
        op = Average
    if op is Adasum:
        raise NotImplementedError(_ADASUM)
    return op


def _set_kw(process_set) -> dict:
    return {} if process_set is None else {"process_set": process_set}


def _set_of(process_set):
    return rr.global_process_set if process_set is None else process_set


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    t = tensor.detach()
    return t if t.is_contiguous() else t.contiguous()


# dtypes the engine does not carry but whose bytes it can move (allgather, broadcast,
# alltoall): sent as uint8 views, zero-copy, and viewed back.
_AS_BYTES = (torch.int16, torch.bool)


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    """``t`` (contiguous) as uint8 with one trailing byte dimension, rows unchanged."""
    if t.dtype == torch.bool:
        return t.view(torch.uint8)
    return t.unsqueeze(-1).view(torch.uint8)


def _from_bytes(t: torch.Tensor, dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return t.view(torch.bool)
    if t.numel() == 0:   # an empty result's strides need not allow the view
        return torch.empty(t.shape[:-1], dtype=dtype, device=t.device)
    return t.contiguous().view(dtype).squeeze(-1)


def _is_int(t: torch.Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex)


def _int_average(op, tensors, process_set):
    """Horovod averages integer tensors; the engine refuses to (it would truncate).

    Returns ``(engine op, divisor)``: Sum and the set size for an integer
    Average, else ``(op, None)``.
    """
    if op == Average and tensors and _is_int(tensors[0]):
        return Sum, _set_of(process_set).size()
    return op, None


def _int_scale(t: torch.Tensor, factor: float) -> torch.Tensor:
    """Horovod's integer scaling: multiply in float64, truncate back to the integer dtype."""
    return (t.to(torch.float64) * factor).to(t.dtype)


def _tensor(a) -> torch.Tensor:
    """The engine's result as a tensor sharing its memory."""
    if isinstance(a, np.ndarray) and not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return from_array(a)


def _splits_list(splits):
    if splits is None:
        return None
    if isinstance(splits, torch.Tensor):
        return [int(s) for s in splits.detach().cpu().reshape(-1).tolist()]
    return [int(s) for s in np.asarray(splits).reshape(-1).tolist()]


# ------------------------------------------------------------------- handles
class _Pending:
    """One async call of this module: the engine handles behind it and how to finish it."""

    __slots__ = ("handles", "finish", "keep", "key", "result", "finished")

    def __init__(self, handles, finish, keep=(), key=None):
        self.handles = list(handles)
        self.finish = finish      # list of engine results -> what synchronize() returns
        self.keep = keep          # tensors the engine reads or writes: alive until done
        self.key = key
        self.result = None
        self.finished = False

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def wait(self):
        if not self.finished:
            results, first = [], None
            for h in self.handles:   # drain every handle, then raise the first failure
                try:
                    results.append(h.wait())
                except BaseException as exc:
                    results.append(None)
                    first = first or exc
            self.finished = True
            if first is not None:
                raise first
            self.result = self.finish(results)
            self.keep = ()
        return self.result


class _HandleTable:
    """Integer handles (Horovod's) for the pending async calls, and the names in flight."""

    def __init__(self):
        self._lock = threading.Lock()
        self._next = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._names: set = set()

    def add(self, pending: _Pending) -> int:
        with self._lock:
            if pending.key is not None:
                if pending.key in self._names:
                    kind, name = pending.key
                    raise ValueError(f"rank {rr.rank()}: a {kind} named {name!r} is already in "
                                     "flight; names must be unique among pending operations "
                                     "(Horovod: duplicate name)")
                self._names.add(pending.key)
            h = next(self._next)
            self._pending[h] = pending
            return h

    def get(self, handle) -> _Pending | None:
        return self._pending.get(handle)

    def pop(self, handle) -> _Pending | None:
        with self._lock:
            p = self._pending.pop(handle, None)
            if p is not None and p.key is not None:
                self._names.discard(p.key)
            return p

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            self._names.clear()


HANDLES = _HandleTable()


def _submit(kind, name, handles, finish, keep=()) -> int:
    key = (kind, name) if name is not None else None
    return HANDLES.add(_Pending(handles, finish, keep, key))


def _check_name(kind, name) -> None:
    if name is not None and (kind, name) in HANDLES._names:
        raise ValueError(f"rank {rr.rank()}: a {kind} named {name!r} is already in flight; "
                         "names must be unique among pending operations (Horovod: duplicate name)")


def poll(handle) -> bool:
    """True once the async operation behind ``handle`` has finished (``synchronize`` won't block).

    Example
    -------
    >>> h = hvd.allreduce_async(t)
    >>> while not hvd.poll(h):
    ...     do_other_work()
    >>> y = hvd.synchronize(h)
    """
    if isinstance(handle, _SparseHandle):
        return handle.done()
    p = HANDLES.get(handle)
    if p is None:
        raise ValueError(f"poll(): unknown handle {handle!r} (already synchronized?)")
    return p.done()


def synchronize(handle):
    """Wait for the async operation behind ``handle``; return its result (None for an unknown handle).

    Raises ``HorovodInternalError`` (``rr.RingReduceError``) when the collective failed.

    Example
    -------
    >>> y = hvd.synchronize(hvd.allgather_async(t))
    """
    if isinstance(handle, _SparseHandle):
        return handle()
    p = HANDLES.pop(handle)
    if p is None:
        return None
    return p.wait()


# ---------------------------------------------------------------- allreduce
def _allreduce_async(tensor, output, name, op, prescale_factor, postscale_factor, process_set,
                     engine_compression=None, algorithm="auto") -> int:
    """Start an allreduce of ``tensor`` into ``output`` (None: a new tensor; ``tensor``: in place)."""
    _check_name("allreduce", name)
    src = _contiguous(tensor)
    op, divisor = _int_average(op, [src], process_set)
    post_int = None
    if _is_int(src) and (prescale_factor != 1.0 or postscale_factor != 1.0 or divisor):
        # The engine takes no factors on integers: scale here as Horovod does (float64,
        # truncated), the average's division folded into the postscale.
        if prescale_factor != 1.0:
            src = _int_scale(src, prescale_factor)
        post_int = postscale_factor / (divisor or 1)
        prescale_factor = postscale_factor = 1.0
    inplace = output is tensor
    if inplace and src.data_ptr() == tensor.data_ptr():
        dst = src
    else:
        dst = torch.empty_like(src)
    src_arr = to_array(src)
    dst_arr = src_arr if dst is src else to_array(dst)
    kw = dict(op=op, name=name, out=dst_arr, prescale_factor=prescale_factor,
              postscale_factor=postscale_factor, algorithm=algorithm, **_set_kw(process_set))
    if engine_compression is not None:
        kw["compression"] = engine_compression
    h = rr.allreduce_async(src_arr, **kw)

    def finish(_results):
        res = dst if post_int in (None, 1.0) else _int_scale(dst, post_int)
        if inplace:
            if res.data_ptr() != tensor.data_ptr():
                with torch.no_grad():
                    tensor.copy_(res)
            return tensor
        return res

    return _submit("allreduce", name, [h], finish, keep=(src, dst, tensor))


def allreduce_async(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                    postscale_factor=1.0, process_set=None, ignore_name_scope=False) -> int:
    """Start averaging (or ``op``-reducing) ``tensor`` over the ranks; returns a handle.

    The input is not modified; ``synchronize(handle)`` returns a new tensor.

    Example
    -------
    >>> h = hvd.allreduce_async(grad, name="layer1")
    >>> avg = hvd.synchronize(h)
    """
    op = _op(op, average)
    return _allreduce_async(tensor, None, name, op, prescale_factor, postscale_factor, process_set)


def allreduce_async_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
                     postscale_factor=1.0, process_set=None, ignore_name_scope=False) -> int:
    """In-place :func:`allreduce_async`: ``synchronize(handle)`` returns ``tensor``, reduced."""
    op = _op(op, average)
    return _allreduce_async(tensor, tensor, name, op, prescale_factor, postscale_factor, process_set)


class HorovodAllreduce(torch.autograd.Function):
    """allreduce with autograd: the gradient is the allreduce of the gradient."""

    @staticmethod
    def forward(ctx, tensor, name, op, prescale_factor, postscale_factor, process_set,
                engine_compression, algorithm):
        ctx.args = (op, prescale_factor, postscale_factor, process_set)
        return synchronize(_allreduce_async(tensor, None, name, op, prescale_factor,
                                            postscale_factor, process_set, engine_compression,
                                            algorithm))

    @staticmethod
    def backward(ctx, grad_output):
        op, pre, post, ps = ctx.args
        grad = allreduce(grad_output, op=op, prescale_factor=pre, postscale_factor=post,
                         process_set=ps)
        return (grad,) + (None,) * 7


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def allreduce(tensor, average=None, name=None, compression=Compression.none, op=None,
              prescale_factor=1.0, postscale_factor=1.0, process_set=None,
              ignore_name_scope=False, algorithm="auto") -> torch.Tensor:
    """Return ``tensor`` averaged (default) or reduced with ``op`` over the ranks.

    Differentiable (the gradient is the allreduce of the gradient). ``compression``
    takes a Horovod compressor (``Compression.fp16``, your own) or an engine format
    (``rr.Compression.int8`` ...); ``algorithm`` picks the engine's algorithm.

    Example
    -------
    >>> mean_loss = hvd.allreduce(torch.tensor([loss]), name="loss").item()
    >>> total = hvd.allreduce(counts, op=hvd.Sum)
    """
    op = _op(op, average)
    torch_comp, engine_comp = split_compression(compression)
    if torch_comp is None:
        compressed, cctx = tensor, None
    else:
        compressed, cctx = torch_comp.compress(tensor)
    divide = None
    if torch_comp is not None and op == Average and not compressed.dtype.is_floating_point:
        # An integer-compressed average: sum, and take the mean once decompressed (a floor
        # division of the integers would lose the fraction the compressor kept).
        op, divide = Sum, _set_of(process_set).size()
    if _needs_grad(compressed):
        out = HorovodAllreduce.apply(compressed, name, op, prescale_factor, postscale_factor,
                                     process_set, engine_comp, algorithm)
    else:
        out = synchronize(_allreduce_async(compressed, None, name, op, prescale_factor,
                                           postscale_factor, process_set, engine_comp, algorithm))
    if torch_comp is None:
        return out
    out = torch_comp.decompress(out, cctx)
    return out if divide is None else out / divide


def allreduce_(tensor, average=None, name=None, op=None, prescale_factor=1.0,
               postscale_factor=1.0, process_set=None, ignore_name_scope=False,
               algorithm="auto", compression=None) -> torch.Tensor:
    """In-place :func:`allreduce`; returns ``tensor`` (no autograd, as in Horovod)."""
    op = _op(op, average)
    _, engine_comp = split_compression(compression)
    return synchronize(_allreduce_async(tensor, tensor, name, op, prescale_factor,
                                        postscale_factor, process_set, engine_comp, algorithm))


# -------------------------------------------------------- grouped allreduce
def _grouped_allreduce_async(tensors, inplace, name, op, prescale_factor, postscale_factor,
                             process_set) -> int:
    _check_name("grouped_allreduce", name)
    tensors = list(tensors)
    srcs = [_contiguous(t) for t in tensors]
    op, divisor = _int_average(op, srcs, process_set)
    h = rr.grouped_allreduce_async([to_array(s) for s in srcs], op=op, name=name,
                                   prescale_factor=prescale_factor,
                                   postscale_factor=postscale_factor, **_set_kw(process_set))

    def finish(results):
        outs = [_tensor(a).view(t.shape) for a, t in zip(results[0], tensors)]
        if divisor is not None:
            outs = [_int_scale(o, 1.0 / divisor) for o in outs]
        if not inplace:
            return outs
        with torch.no_grad():
            for t, o in zip(tensors, outs):
                t.copy_(o)
        return tensors

    return _submit("grouped_allreduce", name, [h], finish, keep=tuple(srcs))


def grouped_allreduce_async(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                            postscale_factor=1.0, process_set=None,
                            ignore_name_scope=False) -> int:
    """Start one fused allreduce of a list of tensors; ``synchronize`` returns a list."""
    op = _op(op, average)
    return _grouped_allreduce_async(tensors, False, name, op, prescale_factor, postscale_factor,
                                    process_set)


def grouped_allreduce_async_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                             postscale_factor=1.0, process_set=None,
                             ignore_name_scope=False) -> int:
    """In-place :func:`grouped_allreduce_async`."""
    op = _op(op, average)
    return _grouped_allreduce_async(tensors, True, name, op, prescale_factor, postscale_factor,
                                    process_set)


class HorovodGroupedAllreduce(torch.autograd.Function):
    """grouped_allreduce with autograd: the gradients' grouped allreduce."""

    @staticmethod
    def forward(ctx, name, op, prescale_factor, postscale_factor, process_set, *tensors):
        ctx.args = (op, prescale_factor, postscale_factor, process_set)
        return tuple(synchronize(_grouped_allreduce_async(tensors, False, name, op,
                                                          prescale_factor, postscale_factor,
                                                          process_set)))

    @staticmethod
    def backward(ctx, *grads):
        op, pre, post, ps = ctx.args
        reduced = grouped_allreduce(list(grads), op=op, prescale_factor=pre,
                                    postscale_factor=post, process_set=ps)
        return (None,) * 5 + tuple(reduced)


def grouped_allreduce(tensors, average=None, name=None, compression=Compression.none, op=None,
                      prescale_factor=1.0, postscale_factor=1.0, process_set=None,
                      ignore_name_scope=False) -> list:
    """Reduce a list of tensors in one fused call; returns a list (differentiable).

    Example
    -------
    >>> w_avg, b_avg = hvd.grouped_allreduce([w, b])
    """
    op = _op(op, average)

    def run(ts):
        if _needs_grad(*ts):
            return list(HorovodGroupedAllreduce.apply(name, op, prescale_factor, postscale_factor,
                                                      process_set, *ts))
        return synchronize(_grouped_allreduce_async(ts, False, name, op, prescale_factor,
                                                    postscale_factor, process_set))
    return _through_compressor(compression, list(tensors), run)


def _through_compressor(compression, tensors: list, run) -> list:
    """run(tensors) between a user compressor's compress and decompress of each tensor."""
    torch_comp, _ = split_compression(compression)
    if torch_comp is None:
        return run(tensors)
    pairs = [torch_comp.compress(t) for t in tensors]
    outs = run([p[0] for p in pairs])
    return [torch_comp.decompress(o, ctx) for o, (_, ctx) in zip(outs, pairs)]


def grouped_allreduce_(tensors, average=None, name=None, op=None, prescale_factor=1.0,
                       postscale_factor=1.0, process_set=None, ignore_name_scope=False) -> list:
    """In-place :func:`grouped_allreduce`; returns ``tensors``."""
    op = _op(op, average)
    return synchronize(_grouped_allreduce_async(tensors, True, name, op, prescale_factor,
                                                postscale_factor, process_set))


# ----------------------------------------------------------------- allgather
def _allgather_async(tensors, name, process_set, grouped=False) -> int:
    kind = "grouped_allgather" if grouped else "allgather"
    _check_name(kind, name)
    srcs = [_contiguous(t) for t in tensors]
    dtypes = [t.dtype for t in srcs]
    srcs = [_as_bytes(t) if t.dtype in _AS_BYTES else t for t in srcs]
    handles = [rr.allgather_async(to_array(s), name=_sub(name, i, grouped), **_set_kw(process_set))
               for i, s in enumerate(srcs)]

    def finish(results):
        outs = [_tensor(a) for a in results]
        outs = [_from_bytes(o, d) if d in _AS_BYTES else o for o, d in zip(outs, dtypes)]
        return outs if grouped else outs[0]

    return _submit(kind, name, handles, finish, keep=tuple(srcs))


def _sub(name, i, grouped):
    if name is None or not grouped:
        return name
    return f"{name}.{i}"


def allgather_async(tensor, name=None, process_set=None, ignore_name_scope=False) -> int:
    """Start concatenating every rank's ``tensor`` along dimension 0; returns a handle."""
    return _allgather_async([tensor], name, process_set)


def _rows_offset(dim0: int, process_set) -> int:
    """Where this rank's rows start in an allgather over ``process_set`` (one small allgather)."""
    ps = _set_of(process_set)
    dims = allgather(torch.tensor([dim0], dtype=torch.int64), process_set=process_set)
    return int(dims[:ps.rank()].sum().item())


class HorovodAllgather(torch.autograd.Function):
    """allgather with autograd: this rank's rows of the averaged gradient."""

    @staticmethod
    def forward(ctx, tensor, name, process_set):
        ctx.dim = tensor.shape[0]
        ctx.process_set = process_set
        return synchronize(_allgather_async([tensor], name, process_set))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        offset = _rows_offset(ctx.dim, ctx.process_set)
        return reduced.narrow(0, offset, ctx.dim), None, None


def allgather(tensor, name=None, process_set=None, ignore_name_scope=False) -> torch.Tensor:
    """Concatenate every rank's ``tensor`` along dimension 0 (first dimensions may differ).

    Differentiable: the gradient is this rank's rows of the averaged gradient.

    Example
    -------
    >>> everyone = hvd.allgather(torch.tensor([hvd.rank()]))   # tensor([0, 1, ..., size-1])
    """
    if _needs_grad(tensor):
        return HorovodAllgather.apply(tensor, name, process_set)
    return synchronize(_allgather_async([tensor], name, process_set))


def grouped_allgather_async(tensors, name=None, process_set=None, ignore_name_scope=False) -> int:
    """Start an allgather of each tensor of a list; ``synchronize`` returns a list."""
    return _allgather_async(list(tensors), name, process_set, grouped=True)


class HorovodGroupedAllgather(torch.autograd.Function):
    """grouped_allgather with autograd (per tensor as allgather)."""

    @staticmethod
    def forward(ctx, name, process_set, *tensors):
        ctx.dims = [t.shape[0] for t in tensors]
        ctx.process_set = process_set
        return tuple(synchronize(_allgather_async(tensors, name, process_set, grouped=True)))

    @staticmethod
    def backward(ctx, *grads):
        reduced = grouped_allreduce(list(grads), op=Average, process_set=ctx.process_set)
        ps = _set_of(ctx.process_set)
        dims = allgather(torch.tensor([ctx.dims], dtype=torch.int64),
                         process_set=ctx.process_set)   # (set size, tensors)
        offsets = dims[:ps.rank()].sum(dim=0)
        return (None, None) + tuple(g.narrow(0, int(o), d)
                                    for g, o, d in zip(reduced, offsets.tolist(), ctx.dims))


def grouped_allgather(tensors, name=None, process_set=None, ignore_name_scope=False) -> list:
    """:func:`allgather` of each tensor of a list; returns a list (differentiable)."""
    tensors = list(tensors)
    if _needs_grad(*tensors):
        return list(HorovodGroupedAllgather.apply(name, process_set, *tensors))
    return synchronize(_allgather_async(tensors, name, process_set, grouped=True))


# ----------------------------------------------------------------- broadcast
def _broadcast_async(tensor, root_rank, name, process_set, inplace) -> int:
    _check_name("broadcast", name)
    src = _contiguous(tensor)
    if src.dtype in _AS_BYTES:
        src = _as_bytes(src)
    h = rr.broadcast_async(to_array(src), root_rank=root_rank, name=name, **_set_kw(process_set))

    def finish(results):
        out = _tensor(results[0])
        if tensor.dtype in _AS_BYTES:
            out = _from_bytes(out, tensor.dtype)
        out = out.view(tensor.shape)
        if not inplace:
            return out
        with torch.no_grad():
            tensor.copy_(out)
        return tensor

    return _submit("broadcast", name, [h], finish, keep=(src,))


def broadcast_async(tensor, root_rank, name=None, process_set=None, ignore_name_scope=False) -> int:
    """Start copying ``root_rank``'s ``tensor`` to every rank; ``synchronize`` returns a new tensor."""
    return _broadcast_async(tensor, root_rank, name, process_set, inplace=False)


def broadcast_async_(tensor, root_rank, name=None, process_set=None,
                     ignore_name_scope=False) -> int:
    """In-place :func:`broadcast_async`: ``synchronize`` returns ``tensor`` holding the root's values."""
    return _broadcast_async(tensor, root_rank, name, process_set, inplace=True)


class HorovodBroadcast(torch.autograd.Function):
    """broadcast with autograd: the averaged gradient on the root, zero elsewhere."""

    @staticmethod
    def forward(ctx, tensor, root_rank, name, process_set):
        ctx.root_rank = root_rank
        ctx.process_set = process_set
        return synchronize(_broadcast_async(tensor, root_rank, name, process_set, inplace=False))

    @staticmethod
    def backward(ctx, grad_output):
        reduced = allreduce(grad_output, op=Average, process_set=ctx.process_set)
        if _set_of(ctx.process_set).rank() != ctx.root_rank:
            reduced = reduced * 0
        return reduced, None, None, None


def broadcast(tensor, root_rank, name=None, process_set=None, ignore_name_scope=False) -> torch.Tensor:
    """Return ``root_rank``'s ``tensor`` on every rank (a new tensor; differentiable).

    ``root_rank`` counts within ``process_set`` when one is given.

    Example
    -------
    >>> w0 = hvd.broadcast(w, root_rank=0)
    """
    if _needs_grad(tensor):
        return HorovodBroadcast.apply(tensor, root_rank, name, process_set)
    return synchronize(_broadcast_async(tensor, root_rank, name, process_set, inplace=False))


def broadcast_(tensor, root_rank, name=None, process_set=None, ignore_name_scope=False) -> torch.Tensor:
    """In-place :func:`broadcast`; returns ``tensor``."""
    if tensor.is_contiguous() and not tensor.requires_grad:
        _check_name("broadcast", name)
        rr.broadcast_(to_array(_as_bytes(tensor) if tensor.dtype in _AS_BYTES else tensor), root_rank=root_rank, name=name, **_set_kw(process_set))
        return tensor
    return synchronize(_broadcast_async(tensor, root_rank, name, process_set, inplace=True))


# ------------------------------------------------------------------ alltoall
def _alltoall_async(tensor, splits, name, process_set) -> int:
    _check_name("alltoall", name)
    src = _contiguous(tensor)
    dtype = src.dtype
    if dtype in _AS_BYTES:
        src = _as_bytes(src)
    h = rr.alltoall_async(to_array(src), splits=_splits_list(splits), name=name,
                          **_set_kw(process_set))
    like = splits if isinstance(splits, torch.Tensor) else None

    def finish(results):
        out, received = results[0]
        rs = torch.from_numpy(np.asarray(received, dtype=np.int64).copy())
        if like is not None:
            rs = rs.to(dtype=like.dtype, device=like.device)
        else:
            rs = rs.to(torch.int32)
        out = _tensor(out)
        return (_from_bytes(out, dtype) if dtype in _AS_BYTES else out), rs

    return _submit("alltoall", name, [h], finish, keep=(src,))


def alltoall_async(tensor, splits=None, name=None, process_set=None, ignore_name_scope=False) -> int:
    """Start an alltoall; ``synchronize`` returns ``(received tensor, received splits)``.

    ``splits[i]`` rows of ``tensor`` (along dimension 0) go to rank i; without
    splits the rows are divided evenly.
    """
    return _alltoall_async(tensor, splits, name, process_set)


class HorovodAlltoall(torch.autograd.Function):
    """alltoall with autograd: the gradient travels back with the received splits."""

    @staticmethod
    def forward(ctx, tensor, splits, name, process_set):
        output, received = synchronize(_alltoall_async(tensor, splits, name, process_set))
        ctx.process_set = process_set
        ctx.recvsplits = received
        if splits is None:
            return output
        ctx.mark_non_differentiable(received)
        return output, received

    @staticmethod
    def backward(ctx, grad_output, *dead_gradients):
        grad, _ = alltoall(grad_output, splits=ctx.recvsplits, process_set=ctx.process_set)
        return grad, None, None, None


def alltoall(tensor, splits=None, name=None, process_set=None, ignore_name_scope=False):
    """Send ``splits[i]`` rows of ``tensor`` to rank i; receive every rank's rows for this one.

    Returns the received tensor, and with ``splits`` given also the received
    splits (as Horovod). Differentiable.

    Example
    -------
    >>> out, got = hvd.alltoall(x, splits=torch.tensor([1] * hvd.size(), dtype=torch.int32))
    """
    if _needs_grad(tensor):
        return HorovodAlltoall.apply(tensor, splits, name, process_set)
    output, received = synchronize(_alltoall_async(tensor, splits, name, process_set))
    return output if splits is None else (output, received)


# ------------------------------------------------------------- reducescatter
def _reducescatter_async(tensors, name, op, process_set, prescale_factor, postscale_factor,
                         splits=None, grouped=False) -> int:
    kind = "grouped_reducescatter" if grouped else "reducescatter"
    _check_name(kind, name)
    op = _op(op)
    srcs = [_contiguous(t) for t in tensors]
    op, divisor = _int_average(op, srcs, process_set)
    handles = [rr.reducescatter_async(to_array(s), op=op, splits=_splits_list(splits),
                                      name=_sub(name, i, grouped),
                                      prescale_factor=prescale_factor,
                                      postscale_factor=postscale_factor, **_set_kw(process_set))
               for i, s in enumerate(srcs)]

    def finish(results):
        outs = [_tensor(a) for a in results]
        if divisor is not None:
            outs = [_int_scale(o, 1.0 / divisor) for o in outs]
        return outs if grouped else outs[0]

    return _submit(kind, name, handles, finish, keep=tuple(srcs))


def reducescatter_async(tensor, name=None, op=Average, process_set=None, prescale_factor=1.0,
                        postscale_factor=1.0, splits=None, ignore_name_scope=False) -> int:
    """Start reducing ``tensor`` over the ranks, each keeping its block of rows; returns a handle."""
    return _reducescatter_async([tensor], name, op, process_set, prescale_factor,
                                postscale_factor, splits)


def _scatter_grad(grads, op, process_set, pre, post):
    """Horovod's reducescatter gradient: the allgathered gradient, times the set size for Sum."""
    gathered = grouped_allgather(list(grads), process_set=process_set)
    factor = pre * post * (_set_of(process_set).size() if op == Sum else 1)
    return [g * factor if factor != 1 else g for g in gathered]


class HorovodReducescatter(torch.autograd.Function):
    """reducescatter with autograd: the gradient is the allgather of the gradient."""

    @staticmethod
    def forward(ctx, tensor, name, op, process_set, prescale_factor, postscale_factor, splits):
        ctx.args = (op, process_set, prescale_factor, postscale_factor)
        return synchronize(_reducescatter_async([tensor], name, op, process_set, prescale_factor,
                                                postscale_factor, splits))

    @staticmethod
    def backward(ctx, grad_output):
        op, ps, pre, post = ctx.args
        return (_scatter_grad([grad_output], op, ps, pre, post)[0],) + (None,) * 6


def reducescatter(tensor, name=None, compression=Compression.none, op=Average, process_set=None,
                  prescale_factor=1.0, postscale_factor=1.0, splits=None,
                  ignore_name_scope=False) -> torch.Tensor:
    """Reduce ``tensor`` over the ranks (default: average) and keep this rank's block of rows.

    Rows are split as evenly as possible (the first ranks get one more), or by
    ``splits`` (one count per rank). Differentiable.

    Example
    -------
    >>> shard = hvd.reducescatter(grad_flat, op=hvd.Sum)
    """
    torch_comp, _ = split_compression(compression)
    compressed, cctx = (tensor, None) if torch_comp is None else torch_comp.compress(tensor)
    if _needs_grad(compressed):
        out = HorovodReducescatter.apply(compressed, name, op, process_set, prescale_factor,
                                         postscale_factor, splits)
    else:
        out = synchronize(_reducescatter_async([compressed], name, op, process_set,
                                               prescale_factor, postscale_factor, splits))
    return out if torch_comp is None else torch_comp.decompress(out, cctx)


def grouped_reducescatter_async(tensors, name=None, op=Average, process_set=None,
                                prescale_factor=1.0, postscale_factor=1.0,
                                ignore_name_scope=False) -> int:
    """Start a reducescatter of each tensor of a list; ``synchronize`` returns a list."""
    return _reducescatter_async(list(tensors), name, op, process_set, prescale_factor,
                                postscale_factor, grouped=True)


class HorovodGroupedReducescatter(torch.autograd.Function):
    """grouped_reducescatter with autograd (per tensor as reducescatter)."""

    @staticmethod
    def forward(ctx, name, op, process_set, prescale_factor, postscale_factor, *tensors):
        ctx.args = (op, process_set, prescale_factor, postscale_factor)
        return tuple(synchronize(_reducescatter_async(tensors, name, op, process_set,
                                                      prescale_factor, postscale_factor,
                                                      grouped=True)))

    @staticmethod
    def backward(ctx, *grads):
        op, ps, pre, post = ctx.args
        return (None,) * 5 + tuple(_scatter_grad(grads, op, ps, pre, post))


def grouped_reducescatter(tensors, name=None, compression=Compression.none, op=Average,
                          process_set=None, prescale_factor=1.0, postscale_factor=1.0,
                          ignore_name_scope=False) -> list:
    """:func:`reducescatter` of each tensor of a list; returns a list (differentiable)."""
    def run(ts):
        if _needs_grad(*ts):
            return list(HorovodGroupedReducescatter.apply(name, op, process_set, prescale_factor,
                                                          postscale_factor, *ts))
        return synchronize(_reducescatter_async(ts, name, op, process_set, prescale_factor,
                                                postscale_factor, grouped=True))
    return _through_compressor(compression, list(tensors), run)


# ------------------------------------------------------------ sparse, barrier
class _SparseHandle:
    """What :func:`sparse_allreduce_async` returns: call it (or ``synchronize`` it) for the result."""

    def __init__(self, tensor, indices_handle, values_handle, op, process_set):
        self._t = tensor
        self._hs = (indices_handle, values_handle)
        self._op = op
        self._ps = process_set
        self._result = None

    def done(self) -> bool:
        return all(HANDLES.get(h) is None or HANDLES.get(h).done() for h in self._hs)

    def __call__(self):
        if self._result is None:
            values = synchronize(self._hs[1])
            indices = synchronize(self._hs[0])
            if self._op == Average:
                values = values / _set_of(self._ps).size()
            t = self._t
            if indices.dim() == 0 or values.dim() == 0:
                self._result = t.new().resize_as_(t)
            else:
                self._result = torch.sparse_coo_tensor(indices.transpose(0, 1), values, t.size())
        return self._result


def sparse_allreduce_async(tensor, name, op, process_set=None):
    """Horovod's sparse allreduce: allgather the indices and values of a sparse tensor.

    Returns a handle to call (or pass to :func:`synchronize`) for the summed
    (or averaged) sparse tensor, duplicates not coalesced.
    """
    op = _op(op)
    t = tensor.coalesce() if not tensor.is_coalesced() else tensor
    ih = allgather_async(t.indices().transpose(0, 1).contiguous(),
                         name=None if name is None else f"{name}.indices", process_set=process_set)
    vh = allgather_async(t.values(), name=None if name is None else f"{name}.values",
                         process_set=process_set)
    return _SparseHandle(t, ih, vh, op, process_set)


def barrier(process_set=None) -> None:
    """Wait until every rank (of ``process_set``) has reached this call.

    Example
    -------
    >>> if hvd.rank() == 0:
    ...     prepare_files()
    >>> hvd.barrier()
    """
    rr.barrier(**_set_kw(process_set))
