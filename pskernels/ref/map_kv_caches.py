"""Reference batched cache mapping (docs/KERNELS.md §2).

For layer ``l``, branch ``n``, batch row ``b`` and slot ``j`` (original position ``o[n,b] + j``, new
position ``p[n,b] + j``)::

    k_raw = R(-(o + j)) k
    k_out = R(p + j) (k_raw + f_l(k_raw))        f_l(x) = gate * (x @ down_l) @ up_l   per kv head
    v_out = v + g_l(v)

With no transform this is the pure delta rotation ``R(p - o) k`` and ``v_out = v``.
"""
from __future__ import annotations

import torch

from .rotate_keys import rotate


def low_rank_residual(x, down, up, gate):
    """``x + sigmoid(gate) * (x @ down) @ up`` per head. x ``[B, H, L, D]``, down ``[H, D, r]``, up ``[H, r, D]``,
    gate ``[H]`` logits or None (ungated)."""
    delta = torch.einsum("bhld,hdr->bhlr", x, down.to(x.dtype))
    delta = torch.einsum("bhlr,hre->bhle", delta, up.to(x.dtype))
    if gate is not None:
        delta = delta * torch.sigmoid(gate.to(x.dtype))[None, :, None, None]
    return x + delta


def map_kv_caches(keys, values, orig_positions, new_positions, rope, params):
    """Reference for :func:`pskernels.ops.map_kv_caches` with normalised arguments.

    ``keys[l][n]`` ``[B, Hkv, L_n, D]``; positions int64 ``[N, B]``; ``params`` a dict with optional
    ``k_down, k_up, k_gate, v_down, v_up, v_gate`` stacked over layers (``[NL, Hkv, ...]``).
    Returns nested lists of new tensors in the input dtype.
    """
    k_out, v_out = [], []
    for l, (kl, vl) in enumerate(zip(keys, values)):
        kr, vr = [], []
        for n, (k, v) in enumerate(zip(kl, vl)):
            B, H, L, D = k.shape
            cdt = torch.float64 if k.dtype == torch.float64 else torch.float32
            j = torch.arange(L, device=k.device)
            o = orig_positions[n][:, None, None] + j  # [B, 1, L]
            npos = new_positions[n][:, None, None] + j
            kf = k.to(cdt)
            if params.get("k_down") is not None:
                raw = rotate(kf, -o, rope)
                raw = low_rank_residual(raw, params["k_down"][l], params["k_up"][l], _get(params, "k_gate", l))
                kf = rotate(raw, npos, rope)
            else:
                kf = rotate(kf, npos - o, rope)
            vf = v.to(cdt, copy=True)  # a new tensor even without a value transform
            if params.get("v_down") is not None:
                vf = low_rank_residual(vf, params["v_down"][l], params["v_up"][l], _get(params, "v_gate", l))
            kr.append(kf.to(k.dtype))
            vr.append(vf.to(v.dtype))
        k_out.append(kr)
        v_out.append(vr)
    return k_out, v_out


def _get(params, name, l):
    t = params.get(name)
    return None if t is None else t[l]
