"""RoPE helpers shared by the Triton kernels: per-dim layout, the partner of each dim, and the rotation."""
from __future__ import annotations

import triton
import triton.language as tl


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
