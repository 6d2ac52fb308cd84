"""Compression.int8: one fp32 scale per block and 8-bit levels (-127..127).

Wire: ``4 * ceil(n / B) + n`` bytes, i.e. a ratio of ``4 / (1 + 4 / B)`` against
fp32 (3.94 for B = 256). Per block the scale is max|v| / 127, so the rounding
error of an element is at most half a level, scale / 2.
"""
from __future__ import annotations

import dataclasses

from .base import Quantizer

__all__ = ["Int8"]


@dataclasses.dataclass(frozen=True, repr=False)
class Int8(Quantizer):
    """8-bit block quantisation with two-sided error feedback (on by default).

    Example::

        comp = rr.Compression.int8(block_size=256, stochastic=False)
        y = rr.allreduce(grad, op=rr.Average, compression=comp, name="layer1.weight")
    """

    format = "int8"
