"""The stall inspector: when a collective stalls, find out which ranks never entered it.

Like Horovod's stall inspector, but without a coordinator. A rank whose
mismatch-check exchange has waited for most of RINGREDUCE_STALL_WARNING sends
a small query to every other rank of the channel's communicator. Any rank that
is itself waiting inside ringreduce (progress.wait's slow phase) answers with
its call number on that channel and what it is waiting for; a rank that is
computing, or blocked outside ringreduce, does not answer. The warning (and
the timeout error) then names the ranks that have not entered the call and
says where each one is.

Nothing here runs on the healthy path: queries are only sent, and answered,
by waits that have already spun for SPIN_SECONDS without completing.

Example::

    from ringreduce import progress, stall
    progress.wait([req], "allreduce of tensor 'w'", stall.Inspector(chan, seq, "allreduce of 'w'"))
"""
from __future__ import annotations

from mpi4py import MPI

__all__ = ["Inspector", "serve"]

# Tags far above the algorithms' own (71, 72, ...) so they never match each other.
QUERY_TAG = 32001
REPLY_TAG = 32002

_sends: list = []        # our outstanding query/reply sends, pruned as they complete


def _keep(req) -> None:
    _sends.append(req)
    if len(_sends) > 64:
        _sends[:] = [r for r in _sends if not r.Test()]


class Inspector:
    """Asks the other ranks of `chan` whether they have entered call `seq` and where they are."""

    def __init__(self, chan, seq: int, what: str):
        self.chan = chan
        self.seq = seq
        self.what = what
        self.replies: dict[int, tuple[int, list[str]]] = {}
        self.asked = False

    def ask(self) -> None:
        """Send the query to every other rank (once)."""
        if self.asked:
            return
        self.asked = True
        comm = self.chan.comm
        for peer in range(self.chan.size):
            if peer != self.chan.rank:
                _keep(comm.isend(self.seq, peer, QUERY_TAG))

    def collect(self) -> None:
        """Take in any replies that have arrived (replies to older queries are dropped)."""
        if not self.asked:
            return
        comm = self.chan.comm
        status = MPI.Status()
        while True:
            msg = comm.improbe(MPI.ANY_SOURCE, REPLY_TAG, status)
            if msg is None:
                return
            qseq, their_seq, doing = msg.recv()
            if qseq == self.seq:
                self.replies[status.Get_source()] = (their_seq, doing)

    def missing(self) -> list[int]:
        """Ranks that have not entered the call, as far as the replies tell."""
        return [p for p in range(self.chan.size) if p != self.chan.rank
                and (p not in self.replies or self.replies[p][0] < self.seq)]

    def describe(self) -> str:
        """One line naming the missing ranks and, for each, where it is."""
        self.collect()
        missing = self.missing()
        if not missing:
            return f"every rank has entered {self.what}; still waiting for the data"
        parts = []
        for p in missing:
            if p not in self.replies:
                parts.append(f"rank {p}: no reply (not waiting inside ringreduce: computing, or "
                             "blocked elsewhere)")
            else:
                seq, doing = self.replies[p]
                where = "; ".join(doing) if doing else "not waiting"
                parts.append(f"rank {p}: at call {seq} on this channel, waiting in {where}")
        label = "rank {} has" if len(missing) == 1 else "ranks {} have"
        return (f"{label.format(','.join(map(str, missing)))} not entered "
                f"{self.what} (call {self.seq} on the {self.chan.label} channel) [" +
                "; ".join(parts) + "]")


def serve() -> None:
    """Answer other ranks' queries on every channel of this process (called by slow waits)."""
    from . import comm as _comm
    from .progress import activity
    status = MPI.Status()
    for ctx in list(_comm._state.contexts.values()):
        for chan in (ctx.main, ctx.background):
            if chan.comm == MPI.COMM_NULL:
                continue
            while True:
                msg = chan.comm.improbe(MPI.ANY_SOURCE, QUERY_TAG, status)
                if msg is None:
                    break
                qseq = msg.recv()
                _keep(chan.comm.isend((qseq, chan.seq, list(activity.values())),
                                      status.Get_source(), REPLY_TAG))
