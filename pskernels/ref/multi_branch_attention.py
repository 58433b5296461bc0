"""Reference multi-branch attention (docs/KERNELS.md §1): the semantics every backend matches.

Deliberately simple: per segment it materialises the score matrix, pools the segments of each
calibration group into one softmax, then merges groups by log-sum-exp. fp32 math (fp64 inputs stay
fp64); differentiable, and free of NaN for empty segments/rows (including their gradients).
"""
from __future__ import annotations

import torch

from .._core.segments import SegmentParams
from .merge_states import merge_states
from .rotate_keys import rotate


def _safe_softmax_lse(sc: torch.Tensor):
    """Softmax and LSE over the last dim of ``sc`` where all-(-inf) rows give p = 0, lse = -inf."""
    if sc.shape[-1] == 0:
        return sc, torch.full(sc.shape[:-1], float("-inf"), dtype=sc.dtype, device=sc.device)
    m = sc.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(sc - m)
    l = e.sum(dim=-1, keepdim=True)
    nonempty = l != 0  # NaN (a NaN score) stays NaN instead of reading as an empty row
    l_safe = torch.where(nonempty, l, torch.ones_like(l))
    p = e / l_safe
    lse = torch.where(nonempty, m + torch.log(l_safe), torch.full_like(l, float("-inf")))
    return p, lse.squeeze(-1)


def segment_mask(p: SegmentParams, s: int, B: int, Lq: int, L: int, device) -> torch.Tensor:
    """Bool ``[B, 1, Lq, L]``: which keys of segment ``s`` each query may see."""
    j = torch.arange(L, device=device)
    lens, pad = p.seq_lens[s], p.left_pad[s]
    mask = (j[None, :] >= pad[:, None]) & (j[None, :] < lens[:, None])  # [B, L]
    mask = mask[:, None, :].expand(B, Lq, L)
    if p.causal_last and s == p.seq_lens.shape[0] - 1:
        i = torch.arange(Lq, device=device)
        lim = lens[:, None] - Lq + i[None, :]  # [B, Lq]: last own key index query i may see
        mask = mask & (j[None, None, :] <= lim[:, :, None])
    if p.sliding_window is not None:
        kpos = p.segment_positions[s][:, None] + j[None, :]  # [B, L]
        dist = p.query_positions[:, :, None] - kpos[:, None, :]  # [B, Lq, L]
        mask = mask & (dist < p.sliding_window)
    return mask[:, None]


def multi_branch_attention(q: torch.Tensor, keys, values, p: SegmentParams):
    """Reference for :func:`pskernels.ops.multi_branch_attention` (arguments already normalised)."""
    B, Hq, Lq, D = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(cdt)
    per_group = [[] for _ in range(p.num_groups)]
    for s, (k, v) in enumerate(zip(keys, values)):
        L = k.shape[2]
        qs = qf
        if p.has_shift and bool((p.shifts[s] != 0).any()):
            qs = rotate(qf, (-p.shifts[s])[:, None, None].expand(B, 1, Lq), p.rope)
        sc = torch.einsum("bhgqd,bhkd->bhgqk", qs.reshape(B, Hkv, G, Lq, D), k.to(cdt)).reshape(B, Hq, Lq, L)
        sc = sc * p.scale
        if p.softcap is not None:
            sc = p.softcap * torch.tanh(sc / p.softcap)
        if p.temperature is not None:  # before masking: (-inf) / T would give NaN gradients
            sc = sc / p.temperature[p.groups[s]].to(cdt)[None, :, None, None]
        sc = sc.masked_fill(~segment_mask(p, s, B, Lq, L, q.device), float("-inf"))
        per_group[p.groups[s]].append((sc, v.to(cdt)))

    outs, logits = [], []
    for g, members in enumerate(per_group):
        sc = torch.cat([m[0] for m in members], dim=-1)  # [B, Hq, Lq, sum L]
        vv = torch.cat([m[1] for m in members], dim=2)  # [B, Hkv, sum L, Dv]
        prob, lse = _safe_softmax_lse(sc)
        o = torch.einsum("bhgqk,bhkd->bhgqd", prob.reshape(B, Hkv, G, Lq, -1), vv).reshape(B, Hq, Lq, -1)
        if p.has_knobs:
            finite = torch.isfinite(lse)
            lse_f = torch.where(finite, lse, torch.zeros_like(lse))
            if p.temperature is not None:
                lse_f = lse_f * p.temperature[g].to(cdt)[None, :, None]
            if p.lse_scale is not None:
                lse_f = lse_f * p.lse_scale[g].to(cdt)[None, :, None]
            if p.log_weight is not None:
                lse_f = lse_f + p.log_weight[g].to(cdt)[None, :, None]
            lse = torch.where(finite, lse_f, lse)
        outs.append(o)
        logits.append(lse)
    if len(outs) == 1:
        out, lse = outs[0], logits[0]
    else:
        out, lse = merge_states(torch.stack(outs), torch.stack(logits))
    return out.to(q.dtype), lse.to(torch.float32)
