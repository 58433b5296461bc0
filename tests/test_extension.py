"""The compiled extension: built, loadable on a CPU-only machine, CUDA kernels registered and spill-free."""
import os
import re
import shutil

import pytest
import torch

_ext = pytest.importorskip("pskernels._ext", reason="pskernels._C is not built (PSKERNELS_NO_EXT=1?)")
OPS = ("multi_branch_attention", "merge_states", "rotate_keys", "map_kv_caches")
LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "ext-build.log")
CUDA_EXPECTED = torch.version.cuda is not None and shutil.which("nvcc") is not None and \
    os.environ.get("PSKERNELS_NO_CUDA") != "1"


def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pskernels::{op}", "CPU"), op


@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA or no nvcc: the CPU-only extension is built")
def test_cuda_kernels_built_and_registered():
    assert _ext.with_cuda(), "torch has CUDA and nvcc is installed, but the extension was built without CUDA"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pskernels::{op}", "CUDA"), op
    assert ("cuda" in __import__("pskernels").available_backends()) == torch.cuda.is_available()


@pytest.mark.skipif(not (CUDA_EXPECTED and os.path.exists(LOG)), reason="no CUDA build log (build/ext-build.log)")
def test_cuda_kernels_do_not_spill():
    """ptxas -v figures from the build log (make ext): every CUDA kernel at every arch spills nothing."""
    text = open(LOG).read()
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    regs = re.findall(r"Used (\d+) registers", text)
    assert spills and regs, "the build log has no ptxas -v output"
    assert all(a == 0 and b == 0 for a, b in spills), f"register spills in CUDA kernels: {spills}"
    assert max(int(r) for r in regs) <= 255
