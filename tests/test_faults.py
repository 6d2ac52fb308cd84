"""Stalls, timeouts and faults under a real mpirun: warnings name the missing ranks, and every
fault ends the whole job with a non-zero exit within 30 s, naming the rank. Also the timeline."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time

import pytest
from mpi_util import HERE, run_mpi

SCENARIO = str(HERE / "fault_cases" / "scenario.py")
pytestmark = pytest.mark.mpi
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _run(np_, name, timeout=60, **env):
    full = {**os.environ, "RINGREDUCE_STALL_WARNING": "2", "RINGREDUCE_TIMEOUT": "600", **env}
    t = time.monotonic()
    code, out = run_mpi(np_, [sys.executable, SCENARIO, name], timeout=timeout, env=full)
    return code, out, time.monotonic() - t


def test_stall_warning_names_the_late_rank():
    code, out, _ = _run(3, "stall_warning", LATE="5")
    assert code == 0, out[-5000:]
    assert out.count("RESULT") == 3 and "ok 3" in out, out[-5000:]
    for r in (0, 1):
        assert f"rank {r}: allreduce of tensor 'late.grad' (call 2) has waited" in out, out[-5000:]
    assert "rank 2 has not entered allreduce of tensor 'late.grad'" in out, out[-5000:]


def test_timeout_ends_the_job():
    code, out, took = _run(3, "timeout", RINGREDUCE_TIMEOUT="6")
    assert code != 0 and took < 30, (code, took, out[-5000:])
    assert "timed out after" in out and "tensor 'never.grad'" in out, out[-5000:]
    assert "rank 2 has not entered" in out and "aborting the job" in out, out[-5000:]
    assert "unexpectedly finished" not in out


def test_caught_timeout_refuses_later_calls_and_aborts_at_exit():
    code, out, took = _run(2, "timeout_caught", RINGREDUCE_TIMEOUT="6")
    assert code != 0 and took < 30, (code, took, out[-5000:])
    assert "RESULT rank 0 caught: rank 0: allreduce of tensor 'never.grad'" in out, out[-5000:]
    assert "RESULT rank 0 refused: rank 0: allreduce of tensor 'after'" in out, out[-5000:]
    assert "shutting down after a failure" in out, out[-5000:]


@pytest.mark.parametrize("name, message", [
    ("exception", "rank 2: uncaught ValueError: boom in user code"),
    ("engine_exception", "rank 2: uncaught RuntimeError in thread ringreduce-engine: engine thread broke"),
    ("engine_error_waited", "rank 2: uncaught ZeroDivisionError"),
])
def test_uncaught_exception_aborts_the_job(name, message):
    code, out, took = _run(3, name)
    assert code != 0 and took < 30, (code, took, out[-5000:])
    assert message in out and "aborting the job" in out, out[-5000:]


def test_sys_exit_on_one_rank_ends_the_job():
    code, out, took = _run(3, "sys_exit")
    assert code != 0 and took < 30, (code, took, out[-5000:])
    assert "rank 1 exited (sys.exit or end of script) at call" in out, out[-5000:]
    assert "waits in allreduce of tensor 'w'" in out and "aborting the job" in out, out[-5000:]
    assert "unexpectedly finished" not in out


def test_ranks_leaving_at_different_times_after_the_same_calls_is_silent():
    code, out, took = _run(3, "staggered_exit")
    assert code == 0 and took < 30, (code, took, out[-5000:])
    assert out.count("RESULT") == 4 and "RESULT rank 0 saw exits of [1, 2]" in out, out[-5000:]
    assert "exited" not in out.replace("saw exits", "") and "abort" not in out.lower(), out[-5000:]


def test_sigkill_ends_the_job():
    code, out, took = _run(3, "sigkill")
    assert code != 0 and took < 30, (code, took, out[-5000:])


def _events(path):
    with open(path) as f:
        data = json.load(f)
    return data["traceEvents"]


def test_timeline_per_rank(tmp_path):
    """Every documented event, from a run with ring, tree, shm, compressed calls and a torch step."""
    pattern = str(tmp_path / "tl.{rank}.json")
    code, out, _ = _run(2, "timeline", timeout=120, RINGREDUCE_TIMELINE=pattern, TL_FULL="1")
    assert code == 0, out[-5000:]
    for r in (0, 1):
        evs = _events(pattern.format(rank=r))
        assert {e["pid"] for e in evs} == {r}
        names = {e["name"] for e in evs}
        assert all(e["dur"] >= 0 for e in evs if e["ph"] == "X")
        assert {"fingerprint check", "allreduce", "algorithm ring", "algorithm tree", "wait",
                "process_name", "ring reduce-scatter", "ring allgather", "tree exchange",
                "shm copy in", "shm reduce", "shm gather", "compress", "decompress"} <= names, \
            (r, sorted(names))
        by = {}
        for e in evs:
            by.setdefault(e["name"], []).append(e)
        assert {e["args"]["format"] for e in by["compress"]} >= {"fp16", "int8"}
        assert all(e["args"]["elements"] > 0 and e["args"]["bytes"] > 0 for e in by["compress"])
        assert any(e["args"].get("accumulate") for e in by["decompress"])
        # The ring's two phases nest inside its algorithm event, one after the other.
        ring = next(e for e in by["algorithm ring"])
        rs = next(e for e in by["ring reduce-scatter"] if e["ts"] >= ring["ts"])
        ag = next(e for e in by["ring allgather"] if e["ts"] >= rs["ts"])
        assert rs["ts"] + rs["dur"] <= ag["ts"] + 1 and ag["ts"] + ag["dur"] <= ring["ts"] + ring["dur"] + 1
        if not HAVE_TORCH:      # the MPICH CI venv has no torch
            continue
        assert "bucket ready" in names, (r, sorted(names))
        buckets = by["bucket ready"]
        assert all(e["ph"] == "i" for e in buckets)
        assert sum(e["args"]["tensors"] for e in buckets) == 4          # 2 weights, 2 biases
        assert sum(e["args"]["bytes"] for e in buckets) == 4 * (8 * 16 + 16 + 16 * 2 + 2)


def test_timeline_merged(tmp_path):
    path = str(tmp_path / "timeline.json")
    code, out, _ = _run(3, "timeline", RINGREDUCE_TIMELINE=path)
    assert code == 0, out[-5000:]
    evs = _events(path)
    assert {e["pid"] for e in evs} == {0, 1, 2}
    calls = [e for e in evs if e["name"] == "allreduce"]
    assert {e["args"]["name"] for e in calls} >= {"warm", "t.ring", "t.tree", "t.late", "t.async"}
    assert any(e["name"] == "fingerprint check" and e["tid"] == "ringreduce-engine" for e in evs)
    # 3 ranks: the tree folds rank 0 into rank 1 and hands it the result at the end.
    assert {"tree fold", "tree exchange", "tree unfold"} <= {e["name"] for e in evs if e["pid"] < 2}
    assert not os.path.exists(path + ".rank0")
