"""Fitting the cost model to a measured sweep (what `ringreduce-bench --tune` writes).

Example::

    params = fit(rows, measure_gamma(), n=2)
    params["measured"] = {"ranks": 2, "node_local": True, "points": measured_best(rows)}
"""
from __future__ import annotations

import math
import time

import numpy as np

from ..algorithms import registry

__all__ = ["TUNE_ALGORITHMS", "measure_gamma", "fit", "measured_best"]

# The algorithms a tuning sweep times (hierarchical is priced from its terms only).
TUNE_ALGORITHMS = ("allgather", "tree", "ring", "shm", "mpi")


def measure_gamma(seconds: float = 0.2) -> float:
    """Seconds per byte of a local in-place fp32 reduction (np.add over a 16 MiB buffer)."""
    a = np.ones(4 << 20, np.float32)
    b = np.ones_like(a)
    np.add(a, b, out=a)
    best = math.inf
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        np.add(a, b, out=a)
        best = min(best, time.perf_counter() - t0)
    return best / a.nbytes


def fit(rows: list[dict], gamma: float, n: int) -> dict:
    """alpha and beta per algorithm from measured rows.

    alpha comes from the latency regime (messages <= 4 KiB), beta from the bandwidth
    regime (>= 4 MiB, where the caches no longer hold the data), each by least squares
    on relative error; one straight line through every size would fit neither end.
    Sweeps without both regimes fall back to one joint fit.
    """
    params = {"gamma": gamma, "algorithms": {}}
    for algo in TUNE_ALGORITHMS:
        pts = [w for w in rows if w["algorithm"] == algo]
        if not pts:
            continue
        data = []
        for w in pts:
            L, B, G = registry.terms(algo, w["size"], n)
            t = w["time_us"] * 1e-6
            data.append((w["size"], L, B, t - gamma * G, t))
        small = [d for d in data if d[0] <= 4096]
        large = [d for d in data if d[0] >= 4 << 20]
        if small and large:
            alpha = max(0.0, float(np.median([d[3] / d[1] for d in small if d[1] > 0] or [0.0])))
            A = np.array([d[2] / d[4] for d in large])
            y = np.array([(d[3] - alpha * d[1]) / d[4] for d in large])
            beta = max(0.0, float(A @ y) / float(A @ A)) if float(A @ A) > 0 else 0.0
        else:
            A = np.array([[d[1] / d[4], d[2] / d[4]] for d in data])
            y = np.array([d[3] / d[4] for d in data])
            alpha, beta = (float(v) for v in _nnls2(A, y))
        params["algorithms"][algo] = {"alpha": alpha, "beta": beta}
    return params


def measured_best(rows: list[dict]) -> list:
    """[[size, fastest algorithm], ...] from a sweep: what auto uses where it was measured."""
    best = {}
    for w in rows:
        cur = best.get(w["size"])
        if cur is None or w["time_us"] < cur[1]:
            best[w["size"]] = (w["algorithm"], w["time_us"])
    return [[size, best[size][0]] for size in sorted(best)]


def _nnls2(A: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for two unknowns (try both, then each alone)."""
    best, best_res = np.zeros(2), float(np.sum(y ** 2))
    cands = [np.linalg.lstsq(A, y, rcond=None)[0]]
    for j in range(2):
        col = A[:, j]
        denom = float(col @ col)
        c = np.zeros(2)
        if denom > 0:
            c[j] = max(0.0, float(col @ y) / denom)
        cands.append(c)
    for c in cands:
        if (c >= 0).all():
            res = float(np.sum((A @ c - y) ** 2))
            if res < best_res:
                best, best_res = c, res
    return best
