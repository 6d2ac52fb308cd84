"""Per-rank entry point: run pytest on this rank, its output in $RR_TEST_LOGDIR/rank<N>.log."""
import os
import sys

import pytest


def _rank() -> int:
    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return int(os.environ[var])
    return 0


if __name__ == "__main__":
    logdir = os.environ.get("RR_TEST_LOGDIR")
    if logdir:
        log = open(os.path.join(logdir, f"rank{_rank()}.log"), "w", buffering=1)
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        sys.stdout = sys.stderr = log
    # No -x: every rank must run every test, or the ranks fall out of step and hang.
    code = pytest.main(["-q", "-p", "no:cacheprovider", "-o", "python_files=*.py",
                        "--rootdir", os.path.dirname(os.path.abspath(__file__))] + sys.argv[1:])
    sys.stdout.flush()
    sys.exit(int(code))
