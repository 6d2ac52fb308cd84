#!/usr/bin/env bash
# The core multi-rank tests again with MPICH (the `mpich` PyPI wheel) instead of Open MPI.
#   bash scripts/ci_mpich.sh [venv dir]     (default /tmp/rr-ci-mpich)
# mpi4py picks the MPI library at run time, so a second venv with the mpich wheel is enough;
# ringreduce itself comes from this checkout through PYTHONPATH (its extension is built by the
# main install, same Python), so nothing is rebuilt here.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-/tmp/rr-ci-mpich}
[ $# -gt 0 ] && shift
py=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q mpi4py mpich numpy ml_dtypes tqdm pytest
fi
"$venv/bin/python" -c "from mpi4py import MPI; v = MPI.Get_library_version(); assert 'MPICH' in v, v; print(v.splitlines()[0])"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# MPICH's mpiexec first on PATH: the job scripts under test call the launcher they find there,
# and an Open MPI mpirun from another venv cannot start MPICH ranks (PMIx vs PMI).
# Drop an activated Open MPI venv from PATH too, so its ringreduce-run is not picked up either.
if [ -n "${VIRTUAL_ENV:-}" ]; then
  PATH=$(printf '%s' "$PATH" | tr ':' '\n' | grep -vxF "$VIRTUAL_ENV/bin" | paste -sd: -)
fi
export PATH="$venv/bin:$PATH"
unset OMPI_ALLOW_RUN_AS_ROOT OMPI_ALLOW_RUN_AS_ROOT_CONFIRM
# np 1, 2, 4 of the core suites, the fault/stall/timeline cases and the launcher tests.
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_mpi.py -k "core_suites[1] or core_suites[2] or core_suites[4]" "$@"
"$venv/bin/python" -m pytest -q -p no:cacheprovider tests/test_faults.py tests/test_run.py \
    tests/test_reliability.py "$@"
