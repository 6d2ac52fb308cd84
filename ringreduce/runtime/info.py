"""rr.info(): what this ringreduce is running on, for humans and bug reports."""
from __future__ import annotations

from ..compression import kernels
from ..core import config
from ..core import device as _device
from ..core.mpi import MPI
from ..policy import learn
from . import context as _comm


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
    extensions = {"cpu": kernels.available(), "cuda": kernels.cuda_available()}
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
        "node_id_source": "RINGREDUCE_NODE_ID" if config.text("RINGREDUCE_NODE_ID") else "MPI COMM_TYPE_SHARED",
        "extensions": extensions,
        "cuda": _device.describe(),   # device buffers: cuda-aware or staged, and why
        "mismatch_check": config.check_enabled(),
        "algorithm_override": config.algorithm_override(),
        "algorithm_table": ctx.plan.describe(),
        "learning": _learning(ctx),
        "learned": {chan.label: chan.learner.describe() for chan in ctx.channels()
                    if chan.learner is not None and chan.learner.bands},
    }


def _learning(ctx) -> str:
    if not ctx.plan.learn:
        return "off (auto follows the plan: a tuning file measured this shape, or RINGREDUCE_LEARN=0)"
    path = learn.cache_path()
    return f"on (learned cache: {path})" if path is not None else "on (no cache: RINGREDUCE_LEARNED=off)"


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("ringreduce")
    except Exception:
        return "unknown"
