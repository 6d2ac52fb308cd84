"""Build script: the pure-Python package plus the ringreduce._C extension (C++).

The C++/CUDA kernels are added by the quantize-kernels work; until then this
builds the Python package only.
"""
from setuptools import setup

setup()
