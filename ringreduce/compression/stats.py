"""What the last compressed allreduce cost and how far it was from exact: rr.last_stats().

Byte counts are exact for the layout used, summed over every message every
rank sent, then divided by the rank count (so every rank reports the same
figure). The uncompressed peer is the ring allreduce of the input dtype: each
element crosses 2(n-1) links, i.e. 2(n-1)/n x the tensor's bytes per rank.

The relative L2 error vs the exact result costs one extra uncompressed
allreduce, so it is only measured on request: set RINGREDUCE_STATS_ERROR=1 on
every rank (or call ``ringreduce.compression.measure_error(True)`` on every
rank). The request is part of the call's fingerprint, so ranks that disagree
get a clear mismatch error rather than a hang.
"""
from __future__ import annotations

import dataclasses
import threading

from ..core import config

__all__ = ["CompressionStats", "last_stats", "measure_error", "measuring_error"]


@dataclasses.dataclass(frozen=True)
class CompressionStats:
    """Figures of one compressed allreduce, as seen by this rank.

    Attributes
    ----------
    name : the tensor name (None if unnamed)
    compression : repr of the compression configuration
    dtype, count, ranks : the tensor's dtype and element count, and the rank count
    algorithm : "two-sided" (int8/int4/onebit) or the algorithm the half-type ring used
    payload_bytes : the tensor's own size in bytes
    wire_bytes : bytes sent per rank (all ranks' sends / ranks)
    uncompressed_wire_bytes : the same for an uncompressed ring allreduce of the input
    ratio : uncompressed_wire_bytes / wire_bytes (with one rank, where nothing moves,
        the ratio of the tensor's bytes to its compressed bytes)
    rel_error : ||result - exact|| / ||exact|| (L2) when requested, else None
    nonfinite_blocks : blocks holding NaN/Inf that this rank's compressions met in this call
    residual_resets : residual blocks reset for non-finite values, total for this tensor
    seconds : wall time of the compressed allreduce on this rank
    """

    name: str | None
    compression: str
    dtype: str
    count: int
    ranks: int
    algorithm: str
    payload_bytes: int
    wire_bytes: float
    uncompressed_wire_bytes: float
    ratio: float
    rel_error: float | None
    nonfinite_blocks: int
    residual_resets: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


_lock = threading.Lock()
_last: CompressionStats | None = None
_by_name: dict[str, CompressionStats] = {}
_measure = False


def record(stats: CompressionStats) -> None:
    global _last
    with _lock:
        _last = stats
        if stats.name is not None:
            _by_name[stats.name] = stats


def last_stats(name: str | None = None) -> CompressionStats | None:
    """Figures of the last compressed allreduce on this rank (or the last one of tensor `name`).

    None if there was none. Calls made on the engine's background thread
    (rr.allreduce_async) count too, once their handle is done.

    Example::

        y = rr.allreduce(g, compression=rr.Compression.int8, name="w")
        s = rr.last_stats()
        print(s.wire_bytes, s.ratio)        # ratio about 3.94 for int8 with block_size=256
    """
    with _lock:
        return _last if name is None else _by_name.get(name)


def measure_error(on: bool = True) -> None:
    """Measure the relative error vs exact in later compressed calls (call on every rank).

    Example::

        ringreduce.compression.measure_error(True)
        rr.allreduce(g, compression=rr.Compression.int4, name="w")
        print(rr.last_stats().rel_error)
    """
    global _measure
    _measure = bool(on)


def measuring_error() -> bool:
    """Whether the next compressed calls measure their error (switch or RINGREDUCE_STATS_ERROR)."""
    return _measure or config.flag("RINGREDUCE_STATS_ERROR")
