"""Compression.none: no compression (the allreduce runs uncompressed)."""
from __future__ import annotations

import dataclasses

import numpy as np

from .base import Compressor

__all__ = ["NoCompression"]


@dataclasses.dataclass(frozen=True, repr=False)
class NoCompression(Compressor):
    """The identity compressor; ``resolve`` turns it into "uncompressed".

    Its two methods copy bytes, so code written against the compressor
    interface works with it too.

    Example::

        y = rr.allreduce(x, compression=rr.Compression.none)   # same as compression=None
    """

    format = "none"

    def options(self) -> dict:
        return {}

    def packed_nbytes(self, n: int, itemsize: int = 4) -> int:
        return n * itemsize

    def compress(self, x, packed, residual=None, counter=0, offset=0, name=None,
                 divisor=1.0, values=None) -> int:
        if divisor != 1.0:      # in fp32, as the kernels divide
            x = (x.astype(np.float32) / np.float32(divisor)).astype(x.dtype)
        raw = x.reshape(-1).view(np.uint8)
        packed[:raw.size] = raw
        if values is not None:
            values[...] = x.reshape(-1)
        return 0

    def decompress(self, packed, n, out, accumulate=False, name=None, divisor=1.0) -> None:
        vals = packed[:n * out.itemsize].view(out.dtype)
        if accumulate:
            out += vals
        elif divisor != 1.0:
            out[...] = vals.astype(np.float32) / np.float32(divisor)
        else:
            out[...] = vals
