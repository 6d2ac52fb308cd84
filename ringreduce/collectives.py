"""The public collectives on host arrays: allreduce, broadcast, object exchange.

Data path: validate -> agree (mismatch check) -> algorithm -> result. Each public
function resolves its communicator context and runs on that context's "main"
channel; the background engine runs the same code on the "background" channel.
"""
from __future__ import annotations

import struct

import numpy as np
from mpi4py import MPI

from . import check, timeline
from . import device, gpu
from .algorithms import RUNNERS, SOURCE_RUNNERS, allgather, select
from .algorithms import mpi as native
from .algorithms._transfer import message_slices
from .buffers import HALF_DTYPES, SUPPORTED_DTYPES, check_array, dtype_code, is_integer
from .comm import Channel, context
from .errors import RingReduceError
from .ops import Average, ReduceOp, finish_average, ufunc

__all__ = ["allreduce", "allreduce_", "broadcast_", "broadcast_object", "allgather_object"]


def _as_op(op, rank: int) -> ReduceOp:
    try:
        return ReduceOp(op)
    except ValueError:
        raise RingReduceError(f"rank {rank}: unknown reduction op {op!r} "
                              "(use rr.Sum, rr.Average, rr.Min or rr.Max)") from None


def _prepare_output(chan: Channel, x, out, name, inplace: bool, defer: bool = False) -> np.ndarray:
    """The buffer the algorithm reduces in place: x itself, `out` filled from x, or a copy.

    With defer (host arrays only), `out` or a new array is returned unfilled: the
    caller copies x in, or hands x to an algorithm that reads it directly (shm).
    """
    r = chan.rank
    if inplace:
        return check_array(x, r, name, writable=True)
    x = check_array(x, r, name)
    xp = device.array_module(x)
    if out is None:
        return np.empty(x.shape, x.dtype) if defer else xp.array(x, order="C", copy=True)
    out = check_array(out, r, name, what="out", writable=True)
    if device.is_device_array(out) != device.is_device_array(x):
        raise RingReduceError(f"rank {r}: out{' of tensor ' + repr(name) if name else ''} and "
                              "the input must both be host (numpy) or both device (cupy) arrays")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise RingReduceError(
            f"rank {r}: out{' of tensor ' + repr(name) if name else ''} has shape {out.shape} and "
            f"dtype {out.dtype}, but the input has shape {x.shape} and dtype {x.dtype}")
    if out is not x and not defer:
        xp.copyto(out, x)
    return out


@check.guarded("allreduce")
def allreduce_on(chan: Channel, x, op=Average, algorithm="auto", compression=None,
                 name=None, out=None, inplace=False) -> np.ndarray:
    """allreduce on a given channel (the engine's entry point for both threads)."""
    if (type(x) is np.ndarray and x.nbytes <= check.PIGGYBACK_BYTES and compression is None
            and out is None and algorithm in ("auto", None) and not timeline.on):
        y = _small_allreduce(chan, x, op, name, inplace)
        if y is not None:
            return y
    t0 = timeline.now() if timeline.on else 0
    r = chan.rank
    op = _as_op(op, r)
    algorithm = select.requested(algorithm, r)
    # Out of place on the host: the copy of x into the result waits until the algorithm
    # is known, because shm reads x directly and saves that pass over memory.
    pending = x if not inplace and type(x) is np.ndarray and x is not out else None
    buf = _prepare_output(chan, x, out, name, inplace, defer=pending is not None)
    if is_integer(buf.dtype) and op == Average:
        raise RingReduceError(
            f"rank {r}: op Average on integer tensor{' ' + repr(name) if name else ''} "
            f"({buf.dtype}) would truncate; use rr.Sum and divide, or a float dtype")
    from .compression import compressed_allreduce, resolve
    comp = resolve(compression, r)
    flat = buf.reshape(-1)
    if algorithm == "auto" and comp is None:
        algorithm = select.choose(flat.nbytes, flat.dtype, chan.size, chan)
    if algorithm == "mpi" and buf.dtype in HALF_DTYPES and comp is None:
        native.allreduce(chan, flat, op, name)   # raises the clear half-type error
    src = None
    if pending is not None:
        if algorithm in SOURCE_RUNNERS and comp is None and pending.flags.c_contiguous:
            src = pending.reshape(-1)
        else:
            np.copyto(buf, pending)
    on_device = device.is_device_array(flat)
    fp_algorithm = gpu.label(algorithm) if on_device else algorithm
    seq = chan.next_seq()
    if check.enabled():
        header = check.fingerprint(seq, "allreduce", flat.size, dtype_code(buf.dtype), int(op),
                                   fp_algorithm, name, buf.shape, comp)
        piggyback = (algorithm == "allgather" and flat.nbytes <= check.PIGGYBACK_BYTES
                     and not on_device)
        table, rows = check.exchange(chan, header, flat if piggyback else None, name=name)
        _raise_if_mismatch(chan, table, "allreduce", buf, op, fp_algorithm, name, seq, comp)
        if piggyback:
            allgather.reduce_rows(rows[:, :flat.nbytes], flat, op)
            if timeline.on:
                timeline.complete("allreduce", t0, {"name": name, "algorithm": "piggyback",
                                                    "bytes": flat.nbytes, "call": seq})
            return buf
    if on_device:
        gpu.allreduce(chan, flat, op, algorithm, comp, name)
    elif comp is not None and comp.two_sided and algorithm == "hierarchical":
        RUNNERS["hierarchical"](chan, flat, op, comp, name)   # compressed between node leaders
    elif comp is not None:
        compressed_allreduce(chan, flat, op, algorithm, comp, name)
    elif src is not None:
        SOURCE_RUNNERS[algorithm](chan, flat, op, src=src)
    else:
        run_algorithm(chan, algorithm, flat, op, name)
    if timeline.on:
        timeline.complete("allreduce", t0, {"name": name, "algorithm": algorithm, "bytes": flat.nbytes,
                                            "compression": repr(comp) if comp else None, "call": seq})
    return buf


_HDR = struct.Struct(f"{check.NFIELDS}q")
_AUTO_HASH = check._hash("allgather")
_UFUNCS = {int(op): ufunc(op) for op in ReduceOp}
_OPCODES = {op: int(op) for op in ReduceOp} | {int(op): int(op) for op in ReduceOp}
_AVERAGE = int(Average)


def _small_allreduce(chan: Channel, x: np.ndarray, op, name, inplace: bool):
    """The latency path for payloads that fit in the check's allgather, or None to take the long way.

    It makes exactly the call the general path makes for "auto" at this size (same
    fingerprint, payload piggybacked, rows reduced in rank order with the same
    ufuncs), minus the per-call Python work that dominates at a few bytes.
    """
    code = SUPPORTED_DTYPES.get(x.dtype)
    opcode = _OPCODES.get(op)
    if (code is None or opcode is None or "plan" not in chan.resources or not x.flags.c_contiguous
            or (opcode == _AVERAGE and x.dtype.kind in "iu") or not check.enabled()
            or select.requested("auto", chan.rank) != "auto"
            or (inplace and not x.flags.writeable)):
        return None
    nbytes = x.nbytes
    small = chan.resources.get("small-allreduce")
    if small is None:
        width = _HDR.size + check.PIGGYBACK_BYTES
        send = np.zeros(width, np.uint8)
        recv = np.zeros(chan.size * width, np.uint8)
        small = chan.resources["small-allreduce"] = (send, memoryview(send), recv, width, {})
    send, send_mv, recv, width, views = small
    seq = chan.next_seq()
    hb = _HDR.size
    _HDR.pack_into(send, 0, seq, 1, x.size, code, opcode, _AUTO_HASH, check._hash(name),
                   check._hash(x.shape), 0)
    if nbytes:
        # via a uint8 view: the buffer protocol has no code for ml_dtypes' bfloat16
        send_mv[hb:hb + nbytes] = memoryview(x.view(np.uint8)).cast("B")
    check.finish(chan, chan.comm.Iallgather(send, recv), seq, 1, name)
    head = recv[:hb].tobytes()
    for i in range(1, chan.size):
        if recv[i * width:i * width + hb].tobytes() != head:
            table = recv.reshape(chan.size, width)[:, :hb].copy().view(np.int64)
            _raise_if_mismatch(chan, table, "allreduce", x, ReduceOp(opcode), "allgather", name, seq)
    # Typed views of each rank's payload row, cached per (dtype, size): they repeat every step.
    key = (x.dtype, nbytes)
    rows = views.get(key)
    if rows is None:
        if len(views) > 64:
            views.clear()
        rows = views[key] = [recv[i * width + hb:i * width + hb + nbytes].view(x.dtype)
                             for i in range(chan.size)]
    buf = x if inplace else np.empty_like(x)
    flat = buf if buf.ndim == 1 else buf.reshape(-1)
    # Same arithmetic as allgather.reduce_rows: op(row0, row1), then op(acc, row_i) in rank order.
    fn = _UFUNCS[opcode]
    if chan.size == 1:
        np.copyto(flat, rows[0])
    else:
        fn(rows[0], rows[1], out=flat)
        for i in range(2, chan.size):
            fn(flat, rows[i], out=flat)
    if opcode == _AVERAGE:
        finish_average(ReduceOp.AVERAGE, flat, chan.size)
    return buf


def run_algorithm(chan: Channel, algorithm: str, flat: np.ndarray, op: ReduceOp, name=None) -> None:
    """Reduce the flat buffer in place with a resolved algorithm name."""
    if timeline.on:
        t0 = timeline.now()
        _run_algorithm(chan, algorithm, flat, op, name)
        timeline.complete(f"algorithm {algorithm}", t0, {"name": name, "bytes": flat.nbytes})
    else:
        _run_algorithm(chan, algorithm, flat, op, name)


def _run_algorithm(chan: Channel, algorithm: str, flat: np.ndarray, op: ReduceOp, name=None) -> None:
    if algorithm == "mpi":
        native.allreduce(chan, flat, op, name)
    elif algorithm == "allgather":
        allgather.allreduce(chan, flat, op)
    elif algorithm in RUNNERS:
        RUNNERS[algorithm](chan, flat, op)
    else:
        raise RingReduceError(f"rank {chan.rank}: algorithm {algorithm!r} is not available in this build")


def _agree(chan: Channel, header: np.ndarray, kind, buf, op, algorithm, name, seq) -> None:
    table, _ = check.exchange(chan, header, name=name)
    _raise_if_mismatch(chan, table, kind, buf, op, algorithm, name, seq)


def _raise_if_mismatch(chan, table, kind, buf, op, algorithm, name, seq, compression=None) -> None:
    if (table == table[0]).all():
        return
    shape = buf.shape if buf is not None else ()
    dtype = buf.dtype if buf is not None else None
    count = buf.size if buf is not None else 0
    readable = check.describe(kind, count, dtype, op, algorithm, name, shape, compression, seq)
    check.raise_if_mismatch(table, chan.comm, chan.rank, readable, name)


def allreduce(x, op=Average, algorithm: str = "auto", compression=None, name: str | None = None,
              out: np.ndarray | None = None, comm=None) -> np.ndarray:
    """Reduce `x` across all ranks and return the result (a new array, or `out`).

    Parameters
    ----------
    x : numpy.ndarray
        Any shape; float16, bfloat16, float32, float64, int8, uint8, int32 or int64.
        Non-contiguous input is copied.
    op : rr.Sum, rr.Average, rr.Min or rr.Max
    algorithm : "auto", "ring", "tree", "mpi", "shm" or "hierarchical"
        "auto" picks by message size; RINGREDUCE_ALGORITHM overrides it.
    compression : rr.Compression.* or None
    name : str, optional
        A stable tensor name, used in error messages and the mismatch check
        (required with error-feedback compression).
    out : numpy.ndarray, optional
        Where to write the result (same shape and dtype as x).
    comm : mpi4py communicator, optional
        A sub-communicator; default the one given to rr.init().

    Every rank gets bit-identical results.

    Example::

        import numpy as np, ringreduce as rr
        rr.init()
        y = rr.allreduce(np.arange(10, dtype=np.float32) * rr.rank(), op=rr.Average)
    """
    return allreduce_on(context(comm).main, x, op, algorithm, compression, name, out)


def allreduce_(x: np.ndarray, op=Average, algorithm: str = "auto", compression=None,
               name: str | None = None, comm=None) -> np.ndarray:
    """In-place allreduce: `x` (contiguous, writable) is overwritten and returned.

    Example::

        grad = np.ones(1000, dtype=np.float32)
        rr.allreduce_(grad, op=rr.Sum)     # grad == rr.size() everywhere
    """
    return allreduce_on(context(comm).main, x, op, algorithm, compression, name, inplace=True)


@check.guarded("broadcast")
def broadcast_on(chan: Channel, x: np.ndarray, root_rank: int = 0, name=None) -> np.ndarray:
    r = chan.rank
    if not 0 <= root_rank < chan.size:
        raise RingReduceError(f"rank {r}: root_rank {root_rank} is out of range for {chan.size} ranks")
    x = check_array(x, r, name, writable=True)
    on_device = device.is_device_array(x)
    fp_algorithm = gpu.label("bcast") if on_device else "bcast"
    seq = chan.next_seq()
    if check.enabled():
        header = check.fingerprint(seq, "broadcast", x.size, dtype_code(x.dtype), root_rank,
                                   fp_algorithm, name, x.shape, None)
        _agree(chan, header, "broadcast", x, f"root {root_rank}", fp_algorithm, name, seq)
    if on_device:
        gpu.broadcast(chan, x, root_rank, _bcast_bytes)
    else:
        _bcast_bytes(chan, x, root_rank)
    return x


def _bcast_bytes(chan: Channel, x, root_rank: int) -> None:
    raw = x.reshape(-1).view(np.uint8)
    for lo, hi in message_slices(raw.size):
        chan.comm.Bcast([raw[lo:hi], MPI.BYTE], root=root_rank)


def broadcast_(x: np.ndarray, root_rank: int = 0, comm=None, name: str | None = None) -> np.ndarray:
    """Overwrite `x` on every rank with root_rank's `x`, in place (Horovod's name and argument).

    Example::

        w = np.random.default_rng(rr.rank()).random(10)
        rr.broadcast_(w, root_rank=0)      # every rank now holds rank 0's w
    """
    return broadcast_on(context(comm).main, x, root_rank, name)


def _object_check(chan: Channel, kind: str, root_rank: int) -> None:
    seq = chan.next_seq()
    if check.enabled():
        header = check.fingerprint(seq, kind, op=root_rank)
        _agree(chan, header, kind, None, f"root {root_rank}", "", None, seq)


def broadcast_object(obj, root_rank: int = 0, comm=None):
    """Return root_rank's picklable `obj` on every rank.

    Example::

        cfg = rr.broadcast_object({"lr": 0.1} if rr.rank() == 0 else None)
    """
    chan = context(comm).main
    if not 0 <= root_rank < chan.size:
        raise RingReduceError(f"rank {chan.rank}: root_rank {root_rank} is out of range "
                              f"for {chan.size} ranks")
    _object_check(chan, "broadcast_object", root_rank)
    return chan.comm.bcast(obj, root=root_rank)


def allgather_object(obj, comm=None) -> list:
    """Return the list of every rank's picklable `obj`, in rank order.

    Example::

        counts = rr.allgather_object(len(my_shard))
    """
    chan = context(comm).main
    _object_check(chan, "allgather_object", 0)
    return chan.comm.allgather(obj)
