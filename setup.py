"""Builds ``pskernels._C`` (CPU kernels, plus CUDA kernels when torch has CUDA and nvcc is found).

Environment:
  PSKERNELS_NO_EXT=1        build no extension (the package then runs on its Triton/PyTorch backends)
  PSKERNELS_NO_CUDA=1       build the CPU kernels only
  TORCH_CUDA_ARCH_LIST      CUDA targets (default "8.0;9.0")
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def cpu_flags():
    """-O3 + OpenMP, and AVX2/FMA when the building CPU has them (the extension is built where it runs).

    -fno-trapping-math (as torch itself is built) lets GCC if-convert the selects of the softmax loops,
    which it otherwise leaves scalar ("control flow in loop")."""
    flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    try:
        with open("/proc/cpuinfo") as f:
            cpu = f.read()
        if " avx2" in cpu and " fma" in cpu:
            flags += ["-mavx2", "-mfma", "-mf16c"]
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
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
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
