"""Exit notices: a rank that leaves tells its peers, so they stop waiting for it.

A rank that ends normally (``sys.exit(n)``, the end of the script) is not an
error to Python, and MPI_Finalize may block it until the others arrive. Without
a notice its peers would wait for its next collective until RINGREDUCE_TIMEOUT.

So at interpreter exit, after the engine thread has drained, each rank sends a
small notice to every peer on a control communicator (a duplicate of the init
communicator made by rr.init()): its final call number on every channel of
every communicator context it used. A rank whose wait has gone slow
(the supervised wait, after its spin) polls for notices on each tick. If a peer has
left and some channel shared with it has gone past the peer's final call
number, that call can never complete: the wait raises RingReduceError naming
the rank that left, and, uncaught, the job is aborted (ringreduce.liveness.faults).

The notice is fixed-layout int64 (no pickle): five numbers per context, its key
(group size, group CRC, how many contexts came before) and its final call
numbers on the main and background channels.

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

import time
import zlib

import numpy as np

from ..core.mpi import MPI
from ..transport.p2p import arrived

__all__ = ["ExitNotices", "TAG", "world_ranks"]

TAG = 32003                 # next to the stall inspector's query/reply tags


def world_ranks(comm) -> tuple:
    """The world rank of every rank of `comm`, in its rank order."""
    group, world = comm.Get_group(), MPI.COMM_WORLD.Get_group()
    try:
        return tuple(MPI.Group.Translate_ranks(group, list(range(group.Get_size())), world))
    finally:
        group.Free()
        world.Free()


class ExitNotices:
    """This process's exit notices: sent once at exit, taken in by slow waits.

    Parameters
    ----------
    contexts : callable returning the live communicator contexts (each with
        ``exit_key``, ``exit_ranks``, ``main``, ``background``)
    is_world : callable(ctx) -> bool, whether ctx is the init context (for messages)
    """

    def __init__(self, contexts, is_world):
        self.contexts = contexts
        self.is_world = is_world
        self.ctl = None             # control communicator: a Dup of the init communicator
        self.world_of: list[int] = []   # world rank of each rank of the control communicator
        self.exited: dict[int, dict] = {}   # control rank -> {context key: (main seq, background seq)}
        self.retired: dict = {}      # contexts already freed here: key -> (main seq, background seq)
        self.made: dict = {}         # (group size, CRC) -> contexts made so far for that group
        self.notified = False

    def setup(self, comm) -> None:
        """Duplicate `comm` (the init communicator) as the control communicator (collective)."""
        self.close()
        self.ctl = comm.Dup()
        self.world_of = list(world_ranks(self.ctl))
        self.notified = False
        self.exited.clear()

    def close(self) -> None:
        """Free the control communicator (at shutdown; a later init makes a new one)."""
        if self.ctl is not None and not MPI.Is_finalized():
            self.ctl.Free()
        self.ctl = None

    def key_of(self, comm) -> tuple:
        """A key for a new context on `comm`, the same on every rank of it; and its world ranks."""
        ranks = world_ranks(comm)
        crc = zlib.crc32(np.asarray(ranks, np.int64).tobytes())
        nth = self.made.get((len(ranks), crc), 0)
        self.made[(len(ranks), crc)] = nth + 1
        return (len(ranks), crc, nth), frozenset(ranks)

    def retire(self, ctx) -> None:
        """Remember a freed context's final call numbers (a peer may still be finishing its last call)."""
        key = getattr(ctx, "exit_key", None)
        if key is not None:
            self.retired[key] = (ctx.main.seq, ctx.background.seq)

    def _final_numbers(self) -> dict:
        final = dict(self.retired)
        for ctx in self.contexts():
            key = getattr(ctx, "exit_key", None)
            if key is not None:
                final[key] = (ctx.main.seq, ctx.background.seq)
        return final

    def notify(self) -> None:
        """Tell every peer this rank is leaving, with its final call numbers (once, at exit).

        The notice is a few dozen bytes, so MPI sends it eagerly; the sends are given a
        second to complete and then left (a peer that has already left never receives them).
        """
        if self.ctl is None or self.notified or MPI.Is_finalized():
            return
        self.notified = True
        me, n = self.ctl.Get_rank(), self.ctl.Get_size()
        if n == 1:
            return
        rows = [list(key) + list(seqs) for key, seqs in self._final_numbers().items()]
        buf = np.array(rows, np.int64).reshape(-1, 5)
        reqs = [self.ctl.Isend([buf, MPI.BYTE], p, TAG) for p in range(n) if p != me]
        deadline = time.monotonic() + 1.0
        while not MPI.Request.Testall(reqs) and time.monotonic() < deadline:
            time.sleep(1e-3)

    def _receive(self) -> None:
        for source, raw in arrived(self.ctl, TAG):
            rows = raw.view(np.int64).reshape(-1, 5)
            self.exited[source] = {tuple(int(v) for v in row[:3]): (int(row[3]), int(row[4]))
                                                for row in rows}

    def peers_exited(self) -> dict:
        """Peers known to have left: control rank -> their final call numbers."""
        if self.ctl is not None and not MPI.Is_finalized():
            self._receive()
        return dict(self.exited)

    def check(self, waiting) -> str | None:
        """Watcher: if a peer has left before a call this rank has entered, say so.

        Called on every tick of a slow wait; `waiting.what` describes the wait.
        Returns the error message, or None.
        """
        if self.ctl is None:
            return None
        self._receive()
        if not self.exited:
            return None
        me = self.ctl.Get_rank()
        for peer, final in list(self.exited.items()):
            world_peer = self.world_of[peer]
            for ctx in self.contexts():
                key = getattr(ctx, "exit_key", None)
                if key is None or world_peer not in ctx.exit_ranks:
                    continue
                theirs = final.get(key, (0, 0))
                for chan, last in ((ctx.main, theirs[0]), (ctx.background, theirs[1])):
                    if chan.seq > last:
                        channel = f"the {chan.label} channel" + (
                            "" if self.is_world(ctx) else " of a sub-communicator")
                        text = waiting.what or "a collective"
                        where = text if "(call " in text else f"{text} (call {chan.seq})"
                        return (f"rank {peer} exited (sys.exit or end of script) at call {last} while "
                                f"rank {me} waits in {where} on {channel}: rank {peer} will never "
                                f"enter call {last + 1}")
        return None
