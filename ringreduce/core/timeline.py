"""The timeline: a Chrome-trace (Perfetto) JSON of what each rank did and when.

RINGREDUCE_TIMELINE=path turns it on. With ``{rank}`` in the path every rank
writes its own file (``/tmp/tl.{rank}.json``); without it rank 0 gathers every
rank's events at shutdown and writes one merged file (one process per rank).
Open the file in https://ui.perfetto.dev or chrome://tracing.

Events (complete events with a duration, on a track per thread, unless noted):

- "allreduce": the whole call (name, algorithm, bytes, compression, call number);
- "fingerprint check": the mismatch check's exchange (ringreduce.runtime.agree);
- "algorithm <name>": the algorithm's run, and inside it one event per phase:
  "ring reduce-scatter" and "ring allgather"; "tree fold", one "tree
  exchange" per recursive-doubling round, "tree unfold"; "shm copy in",
  "shm reduce", "shm gather" (per block);
- "compress", "decompress": each kernel call of the compressed paths
  (ringreduce.compression.kernels; format, elements, packed bytes);
- "bucket ready": an instant event when the torch DistributedOptimizer launches
  a bucket's allreduce (bucket index, name, bytes, tensor count);
- "wait": an MPI wait that did not finish at once (ringreduce.transport.wait).

Cheap when off: every call site tests the module flag ``timeline.on`` first,
so the cost is one attribute load.

Example::

    from ringreduce.core import timeline
    t0 = timeline.now() if timeline.on else 0
    ...                                       # the work
    if timeline.on:
        timeline.complete("compress", t0, {"name": name})
"""
from __future__ import annotations

import json
import os
import threading
import time

from . import config

__all__ = ["on", "now", "complete", "instant", "configure", "flush", "events"]

on = False                  # the module flag every call site tests
_path: str | None = None
_rank = 0
_events: list = []
_lock = threading.Lock()
# Wall-clock origin so that ranks' timestamps line up in a merged file.
_offset_us = time.time() * 1e6 - time.perf_counter() * 1e6


def now() -> float:
    """Microseconds on the timeline's clock."""
    return time.perf_counter() * 1e6 + _offset_us


def complete(name: str, start_us: float, args: dict | None = None, cat: str = "ringreduce") -> None:
    """Record an event that began at `start_us` (from now()) and ends now."""
    end = now()
    ev = {"name": name, "cat": cat, "ph": "X", "ts": start_us, "dur": end - start_us,
          "pid": _rank, "tid": threading.current_thread().name}
    if args:
        ev["args"] = args
    with _lock:
        _events.append(ev)


def instant(name: str, args: dict | None = None, cat: str = "ringreduce") -> None:
    """Record a point-in-time event."""
    ev = {"name": name, "cat": cat, "ph": "i", "s": "t", "ts": now(), "pid": _rank,
          "tid": threading.current_thread().name}
    if args:
        ev["args"] = args
    with _lock:
        _events.append(ev)


def events() -> list:
    """A copy of this rank's events so far."""
    with _lock:
        return list(_events)


def configure(rank: int) -> None:
    """Turn the timeline on if RINGREDUCE_TIMELINE is set (called by rr.init())."""
    global on, _path, _rank
    path = config.text("RINGREDUCE_TIMELINE") or ""
    _rank = rank
    _path = path or None
    on = bool(path)


def _metadata(rank: int, evs: list) -> list:
    meta = [{"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": rank, "args": {"sort_index": rank}}]
    return meta


def _write(path: str, evs: list, ranks) -> None:
    meta = [m for r in ranks for m in _metadata(r, evs)]
    tmp = f"{path}.tmp{os.getpid()}"
    d = os.path.dirname(path)
    if d:
        os.makedirs(d, exist_ok=True)
    with open(tmp, "w") as f:
        json.dump({"traceEvents": meta + evs, "displayTimeUnit": "ms"}, f)
    os.replace(tmp, path)


def flush(comm=None) -> str | None:
    """Write the timeline (at shutdown). Returns the path written on this rank, if any.

    comm: the init communicator's engine channel, used to gather events to rank 0
    when the path has no ``{rank}``; None writes this rank's events alone (the
    fault path), to ``<path>.rank<N>``.
    """
    global on
    if _path is None:
        return None
    on = False
    evs = events()
    if "{rank}" in _path:
        path = _path.replace("{rank}", str(_rank))
        _write(path, evs, [_rank])
        return path
    if comm is None:
        path = f"{_path}.rank{_rank}"
        _write(path, evs, [_rank])
        return path
    gathered = comm.gather(evs, root=0)
    if comm.Get_rank() != 0:
        return None
    merged = [ev for part in gathered for ev in part]
    _write(_path, merged, range(comm.Get_size()))
    return _path
