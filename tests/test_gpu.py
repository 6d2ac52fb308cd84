"""The GPU suite (tests/mpi_cases/cases_gpu.py) under mpirun, in both device modes.

Skipped, with the reason, unless cupy imports and sees a CUDA device. The
CUDA-aware run also needs an MPI that says it takes device pointers (handing
them to one that does not would crash it); RR_TEST_FORCE_CUDA_AWARE=1 runs it
regardless. The GPU-independent logic (staging schedule, mode detection) is in
test_staging.py and runs everywhere.
"""
from __future__ import annotations

import os

import pytest
from mpi_util import run_pytest_mpi


def _no_gpu_reason() -> str | None:
    try:
        import cupy
    except Exception as exc:  # not installed, or a CUDA library missing
        return f"cupy unavailable ({type(exc).__name__}: {exc}); pip install ringreduce[cuda12] or [cuda13]"
    try:
        if cupy.cuda.runtime.getDeviceCount() > 0:
            return None
    except Exception as exc:
        return f"no usable CUDA device ({exc})"
    return "no CUDA device"


_REASON = _no_gpu_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.mpi,
              pytest.mark.skipif(_REASON is not None, reason=_REASON or "")]


def _aware_skip_reason() -> str | None:
    if os.environ.get("RR_TEST_FORCE_CUDA_AWARE") == "1":
        return None
    from ringreduce import device

    answer, how = device.query_library()
    return None if answer else f"this MPI is not known to be CUDA-aware ({how})"


@pytest.mark.parametrize("np_", [2, 3])
@pytest.mark.parametrize("aware", ["0", "1"], ids=["staged", "cuda-aware"])
def test_gpu_suite(aware, np_):
    if aware == "1":
        reason = _aware_skip_reason()
        if reason:
            pytest.skip(reason)
    env = dict(os.environ, RINGREDUCE_CUDA_AWARE=aware)
    code, out, counts = run_pytest_mpi(np_, ["mpi_cases/cases_gpu.py"], timeout=900, env=env)
    print(f"np={np_} RINGREDUCE_CUDA_AWARE={aware}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) > 0 and not counts.get("failed"), out[-5000:]
