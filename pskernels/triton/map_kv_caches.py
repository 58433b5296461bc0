"""Batched cache mapping: every (layer, branch) pair in one launch through a pointer table.

Per tile of one (pair, batch row, kv head): keys are un-rotated at their original positions, get the
per-layer low-rank residual, and are re-rotated at the new positions; values get their own residual.
Without a key transform this collapses to one rotation by ``new - orig``.

Rotation needs each dim's RoPE partner (``rope_partner``); after the residual the partner tile is
carried along rather than re-derived: the partner of ``raw @ down @ up`` is ``raw @ down @ up[:, partner]``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._core.registry import register
from .rope_utils import rope_apply, rope_layout, rope_partner
from .utils import (
    TENSOR_DTYPES,
    CompileSpec,
    available,
    cdiv,
    check_inputs,
    compile_spec,
    empty,
    fixed_tile,
    next_power_of_2,
)

BLOCK_L = 16  # slots per program: a fixed tile (not autotuned)
# pair table rows (int64, 13 columns): k, v, k_out, v_out pointers, k strides (b, h, l), v strides (b, h, l),
# L, layer, l * N + n


@triton.jit
def _gate(b_z, p_gate, i_lh):
    """Gate the rank-r projection ``b_z`` [BL, BR] by sigmoid(gate[layer, head])."""
    b_g = tl.load(p_gate + i_lh).to(tl.float32)
    return b_z / (1.0 + tl.exp(-b_g))


@triton.jit
def _tile(p_t, PTR: tl.constexpr, STRIDES: tl.constexpr, k0, i_b, i_h, l0, ALIGNED: tl.constexpr, VEC: tl.constexpr):
    """Pointer to slot ``l0`` of (row i_b, head i_h) of the table's tensor in column PTR, and its slot stride
    (int32: in-tile offsets stay 32-bit, the launcher bounds BLOCK_L * stride)."""
    p = tl.load(p_t + PTR).to(tl.pointer_type(k0.dtype.element_ty))
    s = tl.load(p_t + STRIDES + 2)
    p += i_b * tl.load(p_t + STRIDES) + i_h * tl.load(p_t + STRIDES + 1) + l0 * s
    s = s.to(tl.int32)
    if ALIGNED:  # 16-byte aligned rows let loads through table pointers vectorise
        p, s = tl.multiple_of(p, 16), tl.multiple_of(s, VEC)
    return p, s


@triton.jit
def _map_kv_kernel(
    tab, k0, orig, new, kd, ku, kg, vd, vu, vg, inv_freq,
    B, H, RK, RV, NT,
    D: tl.constexpr, DV: tl.constexpr, ROT: tl.constexpr, GPTJ: tl.constexpr,
    K_TF: tl.constexpr, K_GATE: tl.constexpr, V_TF: tl.constexpr, V_GATE: tl.constexpr,
    ALIGNED: tl.constexpr, VEC: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_RK: tl.constexpr,
    BLOCK_RV: tl.constexpr,
):
    # k0: any cache tensor; it only gives the element type of the table's pointers
    i_l, i_pbh = tl.program_id(0) % NT, tl.program_id(0) // NT  # one flat axis: no 65535 limit
    i_p, i_b, i_h = i_pbh // (B * H), (i_pbh // H) % B, i_pbh % H
    p_t = tab + i_p * 13
    L = tl.load(p_t + 10)
    l0 = i_l * BLOCK_L
    if l0 >= L:
        return
    ety = k0.dtype.element_ty
    i_lh = tl.load(p_t + 11) * H + i_h  # (layer, kv head) of the stacked parameters
    i_nb = tl.load(p_t + 12) * B + i_b
    pos_o, pos_n = tl.load(orig + i_nb), tl.load(new + i_nb)
    o_l = tl.arange(0, BLOCK_L)
    m_l = l0 + o_l < L
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_d, m_v = o_d < D, o_v < DV
    m_k, m_x = m_l[:, None] & m_d[None, :], m_l[:, None] & m_v[None, :]
    # outputs are new contiguous [B, H, L, D] tensors
    p_ko = tl.load(p_t + 2).to(tl.pointer_type(ety)) + ((i_b * H + i_h) * L + l0) * D
    p_vo = tl.load(p_t + 3).to(tl.pointer_type(ety)) + ((i_b * H + i_h) * L + l0) * DV
    if ALIGNED:
        p_ko, p_vo = tl.multiple_of(p_ko, 16), tl.multiple_of(p_vo, 16)
    sign, b_inv = rope_layout(o_d, inv_freq, ROT, GPTJ)
    sign, b_inv = sign[None, :], b_inv[None, :]

    p_k, skl = _tile(p_t, 0, 4, k0, i_b, i_h, l0, ALIGNED, VEC)
    p_k += (o_l * skl)[:, None]  # [BL, 1]
    b_x = tl.load(p_k + o_d[None, :], mask=m_k, other=0.0)  # [BL, BD]
    b_xp = rope_partner(p_k, o_d, m_l[:, None], b_x, ROT, GPTJ).to(tl.float32)
    b_x = b_x.to(tl.float32)
    if K_TF:
        b_ang = -(pos_o + l0 + o_l).to(tl.float32)[:, None] * b_inv
        b_raw = rope_apply(b_x, b_xp, b_ang, sign)
        b_rawp = rope_apply(b_xp, b_x, b_ang, -sign)  # = b_raw[:, partner]
        o_r = tl.arange(0, BLOCK_RK)
        m_r = o_r < RK
        b_down = tl.load(kd + (i_lh * D + o_d[:, None]) * RK + o_r[None, :], mask=m_d[:, None] & m_r[None, :],
                         other=0.0).to(tl.float32)  # [BD, BR]
        p_up = ku + (i_lh * RK + o_r[:, None]) * D  # [BR, 1]
        b_up = tl.load(p_up + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BR, BD]
        b_upp = rope_partner(p_up, o_d, m_r[:, None], b_up, ROT, GPTJ).to(tl.float32)
        b_up = b_up.to(tl.float32)
        b_z = tl.dot(b_raw, b_down, input_precision="ieee")  # [BL, BR]
        if K_GATE:
            b_z = _gate(b_z, kg, i_lh)
        b_raw += tl.dot(b_z, b_up, input_precision="ieee")
        b_rawp += tl.dot(b_z, b_upp, input_precision="ieee")
        b_k = rope_apply(b_raw, b_rawp, (pos_n + l0 + o_l).to(tl.float32)[:, None] * b_inv, sign)
    else:
        b_k = rope_apply(b_x, b_xp, (pos_n - pos_o).to(tl.float32) * b_inv, sign)
    tl.store(p_ko + o_l[:, None] * D + o_d[None, :], b_k.to(ety), mask=m_k)

    p_v, svl = _tile(p_t, 1, 7, k0, i_b, i_h, l0, ALIGNED, VEC)
    b_v = tl.load(p_v + (o_l[:, None] * svl + o_v[None, :]), mask=m_x, other=0.0)  # [BL, BDV]
    if V_TF:
        b_v = b_v.to(tl.float32)
        o_r = tl.arange(0, BLOCK_RV)
        m_r = o_r < RV
        b_down = tl.load(vd + (i_lh * DV + o_v[:, None]) * RV + o_r[None, :], mask=m_v[:, None] & m_r[None, :],
                         other=0.0).to(tl.float32)
        b_up = tl.load(vu + (i_lh * RV + o_r[:, None]) * DV + o_v[None, :], mask=m_r[:, None] & m_v[None, :],
                       other=0.0).to(tl.float32)
        b_z = tl.dot(b_v, b_down, input_precision="ieee")
        if V_GATE:
            b_z = _gate(b_z, vg, i_lh)
        b_v += tl.dot(b_z, b_up, input_precision="ieee")
    tl.store(p_vo + o_l[:, None] * DV + o_v[None, :], b_v.to(ety), mask=m_x)


@register("map_kv_caches", "triton", available=available)
def map_kv_caches(keys, values, orig, new, rope, params):
    check_inputs("map_kv_caches", [t for side in (keys, values) for row in side for t in row] + list(params.values()))
    NL, N = len(keys), len(keys[0])
    k0, v0 = keys[0][0], values[0][0]
    B, H, _, D = k0.shape
    DV, dev = v0.shape[3], k0.device
    ko = [[empty(k.shape, k.dtype, dev) for k in row] for row in keys]
    vo = [[empty(v.shape, v.dtype, dev) for v in row] for row in values]
    pairs = [(l, n) for l in range(NL) for n in range(N) if keys[l][n].shape[2] > 0]
    if not pairs or B * H == 0:
        return ko, vo
    if any(t.stride(2) >= 2**31 // 128 for l, n in pairs for t in (keys[l][n], values[l][n])):
        raise NotImplementedError("map_kv_caches: the triton backend needs sequence strides < 2**24 elements")
    tab = torch.tensor([
        [keys[l][n].data_ptr(), values[l][n].data_ptr(), ko[l][n].data_ptr(), vo[l][n].data_ptr(),
         *keys[l][n].stride()[:3], *values[l][n].stride()[:3], keys[l][n].shape[2], l, l * N + n]
        for l, n in pairs
    ], dtype=torch.int64).to(dev)
    vec = 16 // k0.element_size()
    aligned = D % vec == 0 and DV % vec == 0 and all(
        t.data_ptr() % 16 == 0 and all(st % vec == 0 for st in t.stride()[:3])
        for l, n in pairs for t in (keys[l][n], values[l][n], ko[l][n], vo[l][n]))
    prm = {name: (t.contiguous() if t is not None else rope.inv_freq) for name, t in params.items()}
    RK = params["k_down"].shape[-1] if params["k_down"] is not None else 0
    RV = params["v_down"].shape[-1] if params["v_down"] is not None else 0
    n_l = cdiv(max(keys[l][n].shape[2] for l, n in pairs), BLOCK_L)  # tiles of the longest pair
    _map_kv_kernel[(n_l * len(pairs) * B * H,)](
        tab, k0, orig.contiguous(), new.contiguous(), prm["k_down"], prm["k_up"], prm["k_gate"],
        prm["v_down"], prm["v_up"], prm["v_gate"], rope.inv_freq, B, H, RK, RV, n_l,
        D=D, DV=DV, ROT=rope.rotary_dim, GPTJ=rope.style == "gptj",
        K_TF=params["k_down"] is not None, K_GATE=params["k_gate"] is not None,
        V_TF=params["v_down"] is not None, V_GATE=params["v_gate"] is not None, ALIGNED=aligned, VEC=vec,
        BLOCK_L=BLOCK_L, BLOCK_D=max(16, next_power_of_2(D)), BLOCK_DV=max(16, next_power_of_2(DV)),
        BLOCK_RK=max(16, next_power_of_2(RK)), BLOCK_RV=max(16, next_power_of_2(RV)),
    )
    return ko, vo


# Triton types of _map_kv_kernel's runtime arguments for ahead-of-time compiles; "T": the caches' element type
_ARG_TYPES = dict(tab="*i64", k0="*T", orig="*i64", new="*i64", kd="*fp32", ku="*fp32", kg="*fp32", vd="*fp32",
                  vu="*fp32", vg="*fp32", inv_freq="*fp32", **dict.fromkeys("B H RK RV NT".split(), "i32"))


def compile_specs(dtype: str, D: int, arch: int) -> list[CompileSpec]:
    """``_map_kv_kernel`` as a pure rotation and with gated rank-16 key and value transforms, for caches of element
    type ``dtype`` ("fp16", "bf16", "fp32") and head dim ``D`` (keys and values), aligned rows, neox RoPE over the
    whole head, in the launcher's tile (the same on every ``arch``)."""
    specs = []
    for variant in ("rotate", "transform"):
        tf, BD = variant == "transform", max(16, next_power_of_2(D))
        consts = dict(D=D, DV=D, ROT=D, GPTJ=False, K_TF=tf, K_GATE=tf, V_TF=tf, V_GATE=tf, ALIGNED=True,
                      VEC=16 // TENSOR_DTYPES[dtype].itemsize, BLOCK_D=BD, BLOCK_DV=BD, BLOCK_RK=16, BLOCK_RV=16)
        specs.append(compile_spec(_map_kv_kernel, variant, _ARG_TYPES, dtype, consts, [fixed_tile(BLOCK_L=BLOCK_L)]))
    return specs
