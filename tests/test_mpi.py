"""The multi-rank suites, each run under a real mpirun at np = 1..5."""
from __future__ import annotations

import pytest
from mpi_util import run_pytest_mpi

SUITES = ["mpi_cases/cases_allreduce.py", "mpi_cases/cases_errors.py", "mpi_cases/cases_broadcast.py",
          "mpi_cases/cases_compression.py", "mpi_cases/cases_ops.py",
          "mpi_cases/cases_hierarchical.py", "mpi_cases/cases_engine.py", "mpi_cases/cases_nan.py",
          "mpi_cases/cases_collectives.py", "mpi_cases/cases_learn.py",
          "mpi_cases/cases_auto.py", "mpi_cases/cases_gather_algorithms.py", "mpi_cases/cases_join.py"]


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3, 4, 5])
def test_core_suites(np_):
    code, out, counts = run_pytest_mpi(np_, SUITES, timeout=600)
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) > 0 and not counts.get("failed"), out[-5000:]
