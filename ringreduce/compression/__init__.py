"""Gradient compression: configuration objects and the compressed allreduce.

``rr.Compression`` holds one ready configuration per format; the bare
attribute is the default and calling it changes options::

    rr.Compression.none      # uncompressed (same as compression=None)
    rr.Compression.fp16      # ring in float16, fp32 arithmetic per step
    rr.Compression.bf16      # ring in bfloat16
    rr.Compression.int8      # two-sided error feedback, 8-bit levels + a scale per block
    rr.Compression.int4      # ... 4-bit levels
    rr.Compression.onebit    # ... signs + a scale (mean |v|) per block
    rr.Compression.auto      # picks one of the above per tensor, from what it measures
    rr.Compression.int8(block_size=128, error_feedback=True, clip=None, stochastic=False, seed=0)

One file per compressor (none.py, half.py, int8.py, int4.py, onebit.py) on
the interface of base.py; the allreduce itself is algorithm.py, the
error-feedback residuals state.py, the figures stats.py. docs/compression.md
explains each format's ratio and error.
"""
from __future__ import annotations

import dataclasses

from ..core.errors import RingReduceError, who
from .algorithm import compressed_allreduce
from .auto import Auto
from .base import Compressor, Quantizer
from .half import BF16, FP16
from .int4 import Int4
from .int8 import Int8
from .none import NoCompression
from .onebit import OneBit
from .state import CompressionState, state_for
from .stats import CompressionStats, last_stats, measure_error, measuring_error

__all__ = ["Auto", "Compression", "Compressor", "Quantizer", "CompressionState", "CompressionStats",
           "state_for", "last_stats", "measure_error", "resolve", "compressed_allreduce"]


class Compression:
    """The compression configurations (Horovod's name): pass one as ``compression=``.

    Each attribute is an immutable default configuration; call it to change
    options, e.g. ``rr.Compression.int8(block_size=128)``.

    Example::

        import ringreduce as rr
        y = rr.allreduce(grad, op=rr.Average, compression=rr.Compression.int8,
                         name="layer1.weight")
    """

    none = NoCompression()
    fp16 = FP16()
    bf16 = BF16()
    int8 = Int8()
    int4 = Int4()
    onebit = OneBit()
    auto = Auto()     # a policy choosing among the others per tensor (compression/auto.py)

    FORMATS = ("none", "fp16", "bf16", "int8", "int4", "onebit", "auto")

    def __init__(self):
        raise TypeError("rr.Compression is a namespace; use rr.Compression.int8 etc.")

    @classmethod
    def by_name(cls, name: str) -> Compressor:
        """The default configuration of a format given by name ("int8", ...)."""
        if name not in cls.FORMATS:
            raise RingReduceError(f"unknown compression {name!r} (choose one of {', '.join(cls.FORMATS)})")
        return getattr(cls, name)


def resolve(compression, rank: int):
    """The compression configuration to apply, or None for uncompressed.

    Accepts None, a configuration (``rr.Compression.int8`` or a called one),
    a compressor class, or a format name. When the relative error is requested
    (RINGREDUCE_STATS_ERROR=1 or measure_error(True)) the returned config
    carries that request, so it is part of the mismatch-check fingerprint.
    """
    if compression is None:
        return None
    if isinstance(compression, str):
        try:
            compression = Compression.by_name(compression)
        except RingReduceError as exc:
            raise RingReduceError(f"{who(rank)}: {exc}") from None
    elif isinstance(compression, type) and issubclass(compression, Compressor):
        compression = compression()
    if not isinstance(compression, Compressor):
        raise RingReduceError(f"{who(rank)}: compression must be None or one of rr.Compression."
                              f"{{{', '.join(Compression.FORMATS)}}}, got {compression!r}")
    if isinstance(compression, NoCompression):
        return None
    if measuring_error() and not compression.measure_error:
        compression = dataclasses.replace(compression, measure_error=True)
    return compression
