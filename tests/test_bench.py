"""ringreduce-bench in a quick mode under mpirun np 2: runs, prints the table, errors within tolerance."""
from __future__ import annotations

import csv
import json
import sys

import pytest
from mpi_util import run_mpi

from ringreduce.cli import bench

QUICK = ["-b", "4", "-e", "256K", "-f", "64", "-r", "2", "-n", "3", "-w", "1",
         "--sample-seconds", "0.002", "--no-progress"]


def test_parse_sizes():
    assert bench.parse_size("4") == 4
    assert bench.parse_size("64K") == 65536
    assert bench.parse_size("16M") == 16 << 20
    assert bench.parse_size("1G") == 1 << 30
    assert bench.sizes_between(4, 64 << 20, 4)[-1] == 64 << 20
    assert bench.sizes_between(4, 4096, 4) == [4, 16, 64, 256, 1024, 4096]


@pytest.mark.mpi
def test_bench_quick_np2(tmp_path):
    out_csv, out_json, out_png = tmp_path / "b.csv", tmp_path / "b.json", tmp_path / "b.png"
    argv = [sys.executable, "-m", "ringreduce.cli.bench", *QUICK, "-c", "int8",
            "--csv", str(out_csv), "--json", str(out_json), "--plot", str(out_png)]
    code, out = run_mpi(2, argv, timeout=240)
    assert code == 0, out[-5000:]
    assert "algorithm" in out and "busbw" in out and "x mpi" in out, out[-3000:]
    rows = json.loads(out_json.read_text())["rows"]
    names = {w["algorithm"] for w in rows}
    assert {"mpi", "ps", "ring", "tree", "shm", "auto", "int8"} <= names
    assert {w["size"] for w in rows} == {4, 256, 16384}
    for w in rows:
        limit = 0.05 if w["algorithm"] == "int8" else 1e-6
        assert w["error"] <= limit, w
        assert w["time_us"] > 0 and w["busbw"] >= 0
        if w["ours"] and w["algorithm"] != "int8":
            assert w["vs_mpi"] > 0
    assert any(w["compression_ratio"] and w["compression_ratio"] > 2 for w in rows
               if w["algorithm"] == "int8")
    with open(out_csv) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.mpi
def test_bench_tune_writes_file(tmp_path):
    target = tmp_path / "tuning.json"
    argv = [sys.executable, "-m", "ringreduce.cli.bench", "--tune", "-b", "64", "-e", "1M", "-f", "16",
            "-r", "2", "-n", "3", "-w", "1", "--sample-seconds", "0.002", "--no-progress",
            "--tuning-file", str(target), "--plot", str(tmp_path / "model.png")]
    code, out = run_mpi(2, argv, timeout=240)
    assert code == 0, out[-5000:]
    params = json.loads(target.read_text())
    assert params["source"] == "ringreduce-bench --tune" and params["ranks"] == 2
    for algo in ("ring", "tree", "shm", "mpi", "allgather"):
        p = params["algorithms"][algo]
        assert p["alpha"] >= 0 and p["beta"] >= 0
    assert "auto, full types" in out
    assert (tmp_path / "model.png").stat().st_size > 1000


@pytest.mark.mpi
@pytest.mark.parametrize("kind", ["allgather", "reducescatter", "alltoall"])
def test_bench_collectives_np2(tmp_path, kind):
    out_json = tmp_path / "c.json"
    argv = [sys.executable, "-m", "ringreduce.cli.bench", "--collective", kind, *QUICK,
            "--json", str(out_json)]
    code, out = run_mpi(2, argv, timeout=240)
    assert code == 0, out[-5000:]
    assert f"--collective {kind}" in out and "x mpi" in out, out[-3000:]
    rows = json.loads(out_json.read_text())
    names = {w["column"] for w in rows}
    assert "mpi" in names and ({"rr"} if kind == "alltoall" else {"rr-ring", "rr-shm", "rr-mpi", "rr-auto"}) <= names
    for w in rows:
        assert w["error"] <= (1e-5 if kind == "reducescatter" else 0.0), w


def test_tune_prices_native_as_auto_runs_it(monkeypatch):
    # --tune times its "mpi" candidate through rr.allreduce (the check's handshake and our
    # call around MPI's, as auto runs it); the benchmark's own "mpi" column stays bare MPI.
    import numpy as np
    from mpi4py import MPI

    import ringreduce as rr
    state = {"op": "sum", "dtype": np.dtype(np.float32), "x": np.ones(8, np.float32),
             "y": np.zeros(8, np.float32)}
    plain, = bench.build_columns(["mpi"], [], MPI.COMM_SELF, state)
    routed, = bench.build_columns(["mpi"], [], MPI.COMM_SELF, state, routed_mpi=True)
    assert routed.name == plain.name == "mpi" and routed.ours and not plain.ours
    seen = []
    monkeypatch.setattr(rr, "allreduce", lambda x, op, algorithm, out: seen.append(algorithm))
    plain.call()
    assert seen == [] and np.all(state["y"] == 1)        # MPI_Allreduce on one rank
    routed.call()
    assert seen == ["mpi"]
