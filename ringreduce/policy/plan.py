"""The plan "auto" follows: a decision table per communicator context, the same on every rank.

The cost model (policy.cost, parameters from policy.tuning) prices each candidate
for a message of m bytes on n ranks and auto takes the cheapest; "hierarchical"
joins the candidates when the ranks span several nodes and some node holds more
than one rank. To keep every rank's choice identical, rank 0 loads the
parameters once per communicator context and broadcasts a decision table (as
fixed-layout int64, no pickle): a list of (largest message size, algorithm)
thresholds, looked up by bisection on every call.

Two tables: "full" and "half". The half table never picks native MPI ("mpi"):
MPI has no float16/bfloat16 reduction, and MPI's MIN/MAX drop NaN held by a
lower rank, so float Min/Max use the half table too (NaN is never hidden).
"shm" is a candidate only when every rank of the communicator shares one
node's memory.
"""
from __future__ import annotations

import bisect
import math

import numpy as np

from ..algorithms import registry
from ..algorithms.allgather import piggyback_bytes
from ..core import config
from ..core.dtypes import HALF_DTYPES
from ..core.errors import RingReduceError, who
from ..core.log import logger
from ..core.ops import ReduceOp
from . import learn, tuning
from .collective import COLLECTIVE_TABLES, build_collective_tables
from .cost import predict, predict_across

PUBLIC = registry.PUBLIC
INTERNAL = registry.INTERNAL
CANDIDATES = ("allgather", "tree", "ring", "shm", "mpi")

# The allgather candidate gathers n copies: only worth pricing for small totals.
ALLGATHER_MAX_TOTAL_BYTES = 1 << 16
# Message sizes the decision table is evaluated at (bytes): 0 and powers of two up to 64 GiB.
_GRID = [0] + [1 << k for k in range(37)]


def validate(algorithm: str, rank: int) -> str:
    if algorithm not in PUBLIC and algorithm not in INTERNAL:
        raise RingReduceError(f"{who(rank)}: unknown algorithm {algorithm!r} "
                              f"(choose one of {', '.join(PUBLIC)})")
    return algorithm


def requested(algorithm: str | None, rank: int) -> str:
    """The algorithm asked for: the argument, with RINGREDUCE_ALGORITHM overriding 'auto'."""
    if algorithm and algorithm != "auto":
        return algorithm if algorithm in PUBLIC else validate(algorithm, rank)
    algorithm = config.algorithm_override() or "auto"
    return algorithm if algorithm == "auto" else validate(algorithm, rank)


def build_table(params: dict, n: int, node_local: bool, half: bool, nodes: int = 1,
                max_local: int = 1) -> list:
    """Thresholds [(max_bytes, algorithm), ...] for auto, ascending, the last one open-ended.

    nodes and max_local (the most ranks on one node) matter only when nodes > 1:
    then the links are priced at the network's alpha/beta and, if some node holds
    several ranks, "hierarchical" is a candidate.
    """
    across = nodes > 1 and not node_local
    names = _names(node_local, half, nodes, max_local)
    order = CANDIDATES + ("hierarchical",)
    measured = params.get("measured")
    points = []
    if measured and measured.get("ranks") == n and bool(measured.get("node_local")) == node_local:
        points = [(int(sz), a) for sz, a in measured["points"] if sz > 0]
    picks = []
    for m in _GRID:
        options = [a for a in names if a != "allgather" or n * m <= ALLGATHER_MAX_TOTAL_BYTES]
        if across:
            best = min(options, key=lambda a: (predict_across(params, a, m, n, nodes, max_local),
                                               order.index(a)))
        else:
            best = min(options, key=lambda a: (predict(params, a, m, n), order.index(a)))
        seen = _nearest_measured(points, m)
        # A tuning sweep never times hierarchical, so its measured winners cannot overrule it.
        picks.append(seen if seen in options and best != "hierarchical" else best)
    table = []
    for m, a in zip(_GRID, picks):
        if table and table[-1][1] == a:
            table[-1] = (m, a)
        else:
            table.append((m, a))
    table[-1] = (None, table[-1][1])
    # Sizes between two grid points go with the upper point's pick.
    return table


def _names(node_local: bool, half: bool, nodes: int, max_local: int) -> list[str]:
    names = [a for a in CANDIDATES if (a != "shm" or node_local) and not (a == "mpi" and half)]
    if nodes > 1 and not node_local and max_local > 1:
        names.append("hierarchical")
    return names


def _candidates(n: int, m: int, node_local: bool, half: bool, nodes: int, max_local: int) -> list[str]:
    return [a for a in _names(node_local, half, nodes, max_local)
            if a != "allgather" or n * m <= ALLGATHER_MAX_TOTAL_BYTES]


def _nearest_measured(points: list, m: int) -> str | None:
    """The measured winner nearest to m (log scale), if m lies within the measured range."""
    if not points or m <= 0 or not points[0][0] / 2 <= m <= points[-1][0] * 2:
        return None
    return min(points, key=lambda p: abs(math.log2(p[0]) - math.log2(m)))[1]


class Plan:
    """The decision tables of one communicator context (identical on every rank)."""

    def __init__(self, tables: dict, node_local: bool, source: str):
        self.tables = tables            # "full" / "half" -> [(max_bytes or None, algorithm)]
        self.node_local = node_local
        self.source = source
        self._bounds = {k: [b for b, _ in t[:-1]] for k, t in tables.items()}

    # Set by make_plan / _decode: ranks, nodes, ranks per node; whether auto learns
    # (policy.learn) and the learned cache's decisions for this shape.
    size, nodes, max_local = 1, 1, 1
    learn = False
    cached: list = []     # [(table index, band, index into _NAMES)]

    def candidates(self, nbytes: int, half: bool) -> list[str]:
        """The algorithms auto may run for nbytes (the ones build_table prices)."""
        return _candidates(self.size, nbytes, self.node_local, half, self.nodes, self.max_local)

    def choose(self, nbytes: int, half: bool) -> str:
        key = "half" if half else "full"
        t = self.tables[key]
        return t[bisect.bisect_left(self._bounds[key], nbytes)][1]

    def describe(self) -> dict:
        out = {"source": self.source, "shm_eligible": self.node_local}
        for key, t in self.tables.items():
            out[key] = ", ".join(f"{a} <= {_fmt(b)}" if b is not None else f"{a} above"
                                 for b, a in t)
        return out


def _fmt(b: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if b >= 1 << shift and b % (1 << shift) == 0:
            return f"{b >> shift} {unit}"
    return f"{b} B"


def make_plan(params: dict, n: int, node_local: bool, nodes: int = 1, max_local: int = 1) -> Plan:
    tables = {"full": build_table(params, n, node_local, False, nodes, max_local),
              "half": build_table(params, n, node_local, True, nodes, max_local)}
    tables.update(build_collective_tables(params, n, node_local, nodes))   # allgather, reducescatter
    plan = Plan(tables, node_local, params.get("path", params.get("source", "defaults")))
    plan.size, plan.nodes, plan.max_local = n, nodes, max_local
    return plan


def tuned_for(params: dict, n: int, node_local: bool) -> bool:
    """Whether the tuning file holds measurements for this rank count and node layout."""
    m = params.get("measured")
    return bool(m) and m.get("ranks") == n and bool(m.get("node_local")) == node_local


_NAMES = CANDIDATES + ("hierarchical",)
NAMES = _NAMES           # the algorithm indices of the encoded plan and the learned cache
_TABLE_KEYS = ("full", "half") + tuple(COLLECTIVE_TABLES)


def _encode(plan: "Plan") -> np.ndarray:
    """The plan as int64: size, node_local, nodes, max_local, per table its length and pairs,
    then learn, the number of cached decisions and their (table, band, algorithm) triples."""
    out = [plan.size, int(plan.node_local), plan.nodes, plan.max_local]
    for key in _TABLE_KEYS:
        t = plan.tables[key]
        out.append(len(t))
        for bound, algo in t:
            out += [-1 if bound is None else bound, _NAMES.index(algo)]
    out += [int(plan.learn), len(plan.cached)]
    for triple in plan.cached:
        out += list(triple)
    return np.array(out, np.int64)


def _decode(ints: np.ndarray, source: str) -> "Plan":
    size, node_local, nodes, max_local = (int(v) for v in ints[:4])
    tables, i = {}, 4
    for key in _TABLE_KEYS:
        k = int(ints[i])
        i += 1
        tables[key] = [(None if ints[i + 2 * j] < 0 else int(ints[i + 2 * j]), _NAMES[int(ints[i + 2 * j + 1])])
                       for j in range(k)]
        i += 2 * k
    plan = Plan(tables, bool(node_local), source)
    plan.size, plan.nodes, plan.max_local = size, nodes, max_local
    plan.learn, k = bool(ints[i]), int(ints[i + 1])
    plan.cached = [tuple(int(v) for v in ints[i + 2 + 3 * j: i + 5 + 3 * j]) for j in range(k)]
    return plan


def plan_for(comm, topology, tuning_path: str | None = None) -> Plan:
    """The plan of a new communicator context (collective: call where every rank does).

    Rank 0 reads the tuning file and broadcasts the plan, so ranks never disagree
    even if their files or environments differ.
    """
    rank, size = comm.Get_rank(), comm.Get_size()
    nodes = topology.num_nodes
    max_local = topology.max_local if nodes > 1 else size
    node_local = topology.shares_memory
    ints, source = np.zeros(0, np.int64), b""
    if rank == 0:
        try:
            params = tuning.load(tuning_path)
            plan = make_plan(params, size, node_local, nodes, max_local)
            plan.learn = size > 1 and learn.enabled(tuned_for(params, size, node_local))
            if plan.learn:
                plan.cached = learn.load_cache(learn.shape_key(size, nodes, max_local, node_local), _NAMES)
        except Exception:   # a broken file must not leave the other ranks waiting
            logger.exception("cost model failed; using the shipped defaults")
            plan = make_plan(tuning.DEFAULTS, size, node_local, nodes, max_local)
        ints, source = _encode(plan), str(plan.source).encode()
    lengths = np.array([ints.size, len(source)], np.int64)
    comm.Bcast(lengths, root=0)
    if rank != 0:
        ints = np.empty(int(lengths[0]), np.int64)
    raw = np.frombuffer(source, np.uint8).copy() if rank == 0 else np.empty(int(lengths[1]), np.uint8)
    comm.Bcast(ints, root=0)
    comm.Bcast(raw, root=0)
    return _decode(ints, raw.tobytes().decode())


_FALLBACK: dict = {}     # n -> a plan from the shipped defaults (channels without one)


def without_native(dtype: np.dtype, op) -> bool:
    """Whether native MPI must not reduce this call: half types, and float Min/Max (NaN)."""
    return dtype in HALF_DTYPES or (dtype.kind == "f" and op in (ReduceOp.MIN, ReduceOp.MAX))


def choose(plan, nbytes: int, dtype: np.dtype, n: int, op=ReduceOp.SUM, check_on: bool = False) -> str:
    """The algorithm 'auto' uses for nbytes on n ranks.

    With the mismatch check on (check_on) and a plan, payloads up to
    piggyback_bytes(n) ride in the check's own allgather ("allgather"): one
    collective in all. Without a plan (a channel outside a context), a plan from
    the shipped defaults decides.
    """
    if nbytes <= piggyback_bytes(n) and plan is not None and check_on:
        return "allgather"
    if plan is None:
        plan = _FALLBACK.get(n)
        if plan is None:
            plan = _FALLBACK[n] = make_plan(tuning.DEFAULTS, n, False)
    return plan.choose(nbytes, without_native(dtype, op))


def choose_for(chan, nbytes: int, dtype, op=ReduceOp.SUM) -> str:
    """What 'auto' picks on this channel for nbytes of dtype (its plan; the check as set now)."""
    return choose(chan.plan, nbytes, np.dtype(dtype), chan.size, op, config.check_enabled())
