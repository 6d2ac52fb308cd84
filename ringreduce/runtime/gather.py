"""Collectives that move data without reducing it: allgather, alltoall, broadcast, barrier.

Each is validate -> agree -> move, like allreduce: a fingerprint exchange first
(what every rank must agree on: dtype, the trailing dimensions, the root), then
the data through the supervised wait, as bytes, so every dtype works.
First dimensions may differ per rank (allgather) and splits are exchanged
before the data (alltoall), so a mismatch there is found from the counts, never
by a truncated receive.

Example::

    rows = rr.allgather(np.full((rr.rank() + 1, 3), rr.rank(), np.float32))
    got, splits = rr.alltoall(np.arange(2 * rr.size(), dtype=np.int64))
"""
from __future__ import annotations

import numpy as np

from ..core import device
from ..core.dtypes import check_array, dtype_code
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..transport.p2p import MAX_MESSAGE_BYTES, allgather_bytes
from . import agree
from .collectives import _agree, broadcast_on
from .context import context
from .engine import Handle, run_async
from .process_sets import resolve_comm

__all__ = ["allgather", "allgather_async", "alltoall", "alltoall_async", "broadcast",
           "broadcast_async", "barrier", "allgather_on", "alltoall_on"]


def _host(x, who, name):
    x = check_array(x, who, name)
    if device.is_device_array(x):
        raise RingReduceError(f"{who}: this collective takes host (numpy) arrays; copy device "
                              "buffers with .get() first (device support: allreduce and broadcast)")
    return np.ascontiguousarray(x)


def _rows(x: np.ndarray) -> tuple[int, int]:
    """(first dimension, bytes per row); a 0-d array is one row."""
    first = x.shape[0] if x.ndim else 1
    per = x.dtype.itemsize * int(np.prod(x.shape[1:], dtype=np.int64)) if x.ndim else x.dtype.itemsize
    return first, per


@agree.guarded("allgather")
def allgather_on(chan, x, name=None) -> np.ndarray:
    """allgather on a channel: every rank's x concatenated along axis 0, in rank order."""
    x = _host(x, chan.who, name)
    seq = chan.next_seq()
    tail = x.shape[1:] if x.ndim else ()
    if agree.enabled():
        # The first dimension may differ; the dtype and the other dimensions may not.
        header = agree.fingerprint(seq, "allgather", 0, dtype_code(x.dtype), 0, "bytes", name, tail)
        _agree(chan, header, "allgather", x, "", "bytes", name, seq)
    first, _ = _rows(x)
    # Each rank's first dimension rides in front of its bytes (rows may hold no bytes).
    payload = np.concatenate([np.array([first], np.int64).view(np.uint8), x.reshape(-1).view(np.uint8)])
    parts, _ = allgather_bytes(chan, payload, "allgather" + (f" of tensor '{name}'" if name else ""))
    firsts = [int(p[:8].view(np.int64)[0]) for p in parts]
    out = np.empty((sum(firsts),) + tuple(tail), x.dtype)
    raw = out.reshape(-1).view(np.uint8)
    at = 0
    for p in parts:
        raw[at:at + p.size - 8] = p[8:]
        at += p.size - 8
    return out


def allgather(x, name: str | None = None, comm=None, process_set=None) -> np.ndarray:
    """Concatenate every rank's `x` along axis 0 (first dimensions may differ; the rest must agree).

    Example::

        y = rr.allgather(np.full((rr.rank() + 1, 2), rr.rank(), np.float32))
        # y.shape == (1 + 2 + ... + size, 2)
    """
    return allgather_on(context(resolve_comm(comm, process_set)).main, x, name)


def allgather_async(x, name: str | None = None, comm=None, process_set=None) -> Handle:
    """rr.allgather on the engine thread; returns a Handle whose wait() gives the array."""
    return run_async(resolve_comm(comm, process_set), "allgather", lambda ch: allgather_on(ch, x, name), x)


def checked_splits(chan, first: int, splits, what: str) -> np.ndarray:
    """Explicit `splits` as int64, or a RingReduceError: n non-negative counts summing to `first`."""
    s = np.asarray(splits, np.int64).reshape(-1)
    if s.size != chan.size or (s < 0).any() or int(s.sum()) != first:
        raise RingReduceError(f"{chan.who}: {what}: splits {s.tolist()} must be {chan.size} "
                              f"non-negative counts summing to the first dimension ({first})")
    return s


def _splits_of(chan, first: int, splits, what: str) -> np.ndarray:
    n = chan.size
    if splits is None:
        if first % n:
            raise RingReduceError(f"{chan.who}: {what}: the first dimension ({first}) does not divide "
                                  f"evenly into {n} ranks; pass splits=")
        return np.full(n, first // n, np.int64)
    return checked_splits(chan, first, splits, what)


@agree.guarded("alltoall")
def alltoall_on(chan, x, splits=None, name=None):
    """alltoall on a channel: returns (received array, received splits)."""
    x = _host(x, chan.who, name)
    if x.ndim == 0:
        raise RingReduceError(f"{chan.who}: alltoall needs an array with a first dimension")
    first, per = _rows(x)
    send_splits = _splits_of(chan, first, splits, "alltoall")
    seq = chan.next_seq()
    tail = x.shape[1:]
    if agree.enabled():
        header = agree.fingerprint(seq, "alltoall", 0, dtype_code(x.dtype), 0, "bytes", name, tail)
        _agree(chan, header, "alltoall", x, "", "bytes", name, seq)
    n = chan.size
    recv_splits = np.empty(n, np.int64)
    chan.count(8 * n, 8 * n)
    chan.wait([chan.comm.Ialltoall(send_splits, recv_splits)], "alltoall (splits)")
    out = np.empty((int(recv_splits.sum()),) + tuple(tail), x.dtype)
    scounts, rcounts = send_splits * per, recv_splits * per
    if max(int(scounts.sum()), int(rcounts.sum())) > MAX_MESSAGE_BYTES:
        raise RingReduceError(f"{chan.who}: alltoall of more than {MAX_MESSAGE_BYTES} bytes per rank "
                              "is not supported yet; split the call")
    sdispl = np.concatenate(([0], np.cumsum(scounts)[:-1])).astype(np.int64)
    rdispl = np.concatenate(([0], np.cumsum(rcounts)[:-1])).astype(np.int64)
    sraw, rraw = x.reshape(-1).view(np.uint8), out.reshape(-1).view(np.uint8)
    req = chan.comm.Ialltoallv([sraw, (scounts, sdispl), MPI.BYTE], [rraw, (rcounts, rdispl), MPI.BYTE])
    me = chan.rank
    chan.count(int(scounts.sum() - scounts[me]), int(rcounts.sum() - rcounts[me]))
    chan.wait([req], "alltoall" + (f" of tensor '{name}'" if name else ""))
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


@agree.guarded("barrier")
def _barrier_on(chan) -> None:
    seq = chan.next_seq()
    if agree.enabled():
        _agree(chan, agree.fingerprint(seq, "barrier"), "barrier", None, "", "", None, seq)
    chan.wait([chan.comm.Ibarrier()], "barrier")


def barrier(comm=None, process_set=None) -> None:
    """Wait until every rank has called barrier (supervised: stall warning, timeout, deadlock)."""
    _barrier_on(context(resolve_comm(comm, process_set)).main)

