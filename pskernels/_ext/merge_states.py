"""``merge_states`` on the compiled extension: its "cpu"/"cuda" adapter and its fake implementation."""
from __future__ import annotations

import torch

from .._core.registry import register
from .loader import cpu_available, cuda_available

# The compiled op, a module attribute so that tests can record the calls the adapter makes.
_op = torch.ops.pskernels.merge_states


@torch.library.register_fake("pskernels::merge_states")
def _fake(outs, lses):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


@register("merge_states", "cuda", cuda_available)
@register("merge_states", "cpu", cpu_available)
def _adapter(outs, lses):
    return _op(outs, lses)
