"""Gradient compression: configuration objects and the compressed allreduce."""
from __future__ import annotations

from ..errors import RingReduceError


def resolve(compression, rank: int):
    """The compression configuration to apply, or None for uncompressed."""
    if compression is None:
        return None
    raise RingReduceError(f"rank {rank}: compression is not available in this build yet")


def compressed_allreduce(chan, flat, op, algorithm, comp, name):
    raise RingReduceError(f"rank {chan.rank}: compression is not available in this build yet")
