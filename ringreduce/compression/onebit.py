"""Compression.onebit: the sign of each element and one scale (mean |v|) per block.

Wire: ``4 * ceil(n / B) + ceil(n / 8)`` bytes, a ratio of ``32 / (1 + 32 / B)``
against fp32 (28.4 for B = 256). One call alone is a coarse approximation;
error feedback (on by default) carries what it dropped into later calls, so
averaged over steps the update is right (as in 1-bit SGD / 1-bit Adam).
"""
from __future__ import annotations

import dataclasses

from .base import Quantizer

__all__ = ["OneBit"]


@dataclasses.dataclass(frozen=True, repr=False)
class OneBit(Quantizer):
    """Sign quantisation with a per-block scale and two-sided error feedback.

    Example::

        y = rr.allreduce(grad, compression=rr.Compression.onebit, name="layer1.weight")
    """

    format = "onebit"
