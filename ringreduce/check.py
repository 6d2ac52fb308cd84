"""The mismatch check: ranks agree on what they are about to do before data moves.

Each collective call carries a small fingerprint (call number, kind, count, dtype,
op, algorithm, name, shape, compression). The ranks exchange fingerprints in one
allgather; if any field differs, every rank sees the same table and raises the
same RingReduceError naming the ranks and the field, so nobody hangs in a
collective the others never entered with the same arguments.
"""
from __future__ import annotations

import os
import zlib

import numpy as np
from mpi4py import MPI

from .errors import RingReduceError

FIELDS = ("call number", "collective", "count", "dtype", "op", "algorithm", "name", "shape",
          "compression")
NFIELDS = len(FIELDS)
# Every fingerprint exchange has this one width, whatever the call, so ranks that
# disagree about the call still make matching MPI calls (never a truncation or hang).
# Payloads up to PIGGYBACK_BYTES travel inside it (the "allgather" algorithm).
PIGGYBACK_BYTES = 1024
KINDS = {"allreduce": 1, "broadcast": 2, "broadcast_object": 3, "allgather_object": 4}


def enabled() -> bool:
    """RINGREDUCE_CHECK=0 turns the check off (default on)."""
    return os.environ.get("RINGREDUCE_CHECK", "1").strip().lower() not in ("0", "false", "off", "no")


def _hash(value) -> int:
    return zlib.crc32(repr(value).encode()) if value is not None else 0


def fingerprint(seq: int, kind: str, count: int = 0, dtype_code: int = 0, op: int = 0,
                algorithm: str = "", name: str | None = None, shape=(), compression=None) -> np.ndarray:
    """The call's fingerprint as int64 fields, plus the readable values for error messages."""
    fp = np.array([seq, KINDS[kind], count, dtype_code, op, _hash(algorithm), _hash(name),
                   _hash(tuple(shape)), _hash(compression)], dtype=np.int64)
    return fp


def exchange(chan, header: np.ndarray, payload: np.ndarray | None = None):
    """Allgather the fingerprint (and a small payload) of every rank in one fixed-width call.

    Returns (table of shape (n, NFIELDS), payload rows of shape (n, PIGGYBACK_BYTES) uint8).
    """
    hbytes = header.nbytes
    width = hbytes + PIGGYBACK_BYTES
    send = chan.pool.get("check-send", np.uint8, width)
    recv = chan.pool.get("check-recv", np.uint8, chan.size * width)
    send[:hbytes] = header.view(np.uint8)
    if payload is not None:
        raw = payload.reshape(-1).view(np.uint8)
        send[hbytes:hbytes + raw.size] = raw
    chan.comm.Allgather([send, MPI.BYTE], [recv, MPI.BYTE])
    rows = recv.reshape(chan.size, width)
    return rows[:, :hbytes].copy().view(np.int64), rows[:, hbytes:]


def describe(kind, count, dtype, op, algorithm, name, shape, compression, seq) -> tuple:
    """Readable values for each field, in FIELDS order (only built when a mismatch is reported)."""
    return (seq, kind, count, str(dtype), repr(op), algorithm, name, tuple(shape), repr(compression))


def raise_if_mismatch(table: np.ndarray, comm, rank: int, readable: tuple, name: str | None) -> None:
    """Raise the same RingReduceError on every rank if rows of the (size, NFIELDS) table differ.

    `readable` is this rank's description of the call; it is exchanged only on the
    error path, to name the values in the message.
    """
    if (table == table[0]).all():
        return
    everyone = comm.allgather(readable)
    problems = []
    for f, field in enumerate(FIELDS):
        column = table[:, f]
        if (column == column[0]).all():
            continue
        groups: dict[str, list[int]] = {}
        for r, desc in enumerate(everyone):
            groups.setdefault(repr(desc[f]), []).append(r)
        parts = [f"{_ranks(rs)}: {val}" for val, rs in groups.items()]
        problems.append(f"{field} ({'; '.join(parts)})")
    label = f"tensor '{name}'" if name else f"unnamed {everyone[rank][1]}"
    raise RingReduceError(f"rank {rank}: ranks disagree on {label}: " + ", ".join(problems))


def _ranks(rs: list[int]) -> str:
    return ("rank " if len(rs) == 1 else "ranks ") + ",".join(map(str, rs))
