"""Choosing an algorithm for a call ("auto"), the same way on every rank.

For now a size rule; the fast-engine work replaces it with a measured
alpha-beta-gamma cost model. The choice depends only on values every rank
shares (message size, dtype, rank count, environment), so ranks agree.
"""
from __future__ import annotations

import os

import numpy as np

from ..errors import RingReduceError
from . import mpi as _mpi

PUBLIC = ("auto", "ring", "tree", "mpi", "shm", "hierarchical")
INTERNAL = ("allgather",)

# Below this many bytes gathered in total, one allgather beats any multi-round exchange.
ALLGATHER_MAX_TOTAL_BYTES = 1 << 15
TREE_MAX_BYTES = 1 << 16


def validate(algorithm: str, rank: int) -> str:
    if algorithm not in PUBLIC and algorithm not in INTERNAL:
        raise RingReduceError(f"rank {rank}: unknown algorithm {algorithm!r} "
                              f"(choose one of {', '.join(PUBLIC)})")
    return algorithm


def requested(algorithm: str | None, rank: int) -> str:
    """The algorithm asked for: the argument, with RINGREDUCE_ALGORITHM overriding 'auto'."""
    algorithm = algorithm or "auto"
    if algorithm == "auto":
        algorithm = os.environ.get("RINGREDUCE_ALGORITHM", "auto") or "auto"
    return validate(algorithm, rank)


def choose(nbytes: int, dtype: np.dtype, n: int) -> str:
    """The algorithm 'auto' uses for a message of nbytes on n ranks (never 'mpi' for half types)."""
    if n * nbytes <= ALLGATHER_MAX_TOTAL_BYTES:
        return "allgather"
    if nbytes <= TREE_MAX_BYTES:
        return "tree"
    return "ring"


def table() -> dict:
    """The rule in use, for rr.info()."""
    return {"allgather": f"n * bytes <= {ALLGATHER_MAX_TOTAL_BYTES}",
            "tree": f"bytes <= {TREE_MAX_BYTES}", "ring": "otherwise",
            "native mpi eligible": "never chosen by auto for half types" if _mpi else ""}
