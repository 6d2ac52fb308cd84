"""Build script: the ringreduce package plus its compiled kernels.

Metadata, dependencies and console scripts live in pyproject.toml; this file
only declares the extensions:

* ``ringreduce._C`` (always): the CPU kernels, C++17 + pybind11.
* ``ringreduce._C_cuda`` (when nvcc is found): ``csrc/cuda.cu`` compiled by
  nvcc on its own, linked with a C++ pybind11 binding file and the static CUDA
  runtime.  Without nvcc a notice is printed and the module is skipped;
  ``RINGREDUCE_CUDA=1`` turns a missing nvcc or a failing CUDA build into an
  error, ``RINGREDUCE_CUDA=0`` skips it.  ``RINGREDUCE_CUDA_ARCHS`` overrides
  the architecture list (e.g. ``"90;100"``).

No -ffast-math and no FMA contraction anywhere: the CPU and CUDA kernels must
round every fp32 operation the same way so their bytes are identical.
"""
import os
import re
import shutil
import subprocess
import sys

from pybind11.setup_helpers import Pybind11Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = "csrc"
CXX_FLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"]
# SASS for Ampere, Ada, Hopper, Blackwell (data centre and workstation), plus
# PTX of the newest so later GPUs can JIT it.
DEFAULT_ARCHS = ["80", "86", "89", "90", "100", "120"]
NVCC_FLAGS = ["-O3", "-std=c++17", "--fmad=false", "-ftz=false", "-prec-div=true",
              "-prec-sqrt=true", "-Xcompiler", "-fPIC,-ffp-contract=off"]


def _cuda_mode():
    """'require', 'skip' or 'auto', from RINGREDUCE_CUDA."""
    v = os.environ.get("RINGREDUCE_CUDA", "").strip().lower()
    if v in ("1", "true", "yes", "on"):
        return "require"
    if v in ("0", "false", "no", "off"):
        return "skip"
    return "auto"


def _find_nvcc():
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def _cuda_root(nvcc):
    """The toolkit directory holding include/cuda_runtime.h for this nvcc."""
    # nvcc on PATH may be a symlink or a wrapper script, so also ask nvcc itself.
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    try:
        out = subprocess.run([nvcc, "--dryrun", "--version"], capture_output=True, text=True).stderr
        candidates += re.findall(r"TOP=(\S+)", out)
    except OSError:
        pass
    candidates += [os.environ.get("CUDA_HOME", ""), os.environ.get("CUDA_PATH", ""),
                   "/usr/local/cuda"]
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "include", "cuda_runtime.h")):
            return os.path.realpath(root)
    raise RuntimeError(f"cannot find the CUDA toolkit (include/cuda_runtime.h) for {nvcc}")


def _gencode(archs):
    flags = []
    for a in archs:
        flags += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    flags += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    return flags


class BuildExt(build_ext):
    """build_ext that compiles csrc/*.cu with nvcc for the CUDA extension."""

    def build_extension(self, ext):
        if ext.name != "ringreduce._C_cuda":
            return super().build_extension(ext)
        mode = _cuda_mode()
        nvcc = _find_nvcc()
        if nvcc is None:
            msg = ("ringreduce: nvcc not found (looked at CUDA_HOME, CUDA_PATH, PATH, "
                   "/usr/local/cuda/bin); building without the CUDA kernels")
            if mode == "require":
                raise RuntimeError(msg.replace("building without", "RINGREDUCE_CUDA=1 requires"))
            print("NOTICE: " + msg, file=sys.stderr)
            return
        try:
            self._build_cuda(ext, nvcc)
        except Exception as exc:  # noqa: BLE001 - reported, then optional
            if mode == "require":
                raise
            print(f"NOTICE: ringreduce: CUDA build failed ({exc}); building without the "
                  "CUDA kernels (set RINGREDUCE_CUDA=1 to make this an error)", file=sys.stderr)

    def _build_cuda(self, ext, nvcc):
        root = _cuda_root(nvcc)
        archs = [a.strip() for a in os.environ.get("RINGREDUCE_CUDA_ARCHS", "").replace(",", ";")
                 .split(";") if a.strip()] or DEFAULT_ARCHS
        objdir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        objects = []
        for src in sorted(os.listdir(os.path.join(HERE, CSRC))):
            if not src.endswith(".cu"):
                continue
            obj = os.path.join(objdir, src[:-3] + ".o")
            cmd = [nvcc, "-c", os.path.join(CSRC, src), "-o", obj, "-I" + CSRC,
                   *NVCC_FLAGS, *_gencode(archs)]
            print(" ".join(cmd))
            subprocess.run(cmd, check=True, cwd=HERE)
            objects.append(obj)
        lib = os.path.join(root, "lib64")
        if not os.path.isdir(lib):
            lib = os.path.join(root, "lib")
        ext.include_dirs.append(os.path.join(root, "include"))
        ext.extra_objects = objects
        ext.library_dirs.append(lib)
        # Static runtime: the module then needs only the driver (libcuda) at run time.
        ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        super().build_extension(ext)


ext_modules = [
    Pybind11Extension(
        "ringreduce._C",
        [f"{CSRC}/cpu.cpp", f"{CSRC}/cpu_avx2.cpp", f"{CSRC}/cpu_avx512.cpp",
         f"{CSRC}/bindings.cpp"],
        include_dirs=[CSRC],
        cxx_std=17,
        extra_compile_args=CXX_FLAGS,
    ),
]
if _cuda_mode() != "skip":
    ext_modules.append(Pybind11Extension(
        "ringreduce._C_cuda",
        [f"{CSRC}/bindings_cuda.cpp"],
        include_dirs=[CSRC],
        cxx_std=17,
        extra_compile_args=CXX_FLAGS,
    ))

setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildExt})
