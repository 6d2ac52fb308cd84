"""NaN is never hidden: Min and Max with a NaN on any one rank give NaN there on every rank,
whatever algorithm "auto" (or the caller) picks at each size band, checked against numpy.

MPI's own MIN/MAX drop a NaN held by the lower rank (Open MPI and MPICH), so native
MPI must not be chosen for float Min/Max, or must be corrected when asked for.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from _common import all_ranks_identical, everyone

import ringreduce as rr

rr.init()
N = rr.size()
R = rr.rank()

# One size per band: tiny path, two-row tiny path, native's band in the default plan,
# shm's replicated and blocked bands.
COUNTS = [1, 7, 700, 20000, 70000, 300000]
ALGORITHMS = ["auto", "mpi", "ring", "tree", "shm"]


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("op", [rr.Min, rr.Max])
@pytest.mark.parametrize("holder", sorted({0, N - 1}))
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, ml_dtypes.bfloat16])
def test_min_max_keep_nan(count, op, holder, algorithm, dtype):
    dtype = np.dtype(dtype)
    if algorithm == "mpi" and dtype.itemsize == 2:
        pytest.skip("native MPI has no half-type reduction")
    rng = np.random.default_rng(count * 31 + holder)
    inputs = [rng.standard_normal(count).astype(dtype) for _ in range(N)]
    where = (count // 2, count - 1)
    for w in where:
        inputs[holder][w] = np.nan
    y = rr.allreduce(inputs[R], op=op, algorithm=algorithm, name=f"nan.{count}")
    ref = inputs[0].astype(np.float64)
    for x in inputs[1:]:
        ref = (np.minimum if op == rr.Min else np.maximum)(ref, x.astype(np.float64))
    assert everyone(bool(np.isnan(y.astype(np.float64))[list(where)].all()))
    assert everyone(bool(np.array_equal(np.isnan(y.astype(np.float64)), np.isnan(ref))))
    finite = ~np.isnan(ref)
    assert everyone(bool(np.array_equal(y.astype(np.float64)[finite], ref[finite])))
    assert all_ranks_identical(y)
