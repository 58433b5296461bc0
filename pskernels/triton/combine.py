"""Log-sum-exp merging of partial attention states: the jit merge helpers, and the combine kernel and its launcher
(``merge_states``, and the second pass of split-KV and calibrated-group attention)."""
from __future__ import annotations

import triton
import triton.language as tl

from .utils import CompileSpec, cdiv, compile_spec, fixed_tile, next_power_of_2

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def merge_step(b_m, b_den, b_acc, b_s, b_o):
    """Fold state (log2-LSE ``b_s`` [BL], output ``b_o`` [BL, BD]) into a running (max, denominator, sum).

    A ``-inf`` state gets weight 0 and an all-``-inf`` history keeps den = 0, so nothing turns NaN."""
    b_mn = tl.maximum(b_m, b_s)
    b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
    b_a, b_w = tl.exp2(b_m - b_ms), tl.exp2(b_s - b_ms)
    return b_mn, b_den * b_a + b_w, b_acc * b_a[:, None] + b_w[:, None] * b_o


@triton.jit
def merge_final(b_m, b_den, b_acc):
    """Normalised output and natural-log LSE (0 and -inf where no state contributed; a NaN stays NaN)."""
    b_ok = b_den != 0
    b_d = tl.where(b_ok, b_den, 1.0)
    return b_acc * (1.0 / b_d)[:, None], tl.where(b_ok, (b_m + tl.log2(b_d)) * LN2, float("-inf"))


@triton.jit
def _combine_kernel(
    o, lse, out, out_lse, knobs,
    sos, sog, sob, soh, sol, sod,
    sls, slg, slb, slh, sll,
    sxb, sxh, sxl,
    NS, NGR, H, L,
    DV: tl.constexpr, HAS_KNOBS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """states [NS, NGR, B, H, L, DV] -> out [B, H, L, DV], lse [B, H, L].

    The NS states of each group are merged plainly; the group then enters the final merge with the
    calibrated logit ``lse_scale * T * lse + log_weight`` (knobs [3, NGR, H]: T, lse_scale, log_weight;
    its LSE is already in units of scores / T)."""
    NL = tl.cdiv(L, BLOCK_L)
    i_l, i_bh = tl.program_id(0) % NL, tl.program_id(0) // NL  # one flat axis: no 65535 limit
    # 64-bit tile bases, 32-bit offsets inside the tile
    i_b, i_h, l0 = (i_bh // H).to(tl.int64), (i_bh % H).to(tl.int64), (i_l * BLOCK_L).to(tl.int64)
    o_l = tl.arange(0, BLOCK_L)
    o_d = tl.arange(0, BLOCK_DV)
    m_l = o_l < L - l0
    m_x = m_l[:, None] & (o_d < DV)[None, :]
    # loops carry scalar 64-bit bases only; [BL, BDV] pointer tensors there would cost registers (and spill)
    off_o, off_s = o_l[:, None] * sol + o_d[None, :] * sod, o_l * sll  # [BL, BDV], [BL] 32-bit
    p_o = o + i_b * sob + i_h * soh + l0 * sol
    p_s = lse + i_b * slb + i_h * slh + l0 * sll

    b_M = tl.full([BLOCK_L], float("-inf"), tl.float32)
    b_DEN = tl.zeros([BLOCK_L], tl.float32)
    b_ACC = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    for i_g in range(NGR):
        b_m = tl.full([BLOCK_L], float("-inf"), tl.float32)
        b_den = tl.zeros([BLOCK_L], tl.float32)
        b_acc = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
        p_sg, p_og = p_s, p_o
        for _ in range(NS):
            b_s = tl.load(p_sg + off_s, mask=m_l, other=float("-inf")) * LOG2E
            b_o = tl.load(p_og + off_o, mask=m_x, other=0.0).to(tl.float32)
            b_m, b_den, b_acc = merge_step(b_m, b_den, b_acc, b_s, b_o)
            p_sg, p_og = p_sg + sls, p_og + sos
        p_s, p_o = p_s + slg, p_o + sog  # pointer increments: 64-bit without casting loop counters
        b_og, b_lg = merge_final(b_m, b_den, b_acc)
        if HAS_KNOBS:
            b_t = tl.load(knobs + i_g * H + i_h)
            b_sc = tl.load(knobs + (NGR + i_g) * H + i_h)
            b_lw = tl.load(knobs + (2 * NGR + i_g) * H + i_h)
            b_lg = tl.where(b_lg == float("-inf"), b_lg, b_lg * b_t * b_sc + b_lw)
        b_M, b_DEN, b_ACC = merge_step(b_M, b_DEN, b_ACC, b_lg * LOG2E, b_og)
    b_out, b_lse = merge_final(b_M, b_DEN, b_ACC)
    p_x = (out + i_b * sxb + i_h * sxh + l0 * sxl) + (o_l[:, None] * sxl + o_d[None, :])
    tl.store(p_x, b_out.to(out.dtype.element_ty), mask=m_x)
    tl.store((out_lse + (i_b * H + i_h) * L + l0) + o_l, b_lse, mask=m_l)


BLOCK_L = 16  # rows per program: a fixed tile (not autotuned)


def combine(o, lse, out, out_lse, knobs=None):
    """Launch the merge of ``o [NS, NGR, B, H, L, DV]`` / ``lse [NS, NGR, B, H, L]`` into ``out`` (any strides,
    last one 1) and contiguous ``out_lse``."""
    NS, NGR, B, H, L, DV = o.shape
    _combine_kernel[(cdiv(L, BLOCK_L) * B * H,)](
        o, lse, out, out_lse, knobs if knobs is not None else lse, *o.stride(), *lse.stride(), *out.stride()[:3],
        NS, NGR, H, L, DV, HAS_KNOBS=knobs is not None, BLOCK_L=BLOCK_L, BLOCK_DV=next_power_of_2(DV),
    )


# Triton types of _combine_kernel's runtime arguments for ahead-of-time compiles; "T": the states' element type
_ARG_TYPES = dict(o="*T", lse="*fp32", out="*T", out_lse="*fp32", knobs="*fp32",
                  **dict.fromkeys("sos sog sob soh sol sod sls slg slb slh sll sxb sxh sxl NS NGR H L".split(), "i32"))


def compile_specs(dtype: str, D: int, arch: int) -> list[CompileSpec]:
    """``_combine_kernel`` with and without calibration knobs, for states of element type ``dtype`` ("fp16",
    "bf16", "fp32") and value head dim ``D``, in the launcher's tile (the same on every ``arch``)."""
    return [compile_spec(_combine_kernel, variant, _ARG_TYPES, dtype,
                         dict(DV=D, HAS_KNOBS=variant == "knobs", BLOCK_DV=next_power_of_2(D)),
                         [fixed_tile(BLOCK_L=BLOCK_L)], multiple_of_16=("sob", "soh", "sol", "sxb", "sxh", "sxl"))
            for variant in ("knobs", "plain")]
