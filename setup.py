"""Builds ``pskernels._C`` (CPU kernels, plus CUDA kernels when torch has CUDA and nvcc is found).

Environment:
  PSKERNELS_NO_EXT=1        build no extension (the package then runs on its Triton/PyTorch backends)
  PSKERNELS_NO_CUDA=1       build the CPU kernels only
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0")

The kernels are compiled against the torch of the environment they are installed into, so installing needs
that torch importable at build time: ``pip install --no-build-isolation .``. Without torch, metadata and the
sdist still build; a command that compiles stops with TORCH_MISSING instead of an ImportError traceback.
"""
import glob
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))

TORCH_MISSING = """
error: pskernels compiles its C++/CUDA kernels against the torch of the environment it is installed into,
and torch is not importable in this build environment (pip's default build isolation builds in a fresh
environment without it). Install torch first, then rerun with build isolation off:

    pip install --no-build-isolation .          (in a source checkout; or the path of the sdist)

To install without the compiled kernels (Triton / PyTorch backends only), set PSKERNELS_NO_EXT=1 instead.
"""


class TorchMissing(build_ext):
    """The build_ext of a build without torch: stops with one message (SystemExit prints no traceback)."""

    def run(self):
        raise SystemExit(TORCH_MISSING)


def cpu_flags():
    """-O3 + OpenMP, and AVX2/FMA (AVX-512 too) when the building CPU has them (the extension is built where it
    runs). AVX-512 made the softmax loops of the CPU attention 12% faster on the 2-core Xeon VM (a 16-row decode
    step over a 4096-token shared prefix: 1.19 -> 1.07 ms).

    -fno-trapping-math (as torch itself is built) lets GCC if-convert the selects of the softmax loops,
    which it otherwise leaves scalar ("control flow in loop")."""
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
        if " avx2" in cpu and " fma" in cpu:
            flags += ["-mavx2", "-mfma", "-mf16c"]
        if " avx512f" in cpu and " avx512vl" in cpu and " avx512bw" in cpu and " avx512dq" in cpu:
            flags += ["-mavx512f", "-mavx512vl", "-mavx512bw", "-mavx512dq", "-mprefer-vector-width=512"]
    except OSError:
        pass
    return flags


def extensions():
    if os.environ.get("PSKERNELS_NO_EXT") == "1":
        return [], {}
    # torch locates the toolkit from `which nvcc`; a wrapper in /usr/local/bin would make that /usr/local,
    # which has no lib64/libcudart. Prefer the standard toolkit folder when it is there.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ and os.path.isdir("/usr/local/cuda/lib64"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    try:
        import torch
    except ImportError:
        # Declared so that every command that compiles it (bdist_wheel, editable_wheel, build_ext) reaches
        # TorchMissing, while metadata and sdist commands, which never compile, still work.
        return [Extension("pskernels._C", sources)], {"build_ext": TorchMissing}
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    include = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx = cpu_flags()
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    with_cuda = (bool(cuda_sources) and torch.version.cuda is not None and CUDA_HOME is not None
                 and os.environ.get("PSKERNELS_NO_CUDA") != "1")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        import site

        for sp in site.getsitepackages():  # cusparse.h & co. ship in the nvidia wheels, not the toolkit
            cand = os.path.join(sp, "nvidia", "cu13", "include")
            if os.path.isdir(cand):
                include.append(cand)
        ext = CUDAExtension(
            "pskernels._C",
            sources + cuda_sources,
            include_dirs=include,
            define_macros=[("PSKERNELS_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx + ["-DPSKERNELS_WITH_CUDA"],
                                "nvcc": ["-O3", "-std=c++20", "-lineinfo", "-Xptxas", "-v", "--use_fast_math",
                                         "-DPSKERNELS_WITH_CUDA"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("pskernels._C", sources, include_dirs=include, extra_compile_args=cxx,
                           extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
