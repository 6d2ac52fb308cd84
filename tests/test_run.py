"""ringreduce-run: command lines for Open MPI and hydra (MPICH, Intel MPI) with fake launchers,
host lists and files, OMP_NUM_THREADS, --dry-run, and one real --check."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ringreduce.cli import run

VERSIONS = {
    "openmpi": "mpirun (Open MPI) 5.0.11\n\nReport bugs to https://www.open-mpi.org/community/help/",
    "mpich": "HYDRA build details:\n    Version:                                 4.2.0",
    "intel": "Intel(R) MPI Library for Linux* OS, Version 2021.10 Build 20230619",
}


def _fake(tmp_path, vendor):
    """An executable that answers --version like the vendor's launcher and echoes its argv."""
    path = tmp_path / vendor / "mpirun"
    path.parent.mkdir()
    text = VERSIONS[vendor].replace("'", "")
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = --version ]; then echo '{text}'; exit 0; fi\n"
                    "echo ARGS \"$@\"; echo OMP=$OMP_NUM_THREADS\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("vendor", ["openmpi", "mpich", "intel"])
def test_vendor_detection(tmp_path, vendor):
    assert run.vendor_of(_fake(tmp_path, vendor)) == vendor


def test_openmpi_command_line():
    ln = run.Launcher("/x/mpirun", "openmpi")
    env = {"OMP_NUM_THREADS": "4", "PATH": "/p", "RINGREDUCE_TIMEOUT": "60", "HOME": "/h"}
    cmd = run.build_command(ln, 8, ["python", "t.py"], hosts=[("a", 4), ("b", 4)], env=env,
                            as_root=True, bind_none=True, extra=["--mca", "btl", "tcp,self"])
    assert cmd == ["/x/mpirun", "-np", "8", "-H", "a:4,b:4", "--allow-run-as-root", "--bind-to", "none",
                   "--map-by", "slot", "-x", "OMP_NUM_THREADS", "-x", "PATH", "-x", "RINGREDUCE_TIMEOUT",
                   "--mca", "btl", "tcp,self", "python", "t.py"]
    over = run.build_command(ln, 5, ["p"], oversubscribe=True)
    assert over == ["/x/mpirun", "-np", "5", "--oversubscribe", "--mca", "mpi_yield_when_idle", "1", "p"]


@pytest.mark.parametrize("vendor", ["mpich", "intel"])
def test_hydra_command_line(vendor):
    ln = run.Launcher("/x/mpiexec", vendor)
    cmd = run.build_command(ln, 4, ["python", "t.py"], hosts=[("a", 2), ("b", 2)],
                            env={"OMP_NUM_THREADS": "8", "RINGREDUCE_CHECK": "0"}, as_root=True,
                            oversubscribe=True)
    assert cmd == ["/x/mpiexec", "-n", "4", "-hosts", "a:2,b:2", "-genv", "OMP_NUM_THREADS", "8",
                   "-genv", "RINGREDUCE_CHECK", "0", "python", "t.py"]
    assert "--allow-run-as-root" not in cmd and "--oversubscribe" not in cmd


def test_hosts_and_hostfile(tmp_path):
    assert run.parse_hosts("a:2,b:3,c") == [("a", 2), ("b", 3), ("c", 1)]
    f = tmp_path / "hosts"
    f.write_text("# cluster\nn1 slots=4 max_slots=8\nn2:2\nn3\n\n")
    assert run.read_hostfile(str(f)) == [("n1", 4), ("n2", 2), ("n3", 1)]
    assert run.ranks_per_node(6, [("a", 4), ("b", 4)]) == 4
    assert run.ranks_per_node(16, [("a", 4), ("b", 4)]) == 8       # wraps around: 8 per node
    assert run.ranks_per_node(3, None) == 3


def test_omp_threads_per_rank():
    cores = os.cpu_count() or 1
    env = run.launch_env({}, np=1, per_node=1)
    assert env["OMP_NUM_THREADS"] == str(cores)
    assert run.launch_env({}, np=64, per_node=64)["OMP_NUM_THREADS"] == "1"
    assert run.launch_env({"OMP_NUM_THREADS": "3"}, np=2)["OMP_NUM_THREADS"] == "3"


@pytest.mark.parametrize("vendor", ["openmpi", "mpich"])
def test_cli_dry_run_and_launch(tmp_path, vendor, capsys):
    fake = _fake(tmp_path, vendor)
    assert run.main(["--launcher", fake, "-np", "4", "-H", "n1:2,n2:2", "--mpi-args=-v",
                     "--dry-run", "python", "train.py", "--lr", "0.1"]) == 0
    line = capsys.readouterr().out.strip()
    flag, hosts = ("-np", "-H") if vendor == "openmpi" else ("-n", "-hosts")
    assert f"{fake} {flag} 4 {hosts} n1:2,n2:2" in line
    assert line.endswith("-v python train.py --lr 0.1")
    cores = os.cpu_count() or 1
    assert line.startswith(f"OMP_NUM_THREADS={max(1, cores // 2)} ")
    # A real launch through the fake launcher: the argv and OMP_NUM_THREADS arrive.
    out = subprocess.run([sys.executable, "-m", "ringreduce.cli.run", "--launcher", fake, "-np", "1",
                          "python", "x.py"], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}).stdout
    assert "ARGS" in out and out.rstrip().endswith(f"OMP={cores}") and "python x.py" in out


def test_cli_needs_np_and_command(capsys):
    with pytest.raises(SystemExit):
        run.main(["--launcher", "/bin/true", "python", "x.py"])
    with pytest.raises(SystemExit):
        run.main(["--launcher", "/bin/true", "-np", "2"])


@pytest.mark.mpi
def test_check_reports_the_mpi():
    out = subprocess.run([sys.executable, "-m", "ringreduce.cli.run", "--check"], capture_output=True,
                         text=True, timeout=120).stdout
    for key in ("launcher:", "MPI:", "thread level:", "CUDA-aware MPI:", "extensions built:",
                "tuning file:", "mismatch check:"):
        assert key in out, out


# The job scripts' bodies, run here with the scheduler's variables faked and a tiny program.
TINY = ("import os, numpy as np, ringreduce as rr; rr.init(); "
        "y = rr.allreduce(np.ones(3, np.float32), op=rr.Sum, name='t'); "
        "print(f'TINY rank {rr.rank()}/{rr.size()} sum {y[0]:.0f} omp {os.environ[\"OMP_NUM_THREADS\"]} "
        "timeline {os.environ.get(\"RINGREDUCE_TIMELINE\")}', flush=True)")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _job(script, tmp_path, env):
    tiny = tmp_path / "tiny.py"
    tiny.write_text(TINY.replace("; ", "\n"))
    full = {**os.environ, "RR_TRAIN": f"{sys.executable} {tiny}", "RR_OUT_DIR": str(tmp_path / "out"),
            "PYTHONPATH": ROOT, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
            **env}
    full.pop("OMP_NUM_THREADS", None)
    return subprocess.run(["bash", os.path.join(ROOT, script)], env=full, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)


@pytest.mark.mpi
def test_slurm_script_with_mpirun(tmp_path):
    p = _job("scripts/slurm/train.sbatch", tmp_path, {
        "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1", "SLURM_SUBMIT_DIR": str(tmp_path),
        "RR_LAUNCH": "mpirun", "RR_TIMELINE": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    for r in (0, 1):
        assert f"TINY rank {r}/2 sum 2 omp 1 timeline {tmp_path}/out/timeline.{{rank}}.json" in p.stdout
    assert (tmp_path / "out" / "timeline.0.json").exists()


def test_slurm_script_with_srun(tmp_path):
    """srun is the default launcher: a stand-in srun records its options and runs one rank."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "srun").write_text("#!/bin/sh\necho SRUN \"$@\"\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\n"
                                 "exec \"$@\"\n")
    (bindir / "srun").chmod(0o755)
    p = _job("scripts/slurm/train.sbatch", tmp_path, {
        "SLURM_JOB_ID": "78", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "n1", "SLURM_CPUS_PER_TASK": "2",
        "PATH": f"{bindir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "SRUN --mpi=pmix --kill-on-bad-exit=1 --cpu-bind=none" in p.stdout
    assert "TINY rank 0/1 sum 1 omp 2" in p.stdout


@pytest.mark.mpi
def test_pbs_script(tmp_path):
    nodefile = tmp_path / "nodefile"
    nodefile.write_text("localhost\nlocalhost\n")
    p = _job("scripts/pbs/train.pbs", tmp_path, {"PBS_NODEFILE": str(nodefile), "PBS_JOBID": "99.server",
                                                 "PBS_O_WORKDIR": str(tmp_path), "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stdout + p.stderr
    assert "TINY rank 0/2 sum 2" in p.stdout and "TINY rank 1/2 sum 2" in p.stdout
    assert (tmp_path / "out" / "hosts").read_text() == "localhost slots=2\n"
