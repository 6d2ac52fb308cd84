"""Cost-model parameters: the shipped defaults, and the tuning file `ringreduce-bench --tune` writes.

The model (see algorithms/select.py) prices an allreduce of m bytes on n ranks
with algorithm a as

    T_a(m, n) = alpha_a * L_a(n) + beta_a * B_a(m, n) + gamma * G_a(m, n)

where L is the number of sequential steps (latencies), B the bytes each rank
moves and G the bytes each rank reduces. alpha and beta are per algorithm,
gamma (local reduction speed) is per machine.

`--tune` also records the fastest algorithm it measured at each size
("measured"); for the same rank count and node layout, auto follows those
measurements within the measured size range and the model outside it (a
straight line per algorithm cannot follow the cache effects between 64 KiB and
a few MiB).

The file is JSON; RINGREDUCE_TUNING names it, else ~/.cache/ringreduce/tuning.json
(XDG_CACHE_HOME is honoured). Only rank 0 reads it; select.py broadcasts the
resulting decision table, so every rank chooses alike.

Example::

    from ringreduce.policy import tuning
    params = tuning.load()            # the file if present, else the defaults
    params["algorithms"]["ring"]["alpha"]
"""
from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path

from ..core import config

logger = logging.getLogger("ringreduce")

__all__ = ["DEFAULTS", "default_path", "load", "save"]

FORMAT_VERSION = 1

# Fitted by `ringreduce-bench --tune` on a 2-core VM, np=2, Open MPI 5 shared memory
# (2026-11-28); seconds and seconds per byte. No "measured" table: that one is per machine.
DEFAULTS = {
    "version": FORMAT_VERSION,
    "source": "shipped defaults",
    "gamma": 2.6e-11,
    "algorithms": {
        "allgather": {"alpha": 7.5e-6, "beta": 2.9e-10},
        "tree": {"alpha": 1.0e-5, "beta": 2.1e-10},
        "ring": {"alpha": 1.6e-5, "beta": 1.6e-10},
        "shm": {"alpha": 6.6e-6, "beta": 4.9e-11},
        "mpi": {"alpha": 1.2e-6, "beta": 1.4e-10},
    },
}


def default_path() -> Path:
    """Where the tuning file lives: $RINGREDUCE_TUNING, else the user's cache directory."""
    env = config.text("RINGREDUCE_TUNING")
    if env:
        return Path(env).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "ringreduce" / "tuning.json"


def _merged(found: dict) -> dict:
    """Defaults overlaid with what the file gives (unknown or broken entries are ignored)."""
    params = copy.deepcopy(DEFAULTS)
    if isinstance(found.get("gamma"), (int, float)) and found["gamma"] >= 0:
        params["gamma"] = float(found["gamma"])
    for name, p in (found.get("algorithms") or {}).items():
        if name in params["algorithms"] and isinstance(p, dict):
            for key in ("alpha", "beta"):
                if isinstance(p.get(key), (int, float)) and p[key] >= 0:
                    params["algorithms"][name][key] = float(p[key])
    m = found.get("measured")
    if (isinstance(m, dict) and isinstance(m.get("ranks"), int) and isinstance(m.get("points"), list)
            and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], int)
                    and p[1] in params["algorithms"] for p in m["points"])):
        params["measured"] = {"ranks": m["ranks"], "node_local": bool(m.get("node_local")),
                              "points": [list(p) for p in m["points"]]}
    for key in ("source", "date", "ranks", "host"):
        if key in found:
            params[key] = found[key]
    return params


def load(path: str | os.PathLike | None = None) -> dict:
    """The cost-model parameters: the tuning file merged over DEFAULTS (DEFAULTS if absent).

    A missing file is normal; an unreadable one is logged and ignored.
    """
    path = Path(path) if path is not None else default_path()
    if not path.exists():
        return copy.deepcopy(DEFAULTS)
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable tuning file %s: %s", path, exc)
        return copy.deepcopy(DEFAULTS)
    params = _merged(found if isinstance(found, dict) else {})
    params["path"] = str(path)
    return params


def save(params: dict, path: str | os.PathLike | None = None) -> Path:
    """Write parameters (as load() returns them) to the tuning file; returns its path."""
    path = Path(path) if path is not None else default_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: v for k, v in params.items() if k != "path"}
    data["version"] = FORMAT_VERSION
    data.setdefault("date", time.strftime("%Y-%m-%d %H:%M:%S"))
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path
