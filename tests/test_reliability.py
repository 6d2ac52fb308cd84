"""Reliability under a real mpirun: deadlocks, pickling failures, misconfigured ranks and
every blocking MPI call supervised. Each case fails on the engine before the core redesign."""
from __future__ import annotations

import os
import re
import sys
import time

import pytest
from mpi_util import HERE, run_mpi

SCENARIO = str(HERE / "fault_cases" / "reliability.py")
pytestmark = pytest.mark.mpi


def _run(np_, name, timeout=90, **env):
    full = {**os.environ, "RINGREDUCE_STALL_WARNING": "60", "RINGREDUCE_TIMEOUT": "120", **env}
    t = time.monotonic()
    code, out = run_mpi(np_, [sys.executable, SCENARIO, name], timeout=timeout, env=full)
    return code, out, time.monotonic() - t


def _results(out: str) -> dict:
    found = {}
    # Launchers may join two ranks' lines (hydra): a result ends where the next one begins.
    for m in re.finditer(r"RESULT rank (\d+) (.*?)(?=RESULT rank|\n|$)", out):
        found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


@pytest.mark.parametrize("np_", [2, 3])
def test_deadlock_async_against_blocking_is_named_on_every_rank(np_):
    code, out, took = _run(np_, "deadlock")
    res = _results(out)
    assert sorted(res) == list(range(np_)), out[-5000:]
    for r in range(np_):
        line = res[r][0]
        assert line.startswith("raised after"), out[-5000:]
        assert float(line.split()[2]) < 20, line
        assert "deadlock" in line and "call 1 on the background channel" in line, line
        assert re.search(r"call \d+ on the main channel", line), line
    assert took < 60, took


def _raised_then_in_step(out: str, n: int, raised: int, needle, step: str) -> None:
    """Every rank printed `raised` errors containing needle(rank), then `step` as its last line."""
    res = _results(out)
    for r in range(n):
        errors = [x for x in res.get(r, []) if x.startswith("raised")]
        assert len(errors) == raised and all(needle(r) in e for e in errors), (r, out[-5000:])
        assert res[r][-1] == step, (r, out[-5000:])


@pytest.mark.parametrize("check", ["1", "0"])
def test_unpicklable_broadcast_object_raises_everywhere(check):
    code, out, took = _run(3, "unpicklable_broadcast", RINGREDUCE_CHECK=check)
    assert code == 0 and took < 60, (code, took, out[-5000:])
    _raised_then_in_step(out, 3, 2, lambda r: "could not pickle" if r == 0 else
                         "root rank 0 could not pickle", "in step 3")


@pytest.mark.parametrize("check", ["1", "0"])
def test_unpicklable_allgather_object_raises_everywhere(check):
    code, out, took = _run(3, "unpicklable_allgather", RINGREDUCE_CHECK=check)
    assert code == 0 and took < 60, (code, took, out[-5000:])
    _raised_then_in_step(out, 3, 1, lambda r: "rank 2 could not pickle", "in step [0, 10, 20]")


def test_out_of_range_root_keeps_every_rank_in_step():
    code, out, took = _run(3, "bad_root_object")
    assert code == 0, out[-5000:]
    _raised_then_in_step(out, 3, 1, lambda r: "root_rank 6 is out of range", "in step from 0")


def test_check_set_differently_is_an_error_at_init():
    code, out, took = _run(2, "check_differs")
    res = _results(out)
    for r in range(2):
        assert res[r][0].startswith("raised") and "RINGREDUCE_CHECK differs across ranks" in res[r][0], \
            out[-5000:]
    assert "MPI_ERR_TRUNCATE" not in out


def test_native_broadcast_and_object_waits_are_supervised():
    code, out, took = _run(2, "unsupervised_stalls", RINGREDUCE_STALL_WARNING="1.5",
                           RINGREDUCE_CHECK="0")
    assert code == 0, out[-5000:]
    for label in ("native MPI_Allreduce of tensor 'late'", "broadcast", "broadcast_object",
                  "allgather_object"):
        assert re.search(rf"rank 0: {re.escape(label)}( \(length\)| \(lengths\))? has waited", out), \
            (label, out[-5000:])


def test_reinit_frees_the_previous_control_communicator():
    code, out, _ = _run(2, "control_comm_freed")
    assert code == 0, out[-5000:]
    assert out.count("old freed True new live True") == 2, out[-5000:]
