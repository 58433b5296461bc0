"""``merge_states``: log-sum-exp merge of partial attention states, one launch of the combine kernel."""
from __future__ import annotations

import torch

from .._core.registry import register
from .combine import combine
from .utils import available, check_inputs, empty


@register("merge_states", "triton", available=available)
def merge_states(o, s):
    check_inputs("merge_states", (o, s))
    N, B, H, L, DV = o.shape
    out = empty((B, H, L, DV), o.dtype, o.device)
    lse = empty((B, H, L), torch.float32, o.device)
    if lse.numel() == 0:
        return out, lse
    combine(o[:, None], s[:, None], out, lse)
    return out, lse
