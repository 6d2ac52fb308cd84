"""Agreement (the mismatch check): ranks agree on what they are about to do before data moves.

Each collective call carries a small fingerprint (call number, kind, count, dtype,
op, algorithm, name, shape, compression). The ranks exchange fingerprints in one
allgather; if any field differs, every rank sees the same table and raises the
same RingReduceError naming the ranks and the field, so nobody hangs in a
collective the others never entered with the same arguments.
"""
from __future__ import annotations

import ast
import functools
import inspect
import json
import struct
import zlib

import numpy as np

from ..algorithms.allgather import piggyback_bytes
from ..algorithms import ring, tree
from ..compression import kernels
from ..core import config, timeline
from ..core.dtypes import itemsize_of
from ..core.errors import RingReduceError
from ..core.mpi import MPI
from ..liveness.stall import Inspector
from ..transport.p2p import allgather_bytes, bcast_bytes
from ..transport.window import RowWindow

FIELDS = ("call number", "collective", "count", "dtype", "op", "algorithm", "name", "shape",
          "compression")
NFIELDS = len(FIELDS)
HEADER_BYTES = 8 * NFIELDS
# The layout, defined once: NFIELDS native int64 in FIELDS order. The C++ tiny path
# (csrc: small_pack) writes the same layout; runtime.tiny asserts so at import.
HEADER = struct.Struct(f"={NFIELDS}q")
_HEADER = HEADER
KINDS = {"allreduce": 1, "broadcast": 2, "broadcast_object": 3, "allgather_object": 4,
         "allgather": 5, "reducescatter": 6, "alltoall": 7, "barrier": 8, "grouped_allreduce": 9,
         "join": 10, "error": 99}
ERROR_KIND = KINDS["error"]
JOIN_KIND = KINDS["join"]
_KIND_NAMES = {v: k for k, v in KINDS.items()}


def enabled() -> bool:
    """RINGREDUCE_CHECK=0 turns the check off (default on)."""
    return config.check_enabled()


_HASHES: dict = {}   # (type, value) -> crc32 of repr: names, shapes and configs repeat every step


def _hash(value) -> int:
    if value is None:
        return 0
    key = (type(value), value)
    try:
        h = _HASHES.get(key)
    except TypeError:                # unhashable: no caching
        return zlib.crc32(repr(value).encode())
    if h is None:
        h = zlib.crc32(repr(value).encode())
        if len(_HASHES) < 4096:
            _HASHES[key] = h
    return h


def fingerprint(seq: int, kind: str, count: int = 0, dtype_code: int = 0, op: int = 0,
                algorithm: str = "", name: str | None = None, shape=(), compression=None) -> np.ndarray:
    """The call's fingerprint as int64 fields, plus the readable values for error messages."""
    return np.frombuffer(_HEADER.pack(seq, KINDS[kind], count, dtype_code, op, _hash(algorithm),
                                      _hash(name), _hash(tuple(shape)), _hash(compression)),
                         np.int64)


SHARED_PAYLOAD = 4096    # payload bytes of a row in shared memory: runtime.tiny.REACH
# What the paths over shared rows call once Rows.fused() says yes (runtime.tiny, collectives).
_FUSED = ("flags_arrive", "header_exchange", "small_allreduce", "small_finish")


def _cpp_handshake():
    """_C.flags_arrive when the extension has every fused call (a stale build: None, Python polls)."""
    C = kernels._C
    return C.flags_arrive if C is not None and all(hasattr(C, f) for f in _FUSED) else None


class Rows:
    """A channel's fingerprint rows: one send row and the n received, of one fixed width.

    Every fingerprint exchange on the channel (exchange() here, the fast path in
    collectives.py, the tiny path) goes through ``begin()`` then ``post()``, so the
    ranks make the same exchange whichever path each takes. On a channel whose
    ranks share a node the rows live in shared memory (transport.window.RowWindow:
    about 1 us at np=2 on a 2-core VM); elsewhere ``post`` is ``Iallgather(send, recv)``
    (3.7-4.1 us there).

    Over MPI the ring and the tree start their data before the agreement ends: ``start()``
    posts the exchange, the algorithm sends its first segment, and ``post(early=...)`` finishes
    the exchange before any received byte is used (see ``settle_early``).
    """

    def __init__(self, n: int, comm=None):
        # In shared memory a wider row costs nothing to exchange, so it holds the tiny
        # path's whole payload (no second exchange up to 4 KiB); over MPI rows stay
        # under the eager limit (allgather.piggyback_bytes says why).
        self.width = HEADER_BYTES + (max(piggyback_bytes(n), SHARED_PAYLOAD) if comm is not None
                                     else piggyback_bytes(n))
        self.window = RowWindow(comm, self.width, _cpp_handshake()) if comm is not None else None
        if self.window is None:
            self.send = np.zeros(self.width, np.uint8)
            self.recv = np.zeros(n * self.width, np.uint8)
        else:
            self.send = self.recv = None   # this call's views into the window, set by begin()
        self.req = None                    # an exchange posted by start(), finished by post()

    def begin(self) -> np.ndarray:
        """The row to write this call's fingerprint (and payload) into."""
        if self.window is not None:
            self.send, self.recv = self.window.flip()
        return self.send

    def headers(self, n: int) -> np.ndarray:
        """The received fingerprints as an (n, NFIELDS) int64 table (a copy)."""
        return self.recv.reshape(n, self.width)[:, :HEADER_BYTES].copy().view(np.int64)

    @property
    def overlaps(self) -> bool:
        """Whether the ring or tree may send data before this exchange ends (rows over MPI: across nodes)."""
        return self.window is None

    def start(self, chan) -> None:
        """Post the exchange of the row written since begin(); post() finishes it (MPI rows only)."""
        self.req = chan.comm.Iallgather(self.send, self.recv)

    def progress(self) -> None:
        """Let MPI advance the exchange start() posted (its later rounds move only inside MPI calls)."""
        req = self.req
        if req is not None:
            req.Test()

    def post(self, chan, seq: int, kind_code: int, name: str | None, early=None) -> None:
        """Exchange the rows written since begin(): afterwards self.recv holds every rank's.

        `early` is (receive, send) requests of the ring's or tree's first segment when this rank
        sent it before agreeing; on a mismatch they are settled before this returns.
        """
        width = self.width
        chan.count(width, (chan.size - 1) * width)
        if self.window is None:
            req, self.req = self.req, None
            finish(chan, req if req is not None else chan.comm.Iallgather(self.send, self.recv),
                   seq, kind_code, name)
            if not rows_same(self, chan.size):
                settle_early(chan, self, early)
            return
        self.window.sync(lambda done: _wait_rows(chan, done, seq, kind_code, name))

    def fused(self) -> RowWindow | None:
        """The shared-memory rows when their handshake can run inside a caller's C++ call
        (runtime.tiny): the caller counts the bytes, publishes and polls, and calls
        ``wait_arrival`` when the poll ran out; else None (use ``post``)."""
        window = self.window
        return window if window is not None and window.arrive is not None else None

    def wait_arrival(self, chan, seq: int, kind_code: int, name: str | None) -> None:
        self.window.wait_arrival(lambda done: _wait_rows(chan, done, seq, kind_code, name))

    def close(self) -> None:
        if self.window is not None:
            self.window.close()
            self.window = None


def _wait_rows(chan, done, seq: int, kind_code: int, name: str | None) -> None:
    what = _call_label(kind_code, name)
    chan.supervisor.wait_until(done, lambda: f"{what} (call {seq})", Inspector(chan, seq, what), chan=chan)


_ALLREDUCE = KINDS["allreduce"]
# The algorithms that may send their first segment before agreeing over MPI rows (modules
# with first_messages, first_segment_bytes and PRE_TAG), by name and by fingerprint hash.
_EARLY_BY_NAME = {"ring": ring, "tree": tree}
_EARLY = {_hash(name): algo for name, algo in _EARLY_BY_NAME.items()}
# ... when that segment is at most this large. A larger one delays the rows behind it on
# the link (they complete only after it), and with them the rest of the message: in the
# emulated cluster at 10 Gbit/s the tree at 1 MiB (a 256 KiB first segment) took 1.3x
# the time with the early send; the ring at 256 KiB (128 KiB) gained 6-12 %.
EARLY_MAX_BYTES = 1 << 17


def early_pays(algorithm: str, count: int, itemsize: int, n: int) -> bool:
    """Whether an uncompressed host `algorithm` call over MPI rows sends its first segment early."""
    return _sends_early(_EARLY_BY_NAME.get(algorithm), count, itemsize, n)


def works_early(algorithm: str, count: int, itemsize: int, n: int) -> bool:
    """Whether a host `algorithm` call over MPI rows starts before its agreement ends: the ring's
    and the tree's first segment (early_pays), or the hierarchical copy of this rank's input
    into its node's window (local work, no message: nothing for settle_early)."""
    return algorithm == "hierarchical" or early_pays(algorithm, count, itemsize, n)


def _sends_early(algo, count: int, itemsize: int, n: int) -> bool:
    """The one rule, for this rank's call (early_pays) and for every rank's row (early_messages)."""
    return (algo is not None and count > 0 and itemsize > 0
            and algo.first_segment_bytes(count, itemsize, n) <= EARLY_MAX_BYTES)


def early_messages(row, r: int, n: int):
    """(to, from, tag) of the segment rank r sent and received before agreeing, per its fingerprint
    row, or None when it sent nothing early.

    Every path that fingerprints an uncompressed host ring or tree allreduce over MPI
    rows sends early when ``early_pays`` says so (collectives._fast and _general), so
    the row alone says.
    """
    if row[1] != _ALLREDUCE or row[8] != 0:
        return None
    algo = _EARLY.get(int(row[5]))
    if not _sends_early(algo, int(row[2]), itemsize_of(row[3]), n):
        return None
    to, frm = algo.first_messages(n, r)
    return to, frm, algo.PRE_TAG


def settle_early(chan, rows: Rows, early) -> None:
    """After a mismatched exchange over MPI: consume the early first segments, so none is left
    to match a later call.

    Each rank that sends early sends at most one message (its algorithm's early tag)
    before the exchange, to a peer its row determines, so from the rows every rank
    knows which messages are coming to it: it waits for the one its posted receive
    matches (a longer one is truncated, which consumes it too), receives the others
    by probe, or cancels its receive when nothing matches it; then its own send completes.
    """
    n, me = chan.size, chan.rank
    table = rows.headers(n)
    recv, send = early if early is not None else ([], [])
    mine = early_messages(table[me], me, n)
    posted = (mine[1], mine[2]) if mine is not None and recv else None
    for source in range(n):
        theirs = early_messages(table[source], source, n) if source != me else None
        if theirs is None or theirs[0] != me:
            continue
        if (source, theirs[2]) == posted:
            _complete_quietly(chan, recv, "the early segment after a mismatch")
            posted = recv = None
        else:
            _receive_stray(chan, source, theirs[2])
    if recv:
        for req in recv:
            req.Cancel()
        _complete_quietly(chan, recv, "a cancelled early receive")
    _complete_quietly(chan, send, "the early send after a mismatch")


def _complete_quietly(chan, reqs: list, what: str) -> None:
    for req in reqs:
        try:
            chan.wait([req], what)
        except MPI.Exception:     # MPI_ERR_TRUNCATE: the peer's segment was longer; it is consumed
            pass


def _receive_stray(chan, source: int, tag: int) -> None:
    status = MPI.Status()
    found = []

    def probed() -> bool:
        msg = chan.comm.improbe(source, tag, status)
        if msg is not None:
            found.append(msg)
        return bool(found)

    chan.supervisor.wait_until(probed, "an early segment after a mismatch", chan=chan)
    found[0].Recv([np.empty(status.Get_count(MPI.BYTE), np.uint8), MPI.BYTE])


def rows_of(chan) -> Rows:
    """The channel's Rows (made on first use, kept in chan.rows)."""
    if chan.rows is None:
        chan.rows = Rows(chan.size)
    return chan.rows


def shared_rows(chan) -> None:
    """Give a channel whose ranks share a node its rows in shared memory (collective: at creation)."""
    if chan.size > 1 and chan.rows is None:
        chan.rows = Rows(chan.size, chan.comm)


def exchange(chan, header: np.ndarray, payload: np.ndarray | None = None, name: str | None = None):
    """Allgather the fingerprint (and a small payload) of every rank in one fixed-width call.

    The exchange is waited through the channel's supervisor, so a call that some
    ranks never enter warns after RINGREDUCE_STALL_WARNING seconds, naming them
    (liveness.stall), and times out after RINGREDUCE_TIMEOUT.

    Returns (table of shape (n, NFIELDS), payload rows of shape (n, piggyback_bytes(n)) uint8).
    """
    t0 = timeline.now() if timeline.on else 0
    hbytes = header.nbytes
    own = rows_of(chan)
    send = own.begin()
    send[:hbytes] = header.view(np.uint8)
    if payload is not None:
        raw = payload.reshape(-1).view(np.uint8)
        send[hbytes:hbytes + raw.size] = raw
    seq = int(header[0])
    own.post(chan, seq, int(header[1]), name)
    rows = own.recv.reshape(chan.size, own.width)
    if timeline.on:
        timeline.complete("fingerprint check", t0, {"call": seq, "name": name})
    return rows[:, :hbytes].copy().view(np.int64), rows[:, hbytes:]


_QUICK_POLLS = 64


def finish(chan, req, seq: int, kind_code: int, name: str | None) -> None:
    """Complete a posted fingerprint allgather: at once if it is done, else through the supervisor."""
    # Poll a little before the supervised wait: at a few bytes the peer's row
    # usually lands within a microsecond, and the wait costs ~2 us per entry.
    for _ in range(_QUICK_POLLS):
        if req.Test():
            return
    if not req.Test():
        what = _call_label(kind_code, name)
        chan.wait([req], lambda: f"{what} (call {seq})", Inspector(chan, seq, what))


def _call_label(kind_code: int, name: str | None) -> str:
    kind = _KIND_NAMES.get(kind_code, "collective")
    return f"{kind} of tensor '{name}'" if name else f"unnamed {kind}"


def guarded(kind: str):
    """Decorate a collective `fn(chan, ...)` so that an error raised on some ranks
    before the exchange still reaches the others.

    Without it, a rank that rejects its input (bad dtype, unknown compression...)
    raises alone and the other ranks wait in the exchange for it forever. With it,
    the rejecting rank takes part in the exchange with an "error" fingerprint, so
    every rank raises: the others name the rejecting rank and its reason.
    """
    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(chan, *args, **kwargs):
            before = chan.seq
            try:
                return fn(chan, *args, **kwargs)
            except Exception as exc:
                # chan.seq moved: the exchange already happened (or this is its error).
                if chan.seq == before and chan.size > 1 and enabled():
                    bound = sig.bind_partial(chan, *args, **kwargs).arguments
                    _share_local_error(chan, kind, bound.get("name"), exc)
                raise
        return wrapper
    return deco


def _share_local_error(chan, kind: str, name, exc: BaseException) -> None:
    seq = chan.next_seq()
    table, _ = exchange(chan, fingerprint(seq, "error"), name=name)
    kinds = table[:, 1]
    if ((kinds == ERROR_KIND) | (kinds == JOIN_KIND)).all():
        return                      # every rank rejected its call (or has joined): each raises its own
    readable = (seq, f"{kind} rejected on this rank: {exc}", "", "", "", "", name, (), "")
    try:
        raise_if_mismatch(table, chan, readable, name)
    except RingReduceError as shared:
        raise shared from exc


def describe(kind, count, dtype, op, algorithm, name, shape, compression, seq) -> tuple:
    """Readable values for each field, in FIELDS order (only built when a mismatch is reported)."""
    return (seq, kind, count, str(dtype), repr(op), algorithm, name, tuple(shape), repr(compression))


def rows_same(rows: Rows, n: int) -> bool:
    """Whether every rank's fingerprint in the received rows equals rank 0's (headers only)."""
    raw = rows.recv
    if kernels._C is not None:         # the tiny path's C++ row compare
        return kernels._C.small_same(raw, rows.width, n)
    head = raw[:HEADER_BYTES].tobytes()
    w = rows.width
    return all(raw[r * w:r * w + HEADER_BYTES].tobytes() == head for r in range(1, n))


def all_same(table: np.ndarray) -> bool:
    """Whether every row of a C-contiguous (n, k) table equals the first (a bytes compare: no numpy temporaries)."""
    raw = table.tobytes()
    return raw == raw[:len(raw) // max(table.shape[0], 1)] * table.shape[0]


def raise_if_mismatch(table: np.ndarray, chan, readable: tuple, name: str | None) -> None:
    """Raise the same RingReduceError on every rank if rows of the (size, NFIELDS) table differ.

    `readable` is this rank's description of the call; it is exchanged only on the
    error path, to name the values in the message.
    """
    if all_same(table):
        return
    joined = joined_ranks(table)
    if joined is not None:
        raise PeersJoined(joined)
    rank, who = chan.rank, chan.who
    everyone = _exchange_readable(chan, readable)
    kinds = table[:, 1]
    label_row = next((d for d, k in zip(everyone, kinds) if k != ERROR_KIND), everyone[rank])
    label = f"tensor '{name}'" if name else f"unnamed {ast.literal_eval(label_row[1])}"
    rejected = [r for r, k in enumerate(kinds) if k == ERROR_KIND]
    if rejected:
        reasons = "; ".join(f"rank {r}: {ast.literal_eval(everyone[r][1])}" for r in rejected)
        raise RingReduceError(f"{who}: {_ranks(rejected)} rejected {label} [{reasons}]")
    problems = []
    for f, field in enumerate(FIELDS):
        column = table[:, f]
        if (column == column[0]).all():
            continue
        groups: dict[str, list[int]] = {}
        for r, desc in enumerate(everyone):
            groups.setdefault(desc[f], []).append(r)
        parts = [f"{_ranks(rs)}: {val}" for val, rs in groups.items()]
        problems.append(f"{field} ({'; '.join(parts)})")
    raise RingReduceError(f"{who}: ranks disagree on {label}: " + ", ".join(problems))


_SEP = "\x1f"     # between the fields of a readable row (never inside a repr)


def _exchange_readable(chan, readable: tuple) -> list[list[str]]:
    """Every rank's readable description, each field as its repr (bytes, supervised, no pickle)."""
    text = _SEP.join(repr(v).replace(_SEP, " ") for v in readable)
    parts, _ = allgather_bytes(chan, np.frombuffer(text.encode(), np.uint8), "mismatch report")
    return [p.tobytes().decode("utf-8", "replace").split(_SEP) for p in parts]


def _ranks(rs: list[int]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(map(str, rs))



# -- join: ranks that have run out of work keep serving the others' collectives -------------

class PeersJoined(Exception):
    """Raised by raise_if_mismatch on a rank whose call met joined ranks (and no disagreement).

    Internal: each collective catches it right after its agreement round and runs
    the call again in its joined form (every rank, joined ones included, makes the
    same calls then: runtime.join).
    """

    def __init__(self, joined: list[int]):
        super().__init__(f"ranks {joined} have joined")
        self.joined = joined


def joined_ranks(table: np.ndarray) -> list[int] | None:
    """The joined ranks when the others all make one and the same call, else None."""
    kinds = table[:, 1]
    joined = kinds == JOIN_KIND
    if not joined.any() or joined.all():
        return None
    others = table[~joined]
    if (others[:, 1] == ERROR_KIND).any() or not all_same(np.ascontiguousarray(others)):
        return None
    return [int(r) for r in np.flatnonzero(joined)]


def join_fingerprint(seq: int, joined_at: int) -> np.ndarray:
    """A joined rank's row: kind "join", the call number it joined at in the count field."""
    return fingerprint(seq, "join", joined_at)


def share_spec(chan, joined: list[int], spec: dict | None = None) -> dict:
    """The call the ranks still working make, described by the lowest of them to every rank.

    Every rank calls it at the same point (after an agreement round that met joined
    ranks); `spec` matters only on that lowest rank. JSON, not pickle: plain fields.
    """
    root = min(r for r in range(chan.size) if r not in joined)
    data = json.dumps(spec).encode() if chan.rank == root else b""
    length = np.array([len(data)], np.int64)
    bcast_bytes(chan, length, root, "join (call description length)")
    buf = (np.frombuffer(data, np.uint8).copy() if chan.rank == root
           else np.empty(int(length[0]), np.uint8))
    bcast_bytes(chan, buf, root, "join (call description)")
    return json.loads(buf.tobytes().decode())


def joinable(handler):
    """Decorate a collective fn(chan, ...): when its agreement round meets joined ranks,
    ``handler()(chan, joined, ...)`` runs instead, with fn's arguments (handler is a
    thunk, so it may be defined below fn). See runtime.join.
    """
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(chan, *args, **kwargs):
            try:
                return fn(chan, *args, **kwargs)
            except PeersJoined as peers:
                return handler()(chan, peers.joined, *args, **kwargs)
        return wrapper
    return deco
