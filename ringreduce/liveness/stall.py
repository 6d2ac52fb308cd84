"""The stall inspector: when a collective stalls, find out which ranks never entered it.

Like Horovod's stall inspector, but without a coordinator. A rank whose
mismatch-check exchange has waited for most of RINGREDUCE_STALL_WARNING sends
a small query to every other rank of the channel's communicator. Any rank that
is itself waiting inside ringreduce (the supervised wait's slow phase) answers
with its call number on that channel and what it is waiting for; a rank that
is computing, or blocked outside ringreduce, does not answer. The warning (and
the timeout error) then names the ranks that have not entered the call and
says where each one is.

Messages are fixed-layout bytes (no pickle): a query is one int64 (the call
number asked about); a reply is two int64 (that number, the replier's call
number on the channel) followed by UTF-8 text (what it waits in).

Nothing here runs on the healthy path: queries are only sent, and answered,
by waits that have already spun for SPIN_SECONDS without completing.

Example::

    service = StallService(runtime.channels, supervisor)   # answers queries on slow ticks
    supervisor.servers.append(service.serve)
    chan.wait([req], "allreduce of tensor 'w'", Inspector(chan, seq, "allreduce of 'w'"))
"""
from __future__ import annotations

import numpy as np

from ..core.mpi import MPI
from ..transport.p2p import PendingSends, arrived

__all__ = ["Inspector", "StallService", "QUERY_TAG", "REPLY_TAG"]

# Tags far above the algorithms' own (71, 72, ...) so they never match each other.
QUERY_TAG = 32001
REPLY_TAG = 32002


class Inspector:
    """Asks the other ranks of `chan` whether they have entered call `seq` and where they are."""

    def __init__(self, chan, seq: int, what: str):
        self.chan = chan
        self.seq = seq
        self.what = what
        self.replies: dict[int, tuple[int, list[str]]] = {}
        self.asked = False
        self._sends = PendingSends()

    def ask(self) -> None:
        """Send the query to every other rank (once)."""
        if self.asked:
            return
        self.asked = True
        comm = self.chan.comm
        query = np.array([self.seq], np.int64)
        for peer in range(self.chan.size):
            if peer != self.chan.rank:
                self._sends.keep(comm.Isend([query, MPI.BYTE], peer, QUERY_TAG), query)

    def collect(self) -> None:
        """Take in any replies that have arrived (replies to older queries are dropped)."""
        if not self.asked:
            return
        for source, buf in arrived(self.chan.comm, REPLY_TAG):
            qseq, their_seq = (int(v) for v in buf[:16].view(np.int64))
            doing = [d for d in buf[16:].tobytes().decode("utf-8", "replace").split("\n") if d]
            if qseq == self.seq:
                self.replies[source] = (their_seq, doing)

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


class StallService:
    """Answers other ranks' stall queries on every channel of this process.

    `channels` returns the channels to serve; `supervisor.waiting` says what this
    process's threads are blocked in.
    """

    def __init__(self, channels, supervisor):
        self.channels = channels
        self.supervisor = supervisor
        self._sends = PendingSends()

    def serve(self) -> None:
        for chan in self.channels():
            if chan.comm == MPI.COMM_NULL:
                continue
            for source, raw in arrived(chan.comm, QUERY_TAG):
                query = raw.view(np.int64)
                doing = "\n".join(w.what for w in list(self.supervisor.waiting.values()))
                reply = np.concatenate([np.array([query[0], chan.seq], np.int64).view(np.uint8),
                                        np.frombuffer(doing.encode(), np.uint8)])
                self._sends.keep(chan.comm.Isend([reply, MPI.BYTE], source, REPLY_TAG), reply)
