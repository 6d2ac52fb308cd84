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


@pytest.mark.mpi
def test_train_script_diloco_and_resume(tmp_path):
    import re
    import sys

    from mpi_util import ROOT, run_mpi

    ckpt = tmp_path / "ckpt.pt"
    common = [sys.executable, str(ROOT / "scripts" / "train.py"), "--batch-size", "4",
              "--eval-batches", "2", "--data-bytes", "400000", "--no-progress", "--sync", "diloco",
              "--sync-every", "4", "--fragments", "2", "--overlap-sync", "--compression", "int8"]
    code, out = run_mpi(2, common + ["--steps", "6", "--checkpoint", str(ckpt)], timeout=240)
    assert code == 0, out[-10000:]
    assert "diloco every 4 steps" in out, out[-3000:]
    assert re.search(r"^final loss \d+\.\d+", out, re.MULTILINE), out[-3000:]
    assert re.search(r"^wire MiB/rank \d+\.\d+", out, re.MULTILINE), out[-3000:]
    sums = re.findall(r"^rank (\d+) checksum ([0-9a-f]+)", out, re.MULTILINE)
    assert len(sums) == 2 and sums[0][1] == sums[1][1], out[-3000:]
    code, out2 = run_mpi(2, common + ["--steps", "8", "--resume", str(ckpt)], timeout=240)
    assert code == 0, out2[-10000:]
    assert "resumed from step 6" in out2, out2[-3000:]
