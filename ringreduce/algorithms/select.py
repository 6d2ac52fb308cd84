"""Choosing an algorithm for a call ("auto"), the same way on every rank.

An alpha-beta-gamma cost model (parameters in ringreduce.tuning) prices each
candidate for a message of m bytes on n ranks:

    T_a = alpha_a * L_a(n) + beta_a * B_a(m, n) + gamma * G_a(m, n)

(L: sequential steps, B: bytes moved per rank, G: bytes reduced per rank) and
auto takes the cheapest. When the ranks span several nodes, every byte a flat
algorithm moves may cross a node's link, so L and B are priced at the network's
alpha and beta instead (a cross-node `--tune`'s ring fit if the tuning file has
one, else NETWORK_DEFAULTS), and "hierarchical" joins the candidates when some
node holds more than one rank: its B is only what the node leaders send across
links (hierarchical.cost_terms), its node-local work is priced at gamma. With
one node nothing changes. To keep every rank's choice identical, rank 0 loads the
parameters once per communicator context and broadcasts a decision table: a
list of (largest message size, algorithm) thresholds, looked up by bisection
on every call. "mpi" is never chosen for half types, "shm" only when every rank
of the communicator shares one node's memory.
"""
from __future__ import annotations

import bisect
import logging
import math
import os

import numpy as np

from .. import check
from ..buffers import HALF_DTYPES
from ..errors import RingReduceError

logger = logging.getLogger("ringreduce")

PUBLIC = ("auto", "ring", "tree", "mpi", "shm", "hierarchical")
INTERNAL = ("allgather",)
CANDIDATES = ("allgather", "tree", "ring", "shm", "mpi")

# The allgather candidate gathers n copies: only worth pricing for small totals.
ALLGATHER_MAX_TOTAL_BYTES = 1 << 16
# Cross-node links when no cross-node tuning exists: 10 Gbit/s (payload 1.25 GB/s) and
# 30 us per message step (TCP through a switch). Only the ranking matters for auto, and
# hierarchical's advantage (fewer bytes on the links) holds at any link speed well below
# memory bandwidth.
NETWORK_DEFAULTS = {"alpha": 3.0e-5, "beta": 8.0e-10}
# Message sizes the decision table is evaluated at (bytes): 0 and powers of two up to 64 GiB.
_GRID = [0] + [1 << k for k in range(37)]


def validate(algorithm: str, rank: int) -> str:
    if algorithm not in PUBLIC and algorithm not in INTERNAL:
        raise RingReduceError(f"rank {rank}: unknown algorithm {algorithm!r} "
                              f"(choose one of {', '.join(PUBLIC)})")
    return algorithm


# os.environ.get costs ~0.3 us (key encoding); the raw mapping behind it is read
# per call instead, so a variable set at run time still counts.
_RAW_ENV = getattr(os.environ, "_data", None)


def _env(name: str, raw: bytes) -> str | None:
    if _RAW_ENV is None or os.name != "posix":
        return os.environ.get(name)
    value = _RAW_ENV.get(raw)
    return value.decode() if value is not None else None


def requested(algorithm: str | None, rank: int) -> str:
    """The algorithm asked for: the argument, with RINGREDUCE_ALGORITHM overriding 'auto'."""
    if algorithm and algorithm != "auto":
        return algorithm if algorithm in PUBLIC else validate(algorithm, rank)
    algorithm = _env("RINGREDUCE_ALGORITHM", b"RINGREDUCE_ALGORITHM") or "auto"
    return algorithm if algorithm == "auto" else validate(algorithm, rank)


def terms(algorithm: str, m: float, n: int) -> tuple[float, float, float]:
    """(L, B, G) of the cost model for m bytes on n ranks."""
    if n <= 1:
        return 0.0, 0.0, 0.0
    if algorithm == "ring":
        return 2.0 * (n - 1), 2.0 * (n - 1) / n * m, (n - 1) / n * m
    if algorithm == "tree":
        p = 1 << (n.bit_length() - 1)
        fold = 1 if n > p else 0
        rounds = math.log2(p) + 2 * fold
        return rounds, rounds * m, (math.log2(p) + fold) * m
    if algorithm == "allgather":
        return 1.0, (n - 1) * m, (n - 1) * m
    if algorithm == "shm":
        from .shm import REPLICATED_MAX_BYTES
        if m <= REPLICATED_MAX_BYTES:
            return 1.0, m, (n - 1) * m
        return 2.0, 2.0 * m, (n - 1) / n * m
    if algorithm == "mpi":
        return 1.0, m, 0.0
    raise ValueError(algorithm)


def predict(params: dict, algorithm: str, m: float, n: int) -> float:
    """Predicted seconds for one allreduce of m bytes on n ranks."""
    L, B, G = terms(algorithm, m, n)
    p = params["algorithms"][algorithm]
    return p["alpha"] * L + p["beta"] * B + params["gamma"] * G


def network(params: dict) -> dict:
    """alpha and beta of the links between nodes: a cross-node --tune's ring fit, else defaults."""
    measured = params.get("measured") or {}
    if measured and not measured.get("node_local") and "ring" in params.get("algorithms", {}):
        ring = params["algorithms"]["ring"]
        return {"alpha": float(ring["alpha"]), "beta": float(ring["beta"])}
    return dict(NETWORK_DEFAULTS)


def predict_across(params: dict, algorithm: str, m: float, n: int, nodes: int,
                   max_local: int) -> float:
    """Predicted seconds for m bytes on n ranks spread over `nodes` nodes (nodes > 1).

    Flat algorithms pay the network's beta for every byte (with ranks in blocks per
    node each step crosses some link) and, per step, their own alpha (the software
    overhead the local fit measured) plus the network's; native MPI is priced as
    recursive doubling (log2 n steps of m bytes each), as Open MPI's default does
    across nodes; hierarchical pays the network only for the leaders' ring and
    gamma for the node-local steps.
    """
    net = network(params)
    own = params["algorithms"]
    if algorithm == "hierarchical":
        from .hierarchical import cost_terms
        L, B, G = cost_terms(m, n, nodes, max_local)
        alpha = own["ring"]["alpha"]
    elif algorithm == "mpi":
        steps = math.ceil(math.log2(n)) if n > 1 else 0
        L, B, G = float(steps), steps * m, steps * m
        alpha = own["mpi"]["alpha"]
    else:
        L, B, G = terms(algorithm, m, n)
        alpha = own[algorithm]["alpha"]
    return (alpha + net["alpha"]) * L + net["beta"] * B + params["gamma"] * G


def build_table(params: dict, n: int, node_local: bool, half: bool, nodes: int = 1,
                max_local: int = 1) -> list:
    """Thresholds [(max_bytes, algorithm), ...] for auto, ascending, the last one open-ended.

    nodes and max_local (the most ranks on one node) matter only when nodes > 1:
    then the links are priced at the network's alpha/beta and, if some node holds
    several ranks, "hierarchical" is a candidate.
    """
    across = nodes > 1 and not node_local
    names = [a for a in CANDIDATES if (a != "shm" or node_local) and not (a == "mpi" and half)]
    if across and max_local > 1:
        names.append("hierarchical")
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
    plan = Plan(tables, node_local, params.get("path", params.get("source", "defaults")))
    plan.nodes, plan.max_local = nodes, max_local
    return plan


def _shares_memory(ctx) -> bool:
    """True iff every rank of the context can map every other rank's memory."""
    if ctx.num_nodes != 1:
        return False
    if not os.environ.get("RINGREDUCE_NODE_ID"):
        return True          # the node split was MPI's shared-memory split itself
    from mpi4py import MPI
    sub = ctx.main.comm.Split_type(MPI.COMM_TYPE_SHARED, key=ctx.rank)
    whole = ctx.main.comm.allreduce(int(sub.Get_size() == ctx.size), op=MPI.MIN)
    sub.Free()
    return bool(whole)


def attach(ctx) -> Plan:
    """Give a new communicator context its plan (collective: call where every rank does).

    Rank 0 reads the tuning file and broadcasts the plan, so ranks never disagree
    even if their files or environments differ.
    """
    from mpi4py import MPI

    from .. import tuning
    node_local = _shares_memory(ctx)
    nodes = ctx.num_nodes
    max_local = ctx.main.comm.allreduce(ctx.local_size, op=MPI.MAX) if nodes > 1 else ctx.size
    plan = None
    if ctx.rank == 0:
        try:
            plan = make_plan(tuning.load(), ctx.size, node_local, nodes, max_local)
        except Exception:   # a broken file must not leave the other ranks waiting
            logger.exception("cost model failed; using the shipped defaults")
            plan = make_plan(tuning.DEFAULTS, ctx.size, node_local, nodes, max_local)
    plan = ctx.main.comm.bcast(plan, root=0)
    for chan in (ctx.main, ctx.background):
        chan.resources["plan"] = plan
    from .. import comm as _comm
    if _comm._state.world is None:      # the init context is being built
        _last[0] = plan
    return plan


_last: list = [None]   # the init context's plan, for table()


def _fallback_plan(n: int) -> Plan:
    from .. import tuning
    return make_plan(tuning.DEFAULTS, n, False)


def choose(nbytes: int, dtype: np.dtype, n: int, chan=None) -> str:
    """The algorithm 'auto' uses for nbytes on n ranks (never 'mpi' for half types).

    With a channel, its context's broadcast plan decides (shm is a candidate when
    the ranks share memory); without one, a plan from the shipped defaults.
    """
    plan = chan.resources.get("plan") if chan is not None else None
    # With the mismatch check on, payloads this small ride in the check's own
    # allgather: one collective in all, cheaper than any algorithm after it.
    if nbytes <= check.piggyback_bytes(n) and plan is not None and check.enabled():
        return "allgather"
    if plan is None:
        plan = _FALLBACK.get(n)
        if plan is None:
            plan = _FALLBACK[n] = _fallback_plan(n)
    return plan.choose(nbytes, dtype in HALF_DTYPES)


_FALLBACK: dict = {}


def resolve(chan, algorithm: str) -> str:
    """An explicit algorithm the channel cannot run, replaced by one it can ('shm' off-node)."""
    if algorithm == "shm":
        plan = chan.resources.get("plan")
        if plan is None or not plan.node_local:
            if not _warned.get(id(chan)):
                _warned[id(chan)] = True
                logger.warning("rank %d: 'shm' needs every rank on one node; using 'ring' instead",
                               chan.rank)
            return "ring"
    return algorithm


_warned: dict = {}


def table() -> dict:
    """The decision table in use on the init communicator, for rr.info()."""
    plan = _last[0]
    if plan is None:
        return {"source": "not initialised"}
    return plan.describe()
