"""The compiled extension: built, loadable on a CPU-only machine, CUDA kernels registered and spill-free."""
import glob
import os
import re
import shutil

import pytest
import torch

import pskernels

loader = pytest.importorskip("pskernels._ext.loader", reason="pskernels._C is not built (PSKERNELS_NO_EXT=1?)",
                             exc_type=ImportError)
OPS = ("multi_branch_attention", "merge_states", "rotate_keys", "map_kv_caches")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# ptxas -v lines of the CUDA sources as last compiled (the Makefile's ext target keeps them per source)
LOG = os.path.join(ROOT, "build", "cuda-ptxas.log")
CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
CUDA_EXPECTED = torch.version.cuda is not None and shutil.which("nvcc") is not None and \
    os.environ.get("PSKERNELS_NO_CUDA") != "1"


def test_cpu_kernels_registered():
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pskernels::{op}", "CPU"), op


@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA or no nvcc: the CPU-only extension is built")
def test_cuda_kernels_built_and_registered():
    assert loader.with_cuda(), "torch has CUDA and nvcc is installed, but the extension was built without CUDA"
    for op in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"pskernels::{op}", "CUDA"), op
    assert ("cuda" in __import__("pskernels").available_backends()) == torch.cuda.is_available()


def _kernels_of(source):
    """Names of the __global__ functions defined in a .cu file."""
    text = open(source).read()
    return re.findall(r"__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*\(", text)


def _ptxas_entries(text):
    """(mangled kernel name, arch, spill stores, spill loads, registers) per entry function in ptxas -v output."""
    entries, current = [], None
    for line in text.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)' for '(sm_\d+)'", line):
            current = [m[1], m[2]]
        elif current is not None and len(current) == 2 and (
                m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            current += [int(m[1]), int(m[2])]
        elif current is not None and len(current) == 4 and (m := re.search(r"Used (\d+) registers", line)):
            entries.append((*current, int(m[1])))
            current = None
    return entries


def test_each_op_has_its_kernel_files():
    """An op's kernels are found by its name: csrc/cpu/<op>.cpp and csrc/cuda/<op>.cu. Each .cu defines kernels
    (the spill test below reads their names from the sources)."""
    for op in OPS:
        for path in (os.path.join("cpu", f"{op}.cpp"), os.path.join("cuda", f"{op}.cu")):
            assert os.path.exists(os.path.join(ROOT, "csrc", path)), path
    assert all(_kernels_of(s) for s in CUDA_SOURCES), {os.path.basename(s): _kernels_of(s) for s in CUDA_SOURCES}


@pytest.mark.skipif(not CUDA_EXPECTED, reason="torch without CUDA or no nvcc: no CUDA kernels are compiled")
def test_cuda_kernels_do_not_spill():
    """ptxas -v figures of the CUDA build (make ext): every kernel of every csrc/cuda/*.cu, at every compiled
    arch and for every dtype instantiation, spills nothing."""
    assert os.path.exists(LOG), f"{LOG} is missing: build the extension with `make ext`"
    text = open(LOG).read()
    # Each source's figures follow its nvcc command line.
    stale = [os.path.basename(s) for s in CUDA_SOURCES if f"/csrc/cuda/{os.path.basename(s)} " not in text]
    assert not stale, f"{LOG} has no ptxas figures of {stale}: rebuild the extension with `make ext`"
    entries = _ptxas_entries(text)
    assert entries, "the build log has no ptxas -v output"
    archs = {arch for _, arch, *_ in entries}
    for source in CUDA_SOURCES:
        for kernel in _kernels_of(source):
            # Itanium mangling: the name follows its length and precedes its template arguments (I) or its end (E).
            found = {arch for name, arch, *_ in entries if re.search(rf"\d{kernel}[IE]", name)}
            assert found == archs, f"{kernel} ({os.path.basename(source)}): ptxas figures for {sorted(found)}, " \
                                   f"expected {sorted(archs)}"
    spilling = [(name, arch, st, ld) for name, arch, st, ld, _ in entries if st or ld]
    assert not spilling, f"register spills in CUDA kernels: {spilling}"
    # Functions the kernels call (e.g. the double sincos slow path) have their own spill lines.
    spills = [(int(a), int(b)) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)]
    assert all(a == 0 and b == 0 for a, b in spills), f"register spills in CUDA device functions: {spills}"
    assert max(regs for *_, regs in entries) <= 255


def test_cpu_kernel_refuses_a_zero_head_dim_itself():
    """The C++ op's own check (callers that skip the Python checks, e.g. torch.ops): a head dim of 0 would hand BLAS
    a leading dimension of 0, which MKL refuses while leaving the output unwritten."""
    if "cpu" not in pskernels.available_backends("multi_branch_attention"):
        pytest.skip("the compiled extension (backend 'cpu') is not built")
    q, k, v = torch.randn(1, 2, 3, 0), torch.randn(1, 2, 5, 0), torch.randn(1, 2, 5, 4)
    lens, pads = torch.tensor([[5]]), torch.tensor([[0]])
    with pytest.raises(RuntimeError, match=r"q: expected a head dim \(last dimension\) >= 1"):
        torch.ops.pskernels.multi_branch_attention(q, [k], [v], lens, pads, None, None, None, None, True, True, 1.0,
                                                   0.0, 0, torch.zeros(1, dtype=torch.int64), None, None, None)


_CPU_ATTENTION_CHECK = r"""
import torch, pskernels
torch.manual_seed(0)
worst = 0.0
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for Lq, G in ((32, 3), (5, 4), (1, 8)):   # chunks of 96, 20 and 8 query rows
        q = torch.randn(2, 2 * G, Lq, 40, dtype=dtype)
        lens = (17, 300, 0, Lq)
        ks = [torch.randn(2, 2, n, 40, dtype=dtype) for n in lens]
        vs = [torch.randn(2, 2, n, 24, dtype=dtype) for n in lens]
        kw = dict(seq_lens=torch.tensor([[17, 9], [300, 280], [0, 0], [Lq, Lq]]), softcap=20.0)
        o, l = pskernels.multi_branch_attention(q, ks, vs, backend="cpu", **kw)
        ro, rl = pskernels.multi_branch_attention(q.float(), [k.float() for k in ks], [v.float() for v in vs],
                                                  backend="torch", **kw)
        tol = {torch.bfloat16: 2e-2, torch.float16: 3e-3}.get(dtype, 1e-5)
        worst = max(worst, (o.float() - ro).abs().max().item() / tol)
        assert torch.allclose(l, rl, atol=1e-4, rtol=1e-4), (dtype, Lq)
print("WORST", worst)
"""


@pytest.mark.parametrize("blas", ["0", "1"])
def test_cpu_attention_with_and_without_blas(blas):
    """The CPU kernel's BLAS path (libtorch's sgemm, and MKL's bf16 / fp16 GEMMs, found at run time) and its own
    loops (no BLAS, or PSKERNELS_CPU_BLAS=0) agree with the reference. A subprocess, since the choice is made once
    per process."""
    import subprocess
    import sys

    env = dict(os.environ, PSKERNELS_CPU_BLAS=blas)
    res = subprocess.run([sys.executable, "-c", _CPU_ATTENTION_CHECK], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    worst = float(res.stdout.split("WORST")[1])
    assert worst <= 1.0, f"max error {worst:.2f}x the tolerance"


_CPU_MAP_CHECK = r"""
import torch, pskernels
from pskernels import RopeSpec
torch.manual_seed(0)
NL, H, D, Dv, r, B = 3, 2, 64, 32, 4, 2
rope = RopeSpec(inv_freq=1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D)))
lens = (300, 1, 0, 17)  # more slots than one row block, one, none
keys = [[torch.randn(B, H, L, D) for L in lens] for _ in range(NL)]
values = [[torch.randn(B, H, L, Dv) for L in lens] for _ in range(NL)]
params = dict(k_down=torch.randn(NL, H, D, r) / 8, k_up=torch.randn(NL, H, r, D) / 2, k_gate=torch.randn(NL, H),
              v_down=torch.randn(NL, H, Dv, r) / 6, v_up=torch.randn(NL, H, r, Dv) / 2, v_gate=torch.randn(NL, H))
orig = torch.tensor([[3, 5], [0, 0], [9, 9], [40, 2]])
new = torch.tensor([[3, 0], [7, 7], [1, 2], [400, 300]])
for p in (params, {}):
    out = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new, backend="cpu", **p)
    ref = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new, backend="torch", **p)
    for a_l, r_l in zip(out[0] + out[1], ref[0] + ref[1]):
        for a, b in zip(a_l, r_l):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
print("OK")
"""


@pytest.mark.parametrize("blas", ["0", "1"])
def test_cpu_map_kv_caches_with_and_without_blas(blas):
    """map_kv_caches' low-rank products through libtorch's sgemm and through its own loops agree with the
    reference (several row blocks, empty and one-slot branches). A subprocess, as above."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", _CPU_MAP_CHECK], env=dict(os.environ, PSKERNELS_CPU_BLAS=blas),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "OK", res.stderr[-3000:]
