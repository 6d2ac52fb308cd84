"""The learning auto: "auto" times its candidates on the job's own calls and keeps the fastest.

Without a tuning file (nobody ran ``ringreduce-bench --tune``), the cost model's
shipped defaults guess, and on a given machine they guess wrong by up to 2x. So
for host allreduces above the tiny path (> 4 KiB), auto learns per size band
(sizes in (2**(k-1), 2**k]) and per table ("full", or "half" for half types and
float Min/Max, which never run native MPI):

1. **Explore.** The band's calls go round-robin over the candidates (the plan's
   pick first) in runs of ``run_length(m)`` calls (4 up to 512 KiB, 2 above),
   ``samples(m)`` rounds, interleaved (A A B B C C A A ...) so machine noise
   hits every candidate alike. Only the second half of each run is timed: the
   first calls after another algorithm pay for
   that one's cache footprint and arrival skew (interleaved call by call, 2-core
   VM, 256 KiB: shm 170-220 us against 100-113 us in a steady loop, mpi 195-215
   against 120-155, so the ranking flipped), and it absorbs the first-use costs
   (a first shm call maps its window, a first ring call fills its scratch pool).
   The whole call is timed, agreement included: it does not cost every candidate
   the same (staged shm's handshake is its data barrier; a native call waits for
   the handshake before MPI starts; the ring overlaps it across nodes).
2. **Decide, agreed.** After the last round every rank allreduces (MAX) its
   per-candidate medians: the collective is as slow as its slowest rank, and
   every rank gets the same vector, so every rank picks the same fastest
   candidate. The schedule itself is a function of how many calls of the band
   this channel has made, identical on every rank, so during exploration every
   rank also runs the same algorithm on every call (the mismatch check would
   say so otherwise).
   **A close call goes to a runoff.** When other candidates' medians are within
   ``RUNOFF`` x the fastest, those candidates explore once more in runs twice as
   long (``runoff_calls``), still timing the second half of each run, and that
   round decides. Interleaved calls are not a steady loop: on the 2-core VM (no
   tuning file, 2026-12-07) the ring won 16 MiB over mpi by 1.3 % while
   exploring and then took 1.3x mpi's time in a steady loop; mpi won 256 KiB over
   shm by 2.7 % and took 1.25x the best.
3. **Watch for drift.** A settled band keeps the last few call times; every
   ``interval`` calls (32, doubling to 1024 while nothing changes) the ranks
   allreduce the median of the recent ones. Slower than ``DRIFT`` x the band's
   baseline (the first such check after a decision) at two checks in a row
   means the machine changed: the band explores again, over the candidates
   whose last median was within ``CONTENDERS`` x the choice's drifted time
   (on the 2-core VM, whose times swing 2-4x between moments, a 16 KiB band
   drifted from shm's 17 us and explored the ring's 185 us and the tree's 64 us
   again for no gain).
4. **Remember.** Rank 0 writes each decision to the learned cache
   (``~/.cache/ringreduce/learned.json``, or ``RINGREDUCE_LEARNED``), keyed by
   the machine shape (ranks, nodes, ranks per node, shared memory or not). The
   next launch of the same shape starts with those bands settled (rank 0 reads
   the file and broadcasts it with the plan), still watched for drift.

Each channel (the caller's thread, the engine thread) learns on its own calls,
so no state is shared between threads whose call orders differ across ranks.

Switches: ``RINGREDUCE_LEARN=0`` turns learning off (auto follows the plan
alone); with a tuning file that holds measurements for this shape
(``--tune``), learning is off unless ``RINGREDUCE_LEARN=1``.
``RINGREDUCE_LEARNED=off`` learns without reading or writing the cache (every
launch starts fresh); ``ringreduce-bench --forget`` deletes the cache.

Example::

    import ringreduce as rr
    rr.init()
    for step in range(100):
        rr.allreduce(grad)                     # the first 40-100 calls of each size explore
    rr.info()["learned"]["main"]               # {'full 1 MiB': 'shm (learned at call 17, 220 us)', ...}
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..core import config, timeline
from ..core.log import logger
from ..core.mpi import MPI
from .observations import band, band_bytes

__all__ = ["Learner", "cache_path", "load_cache", "forget", "enabled", "shape_key", "MIN_BYTES"]

MIN_BYTES = 4096          # sizes at or below: the tiny path (one allgather), nothing to learn
RUN = 2                   # consecutive calls per candidate in a round above 512 KiB ...
SHORT_RUN = 4             # ... and up to 512 KiB (short calls: the switch costs weigh more);
                          # the second half of each run is timed
_SHORT_BANDS = 19         # the last band of SHORT_RUN: sizes in (256 KiB, 512 KiB]
DRIFT = 1.5               # settled band slower than this x its baseline: explore again
FIRST_CHECK = 32          # calls between drift checks right after a decision ...
LAST_CHECK = 1024         # ... doubling up to this while nothing drifts
RECENT = 8                # call times kept for the drift check
MAX_REEXPLORE = 4         # re-explorations per band and launch (a flapping machine stops here)
CONTENDERS = 2.0          # a re-exploration tries only the candidates whose last median was
                          # within this x the drifted time of the choice (see _check_drift)
RUNOFF = 1.10             # candidates within this x the fastest median explore again, longer
SLOW_CHECKS = 2           # consecutive slow drift checks before exploring again
TABLES = ("full", "half")
CACHE_VERSION = 1


def samples(nbytes: int) -> int:
    """Timed rounds per candidate: five at every size. Three from 1 MiB let two lucky calls
    decide: at 64 MiB on the 2-core VM the ring's timed calls were 20 ms in exploring and
    32-69 ms after, against shm's steady 21-28, and auto kept the ring."""
    return 5


def run_length(nbytes: int) -> int:
    """Consecutive calls of one candidate in an exploring round: by size band, so every
    size of a band gets the same (bands up to 512 KiB: SHORT_RUN; from (512 KiB, 1 MiB]: RUN)."""
    return SHORT_RUN if band(nbytes) <= _SHORT_BANDS else RUN


def explore_calls(nbytes: int, candidates: int) -> int:
    """How many calls of a band exploring takes, over all its candidates."""
    return samples(nbytes) * run_length(nbytes) * candidates


def runoff_calls(nbytes: int, candidates: int) -> int:
    """How many calls a band's runoff takes (runs twice as long), over the candidates in it."""
    return samples(nbytes) * 2 * run_length(nbytes) * candidates


def enabled(tuned: bool) -> bool:
    """Whether auto learns: RINGREDUCE_LEARN, default on unless a tuning file measured this shape."""
    return config.flag("RINGREDUCE_LEARN", default=not tuned)


def shape_key(size: int, nodes: int, max_local: int, node_local: bool) -> str:
    """What "the same machine shape" means for the cache: ranks, nodes, ranks per node, shm."""
    return f"ranks={size} nodes={nodes} per_node={max_local} shm={int(node_local)}"


def cache_path() -> Path | None:
    """$RINGREDUCE_LEARNED, else ~/.cache/ringreduce/learned.json; None when set to off/0."""
    env = config.text("RINGREDUCE_LEARNED")
    if env and env.lower() in config.OFF:
        return None
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ringreduce" / "learned.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable learned cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def load_cache(shape: str, names: tuple, path: Path | None = None) -> list[tuple[int, int, int]]:
    """The cached decisions for `shape` as (table index, band, index into names) triples."""
    path = cache_path() if path is None else path
    if path is None:
        return []
    entry = _read(path).get("shapes", {}).get(shape, {})
    out = []
    for t, table in enumerate(TABLES):
        for k, rec in (entry.get(table) or {}).items():
            algo = rec.get("algorithm") if isinstance(rec, dict) else None
            if str(k).isdigit() and algo in names:
                out.append((t, int(k), names.index(algo)))
    return sorted(out)


def _save(path: Path, shape: str, table: str, k: int, algorithm: str, medians: dict) -> None:
    """Merge one decision into the cache file (rank 0 only; atomic replace)."""
    data = _read(path) or {"version": CACHE_VERSION}
    data["version"] = CACHE_VERSION
    entry = data.setdefault("shapes", {}).setdefault(shape, {})
    entry.setdefault(table, {})[str(k)] = {
        "algorithm": algorithm, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "median_us": {a: round(s * 1e6, 2) for a, s in medians.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def forget(path: Path | None = None) -> Path | None:
    """Delete the learned cache (the next launch starts from the plan); returns the path removed."""
    path = cache_path() if path is None else path
    if path is not None and path.exists():
        path.unlink(missing_ok=True)     # every rank of a node may forget the same file at once
        return path
    return None


class _Band:
    """One (table, band)'s learning state; identical on every rank of a channel."""

    __slots__ = ("candidates", "run", "explore_calls", "times", "choice", "source", "baseline", "recent",
                 "since_check", "interval", "reexplored", "learned_at", "calls", "medians", "slow",
                 "runoff_of")

    def __init__(self, candidates: list[str], run: int, choice: str | None = None, source: str = ""):
        self.candidates = candidates
        self.run = run                    # calls per candidate in a round (run_length)
        self.choice = choice              # None while exploring
        self.source = source              # "learned" / "cache" once settled
        self.explore_calls = 0
        self.times: dict[str, list[float]] = {}
        self.baseline: float | None = None
        self.recent: list[float] = []
        self.since_check = 0
        self.interval = FIRST_CHECK
        self.reexplored = 0
        self.learned_at = 0               # the band's call number when it settled
        self.calls = 0
        self.medians: dict[str, float] = {}
        self.slow = 0                     # consecutive drift checks above DRIFT x baseline
        self.runoff_of: list[str] | None = None   # during a runoff: the round's full candidates

    def explore(self) -> None:
        self.choice, self.source = None, ""
        self.explore_calls = 0
        self.times = {a: [] for a in self.candidates}

    def timed(self) -> bool:
        """Whether this call's time is read: while exploring, and for the last RECENT calls
        before a drift check (the check reads only those). Else the caller counts the call
        with ``untimed()`` instead of ``Learner.done``: less Python between two MPI calls."""
        return self.choice is None or self.since_check >= self.interval - RECENT

    def untimed(self) -> None:
        self.calls += 1
        self.since_check += 1

    def start_runoff(self, close: list[str]) -> None:
        """Explore `close` again in runs twice as long; finish_runoff() restores the rest."""
        self.runoff_of, self.candidates = self.candidates, close
        self.run *= 2
        self.explore()

    def finish_runoff(self) -> None:
        self.candidates, self.runoff_of = self.runoff_of, None
        self.run //= 2


class Learner:
    """auto's learning state on one channel (made by the runtime when learning is on).

    ``pick`` is called before the agreement with the plan's choice and returns what
    to run; ``done`` after the algorithm with its time. Both are deterministic in the
    sequence of calls, except at the agreed rounds (an allreduce of float64 medians).
    """

    def __init__(self, plan, shape: str, cached: list[tuple[int, int, int]], names: tuple,
                 save: bool):
        self.plan = plan
        self.shape = shape
        self.save = save                   # rank 0 writes the cache
        self.bands: dict[tuple[int, int], _Band] = {}
        self.events: list[dict] = []       # what was learned, when (rr.info, the timeline)
        self._send = np.zeros(len(names) + 1, np.float64)
        self._recv = np.zeros(len(names) + 1, np.float64)
        self._cached = {(t, k): names[a] for t, k, a in cached}

    def _band(self, t: int, k: int, nbytes: int) -> _Band:
        half = t == 1
        cands = self.plan.candidates(band_bytes(k), half)
        first = self.plan.choose(band_bytes(k), half)
        cands = [first] + [a for a in cands if a != first]
        cached = self._cached.get((t, k))
        run = run_length(band_bytes(k))
        if cached in cands:
            b = _Band(cands, run, cached, "cache")
        else:
            b = _Band(cands, run)
            b.explore()
        self.bands[(t, k)] = b
        return b

    def band_for(self, nbytes: int, half: bool) -> _Band:
        """The state of nbytes' band (made on first use): ``.choice`` is set once it settled."""
        t, k = (1 if half else 0), band(nbytes)
        b = self.bands.get((t, k))
        return b if b is not None else self._band(t, k, nbytes)

    def pick(self, nbytes: int, half: bool) -> str:
        """The algorithm for this call of nbytes ("half": the table without native MPI)."""
        t = 1 if half else 0
        k = band(nbytes)
        b = self.bands.get((t, k))
        if b is None:
            b = self._band(t, k, nbytes)
        if b.choice is not None:
            return b.choice
        return b.candidates[(b.explore_calls // b.run) % len(b.candidates)]

    def done(self, chan, algorithm: str, nbytes: int, half: bool, seconds: float,
             b: _Band | None = None) -> None:
        """Account one finished call (every rank calls this after the same calls); `b`: its
        band's state when the caller has it (``band_for``), saving the lookup."""
        if b is None:
            b = self.bands.get((1 if half else 0, band(nbytes)))
        if b is None:
            return
        b.calls += 1
        if b.choice is None:
            if b.explore_calls % b.run >= b.run // 2:
                b.times[algorithm].append(seconds)
            b.explore_calls += 1
            if b.explore_calls >= samples(nbytes) * b.run * len(b.candidates):
                self._decide(chan, b, half, nbytes)
            return
        recent = b.recent
        if len(recent) < RECENT:
            recent.append(seconds)
        else:
            recent[b.since_check % RECENT] = seconds
        b.since_check += 1
        if b.since_check >= b.interval and len(recent) >= RECENT // 2:
            self._check_drift(chan, b, half, nbytes)

    def _agree(self, chan, values: list[float], what: str) -> np.ndarray:
        """Every rank's values, MAX over ranks (the same vector everywhere)."""
        k = len(values)
        send, recv = self._send[:k], self._recv[:k]
        send[:] = values
        chan.count(send.nbytes, send.nbytes)
        chan.wait([chan.comm.Iallreduce(send, recv, MPI.MAX)], what)
        return recv.copy()

    def _decide(self, chan, b: _Band, half: bool, nbytes: int) -> None:
        local = [float(np.median(b.times[a])) if b.times[a] else float("inf") for a in b.candidates]
        agreed = self._agree(chan, local, "auto's learning round")
        i = int(np.argmin(agreed))            # ties: the earlier candidate (the plan's pick first)
        table = TABLES[1 if half else 0]
        k = band(nbytes)
        if b.runoff_of is None:
            b.medians = {a: float(s) for a, s in zip(b.candidates, agreed)}
            # Agreed medians, so every rank sees the same close call and the same runoff.
            close = [a for a, s in zip(b.candidates, agreed) if s <= RUNOFF * agreed[i]]
            if len(close) > 1:
                b.start_runoff(close)
                event = {"table": table, "band": _label(band_bytes(k)), "runoff": close,
                         "call": chan.seq, "median_us": {a: round(s * 1e6, 1) for a, s in b.medians.items()}}
                self.events.append(event)
                logger.info("auto: %s %s is a close call; a runoff between %s (medians %s us)", table,
                            event["band"], ", ".join(close), event["median_us"])
                if timeline.on:
                    timeline.instant("auto runoff", event)
                return
        else:
            winner = b.candidates[i]
            b.medians.update({a: float(s) for a, s in zip(b.candidates, agreed)})
            b.finish_runoff()
            i = b.candidates.index(winner)
        b.choice, b.source, b.learned_at = b.candidates[i], "learned", b.calls
        b.baseline, b.recent, b.since_check, b.interval = None, [], 0, FIRST_CHECK
        event = {"table": table, "band": _label(band_bytes(k)), "choice": b.choice,
                 "call": chan.seq, "band_call": b.calls, "reexplored": b.reexplored,
                 "median_us": {a: round(s * 1e6, 1) for a, s in b.medians.items()}}
        self.events.append(event)
        logger.info("auto learned %s %s on %s: %s (medians %s us)", table, event["band"], chan.label,
                    b.choice, event["median_us"])
        if timeline.on:
            timeline.instant("auto learned", event)
        path = cache_path() if self.save else None
        if path is not None:
            try:
                _save(path, self.shape, table, k, b.choice, b.medians)
            except OSError as exc:
                logger.warning("could not write the learned cache %s: %s", path, exc)

    def _check_drift(self, chan, b: _Band, half: bool, nbytes: int) -> None:
        recent = sorted(b.recent)
        now = float(self._agree(chan, [recent[len(recent) // 2]], "auto's drift check")[0])
        b.since_check = 0
        if b.baseline is None:
            b.baseline = now
            return
        if now > DRIFT * b.baseline:
            # Slow twice in a row (the second check comes FIRST_CHECK calls later): a burst of
            # load from another process passes, a changed machine stays.
            b.slow += 1
            b.interval = FIRST_CHECK
            if b.slow < SLOW_CHECKS or b.reexplored >= MAX_REEXPLORE:
                return
            b.slow = 0
            b.reexplored += 1
            # Every rank has the same medians and `now` (agreed), so the same contenders.
            b.candidates = [a for a in b.candidates
                            if a == b.choice or b.medians.get(a, 0.0) <= CONTENDERS * now]
            event = {"table": TABLES[1 if half else 0], "band": _label(band_bytes(band(nbytes))),
                     "was": b.choice, "call": chan.seq, "baseline_us": round(b.baseline * 1e6, 1),
                     "now_us": round(now * 1e6, 1), "drift": True, "exploring": list(b.candidates)}
            self.events.append(event)
            logger.info("auto: %s %s drifted (%.1f -> %.1f us); exploring again", event["table"],
                        event["band"], b.baseline * 1e6, now * 1e6)
            if timeline.on:
                timeline.instant("auto drift", event)
            b.explore()
            return
        b.slow = 0
        b.baseline = min(b.baseline, now)
        b.interval = min(b.interval * 2, LAST_CHECK)

    def settled(self, nbytes: int, half: bool = False) -> bool:
        """Whether the band of nbytes has a choice (learned or cached) on this channel."""
        b = self.bands.get((1 if half else 0, band(nbytes)))
        return b is not None and b.choice is not None

    def describe(self) -> dict:
        """{"full 1 MiB": "shm (learned at call 21: shm 220 us, mpi 410 us, ...)", ...}."""
        out = {}
        for (t, k), b in sorted(self.bands.items()):
            key = f"{TABLES[t]} {_label(band_bytes(k))}"
            if b.choice is None:
                out[key] = f"exploring ({b.explore_calls} calls so far over {', '.join(b.candidates)})"
            elif b.source == "cache":
                out[key] = f"{b.choice} (from the learned cache)"
            else:
                meds = ", ".join(f"{a} {s * 1e6:.0f} us" for a, s in b.medians.items())
                out[key] = f"{b.choice} (learned at band call {b.learned_at}: {meds})"
        return out


def _label(b: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << shift:
            return f"{b >> shift} {unit}"
    return f"{b} B"
