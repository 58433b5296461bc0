"""Loads the compiled extension (``pskernels._C``) that the ``"cpu"`` / ``"cuda"`` backends call.

The extension is built by ``setup.py`` (``pip install -e .``, ``make ext``). If it is missing in a source
checkout, its CPU kernels are JIT-compiled on first use with ninja (a few minutes; a message says so).
``PSKERNELS_NO_EXT=1`` disables it: the package then runs on its Triton / PyTorch backends. Importing this
module raises ImportError, with the reason, when the extension is unavailable.
"""
from __future__ import annotations

import glob
import os
import sys

import torch

_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _jit_build():
    """Compile the CPU kernels (every ``csrc/cpu/*.cpp`` plus ``csrc/bindings.cpp``, which registers the ops)."""
    from torch.utils.cpp_extension import load

    csrc = os.path.join(_ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "cpu", "*.cpp"))) + [os.path.join(csrc, "bindings.cpp")]
    if not os.path.exists(sources[-1]):
        raise ImportError("pskernels._C is not built and the C++ sources are not available for a JIT build")
    print("pskernels: the C++ extension is not built; compiling it now (first use only, a few minutes)...",
          file=sys.stderr)
    return load(name="pskernels_C", sources=sources, extra_include_paths=[os.path.join(csrc, "include"), csrc],
                extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"], extra_ldflags=["-fopenmp"], verbose=False)


def _load():
    if os.environ.get("PSKERNELS_NO_EXT") == "1":
        raise ImportError("pskernels._C unavailable: disabled by PSKERNELS_NO_EXT=1")
    try:
        from .. import _C
    except ImportError:
        try:
            return _jit_build()
        except Exception as e:  # noqa: BLE001 - any build failure leaves the pure-Python backends working
            raise ImportError(f"pskernels._C unavailable: not built and JIT build failed: {type(e).__name__}: {e}") \
                from e
    return _C


# Loading the module runs its TORCH_LIBRARY registrations: torch.ops.pskernels.* exist from here on.
extension = _load()


def with_cuda() -> bool:
    """Whether the loaded extension holds the CUDA kernels (a JIT build holds the CPU kernels only)."""
    return bool(getattr(extension, "with_cuda", False))


def cpu_available() -> bool:
    # Every build holds the CPU kernels, and this module imports only when a build loaded.
    return True


def cuda_available() -> bool:
    return with_cuda() and torch.cuda.is_available()
