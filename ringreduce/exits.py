"""Exit notices: a rank that leaves tells its peers, so they stop waiting for it.

A rank that ends normally (``sys.exit(n)``, the end of the script) is not an
error to Python, and MPI_Finalize may block it until the others arrive. Without
a notice its peers would wait for its next collective until RINGREDUCE_TIMEOUT.

So at interpreter exit, after the engine thread has drained, each rank sends a
small notice to every peer on a control communicator (a duplicate of the init
communicator made by rr.init()): its final call number on every channel of
every communicator context it used. A rank whose wait has gone slow
(progress.wait, after its spin) polls for notices on each tick. If a peer has
left and some channel shared with it has gone past the peer's final call
number, that call can never complete: the wait raises RingReduceError naming
the rank that left, and, uncaught, the job is aborted (ringreduce.faults).

A normal end stays silent: ranks that made the same calls have the same final
numbers, so a rank still finishing the last call when a faster peer leaves is
not ahead of it and keeps waiting for the data already on its way.

Contexts are matched across ranks by a key: the group's world ranks (as a CRC)
and how many contexts this process made before for that group. Ranks of a
correct program create contexts for a group in the same order.

Example::

    # rank 1:  sys.exit(3) after call 41
    # rank 0:  rr.allreduce(w, name="w")   # call 42
    # -> rank 0: rank 1 exited (sys.exit or end of script) at call 41 while rank 0
    #    waits in allreduce of tensor 'w' (call 42) on the main channel
"""
from __future__ import annotations

import pickle
import time
import zlib

import numpy as np
from mpi4py import MPI

__all__ = ["setup", "key_of", "retire", "notify", "check", "exited"]

TAG = 32003                 # next to the stall inspector's query/reply tags
_ctl: MPI.Comm | None = None
_world_of: list[int] = []   # world rank of each rank of the control communicator
_exited: dict[int, dict] = {}   # control rank -> {context key: (main seq, background seq)}
_retired: dict = {}          # contexts already freed here: key -> (main seq, background seq)
_made: dict = {}             # group CRC -> contexts made so far for that group
_notified = False


def _world_ranks(comm: MPI.Comm) -> tuple:
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return tuple(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world))
    finally:
        group.Free()
        world.Free()


def setup(comm: MPI.Comm) -> None:
    """Duplicate `comm` (the init communicator) as the control communicator (collective)."""
    global _ctl, _world_of, _notified
    _ctl = comm.Dup()
    _world_of = list(_world_ranks(_ctl))
    _notified = False
    _exited.clear()


def key_of(comm: MPI.Comm) -> tuple:
    """A key for a new context on `comm`, the same on every rank of it; and its world ranks."""
    ranks = _world_ranks(comm)
    crc = zlib.crc32(np.asarray(ranks, np.int64).tobytes())
    nth = _made.get((len(ranks), crc), 0)
    _made[(len(ranks), crc)] = nth + 1
    return (len(ranks), crc, nth), frozenset(ranks)


def retire(ctx) -> None:
    """Remember a freed context's final call numbers (a peer may still be finishing its last call)."""
    key = getattr(ctx, "exit_key", None)
    if key is not None:
        _retired[key] = (ctx.main.seq, ctx.background.seq)


def _final_numbers() -> dict:
    from . import comm as _comm
    final = dict(_retired)
    for ctx in list(_comm._state.contexts.values()):
        key = getattr(ctx, "exit_key", None)
        if key is not None:
            final[key] = (ctx.main.seq, ctx.background.seq)
    return final


def notify() -> None:
    """Tell every peer this rank is leaving, with its final call numbers (once, at exit).

    The notice is a few dozen bytes, so MPI sends it eagerly; the sends are given a
    second to complete and then left (a peer that has already left never receives them).
    """
    global _notified
    if _ctl is None or _notified or MPI.Is_finalized():
        return
    _notified = True
    me, n = _ctl.Get_rank(), _ctl.Get_size()
    if n == 1:
        return
    data = pickle.dumps(_final_numbers(), protocol=pickle.HIGHEST_PROTOCOL)
    buf = np.frombuffer(data, np.uint8)
    reqs = [_ctl.Isend([buf, MPI.BYTE], p, TAG) for p in range(n) if p != me]
    deadline = time.monotonic() + 1.0
    while not MPI.Request.Testall(reqs) and time.monotonic() < deadline:
        time.sleep(1e-3)


def _receive() -> None:
    status = MPI.Status()
    while True:
        msg = _ctl.improbe(MPI.ANY_SOURCE, TAG, status)
        if msg is None:
            return
        buf = np.empty(status.Get_count(MPI.BYTE), np.uint8)
        msg.Recv([buf, MPI.BYTE])
        _exited[status.Get_source()] = pickle.loads(buf.tobytes())


def exited() -> dict:
    """Peers known to have left: control rank -> their final call numbers."""
    if _ctl is not None and not MPI.Is_finalized():
        _receive()
    return dict(_exited)


def check(what="") -> str | None:
    """Take in notices; if a peer has left before a call this rank has entered, say so.

    Called on every tick of a slow wait; `what` (str or callable) describes the wait
    and is only evaluated for the message. Returns the error message, or None.
    """
    if _ctl is None:
        return None
    _receive()
    if not _exited:
        return None
    from . import comm as _comm
    me = _ctl.Get_rank()
    for peer, final in list(_exited.items()):
        world_peer = _world_of[peer]
        for ctx in list(_comm._state.contexts.values()):
            key = getattr(ctx, "exit_key", None)
            if key is None or world_peer not in ctx.exit_ranks:
                continue
            theirs = final.get(key, (0, 0))
            for chan, last in ((ctx.main, theirs[0]), (ctx.background, theirs[1])):
                if chan.seq > last:
                    channel = f"the {chan.label} channel" + (
                        "" if ctx is _comm._state.world else " of a sub-communicator")
                    text = (what() if callable(what) else what) or "a collective"
                    where = text if "(call " in text else f"{text} (call {chan.seq})"
                    return (f"rank {peer} exited (sys.exit or end of script) at call {last} while "
                            f"rank {me} waits in {where} on {channel}: rank {peer} will never "
                            f"enter call {last + 1}")
    return None
