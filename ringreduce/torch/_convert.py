"""Zero-copy views between torch tensors and the arrays the engine takes.

CPU tensors become numpy views (bfloat16 through ``ml_dtypes``), CUDA tensors
become cupy views through DLPack. Both share memory with the tensor, so the
engine writes results straight into torch storage.

Example
-------
>>> import torch
>>> from ringreduce.torch._convert import to_array, from_array
>>> t = torch.ones(4, dtype=torch.bfloat16)
>>> a = to_array(t)          # numpy view, dtype ml_dtypes.bfloat16
>>> a[0] = 3
>>> float(t[0])
3.0
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["to_array", "from_array", "byte_view"]

try:  # ml_dtypes is a core dependency, but keep the import error readable
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    ml_dtypes = None
    _BF16 = None


def _cupy():
    try:
        import cupy

        return cupy
    except ImportError as exc:  # pragma: no cover - GPU machines only
        raise ImportError("CUDA tensors need cupy (pip install ringreduce[cuda12|cuda13])") from exc


def to_array(t: torch.Tensor):
    """Return a numpy (CPU) or cupy (CUDA) array sharing memory with ``t``.

    ``t`` must be contiguous; autograd history is ignored (the view is of
    ``t.detach()``).
    """
    t = t.detach()
    if not t.is_contiguous():
        raise ValueError("to_array needs a contiguous tensor")
    if t.is_cuda:
        cp = _cupy()
        if t.dtype == torch.bfloat16:
            # cupy has no bfloat16: hand the engine the raw 16-bit words tagged as bf16
            return cp.from_dlpack(t.view(torch.int16)).view(_BF16)
        return cp.from_dlpack(t)
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(_BF16)
    return t.numpy()


def from_array(a) -> torch.Tensor:
    """Return a torch tensor sharing memory with numpy/cupy array ``a``."""
    if isinstance(a, np.ndarray):
        if _BF16 is not None and a.dtype == _BF16:
            return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(a)
    if _BF16 is not None and getattr(a, "dtype", None) == _BF16:  # pragma: no cover - GPU
        return torch.from_dlpack(a.view("int16")).view(torch.bfloat16)
    return torch.from_dlpack(a)  # pragma: no cover - GPU


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of a contiguous tensor's bytes (for dtype-blind broadcasts)."""
    return t.detach().reshape(-1).view(torch.uint8)
