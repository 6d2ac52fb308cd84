"""ringreduce.torch and scripts/train.py under a real mpirun (np = 2 and 3)."""
from __future__ import annotations

import re
import sys

import pytest
from mpi_util import ROOT, run_mpi, run_pytest_mpi

pytest.importorskip("torch")


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [2, 3])
def test_torch_cases(np_):
    code, out, counts = run_pytest_mpi(np_, ["torch_cases/cases_torch.py"], timeout=300)
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= 35 and not counts.get("failed"), out[-5000:]


@pytest.mark.mpi
def test_train_script_smoke(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    argv = [sys.executable, str(ROOT / "scripts" / "train.py"), "--steps", "6", "--batch-size", "4",
            "--eval-batches", "2", "--data-bytes", "400000", "--checkpoint", str(ckpt),
            "--no-progress"]
    # Compressed after a 3-step warm-up with frozen Adam variance, DDP interleaved.
    extra = ["--compression", "int8", "--compression-warmup", "3", "--freeze-variance",
             "--compare-ddp"]
    code, out = run_mpi(2, argv + extra, timeout=240)
    assert code == 0, out[-10000:]
    assert "compression int8 after 3 uncompressed steps" in out, out[-3000:]
    assert re.search(r"^throughput ratio ringreduce/ddp \d+\.\d+", out, re.M), out[-3000:]
    assert re.search(r"^final loss \d+\.\d+", out, re.M), out[-3000:]
    assert re.search(r"^samples/s \d+(\.\d+)?", out, re.M), out[-3000:]
    sums = re.findall(r"^rank (\d+) checksum ([0-9a-f]+)", out, re.M)
    assert len(sums) == 2 and sums[0][1] == sums[1][1], out[-3000:]
    assert ckpt.exists()
    # Resuming continues from the checkpoint: same rank count, two more steps.
    code, out2 = run_mpi(2, argv[:2] + ["--steps", "8", "--batch-size", "4", "--eval-batches", "2",
                                        "--data-bytes", "400000", "--resume", str(ckpt),
                                        "--no-progress"], timeout=240)
    assert code == 0, out2[-10000:]
    assert "resumed from step 6" in out2, out2[-3000:]
