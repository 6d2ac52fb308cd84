"""A first allreduce: run with `mpirun -np 4 python scripts/allreduce_example.py`.

Each rank contributes arange(10) * rank; the average is arange(10) * (n-1)/2 on
every rank, bit-identical.
"""
import numpy as np

import ringreduce as rr

rr.init()
x = np.arange(10, dtype=np.float32) * rr.rank()
y = rr.allreduce(x, op=rr.Average, name="example")
expected = np.arange(10, dtype=np.float32) * (rr.size() - 1) / 2
assert np.allclose(y, expected), (y, expected)

h = rr.allreduce_async(np.ones(1 << 20, dtype=np.float32), op=rr.Sum, name="ones")
total = h.wait()                                   # overlapped with whatever ran meanwhile
assert total[0] == rr.size()

w = np.random.default_rng(rr.rank()).random(4)
rr.broadcast_(w, root_rank=0)                      # everyone now holds rank 0's w
if rr.rank() == 0:
    print(f"{rr.size()} ranks agree: {y[:4]} ...; broadcast {w.round(3)}")
