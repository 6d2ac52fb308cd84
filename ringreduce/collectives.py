"""The public collectives on host arrays: allreduce, broadcast, object exchange.

Data path: validate -> agree (mismatch check) -> algorithm -> result. Each public
function resolves its communicator context and runs on that context's "main"
channel; the background engine runs the same code on the "background" channel.
"""
from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import check, timeline
from . import device, gpu, kernels
from .algorithms import RUNNERS, SOURCE_RUNNERS, allgather, select
from .algorithms import mpi as native
from .algorithms._transfer import message_slices
from .buffers import HALF_DTYPES, SUPPORTED_DTYPES, check_array, dtype_code, is_integer
from .comm import Channel, context
from .errors import RingReduceError
from .ops import Average, ReduceOp

__all__ = ["allreduce", "allreduce_", "broadcast_", "broadcast_object", "allgather_object"]


_OPS_BY_VALUE = {key: op for op in ReduceOp for key in (op, int(op))}


def _as_op(op, rank: int) -> ReduceOp:
    found = _OPS_BY_VALUE.get(op) if isinstance(op, (int, ReduceOp)) else None
    if found is not None:
        return found
    try:
        return ReduceOp(op)
    except ValueError:
        raise RingReduceError(f"rank {rank}: unknown reduction op {op!r} "
                              "(use rr.Sum, rr.Average, rr.Min or rr.Max)") from None


def _compression():
    """ringreduce.compression, imported on first use (it imports this module's peers)."""
    from . import compression
    return compression


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
    if (type(x) is np.ndarray and x.nbytes <= _TWO_ROW_BYTES and compression is None
            and algorithm in ("auto", None)):
        y = _small_allreduce(chan, x, op, name, inplace, out)
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
    comp = None if compression is None else _compression().resolve(compression, r)
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
        piggyback = (algorithm == "allgather" and flat.nbytes <= check.piggyback_bytes(chan.size)
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
        _compression().compressed_allreduce(chan, flat, op, algorithm, comp, name)
    elif src is not None:
        SOURCE_RUNNERS[algorithm](chan, flat, op, src=src)
    else:
        run_algorithm(chan, algorithm, flat, op, name)
    if timeline.on:
        timeline.complete("allreduce", t0, {"name": name, "algorithm": algorithm, "bytes": flat.nbytes,
                                            "compression": repr(comp) if comp else None, "call": seq})
    return buf


# The tiny path's tables: dtype -> (fingerprint code, kernel code, integer?); op -> (code, kernel op, average).
_SMALL_DTYPES = {dt: (code, kernels._NP_DT[dt], dt.kind in "iu") for dt, code in SUPPORTED_DTYPES.items()}
_RAW_ENV = check._RAW_ENV      # RINGREDUCE_ALGORITHM is only parsed when it is set
_KERNEL_OP = {ReduceOp.SUM: "sum", ReduceOp.AVERAGE: "sum", ReduceOp.MIN: "min", ReduceOp.MAX: "max"}
_SMALL_OPS = {key: (int(op), kernels._OPS[_KERNEL_OP[op]], op == Average)
              for op in ReduceOp for key in (op, int(op))}
_AUTO_HASH = check._hash("allgather")
_TWO_ROW_BYTES = 4096     # the tiny path's reach: one row, or a row and a second allgather
_SHAPE_HASHES: dict = {}


class _TinyRows:
    """The tiny path's buffers: the channel's fingerprint rows (check.Rows) and the tail.

    Each call posts the very Iallgather that check.exchange makes, so it matches
    whatever another rank does at that call (a persistent request would not).
    """

    def __init__(self, chan: Channel):
        own = check.rows_of(chan)
        self.width, self.send, self.recv = own.width, own.send, own.recv
        self.limit = self.width - check.HEADER_BYTES
        extra = max(_TWO_ROW_BYTES - self.limit, 0)
        self.tail = np.zeros(extra, np.uint8)
        self.rest = np.zeros(chan.size * extra, np.uint8)
        self.tails: dict = {}      # tail bytes -> (send view, receive view): sizes repeat

    def tail_views(self, nbytes: int, n: int):
        views = self.tails.get(nbytes)
        if views is None:
            views = self.tails[nbytes] = (self.tail[:nbytes], self.rest[:n * nbytes])
        return views


def _small_allreduce(chan: Channel, x: np.ndarray, op, name, inplace: bool, out=None):
    """The latency path for payloads that fit in the check's allgather, or None to take the long way.

    It makes exactly the call the general path makes for "auto" at this size (same
    fingerprint, payload piggybacked, rows reduced in rank order with the same
    arithmetic as numpy), with the per-call work done in two C++ calls: at a few
    bytes, Python object work would cost several times the MPI call itself.
    """
    codes = _SMALL_DTYPES.get(x.dtype)
    ops = _SMALL_OPS.get(op)
    rows = chan.resources.get("tiny-rows")
    if rows is None:
        if kernels._C is None or "plan" not in chan.resources:
            return None
        rows = chan.resources["tiny-rows"] = _TinyRows(chan)
    nbytes = x.nbytes
    if (codes is None or ops is None or not x.flags.c_contiguous
            or (ops[2] and codes[2]) or (inplace and not x.flags.writeable) or timeline.on):
        return None
    # Past the row, a second allgather carries the rest, posted only once the rows
    # have shown that every rank sends the same count.
    if nbytes > _TWO_ROW_BYTES:
        return None
    if (_RAW_ENV is None or b"RINGREDUCE_ALGORITHM" in _RAW_ENV) and \
            select.requested("auto", chan.rank) != "auto":
        return None
    if out is not None and (type(out) is not np.ndarray or out.shape != x.shape
                            or out.dtype != x.dtype or not out.flags.c_contiguous
                            or not out.flags.writeable):
        return None           # the general path explains what is wrong with `out`
    shape_hash = _SHAPE_HASHES.get(x.shape)
    if shape_hash is None:
        shape_hash = check._hash(x.shape)
        if len(_SHAPE_HASHES) < 4096:
            _SHAPE_HASHES[x.shape] = shape_hash
    seq = chan.next_seq()
    C = kernels._C
    tail = rest = None
    if nbytes > rows.limit:
        tail, rest = rows.tail_views(nbytes - rows.limit, chan.size)
    C.small_pack(rows.send, x, seq, codes[0], ops[0], _AUTO_HASH,
                 0 if name is None else check._hash(name), shape_hash, tail)
    req = chan.comm.Iallgather(rows.send, rows.recv)
    if not req.Test():
        check.finish(chan, req, seq, 1, name)
    if not C.small_same(rows.recv, rows.width, chan.size):
        table = rows.recv.reshape(chan.size, rows.width)[:, :check.HEADER_BYTES].copy().view(np.int64)
        # With the check off, names and shapes may differ; counts and dtypes never
        # may: a second allgather would not match (a hang, not an error). Every rank
        # sees the same table, so every rank takes the same branch.
        if check.enabled() or not check.all_same(table[:, 2:4].copy()):
            _raise_if_mismatch(chan, table, "allreduce", x, ReduceOp(ops[0]), "allgather", name, seq)
    if tail is not None:
        check.finish(chan, chan.comm.Iallgather(tail, rest), seq, 1, name)
    buf = x if inplace else out if out is not None else np.empty_like(x)
    C.small_reduce(rows.recv, rows.width, chan.size, buf, codes[1], ops[1], ops[2], rest)
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
    if check.all_same(table):
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
    if (type(x) is np.ndarray and x.nbytes <= _TWO_ROW_BYTES and compression is None
            and algorithm == "auto"):
        # The tiny path first, outside allreduce_on's error sharing: it rejects by
        # returning None, and anything it raises comes after the exchange.
        y = _small_allreduce(context(comm).main, x, op, name, False, out)
        if y is not None:
            return y
    return allreduce_on(context(comm).main, x, op, algorithm, compression, name, out)


def allreduce_(x: np.ndarray, op=Average, algorithm: str = "auto", compression=None,
               name: str | None = None, comm=None) -> np.ndarray:
    """In-place allreduce: `x` (contiguous, writable) is overwritten and returned.

    Example::

        grad = np.ones(1000, dtype=np.float32)
        rr.allreduce_(grad, op=rr.Sum)     # grad == rr.size() everywhere
    """
    if (type(x) is np.ndarray and x.nbytes <= _TWO_ROW_BYTES and compression is None
            and algorithm == "auto"):
        y = _small_allreduce(context(comm).main, x, op, name, True)
        if y is not None:
            return y
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
