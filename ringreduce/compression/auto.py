"""Compression.auto: a policy that picks each tensor's format from what it measures on the job.

``rr.Compression.auto(quality=0.01, min_elements=2**14, formats=(...))`` is accepted
wherever a compression is. Per tensor name (a DistributedOptimizer bucket is one
tensor) it decides, and keeps re-deciding:

* **Whether compression pays, and which format is fastest**, from the tensor's own
  calls: the first ``WARM`` calls run uncompressed, then each candidate format runs
  ``TRIAL`` calls in turn, coarsest first (onebit, int4, int8, bf16, fp16); once one
  is within quality, finer ones run only if predicted faster than it measured; "none"
  runs again at the end when the best format beat it by less than 1.5x. The median
  call time of the last ``TRIAL - 1`` calls of each, MAX over the ranks, is the
  measurement (the first pays for scratch buffers). A
  candidate is skipped without a trial unless its predicted call, its compress +
  decompress of the tensor (this machine's kernel speed, measured once per process
  on 2**20 elements) plus the uncompressed call's time scaled by its wire bytes, is
  at most ``TRIAL_GAIN`` (0.6) of the uncompressed call: on one machine with shared
  memory that leaves "none" after the warm-up.
* **Whether its error stays within quality**: with error feedback (auto turns it on
  for every format, fp16/bf16 included), what the reduced results have missed so
  far is exactly the pending residuals (the workers' mean and the owners' server
  residuals), so auto estimates the relative L2 error of the accumulated result,
  ``||pending|| / ||sum of exact results||``, on ``SAMPLE`` fixed coordinates of
  the tensor (the same on every rank). Early the sum is short and only fine formats
  pass; as it grows coarser ones do: this replaces a hand-set warm-up. Before a
  format is tried, its error is predicted (``ONE_STEP``, its typical one-call error,
  times ||result|| / ||sum of results||); one predicted over quality waits
  ("deferred") and is tried at a later check once predicted under ``quality / 2``. A format
  whose error estimate exceeds ``quality`` at a check, or that met NaN/Inf, is
  dropped for the next finer one ("fallback"); a faster format rejected for its
  error is tried again once its predicted error (it shrinks as the sum grows) is
  under ``quality / 2`` ("tighten").
* Tensors under ``min_elements`` and 1-D tensors (biases, norms) stay uncompressed;
  ``one_dim=True`` lets 1-D tensors compress (DistributedOptimizer sets it for its
  fusion buckets, which are flat).

Every rank makes the same decision at the same call: the decisions are functions
of the tensor's call count and of statistics allgathered from every rank and
combined in rank order (bit-identical everywhere). The chosen format is what the
call's fingerprint carries, so a rank that chose otherwise gets the mismatch error.

Residuals on a format change: the worker residual (full length, fp32) and the
server residual (the owner's chunk; the same chunks for every format at the same
block size) carry over from one format to the next, so nothing is lost; while
"none" runs they wait untouched and are added back when a compressed format
returns. The state (choices, statistics, history) lives in
``rr.compression_state()`` next to the residuals and goes into its state_dict.

Example::

    import ringreduce as rr
    y = rr.allreduce(grad, op=rr.Average, compression=rr.Compression.auto, name="layer1.w")
    print(rr.compression_state().auto_report())   # per tensor: format over time, bytes, error
"""
from __future__ import annotations

import dataclasses
import time
import zlib

import numpy as np

from ..core import timeline
from ..core.errors import RingReduceError
from ..core.log import logger
from ..core.ops import ReduceOp
from . import kernels
from . import stats as _stats
from .base import Compressor, Quantizer
from .half import BF16, FP16
from .int4 import Int4
from .int8 import Int8
from .onebit import OneBit

__all__ = ["Auto", "AutoTensor", "choose", "after"]

FINE_TO_COARSE = ("none", "fp16", "bf16", "int8", "int4", "onebit")
WARM = 3            # uncompressed calls first (timed: the baseline)
TRIAL = 3           # calls per candidate format (the first untimed)
SAMPLE = 1024       # coordinates the error estimate watches
TRIAL_GAIN = 0.6    # try a format only if predicted at most this fraction of the uncompressed call
# One call's relative error per format on Gaussian data, rounded up (the compression bench
# measures 3.1e-4, 2.5e-3, 9.8e-3, 0.18, 0.81): a format whose predicted error, this times
# ||result|| / ||sum of results||, is above quality waits ("deferred") instead of being tried.
ONE_STEP = {"none": 0.0, "fp16": 5e-4, "bf16": 4e-3, "int8": 1.5e-2, "int4": 0.25, "onebit": 1.0}
FIRST_CHECK = 8     # calls between error checks once settled, doubling up to LAST_CHECK
LAST_CHECK = 128
_CALIBRATE_N = 1 << 20     # 4 MiB of fp32: mostly out of cache; ~70 ms for all formats, once
_TINY_NORM = 1e-30


@dataclasses.dataclass(frozen=True, repr=False)
class Auto(Compressor):
    """The self-tuning compression policy (see the module docstring).

    Options
    -------
    quality : bound on the estimated relative L2 error of the accumulated result (0.01)
    min_elements : tensors with fewer elements stay uncompressed (2**14)
    formats : the formats auto may use, "none" always included
    one_dim : compress 1-D tensors too (fusion buckets; default False)

    Example::

        y = rr.allreduce(g, compression=rr.Compression.auto(quality=0.02), name="w")
    """

    format = "auto"
    quality: float = 0.01
    min_elements: int = 1 << 14
    formats: tuple = ("none", "fp16", "int8", "int4", "onebit")
    one_dim: bool = False

    def __post_init__(self):
        try:
            q = float(self.quality)
        except (TypeError, ValueError):
            q = -1.0
        if not q > 0:
            raise RingReduceError(f"Compression.auto: quality must be a number > 0, got {self.quality!r}")
        object.__setattr__(self, "quality", q)
        m = self.min_elements
        if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or m < 0:
            raise RingReduceError(f"Compression.auto: min_elements must be an integer >= 0, got {m!r}")
        object.__setattr__(self, "min_elements", int(m))
        fmts = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        bad = [f for f in fmts if f not in FINE_TO_COARSE]
        if bad or not fmts:
            raise RingReduceError(f"Compression.auto: formats must be among {FINE_TO_COARSE}, "
                                  f"got {self.formats!r}")
        # Finest first, "none" always there (auto starts uncompressed).
        object.__setattr__(self, "formats", tuple(f for f in FINE_TO_COARSE
                                                  if f == "none" or f in fmts))
        if not isinstance(self.one_dim, (bool, np.bool_)):
            raise RingReduceError(f"Compression.auto: one_dim must be True or False, got {self.one_dim!r}")

    def options(self) -> dict:
        return {"quality": self.quality, "min_elements": self.min_elements,
                "formats": self.formats, "one_dim": self.one_dim}

    def packed_nbytes(self, n: int) -> int:      # a policy moves what its choice moves
        raise RingReduceError("Compression.auto is a policy, not a wire format")

    compress = decompress = packed_nbytes


# The concrete configurations auto runs: error feedback on for every format.
_CONFIGS = {"none": None, "fp16": FP16(error_feedback=True), "bf16": BF16(error_feedback=True),
            "int8": Int8(), "int4": Int4(), "onebit": OneBit()}


def config_of(fmt: str):
    return _CONFIGS[fmt]


class AutoTensor:
    """Auto's state for one tensor name: phase, choice, measurements, history."""

    def __init__(self, count: int, formats: tuple):
        self.count = count
        self.formats = formats
        self.calls = 0
        self.phase = "warm"                 # warm -> trial -> settled
        self.choice = "none"
        self.trial: list[str] = []          # formats still to try
        self.times: dict[str, list[float]] = {}
        self.medians: dict[str, float] = {}     # agreed (MAX over ranks) call seconds
        self.errors: dict[str, float] = {}      # agreed error estimate when last measured
        self.err_sum: dict[str, float] = {}     # ||sum|| when that error was measured
        self.skipped: list[str] = []
        self.nonfinite = 0
        self.sum = np.zeros(min(SAMPLE, count), np.float64)    # sum of results at the samples
        self.next_check = 0
        self.interval = FIRST_CHECK
        self.history: list[dict] = []       # {"call", "format", "why"}
        self.wire: dict[str, float] = {}    # bytes sent per rank, by format
        self.last_error: float | None = None
        self.predicted: dict[str, float] = {}   # predicted call seconds per format (agreed)
        self.deferred: list[str] = []           # formats predicted over quality so far
        self.last_y = 0.0                       # ||result||^2 at the samples, last call

    def remeasure_none(self, auto) -> bool:
        """Whether the best format within quality beat the warm-up's "none" by less than 1.5x."""
        ok = [s for f, s in self.medians.items() if f != "none"
              and self.errors.get(f, float("inf")) <= auto.quality]
        return bool(ok) and min(ok) * 1.5 > self.medians.get("none", 0.0)

    # -- checkpoint -----------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"count": self.count, "formats": list(self.formats), "calls": self.calls,
                "phase": self.phase, "choice": self.choice, "trial": list(self.trial),
                "medians": dict(self.medians), "errors": dict(self.errors),
                "err_sum": dict(self.err_sum), "skipped": list(self.skipped),
                "nonfinite": self.nonfinite, "sum": self.sum.copy(),
                "next_check": self.next_check, "interval": self.interval,
                "history": [dict(h) for h in self.history], "wire": dict(self.wire),
                "last_error": self.last_error, "predicted": dict(self.predicted),
                "deferred": list(self.deferred), "last_y": self.last_y,
                "times": {k: list(v) for k, v in self.times.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "AutoTensor":
        t = cls(int(d["count"]), tuple(d["formats"]))
        t.calls, t.phase, t.choice = int(d["calls"]), str(d["phase"]), str(d["choice"])
        t.trial = list(d["trial"])
        t.medians = {k: float(v) for k, v in d["medians"].items()}
        t.errors = {k: float(v) for k, v in d["errors"].items()}
        t.err_sum = {k: float(v) for k, v in d.get("err_sum", {}).items()}
        t.skipped = list(d["skipped"])
        t.nonfinite = int(d["nonfinite"])
        t.sum = np.array(_numpy(d["sum"]), np.float64, copy=True).reshape(-1)
        t.next_check, t.interval = int(d["next_check"]), int(d["interval"])
        t.history = [dict(h) for h in d["history"]]
        t.wire = {k: float(v) for k, v in d["wire"].items()}
        t.last_error = None if d.get("last_error") is None else float(d["last_error"])
        t.times = {k: [float(x) for x in v] for k, v in d.get("times", {}).items()}
        t.predicted = {k: float(v) for k, v in d.get("predicted", {}).items()}
        t.deferred = list(d.get("deferred", []))
        t.last_y = float(d.get("last_y", 0.0))
        return t

    def report(self) -> dict:
        return {"format": self.choice, "phase": self.phase, "calls": self.calls,
                "error": self.last_error, "history": [dict(h) for h in self.history],
                "median_ms": {k: round(v * 1e3, 3) for k, v in self.medians.items()},
                "errors": dict(self.errors), "skipped": list(self.skipped),
                "deferred": list(self.deferred),
                "wire_mb": {k: round(v / 1e6, 3) for k, v in self.wire.items()}}


def _numpy(a):
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return a


# -- the kernels' cost on this machine (per process, once) ------------------------------

_codec_cost: dict[str, float] = {}


def _codec_seconds_per_element(fmt: str) -> float:
    """compress (with residual) + decompress of one element, measured once on 2**20."""
    if fmt == "none":
        return 0.0
    if fmt not in _codec_cost:
        comp = _CONFIGS[fmt]
        n = _CALIBRATE_N
        x = np.random.default_rng(0).standard_normal(n).astype(np.float32)
        res = np.zeros(n, np.float32)
        out = np.empty(n, np.float32)
        packed = np.empty(comp.packed_nbytes(n), np.uint8)
        best = float("inf")
        for _ in range(2):
            t0 = time.perf_counter()
            comp.compress(x, packed, res)
            comp.decompress(packed, n, out)
            best = min(best, time.perf_counter() - t0)
        _codec_cost[fmt] = best / n
    return _codec_cost[fmt]


# -- the per-call hooks (runtime.collectives calls these) --------------------------------

def eligible(auto: Auto, flat, shape, op, name) -> bool:
    """Whether auto may compress this tensor at all."""
    if flat.size < max(auto.min_elements, 1) or (len(shape) <= 1 and not auto.one_dim):
        return False
    if op not in (ReduceOp.SUM, ReduceOp.AVERAGE) or flat.dtype.kind != "f" or flat.dtype.itemsize < 2:
        return False
    if flat.dtype.itemsize > 4 or not kernels.available() or type(flat) is not np.ndarray:
        return False            # float64, no kernels, device arrays: uncompressed
    return True


def _samples(name: str, count: int) -> np.ndarray:
    k = min(SAMPLE, count)
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return np.sort(rng.choice(count, size=k, replace=False)) if k < count else np.arange(count)


def choose(chan, state, auto: Auto, flat, shape, op, name):
    """The concrete compression for this call of `name` (None: uncompressed).

    Example::

        comp = choose(chan, state_for(chan), rr.Compression.auto, flat, x.shape, op, "w")
    """
    if not name:
        raise RingReduceError(f"{chan.who}: Compression.auto keeps per-tensor statistics, so the "
                              "allreduce needs a stable name=...")
    if not eligible(auto, flat, shape, op, name):
        return None
    t = state.auto_tensor(name, flat.size, auto.formats)
    return _CONFIGS[t.choice]


def after(chan, state, auto: Auto, flat, op, name, comp, seconds: float) -> None:
    """Book-keeping after the call: timings, the sampled sum, and the agreed decisions."""
    t = state.auto_tensor_if_any(name, flat.size)
    if t is None:
        return
    fmt = "none" if comp is None else comp.format
    t.calls += 1
    if comp is not None:
        st = _stats.last_stats(name)
        if st is not None and st.nonfinite_blocks:
            t.nonfinite += st.nonfinite_blocks
    idx = state.samples(name, flat.size, _samples)
    ys = flat[idx].astype(np.float64)
    t.sum += ys
    t.last_y = float(np.dot(ys, ys))      # the same on every rank: results are bit-identical
    t.times.setdefault(fmt, []).append(seconds)
    n = chan.size
    if comp is None:
        t.wire[fmt] = t.wire.get(fmt, 0.0) + (2 * (n - 1) / n * flat.nbytes if n > 1 else 0.0)
    else:
        t.wire[fmt] = t.wire.get(fmt, 0.0) + (2 * (n - 1) / n * comp.packed_nbytes(flat.size)
                                              if n > 1 else 0.0)
    if t.phase == "warm":
        if t.calls >= WARM:
            _end_warm(chan, state, auto, t, flat, op, name, idx)
    elif t.phase == "trial":
        if len(t.times.get(fmt, [])) >= TRIAL:
            _end_trial(chan, state, auto, t, flat, op, name, idx, fmt)
    elif t.calls >= t.next_check:
        _check(chan, state, auto, t, flat, op, name, idx)


def _predicted_error(t, fmt: str) -> float:
    """A format's error estimate before trying it: one call's error over the accumulated sum."""
    norm = float(np.sqrt(np.dot(t.sum, t.sum)))
    return ONE_STEP[fmt] * np.sqrt(t.last_y) / max(norm, _TINY_NORM)


def _median(v: list[float]) -> float:
    return float(np.median(v[1:] if len(v) > 1 else v))


def _gather(chan, local: np.ndarray, what: str) -> np.ndarray:
    """Every rank's float64 vector, (n, k), the same array on every rank."""
    send = np.ascontiguousarray(local, np.float64)
    recv = np.empty((chan.size, send.size), np.float64)
    chan.count(send.nbytes * max(chan.size - 1, 0), recv.nbytes - send.nbytes)
    chan.wait([chan.comm.Iallgather(send, recv)], what)
    return recv


def _pending(chan, state, t, flat, op, name, idx) -> np.ndarray:
    """This rank's share of the pending residuals at the sampled coordinates, result domain."""
    ts = state.tensor_if_any(name, flat.size)
    v = np.zeros(idx.size, np.float64)
    if ts is None:
        return v
    scale = 1.0 / chan.size if op == ReduceOp.AVERAGE else 1.0
    if ts.worker is not None and ts.worker.size == flat.size:
        v += scale * ts.worker[idx]
    if ts.server is not None and ts.server.size:
        lo, hi = ts.server_lo, ts.server_lo + ts.server.size
        mine = (idx >= lo) & (idx < hi)
        v[mine] += ts.server[idx[mine] - lo]
    return v


def _agreed_stats(chan, state, t, flat, op, name, idx, extra: list[float]):
    """(error estimate, ||sum||, agreed extras by MAX): one allgather of every rank's figures."""
    local = np.concatenate([_pending(chan, state, t, flat, op, name, idx),
                            np.asarray(extra, np.float64)])
    rows = _gather(chan, local, f"Compression.auto's statistics of tensor '{name}'")
    k = idx.size
    pend = np.zeros(k, np.float64)
    for r in range(chan.size):          # rank order: the same bits on every rank
        pend += rows[r, :k]
    exact = t.sum + pend
    norm = float(np.sqrt(np.dot(exact, exact)))
    err = float(np.sqrt(np.dot(pend, pend))) / max(norm, _TINY_NORM)
    return err, norm, rows[:, k:].max(axis=0)


def _event(chan, t, name, fmt, why, **more) -> None:
    if fmt != t.choice or not t.history:
        entry = {"call": t.calls, "format": fmt, "why": why, **more}
        t.history.append(entry)
        logger.info("rank %d: Compression.auto: tensor '%s' -> %s at call %d (%s)", chan.rank, name,
                    fmt, t.calls, why)
        if timeline.on:
            timeline.instant("compression auto", {"name": name, **entry})
    t.choice = fmt


def _end_warm(chan, state, auto, t, flat, op, name, idx) -> None:
    base = _median(t.times.get("none", [float("inf")]))
    fmts = [f for f in auto.formats if f != "none"]
    costs = [_codec_seconds_per_element(f) * flat.size for f in fmts]
    err, norm, agreed = _agreed_stats(chan, state, t, flat, op, name, idx, [base] + costs)
    t.medians["none"] = none = float(agreed[0])
    t.trial, t.skipped = [], []
    for f, cost in zip(fmts, agreed[1:]):
        # Predicted call: the kernels (compress + decompress of the whole tensor, slowest rank)
        # plus the uncompressed call's time scaled by the wire bytes (as if it were all link).
        shrink = _CONFIGS[f].packed_nbytes(flat.size) / flat.nbytes
        t.predicted[f] = float(cost + none * shrink)
        # A trial costs real calls (and a compressed call has fixed costs the prediction
        # leaves out), so only a format predicted to save 40 % or more is tried.
        (t.skipped if t.predicted[f] > TRIAL_GAIN * none else t.trial).append(f)
    t.last_error = err
    t.errors["none"] = err
    t.err_sum["none"] = norm
    # Formats predicted over quality wait until the accumulated result has grown (checks).
    t.deferred = [f for f in t.trial if _predicted_error(t, f) > auto.quality]
    t.trial = [f for f in t.trial if f not in t.deferred]
    if t.trial:
        # Coarsest first: once a format is within quality, the finer ones (more bytes, so
        # predicted slower) are tried only if predicted faster than it measured.
        t.trial.reverse()
        t.phase = "trial"
        _event(chan, t, name, t.trial[0], "trial")
    else:
        _settle(chan, t, name, "none", "no format predicted within quality yet" if t.deferred
                else "compression does not pay here")


def _end_trial(chan, state, auto, t, flat, op, name, idx, fmt) -> None:
    err, norm, agreed = _agreed_stats(chan, state, t, flat, op, name, idx,
                                      [_median(t.times[fmt]), float(t.nonfinite)])
    t.medians[fmt] = float(agreed[0])
    t.errors[fmt], t.err_sum[fmt] = err, norm
    t.last_error = err
    bad = agreed[1] > 0
    t.nonfinite = 0
    if bad:
        t.errors[fmt] = float("inf")
    t.trial = [f for f in t.trial if f != fmt]
    if fmt != "none" and t.errors[fmt] <= auto.quality:
        t.trial = [f for f in t.trial if f == "none" or t.predicted.get(f, 0.0) < t.medians[fmt]]
    if not t.trial and fmt != "none" and "none" not in t.trial and t.remeasure_none(auto):
        # "none" once more when it was close: by then the engine's own algorithm choice for
        # this size has settled (policy.learn explores during the first calls).
        t.trial = ["none"]
        t.times["none"] = []
    if t.trial:
        _event(chan, t, name, t.trial[0], "trial")
        return
    _settle(chan, t, name, *_best(auto, t))


def _best(auto, t, predict_norm: float | None = None) -> tuple[str, str]:
    """The fastest measured format whose (predicted) error is within quality."""
    ok = []
    for f, secs in t.medians.items():
        e = t.errors.get(f, float("inf"))
        if predict_norm is not None and f != "none" and np.isfinite(e):
            e = e * t.err_sum.get(f, 0.0) / max(predict_norm, _TINY_NORM)   # shrinks as the sum grows
        limit = auto.quality if predict_norm is None or f == t.choice else auto.quality / 2
        if f == "none" or e <= limit:
            ok.append((secs, FINE_TO_COARSE.index(f), f))
    secs, _, f = min(ok)
    return f, ("fastest within quality" if predict_norm is None else "tighten")


def _settle(chan, t, name, fmt, why) -> None:
    t.phase = "settled"
    t.interval = FIRST_CHECK
    t.next_check = t.calls + t.interval
    _event(chan, t, name, fmt, why)


def _check(chan, state, auto, t, flat, op, name, idx) -> None:
    fmt = t.choice
    recent = t.times.get(fmt, [])[-8:]
    err, norm, agreed = _agreed_stats(chan, state, t, flat, op, name, idx,
                                      [_median(recent) if recent else 0.0, float(t.nonfinite)])
    t.nonfinite = 0
    t.last_error = err
    if fmt != "none":
        t.errors[fmt], t.err_sum[fmt] = err, norm
        if fmt not in t.medians:          # a deferred format's first check: its measured time
            t.medians[fmt] = float(agreed[0])
    t.times = {k: v[-8:] for k, v in t.times.items()}
    t.interval = min(t.interval * 2, LAST_CHECK)
    t.next_check = t.calls + t.interval
    if fmt != "none" and (agreed[1] > 0 or err > auto.quality):
        # Error grew (or NaN/Inf): the next finer measured format that pays.
        t.errors[fmt] = float("inf") if agreed[1] > 0 else err
        finer = [f for f in t.medians if FINE_TO_COARSE.index(f) < FINE_TO_COARSE.index(fmt)]
        cands = [(t.medians[f], f) for f in finer
                 if f == "none" or t.errors.get(f, float("inf")) * t.err_sum.get(f, 0.0)
                 / max(norm, _TINY_NORM) <= auto.quality]
        new = min(cands)[1] if cands else "none"
        t.interval = FIRST_CHECK
        t.next_check = t.calls + t.interval
        _event(chan, t, name, new, "fallback", error=round(err, 6))
        return
    new, why = _best(auto, t, predict_norm=norm)
    if new != fmt and t.medians.get(new, float("inf")) < t.medians.get(fmt, float("inf")):
        t.interval = FIRST_CHECK
        t.next_check = t.calls + t.interval
        _event(chan, t, name, new, why, error=round(err, 6))
        return
    # A deferred format (not yet tried) whose predicted error is now under quality / 2 and
    # whose predicted time beats the current format's: try it (the next check measures it).
    now = t.medians.get(t.choice, float("inf"))
    for f in sorted(t.deferred, key=FINE_TO_COARSE.index, reverse=True):
        if _predicted_error(t, f) <= auto.quality / 2 and t.predicted.get(f, now) < now:
            t.deferred.remove(f)
            t.interval = FIRST_CHECK
            t.next_check = t.calls + t.interval
            _event(chan, t, name, f, "tighten", error=round(err, 6))
            return


def summary(state) -> str:
    """One line: per format, how many tensors use it now, and the largest error estimate."""
    rep = state.auto_report()
    if not rep:
        return "Compression.auto: no tensor used it"
    by: dict[str, int] = {}
    for r in rep.values():
        by[r["format"]] = by.get(r["format"], 0) + 1
    errs = [r["error"] for r in rep.values() if r["error"] is not None]
    first = min((h["call"] for r in rep.values() for h in r["history"]
                 if h["format"] != "none"), default=None)
    changes = sum(1 for r in rep.values() for h in r["history"] if h["why"] != "trial")
    parts = ", ".join(f"{f} x{c}" for f, c in sorted(by.items(), key=lambda kv: -kv[1]))
    return (f"Compression.auto: {len(rep)} tensor(s) now {parts}"
            + (f", compressed from call {first}" if first is not None else "")
            + f", {changes} change(s) after the trials"
            + (f", error estimate <= {max(errs):.2%}" if errs else ""))


def _assert_quantizer_layout() -> None:   # the carried server residual needs one block size
    sizes = {c.block_size for c in _CONFIGS.values() if isinstance(c, Quantizer)}
    assert len(sizes) == 1, sizes


_assert_quantizer_layout()
