"""The alpha-beta-gamma cost model: predicted seconds per algorithm, message size and layout.

    T_a = alpha_a * L_a(n) + beta_a * B_a(m, n) + gamma * G_a(m, n)

(L: sequential steps, B: bytes moved per rank, G: bytes reduced per rank, from
algorithms.registry). When the ranks span several nodes, every byte a flat
algorithm moves may cross a node's link, so L and B are priced at the
network's alpha and beta instead (a cross-node `--tune`'s ring fit if the
tuning file has one, else NETWORK_DEFAULTS), and hierarchical's B is only what
the node leaders send across links.

Example::

    predict(tuning.DEFAULTS, "ring", 1 << 20, 4)
"""
from __future__ import annotations

import math

from ..algorithms import hierarchical, registry

__all__ = ["NETWORK_DEFAULTS", "predict", "network", "predict_across", "predict_collective"]

# Cross-node links when no cross-node tuning exists: 10 Gbit/s (payload 1.25 GB/s) and
# 30 us per message step (TCP through a switch). Only the ranking matters for auto, and
# hierarchical's advantage (fewer bytes on the links) holds at any link speed well below
# memory bandwidth.
NETWORK_DEFAULTS = {"alpha": 3.0e-5, "beta": 8.0e-10}


def predict(params: dict, algorithm: str, m: float, n: int) -> float:
    """Predicted seconds for one allreduce of m bytes on n ranks."""
    L, B, G = registry.terms(algorithm, m, n)
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
        L, B, G = hierarchical.cost_terms(m, n, nodes, max_local)
        alpha = own["ring"]["alpha"]
    elif algorithm == "mpi":
        steps = math.ceil(math.log2(n)) if n > 1 else 0
        L, B, G = float(steps), steps * m, steps * m
        alpha = own["mpi"]["alpha"]
    else:
        L, B, G = registry.terms(algorithm, m, n)
        alpha = own[algorithm]["alpha"]
    return (alpha + net["alpha"]) * L + net["beta"] * B + params["gamma"] * G


def predict_collective(params: dict, kind: str, algorithm: str, m: float, n: int,
                       nodes: int = 1) -> float:
    """Predicted seconds for an allgather or reduce-scatter ("kind") moving a buffer of m bytes.

    The same alpha-beta-gamma model with the collective's own (L, B, G)
    (algorithms.registry.COLLECTIVES). alpha and beta are the allreduce fit of
    the algorithm of the same name (its per-message and per-byte cost on this
    transport) unless the tuning file has ``"collectives": {kind: {name: {...}}}``;
    across nodes the network's alpha and beta are added, as for allreduce.
    """
    L, B, G = registry.collective_terms(kind, algorithm, m, n)
    p = ((params.get("collectives") or {}).get(kind) or {}).get(algorithm) \
        or params["algorithms"][algorithm]
    if nodes > 1:
        net = network(params)
        return (p["alpha"] + net["alpha"]) * L + net["beta"] * B + params["gamma"] * G
    return p["alpha"] * L + p["beta"] * B + params["gamma"] * G
