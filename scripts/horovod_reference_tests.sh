#!/usr/bin/env bash
# Horovod's own PyTorch test suite against ringreduce.torch, with only the import switched.
#
#   scripts/horovod_reference_tests.sh [HOROVOD_TAG] [NP]      (defaults: v0.28.1, 2)
#
# Downloads test/parallel/test_torch.py of that Horovod tag (Apache-2.0; it is not
# shipped with ringreduce), replaces `import horovod.torch as hvd` by
# `import ringreduce.torch as hvd`, supplies the three helpers it imports from
# Horovod's test/utils/common.py, and runs every test in its own `mpirun -np NP`
# (one failed assertion inside a test's loop leaves the ranks in different calls,
# so a single run would turn one failure into many). Needs network access once,
# torch, pytest and an MPI; not part of the CI suite. Prints one line per test
# and a summary; per-rank logs stay in the work directory it names.
# HOROVOD_TEST_FILE=path uses a copy already on disk instead of downloading;
# ONLY=regex runs the matching tests only.
set -euo pipefail
TAG=${1:-v0.28.1}
NP=${2:-2}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/horovod-tests.XXXXXX")
URL="https://raw.githubusercontent.com/horovod/horovod/${TAG}/test/parallel/test_torch.py"
if [ -n "${HOROVOD_TEST_FILE:-}" ]; then
    cp "$HOROVOD_TEST_FILE" "$WORK/test_torch.py"
else
    curl -fsSL "$URL" -o "$WORK/test_torch.py"
fi
sed -i 's/^import horovod\.torch as hvd$/import ringreduce.torch as hvd/' "$WORK/test_torch.py"
grep -q '^import ringreduce.torch as hvd$' "$WORK/test_torch.py"

cat > "$WORK/common.py" <<'EOF'
"""The helpers Horovod's test_torch.py imports from its test/utils/common.py."""
import contextlib
import os
import tempfile


def mpi_env_rank_and_size():
    for r, s in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if r in os.environ:
            return int(os.environ[r]), int(os.environ[s])
    return 0, 1


def skip_or_fail_gpu_test(test, message):
    test.skipTest(message)


@contextlib.contextmanager
def temppath():
    fd, path = tempfile.mkstemp()
    os.close(fd)
    try:
        yield path
    finally:
        if os.path.exists(path):
            os.remove(path)
EOF

cat > "$WORK/one.sh" <<'EOF'
#!/usr/bin/env bash
cd "$(dirname "$0")"
rank=${OMPI_COMM_WORLD_RANK:-${PMI_RANK:-0}}
exec python -m pytest -q -p no:cacheprovider -rfEs "test_torch.py::TorchTests::$1" > "logs/$1.rank$rank.log" 2>&1
EOF
chmod +x "$WORK/one.sh"
mkdir -p "$WORK/logs"

extra=()
if [ "$NP" -gt "$(nproc)" ]; then extra=(--oversubscribe --mca mpi_yield_when_idle 1); fi
passed=0; failed=0; skipped=0
for t in $(grep -o 'def test_[A-Za-z0-9_]*' "$WORK/test_torch.py" | sed 's/def //' | grep -E "${ONLY:-.}"); do
    if RINGREDUCE_TIMEOUT=${RINGREDUCE_TIMEOUT:-60} timeout 300 mpirun -np "$NP" "${extra[@]}" \
            "$WORK/one.sh" "$t" > "$WORK/logs/$t.mpirun" 2>&1; then
        if grep -q " skipped" "$WORK/logs/$t.rank0.log" && ! grep -q " passed" "$WORK/logs/$t.rank0.log"; then
            echo "SKIP $t"; skipped=$((skipped + 1))
        else
            echo "PASS $t"; passed=$((passed + 1))
        fi
    else
        why=$(grep -h -m1 '^E  ' "$WORK"/logs/"$t".rank*.log 2>/dev/null | head -1 | cut -c1-150 || true)
        echo "FAIL $t  ${why}"; failed=$((failed + 1))
    fi
done
echo "Horovod ${TAG} test_torch.py on ringreduce.torch, np=${NP}: ${passed} passed, ${failed} failed, ${skipped} skipped (logs: $WORK/logs)"
