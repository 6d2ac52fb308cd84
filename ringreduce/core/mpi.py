"""The one place mpi4py's MPI module is loaded, with the settings that must precede MPI_Init.

ringreduce asks for MPI_THREAD_MULTIPLE (the engine thread communicates while
the user's thread does too), unless the user initialised MPI first.

Open MPI's one-sided "ucx" component prints "OSC UCX component priority set
inside component query failed" for every shared window when the machine has no
RDMA device for UCX to use, although the "sm" component then works fine. We
exclude that component only in that case, and never when the user has chosen
one-sided components themselves. Both settings only take effect when
ringreduce is imported before mpi4py.MPI (docs/quickstart.md says so): a
program that imports mpi4py.MPI first keeps its own thread level, and can set
OMPI_MCA_osc=^ucx itself.

Example::

    from ringreduce.core.mpi import MPI   # instead of `from mpi4py import MPI`
"""
from __future__ import annotations

import os
import sys

import mpi4py

__all__ = ["MPI", "quiet_one_sided_warnings", "user_initialised_first"]


def _has_rdma_device() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def quiet_one_sided_warnings() -> bool:
    """Set OMPI_MCA_osc=^ucx when no RDMA device exists and the user set no osc choice.

    Returns True if the environment was changed. Must run before `from mpi4py import MPI`.
    """
    if "OMPI_MCA_osc" in os.environ or os.environ.get("OMPI_MCA_pml") == "ucx":
        return False
    if _has_rdma_device():
        return False
    os.environ["OMPI_MCA_osc"] = "^ucx"
    return True


user_initialised_first = "mpi4py.MPI" in sys.modules
if not user_initialised_first:
    mpi4py.rc.thread_level = "multiple"
    quiet_one_sided_warnings()

from mpi4py import MPI  # noqa: E402
