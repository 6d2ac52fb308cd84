"""Horovod's torch API (import ringreduce.torch as hvd) under a real mpirun, np = 1 to 5.

tests/torch_cases/cases_horovod.py holds the matrix (collective x dtype x shape x
process set, autograd, handles, errors, compressors, introspection); the MNIST-shaped
example script trains with only Horovod's import switched.
"""
from __future__ import annotations

import re
import sys

import pytest
from mpi_util import ROOT, run_mpi, run_pytest_mpi

pytest.importorskip("torch")


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3, 4, 5])
def test_horovod_cases(np_):
    # --assert=plain: the cases' asserts carry their own messages, and rewriting every
    # torch module pytest imports costs ~20 s per rank on a small machine.
    code, out, counts = run_pytest_mpi(np_, ["torch_cases/cases_horovod.py"], timeout=300,
                                       pytest_args=["--assert=plain"])
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= 300 and not counts.get("failed"), out[-5000:]


@pytest.mark.mpi
def test_horovod_mnist_synthetic_script():
    script = ROOT / "scripts" / "examples" / "horovod_mnist_synthetic.py"
    code, out = run_mpi(2, [sys.executable, str(script), "--epochs", "2", "--fp16-allreduce"],
                        timeout=240)
    assert code == 0, out[-10000:]
    first = float(re.search(r"^initial test loss (\d+\.\d+)", out, re.M).group(1))
    last = float(re.search(r"^final test loss (\d+\.\d+) accuracy (\d+\.\d+)", out, re.M).group(1))
    assert last < first - 0.3, out[-3000:]
    sums = re.findall(r"^rank (\d+) checksum ([0-9a-f]+)", out, re.M)
    assert len(sums) == 2 and sums[0][1] == sums[1][1], out[-3000:]
    # The script refuses Adasum with a clear NotImplementedError, never an AttributeError.
    code, out = run_mpi(2, [sys.executable, str(script), "--epochs", "1", "--use-adasum",
                            "--train-samples", "64", "--test-samples", "64"], timeout=120)
    assert code != 0 and "NotImplementedError" in out and "Adasum" in out, out[-3000:]
