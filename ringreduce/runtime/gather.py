"""Collectives that move data without reducing it: allgather, alltoall, broadcast, barrier.

Each is validate -> agree -> move, like allreduce: a fingerprint exchange first
(what every rank must agree on: dtype, the trailing dimensions, the root), then
the data through the supervised wait, as bytes, so every dtype works. allgather
is an algorithm choice of its own (ring, shm or native MPI_Allgatherv, from the
cost model: algorithms.registry.COLLECTIVES). numpy or cupy arrays
(runtime.device_path: CUDA-aware MPI, or staged through pinned host buffers).
First dimensions may differ per rank (allgather) and splits are exchanged
before the data (alltoall), so a mismatch there is found from the counts, never
by a truncated receive.

Example::

    rows = rr.allgather(np.full((rr.rank() + 1, 3), rr.rank(), np.float32))
    got, splits = rr.alltoall(np.arange(2 * rr.size(), dtype=np.int64))
"""
from __future__ import annotations

import math

import numpy as np

from ..algorithms import registry
from ..algorithms.allgather import piggyback_bytes
from ..core import device, timeline
from ..core.dtypes import check_array, dtype_code
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..policy.collective import choose_collective, requested_collective
from ..transport.p2p import MAX_MESSAGE_BYTES
from . import agree, device_path
from .collectives import _agree, _raise_if_mismatch, broadcast_on, with_host
from .context import context
from .engine import Handle, run_async
from .process_sets import resolve_comm

__all__ = ["allgather", "allgather_async", "alltoall", "alltoall_async", "broadcast",
           "broadcast_async", "barrier", "allgather_on", "alltoall_on"]


def _contiguous(x, who, name):
    """x checked (any dtype we move) and C-contiguous, in its own array module."""
    x = check_array(x, who, name)
    if device.is_device_array(x):
        return x if x.flags.c_contiguous else device.array_module(x).array(x, order="C", copy=True)
    return np.ascontiguousarray(x)


def _rows(x) -> tuple[int, int]:
    """(first dimension, bytes per row); a 0-d array is one row."""
    first = x.shape[0] if x.ndim else 1
    per = x.dtype.itemsize * math.prod(x.shape[1:]) if x.ndim else x.dtype.itemsize
    return first, per


def _label(algorithm: str, on_device: bool) -> str:
    return device_path.label(algorithm) if on_device else algorithm


def _displs(counts: np.ndarray) -> np.ndarray:
    return np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)


@agree.joinable(lambda: _allgather_after_join)
@agree.guarded("allgather")
def allgather_on(chan, x, name=None, algorithm="auto"):
    """allgather on a channel: every rank's x concatenated along axis 0, in rank order."""
    x = _contiguous(x, chan.who, name)
    on_device = device.is_device_array(x)
    algorithm = requested_collective("allgather", algorithm, chan.who)
    seq = chan.next_seq()
    tail = x.shape[1:] if x.ndim else ()
    first, per = _rows(x)
    n = chan.size
    rode = None
    if agree.enabled():
        # The first dimension may differ (it rides in the agreement row, with the bytes
        # themselves when they fit: then the call is one MPI call); the dtype, the other
        # dimensions and the algorithm asked for may not.
        room = piggyback_bytes(n) - 16
        fits = not on_device and x.nbytes <= room
        mine = np.empty(16 + (x.nbytes if fits else 0), np.uint8)
        mine[:16].view(np.int64)[:] = (first, int(fits))
        if fits and x.nbytes:
            mine[16:] = x.reshape(-1).view(np.uint8)
        label = _label(algorithm, on_device)
        header = agree.fingerprint(seq, "allgather", 0, dtype_code(x.dtype), 0, label, name, tail)
        table, rows = agree.exchange(chan, header, mine, name=name)
        _raise_if_mismatch(chan, table, "allgather", x, "", label, name, seq)
        words = rows[:, :16].copy().view(np.int64).tolist()
        if all(fit for _, fit in words):
            # Every rank's bytes rode in the row: assemble, in Python ints (a few us a call).
            out = np.empty((sum(f for f, _ in words),) + tuple(tail), x.dtype)
            raw = out.reshape(-1).view(np.uint8)
            at = 0
            for j, (f, _) in enumerate(words):
                if f:
                    raw[at:at + f * per] = rows[j, 16:16 + f * per]
                    at += f * per
            if timeline.on:
                timeline.complete("allgather", timeline.now(), {"name": name, "algorithm": "piggyback",
                                                                "bytes": at, "call": seq})
            return out
        firsts = np.array([f for f, _ in words], np.int64)
        rode = np.array([bool(fit) for _, fit in words])
    else:
        firsts = np.empty(n, np.int64)
        chan.count(8, 8 * (n - 1))
        chan.wait([chan.comm.Iallgather(np.array([first], np.int64), firsts)], "allgather (rows)")
    counts = firsts * per
    total = int(counts.sum())
    xp = device.array_module(x)
    out = xp.empty((int(firsts.sum()),) + tuple(tail), x.dtype)
    displs = _displs(counts)
    if rode is not None and rode.any():
        raw = out.reshape(-1).view(np.uint8)
        for j in np.flatnonzero(rode):
            raw[displs[j]:displs[j] + counts[j]] = rows[j, 16:16 + counts[j]]
        counts = np.where(rode, 0, counts)      # the rest move by the algorithm
    if algorithm == "auto":
        algorithm = choose_collective(chan.plan, "allgather", total, x.dtype, n)
    runner = registry.COLLECTIVES["allgather"][algorithm].run
    extra = {"agreed": agree.enabled()} if algorithm == "mpi" else {}
    t0 = timeline.now() if timeline.on else 0
    mine_rode = rode is not None and bool(rode[chan.rank])

    def run(ch, src, dst):
        send = src.view(np.uint8)
        runner(ch, send[:0] if mine_rode else send, dst.view(np.uint8), counts, displs, **extra)

    if on_device:
        device_path.moved(chan, x, out, algorithm, run)
    else:
        run(chan, x.reshape(-1), out.reshape(-1))
    if t0:
        timeline.complete("allgather", t0, {"name": name, "algorithm": algorithm, "bytes": total,
                                            "call": seq})
    return out


def allgather(x, name: str | None = None, comm=None, process_set=None, algorithm: str = "auto"):
    """Concatenate every rank's `x` along axis 0 (first dimensions may differ; the rest must agree).

    x may be a numpy or a cupy array (the result lives where x does). algorithm:
    "auto" (the cost model's pick for the gathered size), "ring", "shm" (node-local
    shared memory) or "mpi" (MPI_Allgatherv); RINGREDUCE_ALLGATHER_ALGORITHM
    overrides "auto".

    Example::

        y = rr.allgather(np.full((rr.rank() + 1, 2), rr.rank(), np.float32))
        # y.shape == (1 + 2 + ... + size, 2)
    """
    return allgather_on(context(resolve_comm(comm, process_set)).main, x, name, algorithm)


def allgather_async(x, name: str | None = None, comm=None, process_set=None,
                    algorithm: str = "auto") -> Handle:
    """rr.allgather on the engine thread; returns a Handle whose wait() gives the array."""
    return run_async(resolve_comm(comm, process_set), "allgather",
                     lambda ch: allgather_on(ch, x, name, algorithm), x)


class SplitsError(RingReduceError, ValueError):
    """Bad splits or a first dimension that does not split: a RingReduceError, and a ValueError
    as in Horovod (its tests catch ValueError for these)."""


def checked_splits(chan, first: int, splits, what: str) -> np.ndarray:
    """Explicit `splits` as int64, or a SplitsError: n non-negative counts summing to `first`."""
    s = np.asarray(splits, np.int64).reshape(-1)
    if s.size != chan.size or (s < 0).any() or int(s.sum()) != first:
        raise SplitsError(f"{chan.who}: {what}: splits {s.tolist()} must be {chan.size} "
                              f"non-negative counts summing to the first dimension ({first})")
    return s


def _splits_of(chan, first: int, splits, what: str) -> np.ndarray:
    n = chan.size
    if splits is None:
        if first % n:
            raise SplitsError(f"{chan.who}: {what}: the first dimension ({first}) does not divide "
                                  f"evenly into {n} ranks; pass splits=")
        return np.full(n, first // n, np.int64)
    return checked_splits(chan, first, splits, what)


@agree.joinable(lambda: _alltoall_after_join)
@agree.guarded("alltoall")
def alltoall_on(chan, x, splits=None, name=None):
    """alltoall on a channel: returns (received array, received splits)."""
    x = _contiguous(x, chan.who, name)
    if x.ndim == 0:
        raise RingReduceError(f"{chan.who}: alltoall needs an array with a first dimension")
    on_device = device.is_device_array(x)
    first, per = _rows(x)
    send_splits = _splits_of(chan, first, splits, "alltoall")
    seq = chan.next_seq()
    tail = x.shape[1:]
    label = _label("bytes", on_device)
    if agree.enabled():
        header = agree.fingerprint(seq, "alltoall", 0, dtype_code(x.dtype), 0, label, name, tail)
        _agree(chan, header, "alltoall", x, "", label, name, seq)
    n = chan.size
    recv_splits = np.empty(n, np.int64)
    chan.count(8 * n, 8 * n)
    chan.wait([chan.comm.Ialltoall(send_splits, recv_splits)], "alltoall (splits)")
    out = device.array_module(x).empty((int(recv_splits.sum()),) + tuple(tail), x.dtype)
    scounts, rcounts = send_splits * per, recv_splits * per
    if max(int(scounts.sum()), int(rcounts.sum())) > MAX_MESSAGE_BYTES:
        raise RingReduceError(f"{chan.who}: alltoall of more than {MAX_MESSAGE_BYTES} bytes per rank "
                              "is not supported yet; split the call")

    def run(ch, src, dst):
        req = ch.comm.Ialltoallv([src.view(np.uint8), (scounts, _displs(scounts)), MPI.BYTE],
                                 [dst.view(np.uint8), (rcounts, _displs(rcounts)), MPI.BYTE])
        me = ch.rank
        ch.count(int(scounts.sum() - scounts[me]), int(rcounts.sum() - rcounts[me]))
        ch.wait([req], "alltoall" + (f" of tensor '{name}'" if name else ""))

    if on_device:
        device_path.moved(chan, x, out, None, run)
    else:
        run(chan, x.reshape(-1), out.reshape(-1))
    return out, recv_splits


def alltoall(x, splits=None, name: str | None = None, comm=None, process_set=None):
    """Send splits[j] rows of `x` (along axis 0) to rank j; returns (received rows, received splits).

    splits=None divides the first dimension evenly (it must divide by the rank count).

    Example::

        got, counts = rr.alltoall(np.arange(rr.size(), dtype=np.float32))   # one row each way
    """
    return alltoall_on(context(resolve_comm(comm, process_set)).main, x, splits, name)


def alltoall_async(x, splits=None, name: str | None = None, comm=None, process_set=None) -> Handle:
    """rr.alltoall on the engine thread; wait() gives (received rows, received splits)."""
    return run_async(resolve_comm(comm, process_set), "alltoall",
                     lambda ch: alltoall_on(ch, x, splits, name), x)


def _copy(x):
    """A contiguous copy in x's own array module (the out-of-place broadcast's buffer)."""
    return device.array_module(x).array(x, order="C", copy=True)


def broadcast(x, root_rank: int = 0, name: str | None = None, comm=None, process_set=None):
    """Return root_rank's `x` on every rank (out of place: `x` is left as it is).

    Example::

        w0 = rr.broadcast(np.random.default_rng(rr.rank()).random(4), root_rank=0)
    """
    return broadcast_on(context(resolve_comm(comm, process_set)).main, _copy(x), root_rank, name)


def broadcast_async(x, root_rank: int = 0, name: str | None = None, comm=None,
                    process_set=None) -> Handle:
    """rr.broadcast on the engine thread; wait() gives the new array."""
    y = _copy(x)
    return run_async(resolve_comm(comm, process_set), "broadcast",
                     lambda ch: broadcast_on(ch, y, root_rank, name), y)


@agree.joinable(lambda: _barrier_after_join)
@agree.guarded("barrier")
def _barrier_on(chan) -> None:
    seq = chan.next_seq()
    if agree.enabled():
        _agree(chan, agree.fingerprint(seq, "barrier"), "barrier", None, "", "", None, seq)
    chan.wait([chan.comm.Ibarrier()], "barrier")


def barrier(comm=None, process_set=None) -> None:
    """Wait until every rank has called barrier (supervised: stall warning, timeout, deadlock)."""
    _barrier_on(context(resolve_comm(comm, process_set)).main)



# -- join (runtime.join): a joined rank contributes no rows, sends nothing, receives what it is sent

def _allgather_after_join(chan, joined, x, name=None, algorithm="auto"):
    x = _contiguous(x, chan.who, name)
    algorithm = requested_collective("allgather", algorithm, chan.who)
    spec = {"kind": "allgather", "dtype": dtype_code(x.dtype), "tail": list(x.shape[1:] if x.ndim else ()),
            "name": name, "algorithm": algorithm}
    agree.share_spec(chan, joined, spec)
    got = with_host(x, lambda h: allgather_on(chan, h if h.ndim else h.reshape(1), name, algorithm))
    return device.array_module(x).asarray(got) if device.is_device_array(x) else got


def _alltoall_after_join(chan, joined, x, splits=None, name=None):
    x = _contiguous(x, chan.who, name)
    send_splits = _splits_of(chan, x.shape[0], splits, "alltoall")
    spec = {"kind": "alltoall", "dtype": dtype_code(x.dtype), "tail": list(x.shape[1:]), "name": name}
    agree.share_spec(chan, joined, spec)
    got, recv = with_host(x, lambda h: alltoall_on(chan, h, send_splits, name))
    return (device.array_module(x).asarray(got) if device.is_device_array(x) else got), recv


def _barrier_after_join(chan, joined):
    agree.share_spec(chan, joined, {"kind": "barrier"})
    _barrier_on(chan)
