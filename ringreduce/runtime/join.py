"""rr.join(): a rank out of work keeps serving the other ranks' collectives until every rank has joined.

Horovod's semantics, for every collective. A joined rank takes part in each
agreement round with a "join" fingerprint (agree.join_fingerprint). A rank
still working that meets such rows (and no disagreement among the working
ranks) gets agree.PeersJoined from its check; the lowest working rank then
describes the call (agree.share_spec) and every rank, the joined ones too,
makes it again as a plain host collective (the ``_after_join`` handlers in
collectives, gather and reducescatter; the ``_serve`` table here):

==================  =================================================================
allreduce            joined ranks contribute the op's identity (0, 1, +inf, -inf); the op
                     is unchanged, so Average still divides by every rank, as Horovod
                     does (its test_horovod_join_allreduce expects x * (size - 1) / size)
reducescatter        the same, and the joined rank's piece is dropped
allgather            joined ranks contribute no rows
alltoall             joined ranks send nothing and drop what they receive
broadcast            joined ranks receive; a broadcast from a joined root is a
                     named error on every rank
barrier              joined ranks take part
broadcast_object     joined ranks receive (a joined root: named error)
allgather_object     joined ranks contribute None
==================  =================================================================

Compression is not applied to a call made while some rank has joined (the
joined call is exact) and device arrays are served through host copies.
join() serves both of the communicator's channels: the calling thread's and
the engine thread's (async calls, the DistributedOptimizer's buckets), and
returns the rank that joined last (the highest one of those that joined at
the same call). It needs the mismatch check (RINGREDUCE_CHECK on), which is
what tells a joined rank what the others call. Anything the working ranks
disagree on still ends in the usual named error: at once on the working
ranks, and on a joined rank as the error join() raises once every rank has
joined (it keeps serving meanwhile, so nobody is left waiting).

Example::

    for batch in my_shard:            # shards of different lengths
        rr.allreduce_(grad(batch), op=rr.Average)
    last = rr.join()                   # serves the others' remaining allreduces
"""
from __future__ import annotations

import numpy as np

from ..core import config
from ..core.dtypes import dtype_name
from ..core.errors import RingReduceError
from ..core.ops import ReduceOp
from . import agree
from .collectives import (
    _allgather_object_on,
    _broadcast_object_on,
    broadcast_on,
    check_joined_root,
    serve_allreduce,
)
from .context import context, thread_multiple
from .engine import run_async
from .gather import _barrier_on, allgather_on, alltoall_on
from .process_sets import resolve_comm
from .reducescatter import serve_reducescatter

__all__ = ["identity", "join", "join_on"]


def identity(op: ReduceOp, dtype, shape) -> np.ndarray:
    """An array that leaves every element unchanged under op: what a joined rank contributes."""
    dtype = np.dtype(dtype)
    if op in (ReduceOp.SUM, ReduceOp.AVERAGE):
        return np.zeros(shape, dtype)
    if op == ReduceOp.PRODUCT:
        return np.ones(shape, dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.full(shape, info.max if op == ReduceOp.MIN else info.min, dtype)
    return np.full(shape, np.inf if op == ReduceOp.MIN else -np.inf, dtype)


def _dtype(spec) -> np.dtype:
    return np.dtype(dtype_name(spec["dtype"]))


def _serve(chan, spec: dict, joined: list[int]) -> None:
    """Make, as a joined rank, the call the working ranks described."""
    kind = spec["kind"]
    if kind == "allreduce":
        op = ReduceOp(spec["op"])
        serve_allreduce(chan, identity(op, _dtype(spec), tuple(spec["shape"])), op, spec["name"])
    elif kind == "reducescatter":
        op = ReduceOp(spec["op"])
        serve_reducescatter(chan, identity(op, _dtype(spec), tuple(spec["shape"])), op,
                            np.asarray(spec["rows"], np.int64), spec["name"], spec["algorithm"])
    elif kind == "allgather":
        allgather_on(chan, np.empty((0,) + tuple(spec["tail"]), _dtype(spec)), spec["name"],
                     spec["algorithm"])
    elif kind == "alltoall":
        alltoall_on(chan, np.empty((0,) + tuple(spec["tail"]), _dtype(spec)),
                    np.zeros(chan.size, np.int64), spec["name"])
    elif kind == "broadcast":
        check_joined_root(chan, joined, spec["root"], "broadcast")
        broadcast_on(chan, np.empty(tuple(spec["shape"]), _dtype(spec)), spec["root"], spec["name"])
    elif kind == "broadcast_object":
        check_joined_root(chan, joined, spec["root"], "broadcast_object")
        _broadcast_object_on(chan, None, spec["root"])
    elif kind == "allgather_object":
        _allgather_object_on(chan, None)
    elif kind == "barrier":
        _barrier_on(chan)
    else:
        raise RingReduceError(f"{chan.who}: join() cannot serve a {kind!r} call")


def join_on(chan) -> int:
    """Serve the channel's collectives until every rank has joined; returns the last rank to join."""
    n = chan.size
    if n == 1:
        return 0
    if not config.check_enabled():
        raise RingReduceError(f"{chan.who}: join() needs the mismatch check (RINGREDUCE_CHECK=1): "
                              "it is how a joined rank learns what the others call")
    joined_at = chan.seq + 1
    failed = None                # the first served call that failed: raised once all have joined
    while True:
        seq = chan.next_seq()
        table, _ = agree.exchange(chan, agree.join_fingerprint(seq, joined_at))
        kinds = table[:, 1]
        if (kinds == agree.JOIN_KIND).all():
            if failed is not None:
                raise failed
            at = table[:, 2]
            return int(np.flatnonzero(at == at.max()).max())
        if ((kinds == agree.JOIN_KIND) | (kinds == agree.ERROR_KIND)).all():
            continue                 # the working ranks each rejected their call and raised
        try:
            joined = agree.joined_ranks(table)
            if joined is None:       # the working ranks disagree: the same error here
                readable = agree.describe("join", 0, None, "", "", None, (), None, seq)
                agree.raise_if_mismatch(table, chan, readable, None)
            else:
                _serve(chan, agree.share_spec(chan, joined), joined)
        except RingReduceError as exc:
            # The working ranks raised the same error in the same call; keep serving them.
            failed = failed or exc


def join(comm=None, process_set=None) -> int:
    """Wait until every rank has called join, serving the others' collectives meanwhile.

    Every collective of the ranks still working is served (see the table in
    this module's docstring): a joined rank contributes the identity (or
    nothing); ops are unchanged (Average divides by every rank, as Horovod's). Both the calling
    thread's and the engine thread's calls are served (async forms included),
    the latter only with MPI_THREAD_MULTIPLE.

    Returns
    -------
    int
        The rank that joined last (the highest of those that joined at the same call).

    Example::

        for batch in shard:                     # a different length on each rank
            g = rr.allreduce(local_grad(batch), op=rr.Average)
        last = rr.join()
        w = rr.broadcast(w, root_rank=last)
    """
    c = resolve_comm(comm, process_set)
    ctx = context(c)
    if ctx.main.size == 1:
        return 0
    background = run_async(c, "join", join_on) if thread_multiple() else None
    try:
        last = join_on(ctx.main)
    finally:
        if background is not None:
            background.wait()        # ends once every rank has joined; raises what it met
    return last
