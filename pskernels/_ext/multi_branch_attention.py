"""``multi_branch_attention`` on the compiled extension: its "cpu"/"cuda" adapter and its fake implementation."""
from __future__ import annotations

import torch

from .._core.registry import register
from .loader import cpu_available, cuda_available

# The compiled op, a module attribute so that tests can record the calls the adapter makes.
_op = torch.ops.pskernels.multi_branch_attention


@torch.library.register_fake("pskernels::multi_branch_attention")
def _fake(q, keys, values, seq_lens, left_pad, shifts, segment_positions, query_positions, inv_freq, rope_neox,
          causal_last, scale, softcap, window, groups, temperature, lse_scale, log_weight):
    B, Hq, Lq, _d = q.shape
    return q.new_empty(B, Hq, Lq, values[0].shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@register("multi_branch_attention", "cuda", cuda_available)
@register("multi_branch_attention", "cpu", cpu_available)
def _adapter(q, keys, values, p):
    rope = p.rope
    shifts = p.shifts if p.has_shift else None
    inv = rope.inv_freq if (rope is not None and shifts is not None) else None
    return _op(
        q, keys, values, p.host.seq_lens, p.host.left_pad, shifts, p.segment_positions, p.query_positions, inv,
        rope is None or rope.style == "neox", p.causal_last, p.scale, p.softcap or 0.0, p.sliding_window or 0,
        p.group_ids, p.temperature, p.lse_scale, p.log_weight,
    )
