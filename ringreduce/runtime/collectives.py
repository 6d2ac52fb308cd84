"""The public collectives on host (numpy) and device (cupy) arrays: allreduce, broadcast, objects.

Every call is validate -> agree -> dispatch:

- validate: the arguments, on this rank (a rank that rejects its call still takes
  part in the agreement with an "error" fingerprint, so every rank raises:
  agree.guarded);
- agree: the fingerprints of every rank are compared (agree.exchange), so ranks
  that disagree raise the same RingReduceError instead of hanging;
- dispatch: the algorithm the plan (or the caller) chose, from algorithms.registry,
  the compressed allreduce, or the device path.

Each public function runs on its communicator context's "main" channel; the
engine thread runs the same code on the "background" channel.
"""
from __future__ import annotations

import pickle
from time import perf_counter

import numpy as np

from ..algorithms import allgather, hierarchical, registry, shm
from ..algorithms.native import MPI_IN_PLACE, native_call
from ..algorithms.native import allreduce as native_allreduce
from ..compression import auto as compression_auto
from ..compression import kernels
from ..compression import resolve as resolve_compression
from ..compression.algorithm import compressed_allreduce
from ..compression.algorithm import validate as validate_compression
from ..compression.state import CompressionState, state_for
from ..core import device, timeline
from ..core import config
from ..core.dtypes import HALF_DTYPES, SUPPORTED_DTYPES, check_array, dtype_code, is_integer
from ..core.errors import RingReduceError
from ..core.ops import Average, ReduceOp, finish_average
from ..policy import learn
from ..policy import plan as policy
from ..transport.p2p import allgather_bytes, bcast_bytes
from . import agree, device_path, tiny
from .context import context
from .process_sets import resolve_comm

__all__ = ["allreduce", "allreduce_", "allreduce_on", "broadcast_", "broadcast_object",
           "allgather_object", "compression_state"]

_OPS_BY_VALUE = {key: op for op in ReduceOp for key in (op, int(op))}
_AUTO = ("auto", None)
_FAST_DTYPES = frozenset(SUPPORTED_DTYPES)


def _as_op(op, who: str) -> ReduceOp:
    found = _OPS_BY_VALUE.get(op) if isinstance(op, (int, ReduceOp)) else None
    if found is not None:
        return found
    try:
        return ReduceOp(op)
    except ValueError:
        raise RingReduceError(f"{who}: unknown reduction op {op!r} "
                              "(use rr.Sum, rr.Average, rr.Min, rr.Max or rr.Product)") from None


def _prepare_output(chan, x, out, name, inplace: bool, defer: bool = False) -> np.ndarray:
    """The buffer the algorithm reduces in place: x itself, `out` filled from x, or a copy.

    With defer (host arrays only), `out` or a new array is returned unfilled: the
    caller copies x in, or hands x to an algorithm that reads it directly (shm).
    """
    who = chan.who
    if inplace:
        return check_array(x, who, name, writable=True)
    x = check_array(x, who, name)
    xp = device.array_module(x)
    if out is None:
        return np.empty(x.shape, x.dtype) if defer else xp.array(x, order="C", copy=True)
    out = check_array(out, who, name, what="out", writable=True)
    label = " of tensor " + repr(name) if name else ""
    if device.is_device_array(out) != device.is_device_array(x):
        raise RingReduceError(f"{who}: out{label} and the input must both be host (numpy) or "
                              "both device (cupy) arrays")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise RingReduceError(f"{who}: out{label} has shape {out.shape} and dtype {out.dtype}, "
                              f"but the input has shape {x.shape} and dtype {x.dtype}")
    if out is not x and not defer:
        xp.copyto(out, x)
    return out


def allreduce_on(chan, x, op=Average, algorithm="auto", compression=None,
                 name=None, out=None, inplace=False, prescale_factor=1.0,
                 postscale_factor=1.0) -> np.ndarray:
    """allreduce on a given channel: the one entry point for both threads (tiny path first)."""
    try:      # agree.joinable's handling, inline: a wrapper frame costs more than the tiny path's poll
        if (compression is None and type(x) is np.ndarray and prescale_factor == 1.0
                and postscale_factor == 1.0):
            # Outside _general's error sharing: the tiny and fast paths reject by returning
            # None before any communication, and anything they raise comes after the exchange.
            if algorithm in _AUTO and x.nbytes <= tiny.REACH:
                y = tiny.allreduce(chan, x, op, name, inplace, out, _raise_tiny_mismatch)
                if y is not None:
                    return y
            y = _fast(chan, x, op, algorithm, name, out, inplace)
            if y is not None:
                return y
        return _general(chan, x, op, algorithm, compression, name, out, inplace,
                        prescale_factor, postscale_factor)
    except agree.PeersJoined as peers:
        return _allreduce_after_join(chan, peers.joined, x, op, algorithm, compression, name, out,
                                     inplace, prescale_factor, postscale_factor)


class _Call:
    """What the fast path computes once per (shape, dtype, op, algorithm, name) on a channel."""

    __slots__ = ("algorithm", "dtype_code", "half", "mpi", "name_hash", "nbytes", "op", "shape_hash",
                 "size", "observe", "learner", "band", "headers")

    def __init__(self, x, op: ReduceOp, algorithm, name):
        self.op = op
        self.algorithm = algorithm            # None for auto: chosen per call
        self.size, self.nbytes = x.size, x.nbytes
        self.dtype_code = dtype_code(x.dtype)
        self.half = policy.without_native(x.dtype, op)
        self.name_hash = agree._hash(name)
        self.shape_hash = agree._hash(tuple(x.shape))
        # Native MPI in one blocking call once agreed: (datatype, op), or None.
        self.mpi = native_call(x.dtype, op, x.nbytes)
        # Observations feed the link-speed estimates (Compression.auto reads them from 64 KiB):
        # worth their ~0.4 us from 64 KiB up. auto's learner keeps its own times.
        self.observe = x.nbytes >= _OBSERVE_BYTES
        self.learner = self.band = None       # the learner's state for this size, once looked up
        self.headers = {}                     # algorithm -> the fingerprint (call number 0)

    def header(self, algorithm: str) -> np.ndarray:
        """This call's fingerprint with `algorithm`, for the C++ exchange (which sets the call number)."""
        h = self.headers.get(algorithm)
        if h is None:
            h = self.headers[algorithm] = np.frombuffer(agree.HEADER.pack(
                0, 1, self.size, self.dtype_code, self.op, _ALGO_HASHES[algorithm], self.name_hash,
                self.shape_hash, 0), np.int64)
        return h


_FAST_CALLS_MAX = 512          # distinct call shapes kept per channel
_OBSERVE_BYTES = 1 << 16
_ALGO_HASHES = {a: agree._hash(a) for a in registry.ALGORITHMS}
_small_same = kernels._C.small_same if kernels._C is not None else None    # the C++ row compare
_header_exchange = getattr(kernels._C, "header_exchange", None)              # pack, handshake, compare


def _fast(chan, x, op, algorithm, name, out, inplace):
    """The general path for plain host calls with per-call work cut to lookups (None: not handled).

    Same fingerprint, same exchange, same algorithms as _general: a rank may take
    either path for the same call. Anything unusual (non-contiguous input, a bad
    `out`, the timeline on, half types on native MPI, an invalid op or dtype, the
    check's piggybacked sizes) goes to _general, which explains errors.
    """
    if timeline.on or not x.flags.c_contiguous or (inplace and not x.flags.writeable):
        return None
    cache = chan.fast_calls
    key = (x.shape, x.dtype.num, op, algorithm, name)
    call = cache.get(key) if cache is not None else None
    if call is None:
        call = _new_call(chan, key, x, op, algorithm, name)
        if call is None:
            return None
    if out is not None and out is not x:
        if (type(out) is not np.ndarray or out.shape != x.shape or out.dtype != x.dtype
                or not out.flags.c_contiguous or not out.flags.writeable):
            return None
    check_on = config.check_enabled()
    algo = call.algorithm
    learner = untimed = None
    if algo is None:
        override = config.algorithm_override()
        if override is not None and override != "auto":
            return None
        learner = chan.learner
        if learner is not None and call.nbytes > learn.MIN_BYTES:
            band = call.band
            if band is None or call.learner is not learner:
                call.learner, band = learner, learner.band_for(call.nbytes, call.half)
                call.band = band
            algo = band.choice if band.choice is not None else learner.pick(call.nbytes, call.half)
            if not band.timed():
                learner = None              # settled, no drift check near: counted at the end
                untimed = band
        else:
            learner = None
            algo = policy.choose(chan.plan, call.nbytes, x.dtype, chan.size, call.op, check_on)
        if algo == "allgather" and check_on and call.nbytes <= allgather.piggyback_bytes(chan.size):
            return None                     # rides in the check's allgather: _general
    if inplace or out is x:
        buf, src = x, None
    else:
        buf = np.empty(x.shape, x.dtype) if out is None else out
        src = x
    flat = buf if buf.ndim == 1 else buf.reshape(-1)
    if src is not None:
        if src.ndim != 1:
            src = src.reshape(-1)
        if algo != "mpi" and algo != "shm":          # those read x directly: one pass less
            np.copyto(flat, src)
            src = None
    seq = chan.next_seq()
    obs = chan.context.observations if chan.context is not None and call.observe else None
    # The learner times the whole call, agreement included: staged shm's handshake is its
    # data barrier, and a native call pays the handshake before MPI starts.
    t0 = t1 = perf_counter()
    # shm up to 64 KiB: the input goes into the window first, so the fingerprints'
    # handshake is the data's barrier too (in-band; shm.stage says when it applies).
    staged = shm.stage(chan, flat, src) if check_on and algo == "shm" else None
    early = None
    if check_on:
        rows = chan.rows or agree.rows_of(chan)
        send = rows.begin()
        shared = rows.fused()
        n = chan.size
        if shared is not None:
            # Rows in shared memory: pack, handshake and compare in one C++ call.
            chan.count(rows.width, (n - 1) * rows.width)
            state = _header_exchange(send, call.header(algo), seq, shared.flags_at, shared.stride, n,
                                     shared.rank, shared.calls, shared.polls, rows.recv, rows.width)
            if state == 1:                  # the peers are late: the supervised wait, then compare
                rows.wait_arrival(chan, seq, 1, name)
                state = 0 if _small_same(rows.recv, rows.width, n) else 2
            agreed = state == 0
        else:
            agree.HEADER.pack_into(send, 0, seq, 1, call.size, call.dtype_code, call.op,
                                   _ALGO_HASHES[algo], call.name_hash, call.shape_hash, 0)
            if rows.overlaps and agree.works_early(algo, call.size, x.itemsize, n):
                # Across nodes the ring's or tree's first segment travels while the rows do
                # (the hierarchical path copies into its node's window meanwhile).
                rows.start(chan)
                early = _early_check(chan, rows, seq, buf, call.op, algo, name)
                agreed = True               # checked by the ring or tree before it uses any data
            else:
                rows.post(chan, seq, 1, name)
                agreed = (_small_same(rows.recv, rows.width, n) if _small_same is not None
                          else agree.rows_same(rows, n))
        if not agreed:
            if staged is not None:
                shm.unstage(chan)
            _raise_if_mismatch(chan, rows.headers(n), "allreduce", buf, call.op, algo, name, seq)
        if staged is None:
            t1 = perf_counter()
    mpi = call.mpi
    if staged is not None:
        shm.reduce_replicated(staged, flat, call.op, chan.size)
    elif algo == "mpi" and check_on and mpi is not None:
        # Agreed: every rank is in this call, so MPI's blocking allreduce (native.py says why).
        chan.count(call.nbytes, call.nbytes)
        chan.comm.Allreduce(MPI_IN_PLACE if src is None else [src, mpi[0]], [flat, mpi[0]], mpi[1])
        if call.op == Average:
            finish_average(call.op, flat, chan.size)
    elif algo == "mpi":
        native_allreduce(chan, flat, call.op, name, src=src, agreed=check_on)
    else:
        registry.run(chan, algo, flat, call.op, src=src, agreed=early)
    if obs is not None or learner is not None:
        # Python between two MPI calls costs the peer too (it waits in its next call),
        # so the bookkeeping stays short: no observation below 64 KiB, the band at hand.
        now = perf_counter()
        if obs is not None:
            obs.record(algo, call.nbytes, now - t1)
        if learner is not None:
            learner.done(chan, algo, call.nbytes, call.half, now - t0, call.band)
    if untimed is not None:
        untimed.untimed()
    return buf


def _early_check(chan, rows, seq, buf, op, algorithm, name, comp=None):
    """The ring's, tree's or hierarchical path's ``agreed`` callback: finish the started
    exchange, raise on a mismatch."""
    def agreed(recv, send):
        rows.post(chan, seq, 1, name, early=(recv, send))
        if not agree.rows_same(rows, chan.size):
            _raise_if_mismatch(chan, rows.headers(chan.size), "allreduce", buf, op, algorithm, name, seq,
                               comp)
    agreed.progress = rows.progress      # for work done meanwhile (the hierarchical copy)
    return agreed


def _new_call(chan, key, x, op, algorithm, name):
    """Validate a call shape once for the fast path; None when _general must take it."""
    op = _OPS_BY_VALUE.get(op) if isinstance(op, (int, ReduceOp)) else None
    if op is None or x.dtype not in _FAST_DTYPES or (op == Average and is_integer(x.dtype)):
        return None
    if algorithm in _AUTO:
        algorithm = None
    elif algorithm not in registry.ALGORITHMS or (algorithm == "mpi" and x.dtype in HALF_DTYPES):
        return None
    if name is not None and not isinstance(name, str):
        return None
    call = _Call(x, op, algorithm, name)
    if chan.fast_calls is None:
        chan.fast_calls = {}
    if len(chan.fast_calls) >= _FAST_CALLS_MAX:
        chan.fast_calls.clear()
    chan.fast_calls[key] = call
    return call


def _scales(who, dtype, name, pre, post) -> tuple[float, float] | None:
    """(pre, post) when either differs from 1, else None; integer tensors take no factors."""
    if pre == 1.0 and post == 1.0:
        return None
    if is_integer(dtype):
        raise RingReduceError(f"{who}: prescale_factor/postscale_factor on integer tensor"
                              f"{' ' + repr(name) if name else ''} ({dtype}); scale a float tensor")
    return float(pre), float(post)


def _scale(buf, factor: float) -> None:
    if factor != 1.0 and buf.size:
        if buf.dtype in HALF_DTYPES:
            # fp32 math, one rounding to the half type: Horovod's CPU rule (its prescale tests
            # compare bit for bit); the factor rounded to fp16 first would be off by an ulp.
            np.multiply(buf, np.float32(factor), out=buf, casting="unsafe")
        else:
            np.multiply(buf, buf.dtype.type(factor), out=buf)
        if type(buf) is not np.ndarray:
            device.synchronize(buf)


@agree.guarded("allreduce")
def _general(chan, x, op, algorithm, compression, name, out, inplace,
             prescale_factor=1.0, postscale_factor=1.0) -> np.ndarray:
    t0 = timeline.now() if timeline.on else 0
    who = chan.who
    op = _as_op(op, who)
    algorithm = policy.requested(algorithm, who)
    # Out of place on the host: the copy of x into the result waits until the algorithm
    # is known, because shm reads x directly and saves that pass over memory.
    pending = x if not inplace and type(x) is np.ndarray and x is not out else None
    buf = _prepare_output(chan, x, out, name, inplace, defer=pending is not None)
    if is_integer(buf.dtype) and op == Average:
        raise RingReduceError(
            f"{who}: op Average on integer tensor{' ' + repr(name) if name else ''} "
            f"({buf.dtype}) would truncate; use rr.Sum and divide, or a float dtype")
    comp = resolve_compression(compression, who)
    scales = _scales(who, buf.dtype, name, prescale_factor, postscale_factor)
    flat = buf.reshape(-1)
    auto = None
    if isinstance(comp, compression_auto.Auto):    # a policy: this call's format, agreed by rule
        auto, comp = comp, compression_auto.choose(chan, state_for(chan), comp, flat, buf.shape,
                                                   op, name)
    check_on = agree.enabled()          # read once per call: the env may change between calls
    on_device = type(flat) is not np.ndarray and device.is_device_array(flat)
    learner = None
    if algorithm == "auto" and comp is None:
        learner = chan.learner if not on_device and flat.nbytes > learn.MIN_BYTES else None
        if learner is not None:
            half = policy.without_native(flat.dtype, op)
            algorithm = learner.pick(flat.nbytes, half)
        else:
            algorithm = policy.choose(chan.plan, flat.nbytes, flat.dtype, chan.size, op, check_on)
    if algorithm == "mpi" and buf.dtype in HALF_DTYPES and comp is None:
        native_allreduce(chan, flat, op, name)   # raises the clear half-type error
    if comp is not None:
        validate_compression(chan, flat, op, comp, name)
    src = None
    if pending is not None:
        # Algorithms that read the input themselves (shm, native, the compressed paths'
        # first compression) skip copying it into the result: one pass over memory less.
        reads = (registry.supports_source(algorithm) if comp is None
                 else not on_device and not (comp.two_sided and algorithm == "hierarchical"))
        if reads and scales is None and pending.flags.c_contiguous:
            src = pending.reshape(-1)
        else:
            np.copyto(buf, pending)
    seq = chan.next_seq()
    if scales is not None:
        _scale(flat, scales[0])
    obs = None if on_device or chan.context is None else chan.context.observations
    started = t1 = perf_counter() if obs is not None or auto is not None else 0.0
    # shm up to 64 KiB: the fingerprints' handshake is the data's barrier too (as in _fast).
    staged = (shm.stage(chan, flat, src) if check_on and algorithm == "shm" and comp is None
              and scales is None and not on_device else None)
    # Across nodes the ring, the tree and the hierarchical path (compressed between the
    # leaders too) start before the agreement ends, and finish it themselves.
    early = (_start_early(chan, seq, flat, buf, op, algorithm, name, scales, comp)
             if check_on and not on_device
             and (comp is None or (comp.two_sided and algorithm == "hierarchical"))
             and agree.works_early(algorithm, flat.size, flat.itemsize, chan.size) else None)
    try:
        piggybacked = early is None and check_on and _agree_allreduce(
            chan, seq, flat, buf, op, algorithm, name, comp, scales, on_device)
    except Exception:          # a mismatch, or joined peers: this call is not made as staged
        if staged is not None:
            shm.unstage(chan)
        raise
    if piggybacked:
        if scales is not None:
            _scale(flat, scales[1])
        if timeline.on:
            timeline.complete("allreduce", t0, {"name": name, "algorithm": "piggyback",
                                                "bytes": flat.nbytes, "call": seq})
        return buf
    if staged is not None:
        shm.reduce_replicated(staged, flat, op, chan.size)
    else:
        if t1:
            t1 = perf_counter()
        _dispatch(chan, flat, op, algorithm, comp, name, src, on_device, check_on, early)
    if auto is not None:
        compression_auto.after(chan, state_for(chan), auto, flat, op, name, comp, perf_counter() - t1)
    if obs is not None:
        now = perf_counter()
        obs.record(algorithm if comp is None else f"{algorithm}+{comp.format}", flat.nbytes, now - t1)
        if learner is not None:
            learner.done(chan, algorithm, flat.nbytes, half, now - started)   # agreement included (_fast)
    if scales is not None:
        _scale(flat, scales[1])
    if timeline.on:
        timeline.complete("allreduce", t0, {"name": name, "algorithm": algorithm, "bytes": flat.nbytes,
                                            "compression": repr(comp) if comp else None, "call": seq})
    return buf


def op_code(op, scales) -> int:
    """The fingerprint's op field: the op, and the scale factors when there are any."""
    return int(op) if scales is None else agree._hash((int(op), scales))


def _agree_allreduce(chan, seq, flat, buf, op, algorithm, name, comp, scales, on_device) -> bool:
    """The fingerprint exchange (check on); True when the payload rode in it and the result is done."""
    label = device_path.label(algorithm) if on_device else algorithm
    header = agree.fingerprint(seq, "allreduce", flat.size, dtype_code(buf.dtype), op_code(op, scales),
                               label, name, buf.shape, comp)
    piggyback = (algorithm == "allgather" and not on_device
                 and flat.nbytes <= allgather.piggyback_bytes(chan.size))
    table, rows = agree.exchange(chan, header, flat if piggyback else None, name=name)
    _raise_if_mismatch(chan, table, "allreduce", buf, _shown(op, scales), label, name, seq, comp)
    if piggyback:
        allgather.reduce_rows(rows[:, :flat.nbytes], flat, op)
    return piggyback


def _shown(op, scales):
    return op if scales is None else f"{op!r} x{scales[0]:g} then x{scales[1]:g}"


def _start_early(chan, seq, flat, buf, op, algorithm, name, scales, comp=None):
    """Over MPI rows, start a host ring, tree or hierarchical call's exchange and return its
    ``agreed``; else None."""
    rows = chan.rows or agree.rows_of(chan)
    if not rows.overlaps:
        return None
    header = agree.fingerprint(seq, "allreduce", flat.size, dtype_code(buf.dtype), op_code(op, scales),
                               algorithm, name, buf.shape, comp)
    rows.begin()[:header.nbytes] = header.view(np.uint8)
    rows.start(chan)
    return _early_check(chan, rows, seq, buf, _shown(op, scales), algorithm, name, comp)


def _dispatch(chan, flat, op, algorithm, comp, name, src, on_device, agreed, early=None) -> None:
    """Run the agreed call: device path, compressed, hierarchical-compressed or an algorithm.

    `early`: the ring's or tree's unfinished agreement (_start_early), which it finishes itself.
    """
    if on_device:
        device_path.allreduce(chan, flat, op, algorithm, comp, name)
    elif comp is not None and comp.two_sided and algorithm == "hierarchical":
        # Compressed between the node leaders, exact inside the nodes.
        hierarchical.allreduce(chan, flat, op, across=lambda leaders, b, o: compressed_allreduce(
            leaders, b, o, "ring", comp, name), agreed=early)
    elif comp is not None:
        compressed_allreduce(chan, flat, op, algorithm, comp, name, src=src)
    elif algorithm == "mpi":
        # Agreed (check on): every rank is in this call, so MPI's fast blocking allreduce.
        native_allreduce(chan, flat, op, name, src=src, agreed=agreed)
    else:
        registry.run(chan, algorithm, flat, op, src=src, agreed=early)


def _raise_tiny_mismatch(chan, table, x, op, name, seq) -> None:
    _raise_if_mismatch(chan, table, "allreduce", x, op, "allgather", name, seq)


def _raise_if_mismatch(chan, table, kind, buf, op, algorithm, name, seq, compression=None) -> None:
    if agree.all_same(table):
        return
    shape = buf.shape if buf is not None else ()
    dtype = buf.dtype if buf is not None else None
    count = buf.size if buf is not None else 0
    readable = agree.describe(kind, count, dtype, op, algorithm, name, shape, compression, seq)
    agree.raise_if_mismatch(table, chan, readable, name)


def _agree(chan, header: np.ndarray, kind, buf, op, algorithm, name, seq) -> None:
    table, _ = agree.exchange(chan, header, name=name)
    _raise_if_mismatch(chan, table, kind, buf, op, algorithm, name, seq)


def allreduce(x, op=Average, algorithm: str = "auto", compression=None, name: str | None = None,
              out: np.ndarray | None = None, comm=None, prescale_factor: float = 1.0,
              postscale_factor: float = 1.0, process_set=None) -> np.ndarray:
    """Reduce `x` across all ranks and return the result (a new array, or `out`).

    Parameters
    ----------
    x : numpy.ndarray or cupy.ndarray
        Any shape; float16, bfloat16, float32, float64, int8, uint8, int32 or int64.
        Non-contiguous input is copied.
    op : rr.Sum, rr.Average, rr.Min, rr.Max or rr.Product
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
    prescale_factor, postscale_factor : float
        Multiply the input before the reduction and the result after it (float
        tensors; Horovod's arguments).
    process_set : rr.ProcessSet, optional
        Another spelling of comm= (Horovod's).

    Every rank gets bit-identical results; NaN anywhere stays NaN (Min/Max included).

    Example::

        import numpy as np, ringreduce as rr
        rr.init()
        y = rr.allreduce(np.arange(10, dtype=np.float32) * rr.rank(), op=rr.Average)
    """
    chan = context(resolve_comm(comm, process_set)).main
    return allreduce_on(chan, x, op, algorithm, compression, name, out, False,
                        prescale_factor, postscale_factor)


def allreduce_(x: np.ndarray, op=Average, algorithm: str = "auto", compression=None,
               name: str | None = None, comm=None, prescale_factor: float = 1.0,
               postscale_factor: float = 1.0, process_set=None) -> np.ndarray:
    """In-place allreduce: `x` (contiguous, writable) is overwritten and returned.

    Example::

        grad = np.ones(1000, dtype=np.float32)
        rr.allreduce_(grad, op=rr.Sum)     # grad == rr.size() everywhere
    """
    chan = context(resolve_comm(comm, process_set)).main
    return allreduce_on(chan, x, op, algorithm, compression, name, None, True,
                        prescale_factor, postscale_factor)


def _check_root(chan, root_rank) -> None:
    if not isinstance(root_rank, (int, np.integer)) or not 0 <= root_rank < chan.size:
        raise RingReduceError(f"{chan.who}: root_rank {root_rank!r} is out of range for "
                              f"{chan.size} ranks")


@agree.joinable(lambda: _broadcast_after_join)
@agree.guarded("broadcast")
def broadcast_on(chan, x: np.ndarray, root_rank: int = 0, name=None) -> np.ndarray:
    _check_root(chan, root_rank)
    x = check_array(x, chan.who, name, writable=True)
    on_device = device.is_device_array(x)
    label = device_path.label("bcast") if on_device else "bcast"
    seq = chan.next_seq()
    if agree.enabled():
        header = agree.fingerprint(seq, "broadcast", x.size, dtype_code(x.dtype), root_rank,
                                   label, name, x.shape, None)
        _agree(chan, header, "broadcast", x, f"root {root_rank}", label, name, seq)
    if on_device:
        device_path.broadcast(chan, x, root_rank, bcast_bytes)
    else:
        bcast_bytes(chan, x, root_rank)
    return x


def broadcast_(x: np.ndarray, root_rank: int = 0, comm=None, name: str | None = None,
               process_set=None) -> np.ndarray:
    """Overwrite `x` on every rank with root_rank's `x`, in place (Horovod's name and argument).

    Example::

        w = np.random.default_rng(rr.rank()).random(10)
        rr.broadcast_(w, root_rank=0)      # every rank now holds rank 0's w
    """
    return broadcast_on(context(resolve_comm(comm, process_set)).main, x, root_rank, name)


# -- Python objects: pickled here, moved as bytes through the supervised wait --------------

def _object_check(chan, kind: str, root_rank: int) -> None:
    seq = chan.next_seq()
    if agree.enabled():
        header = agree.fingerprint(seq, kind, op=root_rank)
        _agree(chan, header, kind, None, f"root {root_rank}", "", None, seq)


def _pickle(obj) -> tuple[np.ndarray | None, str | None]:
    """(bytes as uint8, None), or (None, the reason) when obj cannot be pickled."""
    try:
        return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8), None
    except Exception as exc:  # any pickling failure must reach the other ranks
        return None, f"{type(exc).__name__}: {exc}"


@agree.joinable(lambda: _broadcast_object_after_join)
@agree.guarded("broadcast_object")
def _broadcast_object_on(chan, obj, root_rank: int = 0):
    _check_root(chan, root_rank)
    _object_check(chan, "broadcast_object", root_rank)
    data, reason = _pickle(obj) if chan.rank == root_rank else (None, None)
    # First the length (-1: the root could not pickle), then the bytes: every rank
    # learns of a failure on the root instead of waiting for bytes that never come.
    length = np.array([-1 if reason else (data.size if data is not None else 0)], np.int64)
    bcast_bytes(chan, length, root_rank, "broadcast_object (length)")
    if length[0] < 0:
        where = f"{chan.who}" if chan.rank == root_rank else f"{chan.who}: root rank {root_rank}"
        raise RingReduceError(f"{where} could not pickle the object for broadcast_object"
                              + (f": {reason}" if reason else ""))
    buf = data.copy() if chan.rank == root_rank else np.empty(int(length[0]), np.uint8)
    bcast_bytes(chan, buf, root_rank, "broadcast_object")
    return obj if chan.rank == root_rank else pickle.loads(buf.tobytes())


def broadcast_object(obj, root_rank: int = 0, comm=None, process_set=None):
    """Return root_rank's picklable `obj` on every rank.

    A root that cannot pickle `obj` raises RingReduceError, and so does every other
    rank (naming the root), within the same call.

    Example::

        cfg = rr.broadcast_object({"lr": 0.1} if rr.rank() == 0 else None)
    """
    return _broadcast_object_on(context(resolve_comm(comm, process_set)).main, obj, root_rank)


@agree.joinable(lambda: _allgather_object_after_join)
@agree.guarded("allgather_object")
def _allgather_object_on(chan, obj) -> list:
    _object_check(chan, "allgather_object", 0)
    data, reason = _pickle(obj)
    parts, bad = allgather_bytes(chan, data, "allgather_object")
    if bad:
        detail = f": {reason}" if reason else ""
        raise RingReduceError(f"{chan.who}: {agree._ranks(bad)} could not pickle the object for "
                              f"allgather_object{detail if chan.rank in bad else ''}")
    return [pickle.loads(part.tobytes()) for part in parts]


def allgather_object(obj, comm=None, process_set=None) -> list:
    """Return the list of every rank's picklable `obj`, in rank order.

    A rank that cannot pickle its `obj` raises RingReduceError, and so does every
    other rank (naming it), within the same call.

    Example::

        counts = rr.allgather_object(len(my_shard))
    """
    return _allgather_object_on(context(resolve_comm(comm, process_set)).main, obj)


def compression_state(comm=None) -> CompressionState:
    """This rank's error-feedback state for `comm` (default: the init communicator).

    Example::

        import ringreduce as rr
        y = rr.allreduce(g, compression=rr.Compression.int8, name="w")
        ckpt = {"residuals": rr.compression_state().state_dict()}
        rr.compression_state().load_state_dict(ckpt["residuals"])
    """
    return state_for(context(comm).main)


# -- join (runtime.join): the calls of the ranks still working, once some rank has joined ------
# After an agreement round that met joined ranks (agree.PeersJoined), the lowest rank still
# working describes the call (agree.share_spec) and every rank, joined ones included, makes it
# again as a plain host collective: joined ranks contribute the op's identity (nothing, for the
# gathers) and the op is unchanged (an Average still divides by every rank: Horovod's rule).

def with_host(x, fn, copy_back: bool = False):
    """fn(host array of x) for numpy or cupy x (a joined call runs on the host on every rank, so
    every rank's fingerprint is the same); returns fn's result, device arrays copied back."""
    if not device.is_device_array(x):
        return fn(x)
    xp = device.array_module(x)
    host = xp.asnumpy(x)
    got = fn(host)
    if copy_back:
        x[...] = xp.asarray(host)
        device.synchronize(x)
    return got


def check_joined_root(chan, joined: list[int], root: int, kind: str) -> None:
    """A broadcast from a rank that has joined cannot happen: the same error on every rank."""
    if root in joined:
        raise RingReduceError(f"{chan.who}: {kind} from root rank {root}, which has called join(); "
                              "broadcast from a rank still working")


def serve_allreduce(chan, buf: np.ndarray, op, name) -> None:
    """The joined form of an allreduce, in place on host array buf (the same call on every rank)."""
    allreduce_on(chan, buf, op, "auto", None, name, None, True)


def _allreduce_after_join(chan, joined, x, op=Average, algorithm="auto", compression=None, name=None,
                          out=None, inplace=False, prescale_factor=1.0, postscale_factor=1.0):
    """allreduce_on on a rank still working, after its agreement round met joined ranks.

    In place, x was prescaled before the round; otherwise the result is made afresh from x.
    Compression is not applied while some rank has joined (the joined call is exact).
    """
    op = _as_op(op, chan.who)
    scales = _scales(chan.who, x.dtype, name, prescale_factor, postscale_factor)
    if inplace:
        buf = x
    else:
        buf = _prepare_output(chan, x, out, name, False)
        if scales is not None:
            _scale(buf.reshape(-1), scales[0])
    spec = {"kind": "allreduce", "dtype": dtype_code(buf.dtype), "shape": list(buf.shape),
            "op": int(op), "name": name}
    agree.share_spec(chan, joined, spec)
    with_host(buf, lambda h: serve_allreduce(chan, h, op, name), copy_back=True)
    if scales is not None:
        _scale(buf.reshape(-1), scales[1])
    return buf


def _broadcast_after_join(chan, joined, x, root_rank=0, name=None):
    spec = {"kind": "broadcast", "dtype": dtype_code(x.dtype), "shape": list(x.shape),
            "root": int(root_rank), "name": name}
    agree.share_spec(chan, joined, spec)
    check_joined_root(chan, joined, int(root_rank), "broadcast")
    with_host(x, lambda h: broadcast_on(chan, h, root_rank, name), copy_back=True)
    return x


def _broadcast_object_after_join(chan, joined, obj, root_rank=0):
    agree.share_spec(chan, joined, {"kind": "broadcast_object", "root": int(root_rank)})
    check_joined_root(chan, joined, int(root_rank), "broadcast_object")
    return _broadcast_object_on(chan, obj, root_rank)


def _allgather_object_after_join(chan, joined, obj):
    agree.share_spec(chan, joined, {"kind": "allgather_object"})
    return _allgather_object_on(chan, obj)          # joined ranks contribute None
