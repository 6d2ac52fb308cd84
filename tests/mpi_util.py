"""Run code under a real mpirun from pytest.

`run_mpi(np, argv)` launches argv on np ranks with the MPI that mpi4py uses and
returns (returncode, output). `run_pytest_mpi(np, files)` runs pytest files on
every rank (tests/mpi_cases/rank_pytest.py does the per-rank part): rank 0's
output comes back, the other ranks' only when something failed.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from ringreduce.cli.run import build_command, find_launcher, launch_env

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RANK_PYTEST = HERE / "mpi_cases" / "rank_pytest.py"


def run_mpi(np: int, argv: list[str], timeout: float = 300, env: dict | None = None,
            extra: list[str] | None = None) -> tuple[int, str]:
    """Run argv under mpirun on np ranks; returns (exit code, combined output)."""
    launcher = find_launcher()
    cmd = build_command(launcher, np, argv, oversubscribe=np > (os.cpu_count() or 1), extra=extra)
    full_env = launch_env(env, np=np)
    full_env["OMP_NUM_THREADS"] = "1"
    # auto learns as it would for a user, but never reads or writes the user's learned cache.
    full_env.setdefault("RINGREDUCE_LEARNED", "off")
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), full_env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(cmd, env=full_env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, f"TIMEOUT after {timeout}s running {' '.join(cmd)}\n{out}"
    return proc.returncode, proc.stdout + proc.stderr


def run_pytest_mpi(np: int, files: list[str], timeout: float = 600, env: dict | None = None,
                   pytest_args: list[str] | None = None) -> tuple[int, str, dict]:
    """Run pytest on `files` under mpirun; returns (exit code, output, counts from rank 0)."""
    with tempfile.TemporaryDirectory(prefix="rr-mpi-logs-") as logdir:
        env = dict(os.environ if env is None else env)
        env["RR_TEST_LOGDIR"] = logdir
        argv = [sys.executable, str(RANK_PYTEST)] + [str(HERE / f) for f in files] + (pytest_args or [])
        code, out = run_mpi(np, argv, timeout=timeout, env=env)
        logs = sorted(Path(logdir).glob("rank*.log"))
        rank0 = next((p.read_text() for p in logs if p.name == "rank0.log"), "")
        text = out + "\n" + rank0
        if code != 0:
            for p in logs:
                if p.name != "rank0.log":
                    text += f"\n===== {p.name} =====\n" + p.read_text()[-20000:]
    return code, text, summary_counts(rank0)


def summary_counts(text: str) -> dict:
    """{'passed': N, 'failed': M, ...} from pytest's closing line."""
    counts = {}
    for num, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)", text):
        counts[word] = counts.get(word, 0) + int(num)
    return counts
