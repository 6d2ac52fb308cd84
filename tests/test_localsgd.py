"""LocalSGD and DiLoCo (ringreduce.torch) under a real mpirun, np = 2, 3 and 4."""
from __future__ import annotations

import pytest
from mpi_util import run_pytest_mpi

pytest.importorskip("torch")


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [2, 3, 4])
def test_localsgd_cases(np_):
    # --assert=plain: with python_files=*.py pytest would otherwise rewrite every torch module
    # it imports (about 20 s per rank on a small machine).
    args = ["--assert=plain"]
    code, out, counts = run_pytest_mpi(np_, ["torch_cases/cases_localsgd.py"], timeout=300,
                                       pytest_args=args)
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= 30 and not counts.get("failed"), out[-5000:]
