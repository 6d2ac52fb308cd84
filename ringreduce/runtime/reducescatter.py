"""Reduce-scatter and the grouped collectives: one fused call for many tensors.

rr.reducescatter reduces every rank's x and leaves rank r with piece r along
axis 0: split as evenly as possible (np.array_split's rule) or by explicit
`splits`. The algorithm is a choice of its own (ring, shm or native
MPI_Reduce_scatter: algorithms.reducescatter, priced by the cost model); each
piece is computed on one rank. numpy or cupy arrays (runtime.device_path). rr.grouped_allreduce packs a list of tensors into one buffer per
dtype and makes one allreduce of it (one fingerprint, one fused message).

Example::

    mine = rr.reducescatter(np.ones((8, 3), np.float32), op=rr.Sum)   # rows of this rank
    a, b = rr.grouped_allreduce([np.ones(3, np.float32), np.zeros(2, np.float32)])
"""
from __future__ import annotations

import numpy as np

from ..algorithms import native, registry
from ..core import device, timeline
from ..core.dtypes import check_array, dtype_code, is_integer
from ..core.errors import RingReduceError
from ..core.ops import Average
from ..policy.collective import choose_collective, requested_collective
from ..transport.p2p import chunk_bounds
from . import agree, device_path
from .collectives import _as_op, _raise_if_mismatch, _scale, _scales, allreduce_on, op_code, with_host
from .context import context
from .engine import Handle, run_async
from .gather import allgather_on, checked_splits
from .process_sets import resolve_comm

__all__ = ["reducescatter", "reducescatter_async", "grouped_allreduce", "grouped_allreduce_async",
           "grouped_allgather", "grouped_allgather_async", "grouped_reducescatter",
           "grouped_reducescatter_async", "reducescatter_on"]


@agree.joinable(lambda: _reducescatter_after_join)
@agree.guarded("reducescatter")
def reducescatter_on(chan, x, op=Average, splits=None, name=None, prescale_factor=1.0,
                     postscale_factor=1.0, algorithm="auto"):
    """reducescatter on a channel: this rank's reduced piece along axis 0."""
    who, n = chan.who, chan.size
    op = _as_op(op, who)
    x = check_array(x, who, name)
    on_device = device.is_device_array(x)
    if x.ndim == 0:
        raise RingReduceError(f"{who}: reducescatter needs an array with a first dimension")
    if is_integer(x.dtype) and op == Average:
        raise RingReduceError(f"{who}: op Average on integer tensor{' ' + repr(name) if name else ''} "
                              f"({x.dtype}) would truncate; use rr.Sum, or a float dtype")
    algorithm = requested_collective("reducescatter", algorithm, who)
    scales = _scales(who, x.dtype, name, prescale_factor, postscale_factor)
    first = x.shape[0]
    if splits is None:
        rows = np.diff(chunk_bounds(first, n))      # the first ranks get one row more
    else:
        rows = checked_splits(chan, first, splits, "reducescatter")
    if algorithm == "auto":
        algorithm = choose_collective(chan.plan, "reducescatter", x.nbytes, x.dtype, n, op)
    if algorithm == "mpi" and not native.supports(x.dtype):
        raise RingReduceError(f"{who}: algorithm 'mpi' cannot reduce-scatter {x.dtype}"
                              f"{' tensor ' + repr(name) if name else ''}: MPI has no reduction for "
                              "it; use 'ring', 'shm' or 'auto'")
    xp = device.array_module(x)
    buf = xp.array(x, order="C", copy=True)
    per = int(np.prod(x.shape[1:], dtype=np.int64))
    seq = chan.next_seq()
    if agree.enabled():
        # The splits are part of the call: hash them into the algorithm field.
        what = device_path.label(algorithm) if on_device else algorithm
        label = f"{what} rows {rows.tolist()}" if n <= 64 else f"{what} rows #{agree._hash(tuple(rows))}"
        header = agree.fingerprint(seq, "reducescatter", x.size, dtype_code(x.dtype),
                                   op_code(op, scales), label, name, x.shape)
        table, _ = agree.exchange(chan, header, name=name)
        _raise_if_mismatch(chan, table, "reducescatter", buf, op, label, name, seq)
    flat = buf.reshape(-1)
    if scales is not None:
        _scale(flat, scales[0])
    offsets = np.concatenate(([0], np.cumsum(rows))).astype(np.int64) * per
    out = xp.empty((int(rows[chan.rank]),) + tuple(x.shape[1:]), x.dtype)
    runner = registry.COLLECTIVES["reducescatter"][algorithm].run
    extra = {"agreed": agree.enabled()} if algorithm == "mpi" else {}
    t0 = timeline.now() if timeline.on else 0

    def run(ch, src, dst):
        runner(ch, src, op, offsets, dst, **extra)

    if on_device:
        device_path.moved(chan, flat, out, algorithm, run)
    else:
        run(chan, flat, out.reshape(-1))
    if scales is not None:
        _scale(out.reshape(-1), scales[1])
    if t0:
        timeline.complete("reducescatter", t0, {"name": name, "algorithm": algorithm,
                                                "bytes": x.nbytes, "call": seq})
    return out


def serve_reducescatter(chan, buf, op, rows, name, algorithm):
    """The joined form of a reducescatter on host array buf (the same call on every rank)."""
    return reducescatter_on(chan, buf, op, rows, name, 1.0, 1.0, algorithm)


def _reducescatter_after_join(chan, joined, x, op=Average, splits=None, name=None,
                              prescale_factor=1.0, postscale_factor=1.0, algorithm="auto"):
    """reducescatter_on on a rank still working, after its agreement round met joined ranks."""
    op = _as_op(op, chan.who)
    scales = _scales(chan.who, x.dtype, name, prescale_factor, postscale_factor)
    n = chan.size
    rows = (np.diff(chunk_bounds(x.shape[0], n)) if splits is None
            else checked_splits(chan, x.shape[0], splits, "reducescatter"))
    algorithm = requested_collective("reducescatter", algorithm, chan.who)
    spec = {"kind": "reducescatter", "dtype": dtype_code(x.dtype), "shape": list(x.shape),
            "op": int(op), "rows": [int(r) for r in rows], "name": name, "algorithm": algorithm}
    agree.share_spec(chan, joined, spec)

    def serve(h):
        h = np.array(h, order="C", copy=True)
        if scales is not None:
            _scale(h.reshape(-1), scales[0])
        return serve_reducescatter(chan, h, op, rows, name, algorithm)

    got = with_host(x, serve)
    if scales is not None:
        _scale(got.reshape(-1), scales[1])
    return device.array_module(x).asarray(got) if device.is_device_array(x) else got


def reducescatter(x, op=Average, splits=None, name: str | None = None, comm=None,
                  prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                  process_set=None, algorithm: str = "auto"):
    """Reduce `x` over all ranks and return this rank's piece along axis 0.

    Pieces are as even as possible (the first ranks get one row more), or
    `splits[r]` rows for rank r. op: rr.Sum, rr.Average, rr.Min, rr.Max, rr.Product.
    x may be a numpy or a cupy array. algorithm: "auto" (the cost model's pick),
    "ring", "shm" (node-local shared memory) or "mpi" (MPI_Reduce_scatter; not
    for float16/bfloat16); RINGREDUCE_REDUCESCATTER_ALGORITHM overrides "auto".

    Example::

        x = np.ones((rr.size() * 2, 4), np.float32)
        mine = rr.reducescatter(x, op=rr.Sum)     # shape (2, 4), every value rr.size()
    """
    return reducescatter_on(context(resolve_comm(comm, process_set)).main, x, op, splits, name,
                            prescale_factor, postscale_factor, algorithm)


def reducescatter_async(x, op=Average, splits=None, name: str | None = None, comm=None,
                        prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                        process_set=None, algorithm: str = "auto") -> Handle:
    """rr.reducescatter on the engine thread; wait() gives this rank's piece."""
    return run_async(resolve_comm(comm, process_set), "reducescatter",
                     lambda ch: reducescatter_on(ch, x, op, splits, name, prescale_factor,
                                                 postscale_factor, algorithm), x)


def _grouped_on(chan, arrays, op, name, prescale_factor, postscale_factor, algorithm="auto"):
    """One allreduce per dtype over the tensors packed back to back, in list order."""
    arrays = [check_array(a, chan.who, name) for a in arrays]
    out = [None] * len(arrays)
    by_dtype: dict = {}
    for i, a in enumerate(arrays):
        by_dtype.setdefault(a.dtype, []).append(i)
    for dtype, idxs in by_dtype.items():
        total = sum(arrays[i].size for i in idxs)
        xp = device.array_module(arrays[idxs[0]])
        fused = xp.empty(total, dtype)
        at = 0
        for i in idxs:
            fused[at:at + arrays[i].size] = arrays[i].reshape(-1)
            at += arrays[i].size
        label = name if len(by_dtype) == 1 else (f"{name}.{dtype}" if name else None)
        allreduce_on(chan, fused, op, algorithm, None, label, None, True, prescale_factor,
                     postscale_factor)
        at = 0
        for i in idxs:
            out[i] = fused[at:at + arrays[i].size].reshape(arrays[i].shape)
            at += arrays[i].size
    return out


def grouped_allreduce(arrays, op=Average, name: str | None = None, comm=None,
                      prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                      algorithm: str = "auto", process_set=None) -> list:
    """Allreduce a list of arrays in one fused call per dtype; returns the list of results.

    Example::

        g1, g2 = rr.grouped_allreduce([np.ones(3, np.float32), np.ones((2, 2), np.float32)],
                                      op=rr.Sum, name="grads")
    """
    chan = context(resolve_comm(comm, process_set)).main
    return _grouped_on(chan, list(arrays), op, name, prescale_factor, postscale_factor, algorithm)


def grouped_allreduce_async(arrays, op=Average, name: str | None = None, comm=None,
                            prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                            algorithm: str = "auto", process_set=None) -> Handle:
    """rr.grouped_allreduce on the engine thread; wait() gives the list of results."""
    arrays = list(arrays)
    return run_async(resolve_comm(comm, process_set), "grouped allreduce",
                     lambda ch: _grouped_on(ch, arrays, op, name, prescale_factor, postscale_factor,
                                            algorithm), *arrays)


def _grouped_allgather_on(chan, arrays, name) -> list:
    return [allgather_on(chan, a, f"{name}.{i}" if name else None) for i, a in enumerate(arrays)]


def _grouped_reducescatter_on(chan, arrays, op, name, pre, post) -> list:
    return [reducescatter_on(chan, a, op, None, f"{name}.{i}" if name else None, pre, post)
            for i, a in enumerate(arrays)]


def grouped_allgather(arrays, name: str | None = None, comm=None, process_set=None) -> list:
    """rr.allgather of each array, in order (one call each: first dimensions differ per tensor)."""
    return _grouped_allgather_on(context(resolve_comm(comm, process_set)).main, list(arrays), name)


def grouped_allgather_async(arrays, name: str | None = None, comm=None, process_set=None) -> Handle:
    """rr.grouped_allgather on the engine thread; wait() gives the list."""
    arrays = list(arrays)
    return run_async(resolve_comm(comm, process_set), "grouped allgather",
                     lambda ch: _grouped_allgather_on(ch, arrays, name), *arrays)


def grouped_reducescatter(arrays, op=Average, name: str | None = None, comm=None,
                          prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                          process_set=None) -> list:
    """rr.reducescatter of each array, in order."""
    return _grouped_reducescatter_on(context(resolve_comm(comm, process_set)).main, list(arrays), op,
                                     name, prescale_factor, postscale_factor)


def grouped_reducescatter_async(arrays, op=Average, name: str | None = None, comm=None,
                                prescale_factor: float = 1.0, postscale_factor: float = 1.0,
                                process_set=None) -> Handle:
    """rr.grouped_reducescatter on the engine thread; wait() gives the list."""
    arrays = list(arrays)
    return run_async(resolve_comm(comm, process_set), "grouped reducescatter",
                     lambda ch: _grouped_reducescatter_on(ch, arrays, op, name, prescale_factor,
                                                          postscale_factor), *arrays)

