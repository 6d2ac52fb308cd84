"""rr.info(): what this ringreduce is running on, for humans and bug reports."""
from __future__ import annotations

import os

from mpi4py import MPI

from . import comm as _comm
from . import device as _device
from .algorithms import select


def mpi_vendor() -> tuple[str, str]:
    """(vendor, version string) of the MPI library mpi4py loaded."""
    name, version = MPI.get_vendor()
    return name, ".".join(map(str, version))


def info() -> dict:
    """A dict describing the MPI library, ranks and nodes, extensions and the algorithm table.

    Example::

        import ringreduce as rr, pprint
        pprint.pprint(rr.info())
    """
    ctx = _comm.context()
    vendor, version = mpi_vendor()
    try:
        from . import kernels
        extensions = {"cpu": kernels.available(), "cuda": getattr(kernels, "cuda_available", lambda: False)()}
    except ImportError:
        extensions = {"cpu": False, "cuda": False}
    return {
        "version": _package_version(),
        "mpi_vendor": vendor,
        "mpi_version": version,
        "mpi_library": MPI.Get_library_version().strip().splitlines()[0],
        "mpi4py": __import__("mpi4py").__version__,
        "thread_level": _comm.thread_level(),
        "async": "background thread" if _comm.thread_multiple() else "calling thread (no overlap)",
        "rank": ctx.rank,
        "size": ctx.size,
        "local_rank": ctx.local_rank,
        "local_size": ctx.local_size,
        "nodes": ctx.num_nodes,
        "node_id_source": "RINGREDUCE_NODE_ID" if os.environ.get("RINGREDUCE_NODE_ID") else "MPI COMM_TYPE_SHARED",
        "extensions": extensions,
        "cuda": _device.describe(),   # device buffers: cuda-aware or staged, and why
        "mismatch_check": os.environ.get("RINGREDUCE_CHECK", "1") not in ("0", "false", "off"),
        "algorithm_override": os.environ.get("RINGREDUCE_ALGORITHM"),
        "algorithm_table": select.table(),
    }


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("ringreduce")
    except Exception:
        return "unknown"
