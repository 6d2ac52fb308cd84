"""Horovod's compressor interface for torch tensors, next to the engine's formats.

A compressor turns a tensor into what travels and back:
``compress(tensor) -> (tensor, ctx)`` and ``decompress(tensor, ctx) -> tensor``.
``Compression.none`` and ``Compression.fp16`` are Horovod's two ready ones;
subclass :class:`Compressor` (or write any object with those two methods) to
plug your own into :func:`ringreduce.torch.allreduce` or
:class:`~ringreduce.torch.DistributedOptimizer`.

The engine's own formats (``bf16``, ``int8``, ``int4``, ``onebit``, ``auto``)
are reachable here too, under the same names as in ``rr.Compression``; they
are configurations the engine applies inside its allreduce, not tensor
transforms. ``Compression.fp16`` is both: a Horovod compressor for
``allreduce()``, and in ``DistributedOptimizer`` the engine's fp16 ring (same
bytes on the wire, fp32 accumulation inside each step).

Example
-------
>>> import torch, ringreduce.torch as hvd
>>> class Int16Compressor(hvd.Compressor):
...     @staticmethod
...     def compress(tensor):
...         return (tensor * 256).round().to(torch.int16), tensor.dtype
...     @staticmethod
...     def decompress(tensor, ctx):
...         return tensor.to(ctx) / 256
>>> y = hvd.allreduce(torch.ones(4), op=hvd.Sum, compression=Int16Compressor())
"""

from __future__ import annotations

import torch

import ringreduce as rr

__all__ = ["Compressor", "NoneCompressor", "FP16Compressor", "Compression", "split_compression"]


class Compressor:
    """Interface for compressing and decompressing a tensor (Horovod's)."""

    @staticmethod
    def compress(tensor):
        """Return ``(compressed tensor, ctx)``; ctx is whatever decompress needs."""
        raise NotImplementedError

    @staticmethod
    def decompress(tensor, ctx):
        """Return the tensor rebuilt from the reduced compressed tensor and ctx."""
        raise NotImplementedError


class NoneCompressor(Compressor):
    """No compression: the tensor travels as it is."""

    engine = None   # what DistributedOptimizer hands the engine instead

    @staticmethod
    def compress(tensor):
        return tensor, None

    @staticmethod
    def decompress(tensor, ctx):
        return tensor


class FP16Compressor(Compressor):
    """Floating tensors travel as float16 and come back in their own dtype."""

    @property
    def engine(self):
        return rr.Compression.fp16

    @staticmethod
    def compress(tensor):
        dtype = tensor.dtype
        if dtype.is_floating_point and dtype != torch.float16:
            tensor = tensor.type(torch.float16)
        return tensor, dtype

    @staticmethod
    def decompress(tensor, ctx):
        if ctx is not None and ctx.is_floating_point and tensor.dtype != ctx:
            tensor = tensor.type(ctx)
        return tensor


class _CompressionNames:
    """``Compression.none`` / ``.fp16`` (Horovod's compressors) and the engine's formats."""

    none = NoneCompressor()
    fp16 = FP16Compressor()

    def __getattr__(self, name):
        # bf16, int8, int4, onebit, auto ...: the engine's configurations, unchanged.
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(rr.Compression, name)
        except AttributeError:
            raise AttributeError(f"Compression has no format {name!r} (Horovod's: none, fp16; "
                                 f"the engine's: {', '.join(rr.Compression.FORMATS)})") from None

    def __repr__(self):
        return "ringreduce.torch.Compression"


Compression = _CompressionNames()


def _is_engine_config(c) -> bool:
    return type(c).__module__.startswith("ringreduce.compression")


def split_compression(compression):
    """``(torch-level compressor or None, engine configuration or None)`` for ``compression``.

    Our own ``Compression.none`` / ``.fp16`` map to the engine (nothing / its fp16
    ring); an engine configuration goes to the engine; any other object with
    ``compress`` and ``decompress`` (a Horovod-style compressor, class or
    instance) runs around the engine's allreduce.
    """
    if compression is None:
        return None, None
    if isinstance(compression, (NoneCompressor, FP16Compressor)) or compression in (
            NoneCompressor, FP16Compressor):
        eng = compression.engine if not isinstance(compression, type) else compression().engine
        return None, eng
    if _is_engine_config(compression):
        return None, compression
    if callable(getattr(compression, "compress", None)) and callable(
            getattr(compression, "decompress", None)):
        return compression, None
    raise TypeError(f"compression must be None, a Compression.* value or an object with "
                    f"compress(tensor) and decompress(tensor, ctx); got {compression!r}")
