"""Reference RoPE rotation (fp32 math) and ``rotate_keys``."""
from __future__ import annotations

import torch

from ..rope import RopeSpec


def rotate(x: torch.Tensor, positions: torch.Tensor, rope: RopeSpec) -> torch.Tensor:
    """Rotate ``x [..., L, D]`` by ``positions`` (broadcastable to ``x.shape[:-1]``).

    Computes in float32 (float64 stays float64) and returns that dtype; the last
    ``D - rope.rotary_dim`` dimensions pass through unchanged.
    """
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(cdt)
    rd = rope.rotary_dim
    if rd > x.shape[-1]:
        raise ValueError(f"rope.rotary_dim={rd} exceeds head_dim={x.shape[-1]}")
    inv = rope.inv_freq.to(device=x.device, dtype=cdt)
    ang = positions.to(device=x.device, dtype=cdt)[..., None] * inv  # [..., L, rd/2]
    cos, sin = ang.cos(), ang.sin()
    xr, xp = x[..., :rd], x[..., rd:]
    if rope.style == "neox":
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((out, xp), dim=-1) if xp.shape[-1] else out


def rotate_keys(k: torch.Tensor, delta, rope: RopeSpec) -> torch.Tensor:
    """Reference for :func:`pskernels.ops.rotate_keys`: ``R(delta) k`` in k's dtype.

    ``k [B, H, L, D]``; ``delta`` an int, a ``[B]`` tensor (per row) or ``[B, L]`` (per token).
    """
    d = torch.as_tensor(delta, device=k.device)
    if d.ndim == 0:
        d = d.expand(k.shape[0])
    if d.ndim == 1:
        d = d[:, None, None].expand(k.shape[0], 1, k.shape[2])
    else:
        d = d[:, None, :]
    return rotate(k, d, rope).to(k.dtype)
