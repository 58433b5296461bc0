"""Helpers shared by the per-op test files: backend parametrisation, device choice, RoPE specs."""
import pytest
import torch

import pskernels
from pskernels import RopeSpec


def backend_params(op):
    """One pytest param per available backend of ``op``; Triton on CPU runs in the (slow) interpreter."""
    params = []
    for b in pskernels.available_backends(op):
        marks = [pytest.mark.interpreter] if b == "triton" and not torch.cuda.is_available() else []
        params.append(pytest.param(b, marks=marks, id=b))
    return params


def device_for(backend):
    if backend in ("triton", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def make_rope(D, rotary_dim=None, style="neox", base=10000.0, rope_type="default"):
    rd = D if rotary_dim is None else rotary_dim
    inv = 1.0 / base ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    return RopeSpec(inv.float(), style=style, rope_type=rope_type)


def grad_call(backend, fn):
    """Run ``fn`` with inputs that require grad; forward-only backends may refuse (NotImplementedError) or
    return non-differentiable outputs: skip then. The torch backend must be differentiable."""
    try:
        res = fn()
    except NotImplementedError as e:
        if backend == "torch":
            raise
        pytest.skip(f"{backend} backend is forward-only: {e}")
    first = res[0] if isinstance(res, (tuple, list)) else res
    while isinstance(first, (tuple, list)):
        first = first[0]
    if not first.requires_grad:
        assert backend != "torch", "the torch backend must be differentiable"
        pytest.skip(f"{backend} backend is not differentiable")
    return res


def tile_params(classes):
    """One pytest param (class, half precision, tile) per distinct (BLOCK_M, BLOCK_N) that the Triton attention
    kernel's autotuner may launch a tile class of ``classes`` with, on sm_80 or sm_90, in half precision or fp32."""
    from pskernels.triton import multi_branch_attention as mba

    cases = []
    for half in (True, False):
        for cls in classes:
            tiles = {}
            for arch in (80, 90):
                for t in mba.tiles_for(cls, half, arch):
                    tiles.setdefault(t[:2], t)
            cases += [pytest.param(cls, half, t, id=f"{cls}-{'half' if half else 'fp32'}-{t[0]}x{t[1]}")
                      for t in tiles.values()]
    return cases
