"""Waiting on MPI requests. Every blocking wait in the engine goes through here.

One place to add stall warnings, timeouts and fault detection: the algorithms
never call MPI's Wait functions directly.
"""
from __future__ import annotations

from mpi4py import MPI


def wait(reqs: list, what: str = "") -> None:
    """Wait until all requests complete. `what` describes the call for diagnostics."""
    if reqs:
        MPI.Request.Waitall(reqs)
