"""Deadlock detection: when every rank is blocked in ringreduce and no wait can complete, say so.

Example: rank 0 calls ``rr.allreduce_async(x).wait()`` while rank 1 calls
``rr.allreduce(x)``. Rank 0's engine thread waits for call 1 on the background
channel, which rank 1 never makes; rank 1 waits for call 1 on the main channel,
which rank 0 never makes. Without this, both wait until RINGREDUCE_TIMEOUT.

A wait for call s on channel c can only complete once every rank of c's
communicator has entered call s there. A rank is *stuck* when its user's thread
is blocked in ringreduce (a supervised wait, or Handle.wait while the engine
thread is itself blocked in one). When a rank has been stuck for
RINGREDUCE_DEADLOCK_SECONDS (default 2), it asks every rank of the control
communicator for a snapshot: stuck or not, the serial numbers of its current
waits, and per context and channel its call number and the call it waits for.
It asks twice, half a second apart. If both rounds show every rank stuck in
the very same waits (same serials), and every wait has a stuck rank that has
not entered its call, then at the moment between the two rounds nobody could
move: it is a deadlock, and the rank raises RingReduceError naming every rank's
call and channel. Every stuck rank runs the same probe, so every rank raises
within a few seconds. Ranks that are computing, or not answering, never let a
probe conclude (their silence is not evidence).

Messages are fixed-layout int64 rows and UTF-8 text (no pickle), on the control
communicator (the exit notices' duplicate of the init communicator).

Example::

    detector = DeadlockDetector(runtime.contexts, supervisor, notices, after=2.0)
    supervisor.servers.append(detector.serve)
    supervisor.watchers.append(detector.check)
"""
from __future__ import annotations

import re
import threading
import time

import numpy as np

from ..core.mpi import MPI
from ..transport.p2p import PendingSends, arrived

__all__ = ["DeadlockDetector", "QUERY_TAG", "REPLY_TAG"]

QUERY_TAG = 32004
REPLY_TAG = 32005
VERDICT_TAG = 32006      # a rank that found the deadlock tells the others (UTF-8 message)
_ENGINE_THREAD = "ringreduce-engine"
_ROUND_GAP = 0.5         # seconds between the two rounds of a probe
_REPLY_PATIENCE = 2.0    # a round with replies missing after this long is dropped


class DeadlockDetector:
    """Answers snapshot queries and, when this rank is stuck, probes for a deadlock."""

    def __init__(self, contexts, supervisor, notices, after: float = 2.0):
        self.contexts = contexts
        self.supervisor = supervisor
        self.notices = notices            # its control communicator carries the probe
        self.after = after
        self._lock = threading.Lock()
        self._probe = 0
        self._round: dict | None = None   # the probe in flight
        self._first: dict | None = None   # round 1's snapshots, rank -> (ints, waits)
        self._next = 0.0
        self._sends = PendingSends()

    # -- snapshots ------------------------------------------------------------------------

    def _threads(self):
        names = {t.ident: t.name for t in threading.enumerate()}
        return [(names.get(tid, ""), w) for tid, w in list(self.supervisor.waiting.items())]

    def snapshot(self) -> tuple[np.ndarray, str]:
        """This rank's state: int64 [stuck, serial signature, nrows, rows...] and the waits' text."""
        entries = self._threads()
        user = [w for name, w in entries if name != _ENGINE_THREAD]
        engine = [w for name, w in entries if name == _ENGINE_THREAD and w.chan is not None]
        handle = any(w.chan is None for w in user)
        stuck = bool(user) and (not handle or bool(engine))
        signature = sum(w.serial * 1000003 ** i for i, w in enumerate(sorted(
            (w for _, w in entries), key=lambda w: w.serial))) % (1 << 62)
        waits = {}
        for _, w in entries:
            if w.chan is not None and w.chan.context is not None:
                waits[(id(w.chan.context), w.chan.label)] = w
        rows, text = [], []
        for ctx in self.contexts():
            key = getattr(ctx, "exit_key", None)
            if key is None:
                continue
            row = list(key)
            for chan in (ctx.main, ctx.background):
                w = waits.get((id(ctx), chan.label))
                row += [chan.seq, w.seq if w is not None else -1]
                if w is not None:
                    scope = "" if ctx.is_world else " of a sub-communicator"
                    what = re.sub(r" \(call \d+\)$", "", w.what)
                    text.append(f"{what} (call {w.seq} on the {chan.label} channel{scope})")
            rows.append(row)
        head = [int(stuck), signature, len(rows)]
        ints = np.array(head + [v for row in rows for v in row], np.int64)
        return ints, "\n".join(text)

    @staticmethod
    def _encode(probe: int, rnd: int, ints: np.ndarray, text: str) -> np.ndarray:
        head = np.array([probe, rnd, ints.size], np.int64)
        return np.concatenate([head.view(np.uint8), ints.view(np.uint8),
                               np.frombuffer(text.encode(), np.uint8)])

    @staticmethod
    def _decode(buf: np.ndarray):
        probe, rnd, n = (int(v) for v in buf[:24].view(np.int64))
        ints = buf[24:24 + 8 * n].view(np.int64).copy()
        text = buf[24 + 8 * n:].tobytes().decode("utf-8", "replace")
        return probe, rnd, ints, text

    # -- serving --------------------------------------------------------------------------

    def serve(self) -> None:
        """Answer snapshot queries (called on every slow tick)."""
        ctl = self.notices.ctl
        if ctl is None or MPI.Is_finalized():
            return
        for source, raw in arrived(ctl, QUERY_TAG):
            query = raw.view(np.int64)
            ints, text = self.snapshot()
            reply = self._encode(int(query[0]), int(query[1]), ints, text)
            self._sends.keep(ctl.Isend([reply, MPI.BYTE], source, REPLY_TAG), reply)

    # -- probing --------------------------------------------------------------------------

    def check(self, waiting) -> str | None:
        """Watcher: run this rank's probe a step further; the deadlock message, or None."""
        ctl = self.notices.ctl
        if ctl is None or ctl.Get_size() == 1:
            return None
        told = self._verdict_received(ctl)
        if told is not None:
            return told
        if not self._lock.acquire(blocking=False):
            return None
        try:
            found = self._step(ctl)
            if found is not None:
                # The others may not conclude on their own once this rank stops answering.
                raw = np.frombuffer(found.encode(), np.uint8).copy()
                for peer in range(ctl.Get_size()):
                    if peer != ctl.Get_rank():
                        self._sends.keep(ctl.Isend([raw, MPI.BYTE], peer, VERDICT_TAG), raw)
            return found
        finally:
            self._lock.release()

    def _verdict_received(self, ctl) -> str | None:
        for source, buf in arrived(ctl, VERDICT_TAG):
            return f"{buf.tobytes().decode('utf-8', 'replace')} (found by rank {source})"
        return None

    def _step(self, ctl) -> str | None:
        now = time.monotonic()
        if self._round is None:
            entries = list(self.supervisor.waiting.values())
            if now < self._next or not entries or now - min(w.since for w in entries) < self.after:
                return None
            ints, _ = self.snapshot()
            if not ints[0]:
                return None
            self._start(ctl, 1 if self._first is None else 2, now)
            return None
        rnd = self._round
        self._collect(ctl, rnd)
        if len(rnd["replies"]) < ctl.Get_size() - 1:
            if now - rnd["started"] > _REPLY_PATIENCE:
                self._round = self._first = None       # someone is not waiting: no conclusion
                self._next = now + self.after
            return None
        rnd["replies"][ctl.Get_rank()] = self.snapshot()
        self._round = None
        if rnd["number"] == 1:
            self._first = rnd["replies"]
            self._next = now + _ROUND_GAP
            return None
        first, second, self._first = self._first, rnd["replies"], None
        self._next = now + self.after
        return self._verdict(first, second)

    def _start(self, ctl, number: int, now: float) -> None:
        self._probe += 1
        self._round = {"probe": self._probe, "number": number, "started": now, "replies": {}}
        query = np.array([self._probe, number], np.int64)
        for peer in range(ctl.Get_size()):
            if peer != ctl.Get_rank():
                self._sends.keep(ctl.Isend([query, MPI.BYTE], peer, QUERY_TAG), query)

    def _collect(self, ctl, rnd: dict) -> None:
        for source, buf in arrived(ctl, REPLY_TAG):
            probe, number, ints, text = self._decode(buf)
            if probe == rnd["probe"] and number == rnd["number"]:
                rnd["replies"][source] = (ints, text)

    def _verdict(self, first: dict, second: dict) -> str | None:
        ranks = sorted(second)
        for r in ranks:
            a, b = first.get(r), second[r]
            if a is None or not b[0][0] or a[0].tobytes() != b[0].tobytes():
                return None          # not stuck, or moved between the rounds
        # Per rank: {(key, channel index): (seq, waited seq)}
        state = {}
        for r in ranks:
            ints = second[r][0]
            rows = ints[3:].reshape(int(ints[2]), 7) if ints[2] else np.zeros((0, 7), np.int64)
            state[r] = {}
            for row in rows:
                key = tuple(int(v) for v in row[:3])
                state[r][(key, 0)] = (int(row[3]), int(row[4]))
                state[r][(key, 1)] = (int(row[5]), int(row[6]))
        members = self._members()
        for r in ranks:
            for (key, c), (seq, waited) in state[r].items():
                if waited < 0:
                    continue
                group = members.get(key, ranks)
                if not any(state[j].get((key, c), (0, -1))[0] < waited for j in group if j != r):
                    return None      # everyone has entered that call: it can still complete
        parts = []
        for r in ranks:
            doing = "; ".join(t for t in second[r][1].split("\n") if t) or "waiting for the engine thread"
            parts.append(f"rank {r}: {doing}")
        return ("deadlock: every rank is blocked in ringreduce and none of the waits can complete "
                "(each waits for a call another rank has not made) [" + "; ".join(parts) + "]")

    def _members(self) -> dict:
        """Context key -> control ranks of its group."""
        to_ctl = {w: c for c, w in enumerate(self.notices.world_of)}
        out = {}
        for ctx in self.contexts():
            key = getattr(ctx, "exit_key", None)
            if key is not None:
                out[tuple(key)] = [to_ctl[w] for w in ctx.exit_ranks if w in to_ctl]
        return out
