"""Build entry point.

The C++/CUDA extension (`pskernels._C`) will be declared here and built with
`torch.utils.cpp_extension`; until its sources exist the package is pure Python and
every op runs on its Triton or PyTorch backend.
"""
from setuptools import setup

setup()
