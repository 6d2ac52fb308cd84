"""Error-feedback state: residuals per (communicator, tensor name) on each rank.

A compressed allreduce with error feedback keeps two residuals per tensor on
every rank: the *worker* residual (what this rank's compression of its own
gradient dropped, full length) and the *server* residual (what its compression
of the averaged chunk it owns dropped, that chunk's length). Both are added
back before the next compression of the same tensor, so nothing is lost in the
long run. The state also counts the calls per tensor (the stochastic-rounding
counter) and the residual resets caused by non-finite values.

``rr.compression_state(comm=None)`` returns the state of one communicator; its
``state_dict()`` / ``load_state_dict()`` checkpoint this rank's residuals.
"""
from __future__ import annotations

import threading

import numpy as np

from ..core import device
from ..core.errors import RingReduceError
from ..core.log import logger
from .auto import AutoTensor
from .auto import summary as auto_summary

__all__ = ["CompressionState", "state_for"]

STATE_VERSION = 1


class TensorState:
    """One tensor's residuals and counters (internal)."""

    __slots__ = ("count", "worker", "server", "server_lo", "calls", "resets", "warned")

    def __init__(self, count: int):
        self.count = count
        self.worker: np.ndarray | None = None
        self.server: np.ndarray | None = None
        self.server_lo = 0
        self.calls = 0
        self.resets = 0
        self.warned = False

    def worker_residual(self, count: int, xp=np):
        """The worker residual (fp32, full length) as an array of module xp (numpy or cupy)."""
        if self.worker is None or self.worker.size != count:
            self.worker = xp.zeros(count, np.float32)
        elif _module(self.worker) is not xp:     # restored from a checkpoint, used on a device
            self.worker = xp.asarray(self.worker)
        return self.worker

    def server_residual(self, lo: int, hi: int, xp=np):
        """The server residual of the owned chunk [lo, hi)."""
        if self.server is None or self.server_lo != lo or self.server.size != hi - lo:
            self.server = xp.zeros(hi - lo, np.float32)
            self.server_lo = lo
        elif _module(self.server) is not xp:
            self.server = xp.asarray(self.server)
        return self.server


class CompressionState:
    """This rank's error-feedback residuals for one communicator, checkpointable.

    A checkpoint holds one ``state_dict()`` per rank; resume each rank from its
    own entry with the same number of ranks (a different rank count or rank is a
    RingReduceError: the residuals belong to the chunk layout of the old job).

    Example::

        cs = rr.compression_state()
        saved = cs.state_dict()            # this rank's residuals (numpy arrays)
        ...
        cs.load_state_dict(saved)          # same rank, same number of ranks
    """

    def __init__(self, rank: int, size: int):
        self.rank = rank
        self.size = size
        self.warned = False      # NaN/Inf in an unnamed tensor already logged
        self._lock = threading.Lock()
        self._tensors: dict[str, TensorState] = {}
        self._auto: dict = {}         # name -> compression.auto.AutoTensor
        self._samples: dict = {}      # (name, count) -> the sampled coordinates (a cache)

    def tensor(self, name: str, count: int) -> TensorState:
        """The state of tensor `name` (created on first use; reset if its size changed)."""
        with self._lock:
            ts = self._tensors.get(name)
            if ts is None or ts.count != count:
                if ts is not None:
                    logger.warning("rank %d: tensor '%s' changed size from %d to %d elements; "
                                   "its error-feedback residuals restart from zero",
                                   self.rank, name, ts.count, count)
                ts = TensorState(count)
                self._tensors[name] = ts
            return ts

    def tensor_if_any(self, name: str, count: int) -> TensorState | None:
        """The state of tensor `name` if it has one of this size, else None (nothing created)."""
        ts = self._tensors.get(name)
        return ts if ts is not None and ts.count == count else None

    # -- Compression.auto's per-tensor state (compression/auto.py) ---------------------
    def auto_tensor(self, name: str, count: int, formats: tuple):
        """Auto's state of tensor `name` (created on first use; restarted if its size changed)."""
        with self._lock:
            t = self._auto.get(name)
            if t is None or t.count != count:
                t = AutoTensor(count, formats)
                self._auto[name] = t
            return t

    def auto_tensor_if_any(self, name: str, count: int):
        t = self._auto.get(name)
        return t if t is not None and t.count == count else None

    def samples(self, name: str, count: int, make):
        key = (name, count)
        idx = self._samples.get(key)
        if idx is None:
            idx = self._samples[key] = make(name, count)
        return idx

    def auto_report(self) -> dict:
        """Compression.auto per tensor: format now, phase, history of choices, measured call
        times (ms) and error estimates per format, wire MB per format, the latest error."""
        with self._lock:
            return {name: t.report() for name, t in sorted(self._auto.items())}

    def auto_summary(self) -> str:
        """Compression.auto in one line: formats now in use, when compression started, the
        largest error estimate (what scripts/train.py prints at the end)."""
        return auto_summary(self)

    def names(self) -> list[str]:
        """Names of the tensors with state, sorted."""
        with self._lock:
            return sorted(self._tensors)

    def resets(self) -> int:
        """Residual resets caused by non-finite values, over all tensors."""
        with self._lock:
            return sum(t.resets for t in self._tensors.values())

    def clear(self) -> None:
        """Forget every residual (error feedback restarts from zero)."""
        with self._lock:
            self._tensors.clear()
            self._auto.clear()

    def state_dict(self) -> dict:
        """This rank's state as plain Python/numpy values (copies), for a checkpoint."""
        with self._lock:
            tensors = {}
            for name, t in self._tensors.items():
                tensors[name] = {
                    "count": t.count, "calls": t.calls, "resets": t.resets,
                    "worker": _host_copy(t.worker),
                    "server": _host_copy(t.server),
                    "server_lo": t.server_lo,
                }
            return {"version": STATE_VERSION, "rank": self.rank, "size": self.size,
                    "tensors": tensors,
                    "auto": {name: t.to_dict() for name, t in self._auto.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Replace this rank's state with a saved one (same rank, same number of ranks)."""
        if not isinstance(state, dict) or "tensors" not in state:
            raise RingReduceError(f"rank {self.rank}: not a compression state dict "
                                  f"(expected the output of compression_state().state_dict())")
        if state.get("version") != STATE_VERSION:
            raise RingReduceError(f"rank {self.rank}: compression state version "
                                  f"{state.get('version')!r} is not supported (expected {STATE_VERSION})")
        if state.get("size") != self.size:
            raise RingReduceError(
                f"rank {self.rank}: the compression state was saved with {state.get('size')} ranks "
                f"but this communicator has {self.size}; error-feedback residuals can only be "
                "resumed with the same number of ranks (or call clear() to start from zero)")
        if state.get("rank") != self.rank:
            raise RingReduceError(
                f"rank {self.rank}: the compression state was saved by rank {state.get('rank')}; "
                "load each rank's own entry")
        tensors = {}
        for name, d in state["tensors"].items():
            t = TensorState(int(d["count"]))
            t.calls = int(d["calls"])
            t.resets = int(d.get("resets", 0))
            t.server_lo = int(d.get("server_lo", 0))
            if d.get("worker") is not None:
                t.worker = np.array(_numpy(d["worker"]), dtype=np.float32, copy=True).reshape(-1)
            if d.get("server") is not None:
                t.server = np.array(_numpy(d["server"]), dtype=np.float32, copy=True).reshape(-1)
            if t.worker is not None and t.worker.size != t.count:
                raise RingReduceError(f"rank {self.rank}: compression state of tensor '{name}' "
                                      f"is inconsistent (worker residual of {t.worker.size} "
                                      f"elements for a tensor of {t.count})")
            tensors[name] = t
        auto = {name: AutoTensor.from_dict(d) for name, d in state.get("auto", {}).items()}
        with self._lock:
            self._tensors = tensors
            self._auto = auto

    def __repr__(self) -> str:
        return f"CompressionState(rank={self.rank}, size={self.size}, tensors={len(self.names())})"


def _module(a):
    return np if isinstance(a, np.ndarray) else device.array_module(a)


def _host_copy(a):
    """A numpy copy of a residual (numpy or cupy), or None."""
    if a is None:
        return None
    return a.copy() if isinstance(a, np.ndarray) else a.get()


def _numpy(a):
    """numpy view of a saved array (numpy, or a CPU torch tensor from torch.load)."""
    if hasattr(a, "detach"):
        return a.detach().cpu().numpy()
    return a


def state_for(chan) -> CompressionState:
    """The CompressionState used by collectives running on `chan`.

    The runtime gives a context's main and background channels one shared state
    (so both threads see the same residuals); a channel outside any context (a
    hierarchical leaders' channel) gets its own on first use.
    """
    st = chan.compression_state
    if st is None:
        with _lock:
            if chan.compression_state is None:
                chan.compression_state = CompressionState(chan.rank, chan.size)
            st = chan.compression_state
    return st


_lock = threading.Lock()
