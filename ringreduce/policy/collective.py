"""How "auto" picks the allgather and reduce-scatter algorithms: their decision tables.

The same cost model as allreduce's (policy.cost.predict_collective with the
collective's own terms from algorithms.registry.COLLECTIVES), evaluated on the
same size grid. The tables ride in the plan rank 0 broadcasts when a context
is made (policy.plan), so every rank picks alike:

- "allgather": ring, shm (every rank on one node) or mpi, by the gathered size;
- "reducescatter": ring, shm or mpi, by the input size;
- "reducescatter_half": the same without mpi, for float16/bfloat16 and float
  Min/Max (MPI cannot reduce half types, and its MIN/MAX drop NaN).

The algorithm asked for comes first: the call's ``algorithm=``, else
RINGREDUCE_ALLGATHER_ALGORITHM / RINGREDUCE_REDUCESCATTER_ALGORITHM, else auto.

Example::

    from ringreduce.policy import collective
    collective.choose_collective(chan.plan, "allgather", 1 << 20, np.float32, chan.size)
"""
from __future__ import annotations

import bisect

import numpy as np

from ..algorithms import registry
from ..core import config
from ..core.dtypes import HALF_DTYPES
from ..core.errors import RingReduceError
from ..core.ops import ReduceOp
from . import tuning
from .cost import predict_collective

__all__ = ["COLLECTIVE_TABLES", "build_collective_table", "build_collective_tables",
           "requested_collective", "choose_collective"]

# table key -> (collective, without native MPI)
COLLECTIVE_TABLES = {"allgather": ("allgather", False), "reducescatter": ("reducescatter", False),
                     "reducescatter_half": ("reducescatter", True)}
_ORDER = ("ring", "shm", "mpi")          # ties go to the first
_GRID = [0] + [1 << k for k in range(37)]


def build_collective_table(params: dict, kind: str, n: int, node_local: bool, half: bool,
                           nodes: int = 1) -> list:
    """Thresholds [(max_bytes, algorithm), ...] for an auto allgather/reduce-scatter of m bytes,
    ascending, the last one open-ended (None)."""
    algos = registry.COLLECTIVES[kind]
    names = [a for a in algos if (a != "shm" or node_local) and (algos[a].half_types or not half)]
    table: list = []
    for m in _GRID:
        best = min(names, key=lambda a: (predict_collective(params, kind, a, m, n,
                                                            1 if node_local else nodes),
                                          _ORDER.index(a)))
        if table and table[-1][1] == best:
            table[-1] = (m, best)
        else:
            table.append((m, best))
    table[-1] = (None, table[-1][1])
    return table


def build_collective_tables(params: dict, n: int, node_local: bool, nodes: int = 1) -> dict:
    return {key: build_collective_table(params, kind, n, node_local, half, nodes)
            for key, (kind, half) in COLLECTIVE_TABLES.items()}


def requested_collective(kind: str, algorithm: str | None, who: str) -> str:
    """The algorithm asked for: the argument, else RINGREDUCE_<KIND>_ALGORITHM, else "auto"."""
    if not algorithm or algorithm == "auto":
        algorithm = config.collective_algorithm_override(kind) or "auto"
    if algorithm != "auto" and algorithm not in registry.COLLECTIVES[kind]:
        raise RingReduceError(f"{who}: unknown {kind} algorithm {algorithm!r} (choose one of auto, "
                              f"{', '.join(registry.COLLECTIVES[kind])})")
    return algorithm


_FALLBACK: dict = {}      # n -> tables from the shipped defaults (channels without a plan)


def choose_collective(plan, kind: str, nbytes: int, dtype, n: int, op=ReduceOp.SUM) -> str:
    """What "auto" runs for an allgather/reducescatter of a buffer of nbytes (identical on every
    rank: the context's broadcast plan, or the shipped defaults for a channel without one)."""
    tables = getattr(plan, "tables", None)
    if tables is None or kind not in tables:
        tables = _FALLBACK.get(n)
        if tables is None:
            tables = _FALLBACK[n] = build_collective_tables(tuning.DEFAULTS, n, False)
    key = kind
    dtype = np.dtype(dtype)
    if kind == "reducescatter" and (dtype in HALF_DTYPES
                                    or (dtype.kind == "f" and op in (ReduceOp.MIN, ReduceOp.MAX))):
        key = "reducescatter_half"
    t = tables[key]
    return t[bisect.bisect_left([b for b, _ in t[:-1]], nbytes)][1]
