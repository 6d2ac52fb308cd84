"""What this rank has seen its calls cost: seconds and bytes per (size band, algorithm).

One :class:`Observations` store per communicator context (``CommContext.observations``,
shared by its main and background channels; ``chan.context.observations`` from a
channel). The collectives record every timed host allreduce dispatch into it; readers
(the learning auto in ``policy.learn``, ``Compression.auto``'s link-speed estimate,
``rr.info()``) ask for medians or a bandwidth.

The figures are this rank's own and are NOT agreed across ranks: a decision that every
rank must take alike has to allreduce them first (``policy.learn`` does, at its
decision points). Reading them for a purely local choice, or for display, is fine.

Size bands: a message of m bytes falls in band ``band(m) = (m - 1).bit_length()``,
i.e. band k holds sizes in (2**(k-1), 2**k]; a power of two 2**k is band k.

Example::

    obs = ctx.observations                    # or chan.context.observations
    obs.record("ring", 1 << 20, 0.00042)      # one call: algorithm, bytes, seconds
    obs.median_seconds("ring", 1 << 20)       # -> 0.00042 (median of the band's samples)
    obs.bandwidth("mpi", min_bytes=1 << 20)   # bytes/s over the recorded calls >= 1 MiB, or None
    obs.snapshot()                            # {"ring": {"1 MiB": {"calls": 1, "median_us": 420.0}}}
"""
from __future__ import annotations

import threading

__all__ = ["Observations", "band", "band_bytes"]

KEEP = 16           # samples kept per (band, algorithm): a ring buffer of the latest


def band(nbytes: int) -> int:
    """The size band of a message: k for sizes in (2**(k-1), 2**k] (0 and 1 byte: band 0)."""
    return (nbytes - 1).bit_length() if nbytes > 1 else 0


def band_bytes(k: int) -> int:
    """The largest size in band k (2**k)."""
    return 1 << k


class _Series:
    """The latest KEEP calls of one (band, algorithm): seconds and bytes, plus a total count."""

    __slots__ = ("seconds", "nbytes", "calls")

    def __init__(self):
        self.seconds: list[float] = []
        self.nbytes: list[int] = []
        self.calls = 0

    def add(self, nbytes: int, seconds: float) -> None:
        if len(self.seconds) < KEEP:
            self.seconds.append(seconds)
            self.nbytes.append(nbytes)
        else:
            i = self.calls % KEEP
            self.seconds[i] = seconds
            self.nbytes[i] = nbytes
        self.calls += 1


def _median(values: list[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


class Observations:
    """Per-rank timings of one communicator context's calls, by size band and algorithm.

    Thread-safe for one writer per channel (the two channels of a context may record
    at once); reads return copies.
    """

    def __init__(self):
        self._series: dict[tuple[int, str], _Series] = {}
        self._lock = threading.Lock()

    def record(self, algorithm: str, nbytes: int, seconds: float) -> None:
        """Add one call: `algorithm` (a name such as "ring", "mpi", "shm", or a label
        such as "ring+int8" for compressed calls) moved `nbytes` in `seconds`."""
        key = (band(nbytes), algorithm)
        s = self._series.get(key)
        if s is None:
            with self._lock:
                s = self._series.setdefault(key, _Series())
        s.add(nbytes, seconds)

    def samples(self, algorithm: str, nbytes: int) -> list[tuple[int, float]]:
        """The kept (bytes, seconds) samples of `algorithm` in the band of `nbytes`."""
        s = self._series.get((band(nbytes), algorithm))
        return [] if s is None else list(zip(list(s.nbytes), list(s.seconds)))

    def median_seconds(self, algorithm: str, nbytes: int) -> float | None:
        """Median seconds per call of `algorithm` in the band of `nbytes`, or None if never seen."""
        s = self._series.get((band(nbytes), algorithm))
        return _median(list(s.seconds)) if s is not None and s.seconds else None

    def bandwidth(self, algorithm: str | None = None, min_bytes: int = 1 << 16) -> float | None:
        """Median achieved bytes/second (algbw: message bytes / call seconds) over the kept
        calls of at least `min_bytes`, of `algorithm` (None: any algorithm), or None."""
        rates = []
        for (_, algo), s in list(self._series.items()):
            if algorithm is not None and algo != algorithm:
                continue
            rates += [b / t for b, t in zip(list(s.nbytes), list(s.seconds)) if b >= min_bytes and t > 0]
        return _median(rates) if rates else None

    def snapshot(self) -> dict:
        """{algorithm: {band label: {"calls": total calls, "median_us": median of the kept}}}."""
        out: dict = {}
        for (k, algo), s in sorted(self._series.items()):
            if s.seconds:
                out.setdefault(algo, {})[_label(band_bytes(k))] = {
                    "calls": s.calls, "median_us": round(_median(list(s.seconds)) * 1e6, 2)}
        return out

    def clear(self) -> None:
        with self._lock:
            self._series.clear()


def _label(b: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << shift:
            return f"{b >> shift} {unit}"
    return f"{b} B"
