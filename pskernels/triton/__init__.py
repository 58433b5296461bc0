"""Triton kernels and thin launchers; importing this package registers ``backend="triton"`` for every op.

Kernels run on NVIDIA GPUs, and on CPU tensors through the Triton interpreter (``TRITON_INTERPRET=1``,
set before triton is first imported). The backend is forward-only: launchers refuse inputs that need
gradients (use ``backend="torch"`` for training) and float64 (use ``backend="torch"``).
``PSKERNELS_DEBUG_NAN=1`` fills every output the launchers allocate with NaN, so tests see missed writes.
"""
from __future__ import annotations

import os

import torch
import triton  # noqa: F401  (an ImportError here tells ops/ that the backend is absent)


# @triton.jit picks the interpreter when the kernels are defined (below), so read the switch once, here.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _triton_available() -> bool:
    return _INTERPRET or torch.cuda.is_available()


def _on_gpu(device: torch.device) -> bool:
    """Real GPU launch (autotuned configs) as opposed to the interpreter."""
    return device.type == "cuda" and not _INTERPRET


def _empty(shape, dtype, device) -> torch.Tensor:
    # PSKERNELS_DEBUG_NAN=1 poisons library-allocated outputs so that a missed write shows up as NaN.
    if os.environ.get("PSKERNELS_DEBUG_NAN") == "1":
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_inputs(op: str, tensors) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cuda" and not _INTERPRET:
            raise RuntimeError(f"{op}: the triton backend needs CUDA tensors (got {t.device}); CPU tensors run only "
                               "under TRITON_INTERPRET=1 set before triton is imported")
        if t.dtype == torch.float64:
            raise NotImplementedError(f"{op}: the triton backend supports float16/bfloat16/float32, got float64; "
                                      "use backend='torch'")
        if t.requires_grad and torch.is_grad_enabled():
            raise NotImplementedError(f"{op}: the triton backend is forward-only and an input requires grad; "
                                      "use backend='torch' for training (or run under torch.no_grad())")


from . import map_kv_caches, merge_states, multi_branch_attention, rotate_keys  # noqa: E402,F401
