"""Compression.int4: one fp32 scale per block and 4-bit levels (-7..7), two per byte.

Wire: ``4 * ceil(n / B) + ceil(n / 2)`` bytes, a ratio of ``8 / (1 + 8 / B)``
against fp32 (7.76 for B = 256). Scale max|v| / 7 per block.
"""
from __future__ import annotations

import dataclasses

from .base import Quantizer

__all__ = ["Int4"]


@dataclasses.dataclass(frozen=True, repr=False)
class Int4(Quantizer):
    """4-bit block quantisation with two-sided error feedback (on by default).

    Example::

        y = rr.allreduce(grad, compression=rr.Compression.int4, name="layer1.weight")
    """

    format = "int4"
