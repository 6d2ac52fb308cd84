"""The emulated cluster (scripts/cluster): namespaces as nodes, rate-limited links, Open MPI.

Builds small clusters, runs allreduces across them (native MPI and ringreduce's ring),
checks results against numpy, the node split, and that the expected bytes crossed the
emulated links; then checks everything was torn down. Needs root and `ip netns`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLUSTER_DIR = ROOT / "scripts" / "cluster"

_spec = importlib.util.spec_from_file_location("rr_cluster", CLUSTER_DIR / "cluster.py")
cluster = importlib.util.module_from_spec(_spec)
sys.modules["rr_cluster"] = cluster          # dataclasses look the module up by name
_spec.loader.exec_module(cluster)

_ok, _why = cluster.can_create_namespaces()
needs_netns = pytest.mark.skipif(not _ok, reason=f"cannot create network namespaces: {_why}")

MIB = 2**20


def _leftovers(run_id: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    left = [ns for ns in out.split() if ns.startswith(f"rrc-{run_id}-")]
    left += [w for w in links.split() if w.startswith(f"rc{run_id}")]
    if (cluster.STATE_ROOT / run_id).exists():
        left.append(str(cluster.STATE_ROOT / run_id))
    return left


def _run(run_id: str, nodes: int, ranks: int, mib: float, algorithms: str, tmp_path: Path):
    """cluster.py run ... check_allreduce.py; returns (per-algorithm records, counters json)."""
    summary = tmp_path / "counters.json"
    cmd = [sys.executable, str(CLUSTER_DIR / "cluster.py"), "run", "--nodes", str(nodes),
           "--ranks-per-node", str(ranks), "--rate", "1gbit", "--timeout", "90",
           "--run-id", run_id, "--json", str(summary), "--",
           sys.executable, str(CLUSTER_DIR / "check_allreduce.py"), "--mib", str(mib),
           "--algorithms", algorithms]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    records = {r["algorithm"]: r for r in
               (json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))}
    assert set(records) == set(algorithms.split(",")), out[-8000:]
    assert _leftovers(run_id) == [], f"run {run_id} left {_leftovers(run_id)}"
    return records, json.loads(summary.read_text()), out


@pytest.mark.netns
@pytest.mark.mpi
@needs_netns
def test_allreduce_two_nodes_crosses_link(tmp_path):
    """2 nodes x 1 rank, 4 MiB fp32: native and ring both right, ~4 MiB each way per call."""
    run_id = f"t{os.getpid() % 4096:x}"
    records, summary, out = _run(run_id, 2, 1, 4, "mpi,ring", tmp_path)
    for alg, rec in records.items():
        assert rec["ok"] and rec["max_err"] == 0.0, (alg, rec)
        assert rec["nodes"] == 2 and rec["shared_groups"] == 2, (alg, rec)
        assert len(rec["node_bytes"]) == 2, rec
        for node, (sent, received) in rec["node_bytes"].items():
            # A 2-rank allreduce of S bytes sends S each way (ring: 2 * (n-1)/n * S); allow
            # TCP/IP headers (~3%) and the barriers, nothing like a second copy.
            for moved in (sent, received):
                assert 4 * MIB <= moved <= 4.4 * MIB, (alg, node, rec["node_bytes"])
    assert records["ring"]["rr_nodes"] == 2
    # The counters read from outside the namespaces (switch ports) saw both calls.
    for node, d in summary["bytes"].items():
        assert d["sent"] >= 8 * MIB and d["received"] >= 8 * MIB, summary["bytes"]
    assert "# link bytes" in out


@pytest.mark.netns
@pytest.mark.mpi
@needs_netns
def test_two_nodes_two_ranks_node_split(tmp_path):
    """2 nodes x 2 ranks: MPI and ringreduce both see 2 nodes; ring crosses 1.5 x S per link."""
    run_id = f"u{os.getpid() % 4096:x}"
    records, _, _ = _run(run_id, 2, 2, 1, "mpi,ring", tmp_path)
    for alg, rec in records.items():
        assert rec["ok"] and rec["ranks"] == 4, (alg, rec)
        assert rec["nodes"] == 2 and rec["shared_groups"] == 2, (alg, rec)
    assert records["ring"]["rr_nodes"] == 2
    # Ring 0-1-2-3: edges 1->2 and 3->0 cross the links, each carrying 2 * (4-1)/4 * S.
    for node, (sent, received) in records["ring"]["node_bytes"].items():
        for moved in (sent, received):
            assert 1.5 * MIB <= moved <= 1.7 * MIB, records["ring"]["node_bytes"]


def _can_connect(ns: str, addr: str, port: int) -> bool:
    code = ("import socket,sys\ntry:\n socket.create_connection((sys.argv[1],int(sys.argv[2])),"
            "timeout=1).close()\nexcept OSError:\n sys.exit(1)")
    return subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-c", code, addr,
                           str(port)], timeout=20).returncode == 0


@pytest.mark.netns
@needs_netns
def test_linkdown_and_down_cleans_leftovers():
    """linkdown stops traffic, linkup restores it; down() finds a run even without its state."""
    run_id = f"v{os.getpid() % 4096:x}"
    c = cluster.up(2, "1gbit", run_id=run_id)
    server = None
    try:
        n0, n1 = c.nodes
        server = subprocess.Popen(
            ["ip", "netns", "exec", n1.ns, sys.executable, "-c",
             "import socket,sys,time\ns=socket.socket();s.bind((sys.argv[1],5399));s.listen(8)\n"
             "print('ready',flush=True);time.sleep(60)", n1.addr], stdout=subprocess.PIPE,
            text=True)
        assert server.stdout.readline().strip() == "ready"
        assert _can_connect(n0.ns, n1.addr, 5399)
        cluster.set_link(c, 1, False)
        assert not _can_connect(n0.ns, n1.addr, 5399)
        cluster.set_link(c, "1", True)
        assert _can_connect(n0.ns, n1.addr, 5399)
        before = cluster.read_counters(c)
        assert before[n0.ns]["sent"] > 0
    finally:
        # Simulate a crashed run: the state is gone, down() must still find everything.
        import shutil
        shutil.rmtree(c.state_dir)
        removed = cluster.down(run_id)
        if server:
            server.wait(timeout=10)      # the namespace's processes were stopped by down()
    assert set(removed) >= {n.ns for n in c.nodes} | {c.bridge}
    assert _leftovers(run_id) == []


def test_parse_rate_and_names():
    assert cluster.parse_rate("1gbit") == 10**9
    assert cluster.parse_rate("500mbit") == 5 * 10**8
    assert cluster.parse_rate("none") == 0
    with pytest.raises(cluster.ClusterError):
        cluster.parse_rate("fast")
    with pytest.raises(cluster.ClusterError):
        cluster.up(2, run_id="Bad-ID")


@pytest.mark.netns
@pytest.mark.mpi
@needs_netns
def test_hierarchical_two_by_two_halves_link_bytes(tmp_path):
    """2 nodes x 2 ranks, 1 MiB: hierarchical is exact and sends S per link (ring: 1.5 S);
    auto picks it (the cost model across nodes) and moves the same bytes."""
    run_id = f"w{os.getpid() % 4096:x}"
    records, _, _ = _run(run_id, 2, 2, 1, "ring,hierarchical,auto", tmp_path)
    assert records["auto"]["chosen"] == "hierarchical", records["auto"]
    for alg in ("hierarchical", "auto"):
        rec = records[alg]
        # ok: exact on every rank and bit-identical across ranks.
        assert rec["ok"] and rec["max_err"] == 0.0 and rec["rr_nodes"] == 2, rec
        # One leader per node: 2 * (2-1)/2 * S = S each way; the node-local steps stay in memory.
        for node, (sent, received) in rec["node_bytes"].items():
            for moved in (sent, received):
                assert 1.0 * MIB <= moved <= 1.15 * MIB, (alg, rec["node_bytes"])


@pytest.mark.netns
@pytest.mark.mpi
@needs_netns
def test_link_down_ends_job_with_timeout_error():
    """A link cut mid-run: RINGREDUCE_TIMEOUT turns it into a clear error, the job ends, no hang."""
    run_id = f"x{os.getpid() % 4096:x}"
    cmd = [sys.executable, str(CLUSTER_DIR / "cluster.py"), "run", "--nodes", "2",
           "--ranks-per-node", "2", "--rate", "1gbit", "--timeout", "90", "--run-id", run_id,
           "--linkdown", "1@10", "--", sys.executable, str(CLUSTER_DIR / "loop_allreduce.py"),
           "--seconds", "60", "--algorithm", "hierarchical"]
    env = dict(os.environ, RINGREDUCE_TIMEOUT="5", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    import time
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    took = time.monotonic() - t0
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 124), out[-6000:]        # failed, not killed by the backstop
    assert "link of" in out and "down at 10.0 s" in out, out[-6000:]
    assert "timed out after 5 s (RINGREDUCE_TIMEOUT=5)" in out, out[-6000:]
    # It was running before the cut: rank 0's once-a-second lines (the cut comes 10 s after
    # the launch, which took up to 6 s on a loaded 2-core machine).
    assert re.search(r"^\s*\d+\.\d s: \d+ allreduces$", out, re.M), out[-6000:]
    assert took < 60, f"took {took:.0f} s"                      # far below the job's 60 s loop
    assert _leftovers(run_id) == [], f"run {run_id} left {_leftovers(run_id)}"


@pytest.mark.netns
@pytest.mark.mpi
@needs_netns
def test_gloo_meets_across_nodes(tmp_path):
    """torch DDP's peer: gloo meets at node 0's address, binds the node's link, moves S per call."""
    pytest.importorskip("torch")
    run_id = f"g{os.getpid() % 4096:x}"
    cmd = [sys.executable, str(CLUSTER_DIR / "cluster.py"), "run", "--nodes", "2",
           "--rate", "1gbit", "--timeout", "90", "--run-id", run_id, "--",
           sys.executable, str(CLUSTER_DIR / "check_gloo.py"), "--mib", "1"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=150, env=env, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    rec = next(json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{"))
    assert rec["ok"] and rec["ranks"] == 2, rec
    # cluster.py overrides a caller's 127.0.0.1 with node 0's address (10.231.X.2).
    assert rec["master_addr"].startswith(cluster.SUBNET_BASE + "."), rec
    assert rec["ifname"] and rec["ifname"].startswith(f"rc{run_id}n"), rec
    for node, (sent, received) in rec["node_bytes"].items():
        for moved in (sent, received):
            assert 1.0 * MIB <= moved <= 1.2 * MIB, rec["node_bytes"]
    assert _leftovers(run_id) == [], f"run {run_id} left {_leftovers(run_id)}"
