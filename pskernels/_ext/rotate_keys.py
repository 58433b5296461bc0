"""``rotate_keys`` on the compiled extension: its "cpu"/"cuda" adapter and its fake implementation."""
from __future__ import annotations

import torch

from .._core.registry import register
from .loader import cpu_available, cuda_available

# The compiled op, a module attribute so that tests can record the calls the adapter makes.
_op = torch.ops.pskernels.rotate_keys


@torch.library.register_fake("pskernels::rotate_keys")
def _fake(k, delta, inv_freq, neox):
    return k.new_empty(k.shape)


@register("rotate_keys", "cuda", cuda_available)
@register("rotate_keys", "cpu", cpu_available)
def _adapter(k, delta, rope):
    B, _, L, _ = k.shape
    delta = delta[:, None].expand(B, L) if delta.ndim == 1 else delta  # the kernel takes one delta per token
    return _op(k, delta.contiguous(), rope.inv_freq, rope.style == "neox")
