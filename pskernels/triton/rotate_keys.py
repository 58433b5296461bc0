"""``rotate_keys``: re-rotate cached keys by a position delta (RoPE is relative), one program per row tile."""
from __future__ import annotations

import triton
import triton.language as tl

from .._core.registry import register
from .rope_utils import rope_apply, rope_layout, rope_partner
from .utils import CompileSpec, available, cdiv, check_inputs, compile_spec, empty, fixed_tile, next_power_of_2

BLOCK_L = 16  # rows per program: a fixed tile (not autotuned)


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


@register("rotate_keys", "triton", available=available)
def rotate_keys(k, d, rope):
    check_inputs("rotate_keys", (k,))
    B, H, L, D = k.shape
    out = empty((B, H, L, D), k.dtype, k.device)
    if out.numel() == 0:
        return out
    sdb, sdl = (d.stride(0), 0) if d.ndim == 1 else d.stride()
    _rotate_keys_kernel[(cdiv(L, BLOCK_L) * B * H,)](
        k, out, d, rope.inv_freq, k.stride(0), k.stride(1), k.stride(2), sdb, sdl, H, L, D,
        ROT=rope.rotary_dim, GPTJ=rope.style == "gptj", BLOCK_L=BLOCK_L, BLOCK_D=next_power_of_2(D),
    )
    return out


# Triton types of _rotate_keys_kernel's runtime arguments for ahead-of-time compiles; "T": the keys' element type
_ARG_TYPES = dict(k="*T", o="*T", delta="*i64", inv_freq="*fp32",
                  **dict.fromkeys("skb skh skl sdb sdl H L".split(), "i32"))


def compile_specs(dtype: str, D: int, arch: int) -> list[CompileSpec]:
    """``_rotate_keys_kernel`` for neox and gptj RoPE over the whole head, keys of element type ``dtype`` ("fp16",
    "bf16", "fp32") and head dim ``D``, in the launcher's tile (the same on every ``arch``)."""
    return [compile_spec(_rotate_keys_kernel, style, _ARG_TYPES, dtype,
                         dict(D=D, ROT=D, GPTJ=style == "gptj", BLOCK_D=next_power_of_2(D)),
                         [fixed_tile(BLOCK_L=BLOCK_L)], multiple_of_16=("skb", "skh", "skl"))
            for style in ("neox", "gptj")]
