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
