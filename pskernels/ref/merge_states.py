"""Reference log-sum-exp merge of partial attention states."""
from __future__ import annotations

import torch


def merge_states(outs, lses):
    """Merge ``N`` partial attention results computed over disjoint key sets.

    ``outs``: sequence of ``[B, H, L, Dv]`` or stacked ``[N, B, H, L, Dv]``; ``lses``: matching
    ``[B, H, L]`` / ``[N, B, H, L]`` float32 natural-log LSEs. Returns ``(out, lse)`` with ``out`` in
    the dtype of ``outs`` and ``lse`` float32. States with ``lse = -inf`` (no keys) contribute nothing;
    if all are empty the output is 0 and the LSE ``-inf``.
    """
    o = torch.stack(list(outs)) if not isinstance(outs, torch.Tensor) else outs
    s = torch.stack(list(lses)) if not isinstance(lses, torch.Tensor) else lses
    cdt = torch.float64 if o.dtype == torch.float64 else torch.float32
    s = s.to(cdt)
    m = s.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(s - m_safe)  # [N, B, H, L]; -inf -> 0
    denom = w.sum(dim=0)
    nonempty = denom != 0  # NaN (a NaN lse) stays NaN instead of reading as all-empty
    denom_safe = torch.where(nonempty, denom, torch.ones_like(denom))
    out = (w[..., None] * o.to(cdt)).sum(dim=0) / denom_safe[..., None]
    lse = torch.where(nonempty, m_safe + torch.log(denom_safe), torch.full_like(denom, float("-inf")))
    return out.to(o.dtype), lse.to(torch.float32 if cdt == torch.float32 else cdt)
