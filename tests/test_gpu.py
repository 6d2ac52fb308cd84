"""The GPU suite (tests/mpi_cases/cases_gpu.py) under mpirun, in both device modes.

Skipped, with the reason, unless cupy imports and sees a CUDA device. The
CUDA-aware run also needs an MPI that says it takes device pointers (handing
them to one that does not would crash it); RR_TEST_FORCE_CUDA_AWARE=1 runs it
regardless. The GPU-independent logic (staging schedule, mode detection) is in
test_staging.py and runs everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path

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
FAKE_CUPY = Path(__file__).resolve().parent / "fake_cupy"


def _aware_skip_reason() -> str | None:
    if os.environ.get("RR_TEST_FORCE_CUDA_AWARE") == "1":
        return None
    from ringreduce.core import device

    answer, how = device.query_library()
    return None if answer else f"this MPI is not known to be CUDA-aware ({how})"


@pytest.mark.gpu
@pytest.mark.mpi
@pytest.mark.skipif(_REASON is not None, reason=_REASON or "")
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


@pytest.mark.mpi
@pytest.mark.parametrize("aware,np_", [("0", 3), ("1", 2), ("1", 3)],
                         ids=["staged-np3", "cuda-aware-np2", "cuda-aware-np3"])
def test_gpu_suite_on_fake_cupy(aware, np_):
    """The same suite on CPU, with tests/fake_cupy standing in for cupy.

    It runs the GPU path's Python end to end (routing, device scratch, the
    stager with its copier, the mismatch labels) and checks the stream rule:
    the fake raises if MPI or a copy stream reads a buffer with unfinished
    kernels. "cuda-aware" here hands MPI host memory through DLPack, which is
    all that can be checked without a GPU. np=3 matters: with 2 ranks every
    reduction happens to be followed by a finish_average before the next send.
    """
    # A rank failing inside a collective leaves the others waiting: time out fast.
    env = dict(os.environ, RINGREDUCE_CUDA_AWARE=aware, RINGREDUCE_TIMEOUT="60",
               PYTHONPATH=os.pathsep.join(filter(None, [str(FAKE_CUPY), os.environ.get("PYTHONPATH")])))
    code, out, counts = run_pytest_mpi(np_, ["mpi_cases/cases_gpu.py"], timeout=600, env=env)
    print(f"fake cupy, np={np_}, RINGREDUCE_CUDA_AWARE={aware}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) > 100 and not counts.get("failed"), out[-5000:]
