"""The algorithms behind one registry: name -> runner, cost terms and capabilities.

Each runner reduces a flat contiguous buffer in place on a channel:
``run(chan, flat, op)``; those that can read the input from another array take
``src=`` as well (out-of-place calls then skip copying the input first). The
cost terms are the alpha-beta-gamma model's (L, B, G) for m bytes on n ranks:
sequential steps, bytes moved per rank, bytes reduced per rank (ringreduce.policy
prices them).

Example::

    from ringreduce.algorithms import registry
    registry.run(chan, "ring", flat, rr.Sum)
    registry.ALGORITHMS["tree"].terms(1 << 20, 4)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..core import timeline
from ..core.errors import RingReduceError
from ..core.ops import ReduceOp
from . import allgather, allgatherv, hierarchical, native, reducescatter, ring, shm, tree

__all__ = ["Algorithm", "ALGORITHMS", "PUBLIC", "INTERNAL", "run", "supports_source", "Collective",
           "COLLECTIVES", "collective_terms"]


def _ring_terms(m: float, n: int):
    return 2.0 * (n - 1), 2.0 * (n - 1) / n * m, (n - 1) / n * m


def _tree_terms(m: float, n: int):
    p = 1 << (n.bit_length() - 1)
    fold = 1 if n > p else 0
    rounds = math.log2(p) + 2 * fold
    return rounds, rounds * m, (math.log2(p) + fold) * m


def _allgather_terms(m: float, n: int):
    return 1.0, (n - 1) * m, (n - 1) * m


def _shm_terms(m: float, n: int):
    if m <= shm.REPLICATED_MAX_BYTES:
        return 1.0, m, (n - 1) * m
    return 2.0, 2.0 * m, (n - 1) / n * m


def _native_terms(m: float, n: int):
    return 1.0, m, 0.0


def _hierarchical_terms(m: float, n: int):
    return hierarchical.cost_terms(m, n, 1, n)


@dataclass(frozen=True)
class Algorithm:
    """One allreduce algorithm and what it can do."""

    name: str
    run: Callable                       # run(chan, flat, op[, src=...])
    terms: Callable                     # terms(m, n) -> (L, B, G); n > 1
    reads_source: bool = False          # accepts src= (out of place without a copy)
    half_types: bool = True             # can reduce float16 / bfloat16
    node_local_only: bool = False       # needs every rank in one shared-memory node
    nan_min_max: bool = True            # Min/Max propagate NaN as numpy does
    public: bool = True                 # a name users may pass as algorithm=


ALGORITHMS = {a.name: a for a in (
    Algorithm("ring", ring.allreduce, _ring_terms),
    Algorithm("tree", tree.allreduce, _tree_terms),
    Algorithm("shm", shm.run, _shm_terms, reads_source=True, node_local_only=True),
    Algorithm("mpi", native.allreduce, _native_terms, reads_source=True, half_types=False,
              nan_min_max=False),
    Algorithm("hierarchical", hierarchical.allreduce, _hierarchical_terms),
    Algorithm("allgather", allgather.allreduce, _allgather_terms, public=False),
)}
PUBLIC = ("auto",) + tuple(n for n, a in ALGORITHMS.items() if a.public)
INTERNAL = tuple(n for n, a in ALGORITHMS.items() if not a.public)


def supports_source(name: str) -> bool:
    a = ALGORITHMS.get(name)
    return a is not None and a.reads_source


def terms(name: str, m: float, n: int) -> tuple[float, float, float]:
    """(L, B, G) of algorithm `name` for m bytes on n ranks."""
    if n <= 1:
        return 0.0, 0.0, 0.0
    return ALGORITHMS[name].terms(m, n)


def run(chan, name: str, flat: np.ndarray, op: ReduceOp, src: np.ndarray | None = None,
        agreed=None) -> None:
    """Reduce the flat buffer in place with a resolved algorithm name (timeline event included).

    `agreed`: the mismatch check's round, started but not finished (the ring and the
    tree: they finish the round themselves after sending their first segment).
    """
    algo = ALGORITHMS.get(name)
    if algo is None:
        raise RingReduceError(f"{chan.who}: algorithm {name!r} is not available in this build")
    t0 = timeline.now() if timeline.on else 0
    if agreed is not None:
        algo.run(chan, flat, op, agreed=agreed)
    elif src is not None:
        algo.run(chan, flat, op, src=src)
    else:
        algo.run(chan, flat, op)
    if t0:
        timeline.complete(f"algorithm {name}", t0, {"bytes": flat.nbytes})


# -- allgather and reduce-scatter: first-class algorithms of their own ----------------------
# m is the bytes of the whole buffer: the allgather's result, the reduce-scatter's input.

def _shm_blocks(m: float, n: int, block: int) -> float:
    return max(1.0, math.ceil(m / n / block))


def _ag_ring_terms(m: float, n: int):
    return n - 1.0, (n - 1) / n * m, 0.0


def _ag_native_terms(m: float, n: int):
    return 1.0, (n - 1) / n * m, 0.0


def _ag_shm_terms(m: float, n: int):
    # Copy our part in, every part out.
    return _shm_blocks(m, n, allgatherv.BLOCK_BYTES), (n + 1) / n * m, 0.0


def _rs_ring_terms(m: float, n: int):
    return n - 1.0, (n - 1) / n * m, (n - 1) / n * m


def _rs_native_terms(m: float, n: int):
    return 1.0, (n - 1) / n * m, 0.0


def _rs_shm_terms(m: float, n: int):
    # Copy in what the peers own, then reduce our piece from every slot.
    return _shm_blocks(m, n, reducescatter.BLOCK_BYTES), (n - 1) / n * m, (n - 1) / n * m


@dataclass(frozen=True)
class Collective:
    """One allgather or reduce-scatter algorithm (runner signatures: algorithms.allgatherv /
    algorithms.reducescatter); priced with the allreduce fit of the same name (policy.cost)."""

    name: str
    run: Callable
    terms: Callable
    half_types: bool = True
    nan_min_max: bool = True
    device_buffers: bool = True          # hands device arrays to a CUDA-aware MPI as they are


COLLECTIVES = {
    "allgather": {c.name: c for c in (
        Collective("ring", allgatherv.ring, _ag_ring_terms),
        Collective("shm", allgatherv.run_shm, _ag_shm_terms, device_buffers=False),
        Collective("mpi", allgatherv.native, _ag_native_terms),
    )},
    "reducescatter": {c.name: c for c in (
        Collective("ring", reducescatter.ring, _rs_ring_terms),
        Collective("shm", reducescatter.run_shm, _rs_shm_terms, device_buffers=False),
        Collective("mpi", reducescatter.native, _rs_native_terms, half_types=False, nan_min_max=False),
    )},
}


def collective_terms(kind: str, name: str, m: float, n: int) -> tuple[float, float, float]:
    """(L, B, G) of `kind`'s algorithm `name` ("allgather" or "reducescatter") for m bytes on n ranks."""
    if n <= 1:
        return 0.0, 0.0, 0.0
    return COLLECTIVES[kind][name].terms(m, n)
