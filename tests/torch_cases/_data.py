"""Data the torch cases share: a batch every rank can regenerate, its shard, the loss."""
from __future__ import annotations

import torch


def batch(step: int, n: int):
    """The global batch of `step`: (inputs (n, 6), targets (n, 3)), the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, 6, generator=g), torch.randn(n, 3, generator=g)


def shard(t, rank: int, size: int):
    """This rank's contiguous share of a batch tensor."""
    per = t.shape[0] // size
    return t[rank * per:(rank + 1) * per]


def loss_of(model, x, y):
    return ((model(x) - y) ** 2).mean()
