"""RoPE helpers shared by the Triton kernels, and the ``rotate_keys`` kernel."""
from __future__ import annotations

import triton
import triton.language as tl

from .._core.registry import register
from . import _check_inputs, _empty, _triton_available


@triton.jit
def rope_layout(offs_d, inv_freq, ROT: tl.constexpr, GPTJ: tl.constexpr):
    """Per head dim: sign and inverse frequency such that rotating by angle ``pos * inv`` is
    ``x * cos + sign * x[partner] * sin``. Dims >= ROT get inv = 0 (cos 1, sin 0): pass-through."""
    is_rot = offs_d < ROT
    if GPTJ:
        first = offs_d % 2 == 0
        freq = offs_d // 2
    else:
        first = offs_d < ROT // 2
        freq = tl.where(first, offs_d, offs_d - ROT // 2)
    sign = tl.where(first, -1.0, 1.0)
    b_inv = tl.load(inv_freq + freq, mask=is_rot, other=0.0)
    return sign, b_inv


@triton.jit
def rope_partner(p, offs_d, m, b_x, ROT: tl.constexpr, GPTJ: tl.constexpr):
    """``b_x[:, partner(d)]`` for a tile ``b_x = load(p + offs_d[None, :], mask=m)`` (p, m: [R, 1]).

    No gathered (per-element address) loads: gptj swaps neighbours in registers, neox reads the two
    halves with contiguous, vectorisable loads. Values at dims >= ROT are 0 (they meet sin = 0)."""
    if GPTJ:
        b_even, b_odd = tl.split(tl.reshape(b_x, [b_x.shape[0], b_x.shape[1] // 2, 2]))
        return tl.reshape(tl.join(b_odd, b_even), b_x.shape)
    else:
        first = offs_d < ROT // 2
        second = (offs_d >= ROT // 2) & (offs_d < ROT)
        b_a = tl.load(p + (offs_d + ROT // 2)[None, :], mask=m & first[None, :], other=0.0)
        b_b = tl.load(p + (offs_d - ROT // 2)[None, :], mask=m & second[None, :], other=0.0)
        return b_a + b_b


@triton.jit
def sincos(x):
    """(sin x, cos x) in fp32 without libdevice's large-argument path, whose local-memory arrays cost
    a stack frame and register spills: quadrant ``q = round(2x / pi)``, ``r = x - q pi/2`` by a three-part
    Cody-Waite split with fused multiply-adds (accurate for |x| up to ~1e5 rad, positions up to 1e5;
    fp32 angles that large carry more error themselves), then Cephes' minimax polynomials on
    [-pi/4, pi/4] (about 1 ulp)."""
    q = tl.floor(x * 0.6366197723675814 + 0.5)
    r = tl.fma(q, -1.5703125, x)
    r = tl.fma(q, -4.837512969970703125e-4, r)
    r = tl.fma(q, -7.54978995489188216e-8, r)
    z = r * r
    s = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r
    c = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0
    k = q.to(tl.int32) & 3
    sin_x = tl.where(k == 0, s, tl.where(k == 1, c, tl.where(k == 2, -s, -c)))
    cos_x = tl.where(k == 0, c, tl.where(k == 1, -s, tl.where(k == 2, -c, s)))
    return sin_x, cos_x


@triton.jit
def rope_apply(b_x, b_xp, b_ang, sign):
    """Rotate ``b_x`` (with ``b_xp = b_x[..., partner]``) by ``b_ang``; fp32."""
    b_sin, b_cos = sincos(b_ang)
    return b_x * b_cos + sign * b_xp * b_sin


@triton.jit
def _rotate_keys_kernel(
    k, o, delta, inv_freq,
    skb, skh, skl, sdb, sdl,
    H, L, D: tl.constexpr,
    ROT: tl.constexpr, GPTJ: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    NL = tl.cdiv(L, BLOCK_L)
    i_l, i_bh = tl.program_id(0) % NL, tl.program_id(0) // NL  # one flat axis: no 65535 limit
    # 64-bit tile bases, 32-bit offsets inside the tile
    i_b, i_h, l0 = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64), (i_l * BLOCK_L).to(tl.int64)
    o_l = tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_D)
    sign, b_inv = rope_layout(o_d, inv_freq, ROT, GPTJ)
    m_l, m_d = o_l < L - l0, o_d < D
    m_x = m_l[:, None] & m_d[None, :]

    p_k = (k + i_b * skb + i_h * skh + l0 * skl) + (o_l * skl)[:, None]  # [BL, 1]
    b_x = tl.load(p_k + o_d[None, :], mask=m_x, other=0.0)  # [BL, BD]
    b_xp = rope_partner(p_k, o_d, m_l[:, None], b_x, ROT, GPTJ).to(tl.float32)
    b_x = b_x.to(tl.float32)
    b_pos = tl.load(delta + i_b * sdb + l0 * sdl + o_l * sdl, mask=m_l, other=0).to(tl.float32)  # [BL]
    b_o = rope_apply(b_x, b_xp, b_pos[:, None] * b_inv[None, :], sign[None, :])
    p_o = (o + ((i_b * H + i_h) * L + l0) * D) + (o_l[:, None] * D + o_d[None, :])
    tl.store(p_o, b_o.to(o.dtype.element_ty), mask=m_x)


@register("rotate_keys", "triton", available=_triton_available)
def rotate_keys(k, d, rope):
    _check_inputs("rotate_keys", (k,))
    B, H, L, D = k.shape
    out = _empty((B, H, L, D), k.dtype, k.device)
    if out.numel() == 0:
        return out
    sdb, sdl = (d.stride(0), 0) if d.ndim == 1 else d.stride()
    BLOCK_L = 16
    _rotate_keys_kernel[(triton.cdiv(L, BLOCK_L) * B * H,)](
        k, out, d, rope.inv_freq, k.stride(0), k.stride(1), k.stride(2), sdb, sdl, H, L, D,
        ROT=rope.rotary_dim, GPTJ=rope.style == "gptj", BLOCK_L=BLOCK_L, BLOCK_D=triton.next_power_of_2(D),
    )
    return out
