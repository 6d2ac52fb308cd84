"""Compression.fp16 and Compression.bf16: the ring runs in a 16-bit float type.

Each rank converts its tensor to the half type (round to nearest even), the
ordinary ring allreduce runs on those bytes with every step computed in fp32
and rounded back to the half type, and the result is converted to the input's
dtype (an Average's sum is divided in fp32 by that conversion, so the mean of
an fp32 tensor is rounded once, not twice). Half the bytes of fp32 on the wire,
no block scales. With
``error_feedback=True`` (off by default) the conversion error of each call is
kept in a per-tensor residual and added to the next call's input.
"""
from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

from .base import Compressor

__all__ = ["FP16", "BF16"]


@dataclasses.dataclass(frozen=True, repr=False)
class FP16(Compressor):
    """IEEE binary16 on the wire. Values beyond +-65504 overflow to +-Inf (never hidden).

    Options: error_feedback (default False), clip (None or tau > 0).

    Example::

        y = rr.allreduce(grad, compression=rr.Compression.fp16, name="w")
    """

    format = "fp16"
    wire_dtype = np.dtype(np.float16)


@dataclasses.dataclass(frozen=True, repr=False)
class BF16(Compressor):
    """bfloat16 on the wire: fp32's range, 8 bits of mantissa.

    Options: error_feedback (default False), clip (None or tau > 0).

    Example::

        y = rr.allreduce(grad, compression=rr.Compression.bf16, name="w")
    """

    format = "bf16"
    wire_dtype = np.dtype(ml_dtypes.bfloat16)
