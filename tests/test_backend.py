"""torch.distributed's "ringreduce" backend and the DDP compression hooks, under a real mpirun.

tests/torch_cases/cases_backend.py checks every c10d collective against gloo on the
same inputs (np = 1 to 4, sub-groups, five dtypes); cases_ddp.py trains with DDP
(every flag users set), FSDP2 and the compression hook against single-process
full-batch training.
"""
from __future__ import annotations

import re
import sys

import pytest
from mpi_util import ROOT, run_mpi, run_pytest_mpi

pytest.importorskip("torch")


def _run_cases(np_: int, case_file: str, at_least: int) -> None:
    code, out, counts = run_pytest_mpi(np_, [case_file], timeout=400,
                                       pytest_args=["--assert=plain", "-W", "ignore::FutureWarning"])
    print(f"np={np_}: {counts}")
    assert code == 0, out[-20000:]
    assert counts.get("passed", 0) >= at_least and not counts.get("failed"), out[-5000:]


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3, 4])
def test_backend_collectives(np_):
    _run_cases(np_, "torch_cases/cases_backend.py", 150)


@pytest.mark.mpi
@pytest.mark.parametrize("np_", [1, 2, 3])
def test_ddp_fsdp_and_hooks(np_):
    _run_cases(np_, "torch_cases/cases_ddp.py", 20)


@pytest.mark.mpi
def test_train_script_on_the_ringreduce_backend():
    # scripts/train.py --ddp-backend: torch DDP is the main run, our hook on its buckets,
    # DDP on gloo interleaved as the peer.
    script = ROOT / "scripts" / "train.py"
    code, out = run_mpi(2, [sys.executable, str(script), "--steps", "8", "--no-progress",
                            "--ddp-backend", "ringreduce", "--ddp-hook", "int8",
                            "--compression-warmup", "2", "--compare-ddp"], timeout=300)
    assert code == 0, out[-10000:]
    assert re.search(r"^final loss \d+\.\d+", out, re.M), out[-3000:]
    assert re.search(r"^throughput ratio ringreduce/ddp \d+\.\d+", out, re.M), out[-3000:]
    sums = re.findall(r"^rank (\d+) checksum ([0-9a-f]+)", out, re.M)
    assert len(sums) == 2 and sums[0][1] == sums[1][1], out[-3000:]
    wire = float(re.search(r"^wire MiB/rank (\d+\.\d+)", out, re.M).group(1))
    assert wire > 0, out[-3000:]


@pytest.mark.mpi
@pytest.mark.parametrize("flags", [["--hook", "int8", "--warmup", "5"], ["--fsdp"]])
def test_ddp_example_script(flags):
    script = ROOT / "scripts" / "examples" / "ddp_ringreduce.py"
    code, out = run_mpi(2, [sys.executable, str(script), *flags], timeout=240)
    assert code == 0, out[-10000:]
    first = float(re.search(r"^step 0 loss (\d+\.\d+)", out, re.M).group(1))
    last = float(re.search(r"^final loss (\d+\.\d+)", out, re.M).group(1))
    assert last < 0.6 * first, out[-3000:]
