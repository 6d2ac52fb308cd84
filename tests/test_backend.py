"""torch.distributed's "ringreduce" backend and the DDP compression hooks, under a real mpirun.

tests/torch_cases/cases_backend.py checks every c10d collective against gloo on the
same inputs (np = 1 to 4, sub-groups, five dtypes); cases_ddp.py trains with DDP
(every flag users set), FSDP2 and the compression hook against single-process
full-batch training.
"""
from __future__ import annotations

import pytest
from mpi_util import run_pytest_mpi

pytest.importorskip("torch")


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3, 4])
def test_backend_collectives(np_):
    code, out, counts = run_pytest_mpi(np_, ["torch_cases/cases_backend.py"], timeout=400,
                                       pytest_args=["--assert=plain", "-W", "ignore::FutureWarning"])
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= 150 and not counts.get("failed"), out[-5000:]


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3])
def test_ddp_fsdp_and_hooks(np_):
    code, out, counts = run_pytest_mpi(np_, ["torch_cases/cases_ddp.py"], timeout=400,
                                       pytest_args=["--assert=plain", "-W", "ignore::FutureWarning"])
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= 20 and not counts.get("failed"), out[-5000:]
