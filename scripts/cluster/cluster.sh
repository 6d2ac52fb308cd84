#!/bin/bash
# Emulated cluster (network namespaces + tc rate limits + Open MPI); see docs/cluster.md.
#   scripts/cluster/cluster.sh run --nodes 2 --ranks-per-node 1 --rate 1gbit -- python x.py
# Uses the Python next to mpirun (the venv's) when one is active, else python3.
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${RRC_PYTHON:-$(command -v python || command -v python3)}
exec "$py" "$here/cluster.py" "$@"
