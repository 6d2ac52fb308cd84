"""The compressor interface every format shares: an immutable, callable configuration.

A compressor is a frozen dataclass. The instance in ``rr.Compression`` is the
default configuration; calling any instance returns a copy with some options
changed, so ``rr.Compression.int8`` and ``rr.Compression.int8(block_size=128)``
are both valid wherever a compression is taken. The repr is stable: it travels
in the mismatch-check fingerprint, so ranks that configured compression
differently get a clear error instead of garbage.

Each compressor has the same two-method interface over flat arrays:
``compress(x, packed, residual=None, counter=0, offset=0) -> non-finite blocks``
and ``decompress(packed, n, out, accumulate=False)``, plus ``packed_nbytes(n)``.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from ..core.errors import RingReduceError
from . import kernels

__all__ = ["Compressor", "Quantizer"]

_MAX_BLOCK = 1 << 20


@dataclasses.dataclass(frozen=True, repr=False)
class Compressor:
    """Base of all compressors: the format name and the error-feedback switch.

    Attributes
    ----------
    format : str
        The kernels' wire format ("fp16", "bf16", "int8", "int4", "onebit"; "none" for none).
    two_sided : bool
        True for the quantising formats, which run the two-sided compressed
        allreduce; False for fp16/bf16, which run the ordinary ring in the half type.
    """

    format = "none"
    two_sided = False
    error_feedback: bool = False
    clip: float | None = None

    # Set by resolve() when the relative error vs exact is requested (RINGREDUCE_STATS_ERROR=1).
    # It is part of the repr, so ranks that disagree about it fail the mismatch check.
    measure_error: bool = dataclasses.field(default=False, compare=True)

    def __post_init__(self):
        if not isinstance(self.error_feedback, (bool, np.bool_)):
            raise RingReduceError(f"{self.label()}: error_feedback must be True or False, "
                                  f"got {self.error_feedback!r}")
        if self.clip is not None:
            try:
                ok = math.isfinite(float(self.clip)) and float(self.clip) > 0
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise RingReduceError(f"{self.label()}: clip must be None or a finite value > 0, "
                                      f"got {self.clip!r}")
            object.__setattr__(self, "clip", float(self.clip))

    # -- configuration ------------------------------------------------------------
    def __call__(self, **options) -> "Compressor":
        """A copy with some options changed, e.g. ``rr.Compression.int8(block_size=128)``."""
        names = {f.name for f in dataclasses.fields(self)} - {"measure_error"}
        unknown = sorted(set(options) - names)
        if unknown:
            raise RingReduceError(f"{self.label()}: unknown option(s) {', '.join(unknown)} "
                                  f"(options: {', '.join(sorted(names))})")
        return dataclasses.replace(self, **options)

    def label(self) -> str:
        return f"Compression.{self.format}"

    def options(self) -> dict:
        """The user-visible options, in declaration order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name != "measure_error"}

    def __repr__(self) -> str:
        parts = [f"{k}={v!r}" for k, v in self.options().items()]
        if self.measure_error:
            parts.append("measure_error=True")
        return f"{self.label()}({', '.join(parts)})"

    # -- the two-method interface -------------------------------------------------------
    def packed_nbytes(self, n: int) -> int:
        """Bytes of the compressed form of n elements."""
        return kernels.packed_nbytes(self.format, n)

    def compress(self, x: np.ndarray, packed: np.ndarray, residual: np.ndarray | None = None,
                 counter: int = 0, offset: int = 0, name: str | None = None,
                 divisor: float = 1.0, values: np.ndarray | None = None) -> int:
        """Compress flat x (/ divisor, + residual updated in place) into packed; returns
        the non-finite blocks. ``values``, if given, receives what decompress would write."""
        return kernels.compress(self.format, x, packed, residual=residual, clip=self.clip,
                                divisor=divisor, values=values, name=name)

    def decompress(self, packed: np.ndarray, n: int, out: np.ndarray, accumulate: bool = False,
                   name: str | None = None, divisor: float = 1.0) -> None:
        """out = dequant(packed) (/ divisor, in fp32), or out += dequant(packed) (fp32 out)
        when accumulate."""
        if accumulate:
            kernels.decompress_accumulate(self.format, packed, n, out, name=name)
        else:
            kernels.decompress(self.format, packed, n, out, divisor=divisor, name=name)


@dataclasses.dataclass(frozen=True, repr=False)
class Quantizer(Compressor):
    """Block-scaled quantisation (int8, int4, onebit): the two-sided compressed allreduce.

    Options
    -------
    block_size : elements per scale block (a positive multiple of 8, at most 2**20)
    error_feedback : keep worker and server residuals per tensor name (default True)
    clip : None, or tau > 0: finite values are clipped to [-tau, tau] before quantising
    stochastic : stochastic rounding (unbiased) instead of round-to-nearest
    seed : seed of the counter-based RNG used by stochastic rounding
    """

    two_sided = True
    block_size: int = 256
    error_feedback: bool = True
    clip: float | None = None
    stochastic: bool = False
    seed: int = 0

    def __post_init__(self):
        super().__post_init__()
        b = self.block_size
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b <= 0 or b % 8 \
                or b > _MAX_BLOCK:
            raise RingReduceError(f"{self.label()}: block_size must be a positive multiple of 8 "
                                  f"up to {_MAX_BLOCK}, got {b!r}")
        object.__setattr__(self, "block_size", int(b))
        if not isinstance(self.stochastic, (bool, np.bool_)):
            raise RingReduceError(f"{self.label()}: stochastic must be True or False, "
                                  f"got {self.stochastic!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < 2**64:
            raise RingReduceError(f"{self.label()}: seed must be an integer in [0, 2**64), got {s!r}")
        object.__setattr__(self, "seed", int(s))

    def options(self) -> dict:
        order = ("block_size", "error_feedback", "clip", "stochastic", "seed")
        return {k: getattr(self, k) for k in order}

    def packed_nbytes(self, n: int) -> int:
        return kernels.packed_nbytes(self.format, n, self.block_size)

    def compress(self, x, packed, residual=None, counter=0, offset=0, name=None,
                 divisor=1.0, values=None) -> int:
        return kernels.compress(self.format, x, packed, residual=residual,
                                block_size=self.block_size, clip=self.clip,
                                stochastic=self.stochastic, seed=self.seed, counter=counter,
                                offset=offset, divisor=divisor, values=values, name=name)

    def decompress(self, packed, n, out, accumulate=False, name=None, divisor=1.0) -> None:
        if accumulate:
            kernels.decompress_accumulate(self.format, packed, n, out, block_size=self.block_size,
                                          name=name)
        else:
            kernels.decompress(self.format, packed, n, out, block_size=self.block_size,
                               divisor=divisor, name=name)
