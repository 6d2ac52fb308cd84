"""Environment tweaks that must happen before MPI is initialised (imported by comm.py).

Open MPI's one-sided "ucx" component prints "OSC UCX component priority set
inside component query failed" for every shared window when the machine has no
RDMA device for UCX to use, although the "sm" component then works fine. We
exclude that component only in that case, and never when the user has chosen
one-sided components themselves.
"""
from __future__ import annotations

import os

__all__ = ["quiet_one_sided_warnings"]


def _has_rdma_device() -> bool:
    try:
        return bool(os.listdir("/sys/class/infiniband"))
    except OSError:
        return False


def quiet_one_sided_warnings() -> bool:
    """Set OMPI_MCA_osc=^ucx when no RDMA device exists and the user set no osc choice.

    Returns True if the environment was changed. Must run before `from mpi4py import MPI`.

    Example::

        from ringreduce._mpi_env import quiet_one_sided_warnings
        quiet_one_sided_warnings()
        from mpi4py import MPI
    """
    if "OMPI_MCA_osc" in os.environ or os.environ.get("OMPI_MCA_pml") == "ucx":
        return False
    if _has_rdma_device():
        return False
    os.environ["OMPI_MCA_osc"] = "^ucx"
    return True
