"""The compiled extension: built, loadable on a CPU-only machine, CUDA kernels registered and spill-free."""
import os
import re
import shutil

import pytest
import torch

_ext = pytest.importorskip("pskernels._ext", reason="pskernels._C is not built (PSKERNELS_NO_EXT=1?)")
OPS = ("multi_branch_attention", "merge_states", "rotate_keys", "map_kv_caches")
# ptxas -v lines of the last build that ran nvcc (the Makefile's ext target)
LOG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build", "cuda-ptxas.log")
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


@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA or no nvcc: no CUDA kernels are compiled")
def test_cuda_kernels_do_not_spill():
    """ptxas -v figures of the CUDA build (make ext): every CUDA kernel at every arch spills nothing."""
    assert os.path.exists(LOG), f"{LOG} is missing: build the extension with `make ext`"
    text = open(LOG).read()
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    regs = re.findall(r"Used (\d+) registers", text)
    assert spills and regs, "the build log has no ptxas -v output"
    assert all(a == 0 and b == 0 for a, b in spills), f"register spills in CUDA kernels: {spills}"
    assert max(int(r) for r in regs) <= 255


_CPU_ATTENTION_CHECK = r"""
import torch, pskernels
torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16):
    for Lq, G in ((32, 3), (5, 4), (1, 8)):   # BLAS-sized chunks and the decode loops
        q = torch.randn(2, 2 * G, Lq, 40, dtype=dtype)
        lens = (17, 300, 0, Lq)
        ks = [torch.randn(2, 2, n, 40, dtype=dtype) for n in lens]
        vs = [torch.randn(2, 2, n, 24, dtype=dtype) for n in lens]
        kw = dict(seq_lens=torch.tensor([[17, 9], [300, 280], [0, 0], [Lq, Lq]]), softcap=20.0)
        o, l = pskernels.multi_branch_attention(q, ks, vs, backend="cpu", **kw)
        ro, rl = pskernels.multi_branch_attention(q.float(), [k.float() for k in ks], [v.float() for v in vs],
                                                  backend="torch", **kw)
        worst = max(worst, (o.float() - ro).abs().max().item() / (2e-2 if dtype == torch.bfloat16 else 1e-5))
        assert torch.allclose(l, rl, atol=1e-4, rtol=1e-4), (dtype, Lq)
print("WORST", worst)
"""


@pytest.mark.parametrize("blas", ["0", "1"])
def test_cpu_attention_with_and_without_blas(blas):
    """The CPU kernel's BLAS path (libtorch's sgemm, found at run time) and its own loops (no BLAS, or
    PSKERNELS_CPU_BLAS=0) agree with the reference. A subprocess, since the choice is made once per process."""
    import subprocess
    import sys

    env = dict(os.environ, PSKERNELS_CPU_BLAS=blas)
    res = subprocess.run([sys.executable, "-c", _CPU_ATTENTION_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("WORST")[1])
    assert worst <= 1.0, f"max error {worst:.2f}x the tolerance"
