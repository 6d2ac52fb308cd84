"""Horovod's elastic training (``hvd.elastic``): not implemented in ringreduce.

Every name Horovod scripts use (``hvd.elastic.run``, ``TorchState``,
``ElasticSampler``, ...) exists here so that a script fails on its first use
with a NotImplementedError that says why, instead of an AttributeError.
ringreduce runs under a fixed-size MPI launch; restart from a checkpoint
(``scripts/train.py --resume``) to change the rank count.
"""

from __future__ import annotations

__all__ = ["run", "State", "ObjectState", "TorchState", "ElasticSampler"]

_WHY = ("Horovod elastic training ({}) is not implemented in ringreduce: jobs run under a "
        "fixed-size MPI launch; to change the number of ranks, restart from a checkpoint")


def _refuse(what):
    raise NotImplementedError(_WHY.format(what))


def run(func):
    """``@hvd.elastic.run``: refused (NotImplementedError) when applied."""
    _refuse("hvd.elastic.run")


class State:
    """``hvd.elastic.State``: refused (NotImplementedError) when created."""

    def __init__(self, *args, **kwargs):
        _refuse(f"hvd.elastic.{type(self).__name__}")


class ObjectState(State):
    """``hvd.elastic.ObjectState``: refused."""


class TorchState(ObjectState):
    """``hvd.elastic.TorchState``: refused."""


class ElasticSampler:
    """``hvd.elastic.ElasticSampler``: refused (use torch's DistributedSampler with rank/size)."""

    def __init__(self, *args, **kwargs):
        _refuse("hvd.elastic.ElasticSampler")


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    _refuse(f"hvd.elastic.{name}")
