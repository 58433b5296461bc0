"""Fused multi-branch attention: one kernel over a table of separately stored KV segments.

Each program owns a tile of ``BLOCK_M`` rows of one (batch row, kv head): the rows are the flattened
(query i, head g) pairs of the ``G = Hq / Hkv`` query heads sharing that kv head, so K/V are read once
per kv head and never repeated. Segments are walked through a pointer table (no concatenation, any
strides with unit last stride); per segment the query tile is rotated by ``-shift`` in registers
(RoPE is relative, so this re-indexes the segment's keys without rewriting them).

Decode (few query rows) splits every segment's key range across ``NSPLIT`` programs that write
partial states; the combine kernel (:mod:`.combine`) merges them. Calibrated groups (temperature, LSE
scale, log-weight knobs) take the same route with one or more splits: the combine kernel applies the
knobs while merging the groups.

Cascade (shared-prefix) attention: segments every batch row shares (a batch-1 prefix expanded over the
batch, batch stride 0) are read by ``CASCADE`` programs whose M tile packs the rows of all batch rows of a
kv head, each row with its own lengths, padding, shift and window; a second launch reads the rows' own
segments, and the combine kernel merges both by LSE (``plan_launches`` says when). With
``PSKERNELS_TRITON_CASCADE_MERGE=1`` the own-segment launch merges the cascade's partial states into its own on
the way out instead (``MERGE_WS``: one launch fewer; one split, no knobs, no softcap or window), not yet
measured on a GPU, hence off by default.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._core.devices import host_to_device
from .._core.registry import register
from .._core.segments import SegmentParams
from .combine import LOG2E, combine, merge_final, merge_step
from .rope_utils import rope_apply, rope_layout, rope_partner, sincos
from .utils import (
    TENSOR_DTYPES,
    CompileSpec,
    TileConfig,
    available,
    cdiv,
    check_inputs,
    compile_spec,
    empty,
    next_power_of_2,
    on_gpu,
)

# segment table rows (int64): k_ptr, v_ptr, k strides (b, h, l), v strides (b, h, l), causal;
# per-(segment, batch row) table: seq_len, left_pad, shift, segment_position
_SEG_COLS = 9
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
# the interpreter's tile (its warps and stages are unused there); GPU launches autotune over _TILES
_FIXED_TILE = (16, 16, 4, 3)
_DECODE_ROWS = 8  # Lq up to this is treated as decode (split-KV)


@triton.jit
def _tanh(x):
    # saturates to +-1 without overflow: exp2 -> inf gives 1, exp2 -> 0 gives -1
    return 1.0 - 2.0 / (tl.exp2(x * (2.0 * LOG2E)) + 1.0)


@triton.jit
def _mba_fwd_kernel(
    q, o, lse, ws_o, ws_lse, seg, seg_row, grp, qpos, knobs, inv_freq,
    sqb, sqh, sqm, sob, soh, som,
    B, HKV, Lq, NGR, NSPLIT, NMERGE, scale, softcap, window,
    G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, ROT: tl.constexpr, GPTJ: tl.constexpr,
    HAS_SHIFT: tl.constexpr, SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, HAS_KNOBS: tl.constexpr,
    SPLIT: tl.constexpr, CASCADE: tl.constexpr, MERGE_WS: tl.constexpr, PREC: tl.constexpr, DOT_DT: tl.constexpr,
    ALIGNED: tl.constexpr,
    ES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # a cascade program writes partial states: the rows' own segments are merged with them by the combine kernel
    tl.static_assert(SPLIT or not CASCADE, "CASCADE launches write the split-KV workspace (SPLIT)")
    # a launch that merges the workspace's states writes the final output: one split, one uncalibrated group
    tl.static_assert(not (MERGE_WS and (SPLIT or CASCADE or HAS_KNOBS)), "MERGE_WS writes the final output")
    i_s = tl.program_id(1)
    HQ = HKV * G
    if CASCADE:
        # axis 0 flattens (kv head, tile of its rows x queries x heads): every batch row's queries share the
        # M tile, so each K/V tile of a segment shared by all rows is read once for all of them
        NR = G * Lq
        NM = tl.cdiv(B * NR, BLOCK_M)
        i_m, i_hk = tl.program_id(0) % NM, tl.program_id(0) // NM
        o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_r = o_r < B * NR
        # [BM] batch row of each tile row; rows past the end read row B - 1's metadata (then masked), so the
        # per-row tables need no masked loads
        i_b = tl.minimum(o_r // NR, B - 1)
        o_i, o_g = o_r % NR // G, o_r % G  # [BM] query index, head within the kv head's group
    else:
        # axis 0 flattens (batch row, kv head, query tile): only it may exceed 65535 programs
        NM = tl.cdiv(G * Lq, BLOCK_M)
        i_m, i_bh = tl.program_id(0) % NM, tl.program_id(0) // NM
        i_b, i_hk = (i_bh // HKV).to(tl.int64), i_bh % HKV
        o_r = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_i, o_g = o_r // G, o_r % G  # [BM] query index, head within the kv head's group
        m_r = o_i < Lq
    o_hq = i_hk * G + o_g
    o_d, o_v = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    m_d, m_v = o_d < D, o_v < DV
    o_nl = tl.arange(0, BLOCK_N)

    h0 = (i_hk * G).to(tl.int64)
    if CASCADE:  # the tile spans batch rows: 64-bit row offsets
        p_q = (q + h0 * sqh) + (i_b.to(tl.int64) * sqb + o_g * sqh + o_i * sqm)  # [BM]
    else:
        # 64-bit tile bases (first head and query of the tile), 32-bit offsets inside the tile
        i0 = i_m * BLOCK_M // G
        i0_64 = i0.to(tl.int64)
        p_q = (q + i_b * sqb + h0 * sqh + i0_64 * sqm) + (o_g * sqh + (o_i - i0) * sqm)  # [BM]
    # neox over the whole (power-of-two) head: rotate the two halves as separate [BM, BD/2] tiles
    HALVES: tl.constexpr = HAS_SHIFT and not GPTJ and ROT == BLOCK_D
    if HALVES:
        o_h = tl.arange(0, BLOCK_D // 2)
        b_inv = tl.load(inv_freq + o_h)  # [BD/2]
    elif HAS_SHIFT:
        sign, b_inv = rope_layout(o_d, inv_freq, ROT, GPTJ)
    else:
        b_qs = tl.load(p_q[:, None] + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
    if WINDOW:
        b_qpos = tl.load(qpos + i_b * Lq + o_i, mask=m_r, other=0)  # [BM]
    if not (SPLIT or HAS_KNOBS):
        # row pointers only: [BM, BDV] address tensors live across the loops would exhaust registers
        p_o = (o + i_b * sob + h0 * soh + i0_64 * som) + (o_g * soh + (o_i - i0) * som)  # [BM]
        p_lse = lse + (i_b * HQ + o_hq) * Lq + o_i

    for i_g in range(NGR):
        if HAS_KNOBS:
            b_t = tl.load(knobs + i_g * HQ + o_hq, mask=m_r, other=1.0)  # [BM] temperature
            b_xs = LOG2E / b_t[:, None]
        else:
            b_xs = LOG2E
        b_m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        b_l = tl.zeros([BLOCK_M], tl.float32)
        b_acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for i_seg in range(tl.load(grp + i_g), tl.load(grp + i_g + 1)):
            p_seg = seg + i_seg * 9
            p_k = tl.load(p_seg).to(tl.pointer_type(q.dtype.element_ty))
            p_v = tl.load(p_seg + 1).to(tl.pointer_type(q.dtype.element_ty))
            if CASCADE:  # a shared segment: batch stride 0
                p_k += i_hk * tl.load(p_seg + 3)
                p_v += i_hk * tl.load(p_seg + 6)
            else:
                p_k += i_b * tl.load(p_seg + 2) + i_hk * tl.load(p_seg + 3)
                p_v += i_b * tl.load(p_seg + 5) + i_hk * tl.load(p_seg + 6)
            # tile offsets stay int32 (launcher: BLOCK_N * stride < 2**31); the 64-bit part lives in the pointers
            skl, svl = tl.load(p_seg + 4).to(tl.int32), tl.load(p_seg + 7).to(tl.int32)
            causal = tl.load(p_seg + 8)
            if ALIGNED:  # 16-byte aligned rows let loads vectorise (cp.async) through table pointers
                skl, svl = tl.multiple_of(skl, 16 // ES), tl.multiple_of(svl, 16 // ES)
            # per-row metadata: scalars, or [BM] vectors in a cascade tile (each row its own lengths and shift)
            p_row = seg_row + (i_seg * B + i_b) * 4
            seq_len, pad = tl.load(p_row).to(tl.int32), tl.load(p_row + 1).to(tl.int32)
            shift, spos = tl.load(p_row + 2), tl.load(p_row + 3)
            # visible slots of each row: [b_lo, b_hi] (padding, causal, window); the tile scans their union
            b_hi = tl.zeros([BLOCK_M], tl.int32) + (seq_len - 1)
            if causal != 0:
                b_hi = tl.minimum(b_hi, seq_len - Lq + o_i)
            if WINDOW:
                b_lo = tl.minimum(tl.maximum(b_qpos - spos - window + 1, pad), seq_len).to(tl.int32)
            else:
                b_lo = tl.zeros([BLOCK_M], tl.int32) + pad
            lo = tl.min(tl.where(m_r, b_lo, seq_len), 0)
            hi = tl.max(tl.where(m_r, b_hi, -1), 0) + 1
            if SPLIT:
                chunk = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NSPLIT), BLOCK_N) * BLOCK_N
                lo += i_s * chunk
                hi = tl.minimum(hi, lo + chunk)
                b_lo, b_hi = tl.maximum(b_lo, lo), tl.minimum(b_hi, hi - 1)
            if HALVES:
                b_q1 = tl.load(p_q[:, None] + o_h[None, :], mask=m_r[:, None], other=0.0).to(tl.float32)
                b_q2 = tl.load(p_q[:, None] + (o_h + BLOCK_D // 2)[None, :], mask=m_r[:, None],
                               other=0.0).to(tl.float32)
                if CASCADE:
                    b_sin, b_cos = sincos(-shift.to(tl.float32)[:, None] * b_inv[None, :])  # [BM, BD/2]
                    # rounded early: fewer fp32 [BM, BD/2] tiles live at once
                    b_r1 = (b_q1 * b_cos - b_q2 * b_sin).to(q.dtype.element_ty)
                    b_r2 = (b_q2 * b_cos + b_q1 * b_sin).to(q.dtype.element_ty)
                else:
                    b_sin, b_cos = sincos(-shift.to(tl.float32) * b_inv)  # [BD/2]
                    b_r1 = b_q1 * b_cos[None, :] - b_q2 * b_sin[None, :]
                    b_r2 = b_q2 * b_cos[None, :] + b_q1 * b_sin[None, :]
                b_qs = tl.reshape(tl.permute(tl.join(b_r1, b_r2), (0, 2, 1)), [BLOCK_M, BLOCK_D])
                b_qs = b_qs.to(q.dtype.element_ty)
            elif HAS_SHIFT:
                # q is re-read per segment (cache-resident) rather than held rotated and unrotated in registers
                b_q = tl.load(p_q[:, None] + o_d[None, :], mask=m_r[:, None] & m_d[None, :], other=0.0)  # [BM, BD]
                b_qp = rope_partner(p_q[:, None], o_d, m_r[:, None], b_q, ROT, GPTJ)
                if CASCADE:
                    b_ang = -shift.to(tl.float32)[:, None] * b_inv[None, :]  # [BM, BD]
                else:
                    b_ang = -shift.to(tl.float32) * b_inv[None, :]  # [1, BD]
                b_qs = rope_apply(b_q.to(tl.float32), b_qp.to(tl.float32), b_ang, sign[None, :]).to(b_q.dtype)
            p_kj, p_vj = p_k + lo.to(tl.int64) * skl, p_v + lo.to(tl.int64) * svl
            if ALIGNED:
                p_kj, p_vj = tl.multiple_of(p_kj, 16), tl.multiple_of(p_vj, 16)
            for j0 in range(lo, hi, BLOCK_N):
                o_n = j0 + o_nl
                m_n = o_n < hi
                b_k = tl.load(p_kj + (o_nl[None, :] * skl + o_d[:, None]), mask=m_n[None, :] & m_d[:, None], other=0.0)
                b_x = tl.dot(b_qs.to(DOT_DT), b_k.to(DOT_DT), input_precision=PREC) * scale  # [BM, BN]
                if SOFTCAP:
                    b_x = softcap * _tanh(b_x / softcap)
                b_x = b_x * b_xs  # log2 units of scores / T
                b_x = tl.where((o_n[None, :] >= b_lo[:, None]) & (o_n[None, :] <= b_hi[:, None]), b_x, float("-inf"))
                # online softmax; a row that has seen nothing keeps m = -inf and is shifted by 0 instead
                b_mn = tl.maximum(b_m, tl.max(b_x, 1))
                b_ms = tl.where(b_mn == float("-inf"), 0.0, b_mn)
                b_p = tl.exp2(b_x - b_ms[:, None])
                b_a = tl.exp2(b_m - b_ms)
                b_v = tl.load(p_vj + (o_nl[:, None] * svl + o_v[None, :]), mask=m_n[:, None] & m_v[None, :], other=0.0)
                b_pv = tl.dot(b_p.to(b_v.dtype).to(DOT_DT), b_v.to(DOT_DT), input_precision=PREC)  # [BM, BDV]
                b_acc = b_acc * b_a[:, None] + b_pv
                b_l = b_l * b_a + tl.sum(b_p, 1)
                b_m = b_mn
                p_kj += BLOCK_N * skl
                p_vj += BLOCK_N * svl
        if MERGE_WS:
            # the cascade launch's NMERGE partial states of these rows (the shared segments), merged here rather
            # than by a combine launch; in log2 units of scores, as this state (no knobs: T = 1)
            # not software-pipelined: a stage in flight would hold another [BM, BDV] fp32 tile in registers
            for i_p in tl.range(NMERGE, num_stages=1):
                o_w = ((((i_p * NGR + i_g) * B).to(tl.int64) + i_b) * HQ + o_hq) * Lq + o_i  # [BM]
                b_s = tl.load(ws_lse + o_w, mask=m_r, other=float("-inf")) * LOG2E
                b_o = tl.load(ws_o + o_w[:, None] * DV + o_v[None, :], mask=m_r[:, None] & m_v[None, :], other=0.0)
                b_m, b_l, b_acc = merge_step(b_m, b_l, b_acc, b_s, b_o)
        # group state: output and LSE in units of scores / T
        b_og, b_lg = merge_final(b_m, b_l, b_acc)
        if SPLIT or HAS_KNOBS:  # state per (split, group); the combine kernel merges them and applies the knobs
            o_w = ((((i_s * NGR + i_g) * B).to(tl.int64) + i_b) * HQ + o_hq) * Lq + o_i  # [BM]
            tl.store(ws_o + o_w[:, None] * DV + o_v[None, :], b_og, mask=m_r[:, None] & m_v[None, :])
            tl.store(ws_lse + o_w, b_lg, mask=m_r)
        else:  # a single uncalibrated group (NGR == 1) is the final result
            tl.store(p_o[:, None] + o_v[None, :], b_og.to(o.dtype.element_ty), mask=m_r[:, None] & m_v[None, :])
            tl.store(p_lse, b_lg, mask=m_r)


# Autotune tiles (BLOCK_M, BLOCK_N, num_warps, num_stages) per specialisation class, dtype and arch (90: sm_90
# and newer, 80: older). Every list holds only tiles that ptxas compiles without register spills for its class
# (measured with pskernels.apps.kernel_report for sm_80 / sm_90, fp16 / bf16 / fp32, head dims 64 / 80 / 128;
# tests/test_aot_compile.py compiles every entry and asserts it). Half precision: 8 warps for 64-row tiles and
# no 128-row tile once a RoPE shift or a calibration feature is live (the rotated q tile or the extra
# per-row state then spills). fp32: `ieee` dots lower to FMA loops whose register use ptxas balances
# differently per arch, hence per-arch lists of small tiles. Cascade launches (CASCADE, always split) have classes
# of their own: each row's metadata and, with a shift, each row's rotation (sin/cos over a [BM, BD] tile while the
# accumulator is live) spill most 64-row split tiles; unshifted (the ParallelCache prefix), Hopper keeps 64- and
# 128-row wgmma tiles.
_TILES = {
    "half": {
        "plain": [(32, 64, 4, 2), (64, 32, 8, 3), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 3)],
        "rope": [(16, 64, 4, 3), (64, 32, 8, 3)],
        "rope_any": [(16, 64, 4, 3)],
        "heavy": {90: [(16, 64, 4, 3), (64, 32, 8, 3), (64, 64, 8, 2)], 80: [(16, 64, 4, 3)]},
        "heavy_rope_any": [(16, 64, 4, 3)],
        "split": [(16, 64, 4, 3), (64, 32, 8, 3)],
        "split_heavy": [(16, 64, 4, 3), (64, 32, 8, 3)],
        "cascade": {90: [(64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 8, 3), (16, 64, 4, 3)],
                    80: [(32, 64, 4, 2), (16, 64, 4, 3), (32, 32, 8, 3)]},
        "cascade_rope": [(16, 64, 4, 3), (32, 32, 8, 3)],
        "cascade_heavy": [(16, 64, 4, 3), (32, 32, 8, 3)],
    },
    "fp32": {
        "plain": {90: [(16, 16, 4, 3)], 80: [(16, 16, 8, 3), (16, 32, 8, 3)]},
        "rope": {90: [(16, 16, 4, 3), (32, 16, 8, 3), (64, 32, 8, 2)],
                 80: [(16, 16, 4, 3), (16, 32, 8, 3), (32, 32, 8, 3)]},
        "rope_any": {90: [(16, 16, 8, 3), (32, 16, 8, 3)], 80: [(16, 16, 8, 3)]},
        "heavy": {90: [(32, 16, 8, 3)], 80: [(16, 16, 4, 3), (16, 32, 8, 3), (32, 32, 8, 3)]},
        "heavy_rope_any": {90: [(16, 16, 8, 3), (32, 16, 8, 3)], 80: [(16, 16, 8, 3)]},
        "split": {90: [(16, 16, 8, 3), (32, 16, 8, 3)], 80: [(16, 16, 4, 3)]},
        "split_heavy": {90: [(16, 16, 4, 3)], 80: [(16, 16, 4, 3), (32, 32, 8, 3)]},
        "cascade": [(16, 16, 8, 3), (32, 16, 8, 3)],
        "cascade_rope": {90: [(16, 16, 8, 3)], 80: [(16, 16, 8, 3), (16, 32, 8, 3)]},
        "cascade_heavy": [(16, 16, 8, 3), (32, 16, 8, 3)],
    },
}
# ptxas otherwise caps registers below 255 for occupancy and spills a few bytes to get there
MAXNREG = 255
SMEM_BUDGET = {90: 227 * 1024, 80: 163 * 1024}  # opt-in shared memory per block: H100/H200, A100


def tile_class(*, HAS_SHIFT, GPTJ, ROT, BLOCK_D, SOFTCAP, WINDOW, HAS_KNOBS, SPLIT, CASCADE=False, MERGE_WS=False,
               **_) -> str:
    """Register-pressure class of a kernel specialisation (its constexprs), the key of ``_TILES``. An unshifted
    launch that merges the cascade's states takes the general RoPE class's small tiles: with its epilogue the
    plain class's 128 x 64 tile spills on sm_80 (half), the neox class's 32 x 32 / 64 x 32 (fp32, D = 80)."""
    heavy = bool(SOFTCAP or WINDOW or HAS_KNOBS)
    if CASCADE:
        return "cascade_heavy" if heavy else "cascade_rope" if HAS_SHIFT else "cascade"
    if SPLIT:
        return "split_heavy" if heavy else "split"
    # the two-halves RoPE path (neox over the whole power-of-two head) is as light as no shift at all
    halves = HAS_SHIFT and not GPTJ and ROT == BLOCK_D
    if heavy:
        return "heavy" if halves or not HAS_SHIFT else "heavy_rope_any"
    if not HAS_SHIFT:
        return "rope_any" if MERGE_WS else "plain"
    return "rope" if halves else "rope_any"


def tiles_for(cls: str, half: bool, arch: int) -> list[tuple[int, int, int, int]]:
    """Spill-free tiles of class ``cls`` for half precision (else fp32) on compute capability ``arch``."""
    t = _TILES["half" if half else "fp32"][cls]
    return t[90 if arch >= 90 else 80] if isinstance(t, dict) else t


def _tile(c):
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _prune(configs, named_args, **kwargs):
    q = named_args["q"]
    major, minor = torch.cuda.get_device_capability(q.device)
    arch = 10 * major + minor
    keep = tiles_for(tile_class(**kwargs), q.element_size() < 4, arch)
    bd, bdv, es = kwargs["BLOCK_D"], kwargs["BLOCK_DV"], q.element_size()
    # q tile + pipelined K/V tiles within the arch's shared memory
    budget = SMEM_BUDGET[90 if arch >= 90 else 80]
    mine = [c for c in configs if _tile(c) in keep]
    fits = [c for c in mine
            if (c.kwargs["BLOCK_M"] * bd + c.num_stages * c.kwargs["BLOCK_N"] * (bd + bdv)) * es <= budget]
    return fits or mine[:1]


_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st, maxnreg=MAXNREG)
    for bm, bn, w, st in sorted({t for d in _TILES.values() for v in d.values()
                                 for t in (sum(v.values(), []) if isinstance(v, dict) else v)})
]
_mba_fwd_tuned = triton.autotune(
    _GPU_CONFIGS, key=["G", "D", "DV", "ROT", "GPTJ", "HAS_SHIFT", "SOFTCAP", "WINDOW", "HAS_KNOBS", "SPLIT",
                        "CASCADE", "MERGE_WS"],
    prune_configs_by={"early_config_prune": _prune},
)(_mba_fwd_kernel)


def _num_splits(rows: int, B: int, Hkv: int, max_len: int, device: torch.device, block_m: int = _FIXED_TILE[0],
                waves: int = 2) -> int:
    """Split-KV factor: enough programs for ``waves`` per SM when the query side alone cannot fill the machine.

    The query side launches ``cdiv(rows, block_m)`` programs per (batch row, kv head)."""
    if max_len == 0:
        return 1
    if on_gpu(device):
        target, min_chunk = waves * torch.cuda.get_device_properties(device).multi_processor_count, 256
    else:
        target, min_chunk = 8, 2 * _FIXED_TILE[1]
    n_prog = cdiv(rows, block_m) * B * Hkv
    return max(1, min(target // n_prog, cdiv(max_len, min_chunk), 64))


# The largest M tile an autotuned cascade launch may pick: its key splits are counted with it.
_CASCADE_MAX_M = max(t[0] for cls in _TILES["half"] if cls.startswith("cascade") for half in (True, False)
                     for arch in (80, 90) for t in tiles_for(cls, half, arch))


def check_segments(q, keys, values) -> None:
    """The segment table addresses rows with unit last stride in q's dtype on q's device: refuse anything else."""
    for name, ts in (("keys", keys), ("values", values)):
        for s, t in enumerate(ts):
            if t.dtype != q.dtype or t.device != q.device or (t.shape[-1] > 1 and t.stride(-1) != 1):
                raise ValueError(f"{name}[{s}]: expected dtype {q.dtype} on {q.device} (as q) with stride(-1) == 1, "
                                 f"got {t.dtype} on {t.device} with strides {t.stride()}")


class Launch(NamedTuple):
    """One launch of the attention kernel: the live segments it reads (in group order), whether it is a cascade
    launch (every batch row's queries of a kv head in one M tile, against segments all rows share) and its
    number of key splits."""

    segments: tuple
    cascade: bool
    nsplit: int


def shared_segments(keys, values) -> list[int]:
    """The non-empty segments every batch row shares: K and V broadcast over a batch of more than one row (batch
    stride 0), as the expanded batch-1 prefix of a zero-copy ``ParallelCache(prefix, [])``."""
    if keys[0].shape[0] < 2:
        return []
    return [s for s, (k, v) in enumerate(zip(keys, values)) if k.shape[2] > 0 and k.stride(0) == 0 == v.stride(0)]


def plan_launches(q, keys, values, groups, block_m: int = _FIXED_TILE[0], autotuned: bool = False) -> list[Launch]:
    """The attention kernel launches of one call with segment -> group map ``groups`` and ``block_m``-row tiles
    (``autotuned`` launches pass 16, the smallest tile any class uses, as their tile is picked later).

    Each (batch row, kv head) program of the plain launch reads every segment on its own, so a segment shared by
    all B rows is read B times. The cascade (Hydragen, FlashInfer's cascade attention) packs the rows' queries
    into the M tile instead and reads each shared K/V tile once per tile of ``B * G * Lq`` rows; a second launch
    reads the rows' own segments and the combine kernel merges the two by LSE. It pays when stacking fills the
    tile: a row's ``G * Lq`` queries take at most half of it (decode, prefill of a token or two), so packing at
    least halves the passes over the shared K/V (B -> cdiv(B * G * Lq, BLOCK_M)) for the price of a second
    launch and a combine pass, small next to those passes. A row that fills the tile on its own gains nothing
    from packing (prefill): it keeps the one plain launch.

    A decode cascade has few programs (one per kv head and tile of all rows), so its key splits fill the machine;
    autotuned, they are counted with the largest tile the tuner may pick, and aim at one wave of programs rather
    than two: each split adds a ``[B, Hq, Lq, DV]`` fp32 partial state to write and combine, a quarter of the
    prefix's bytes at 16 splits of an 8192-token, 8-kv-head bf16 prefix with 32 rows (issue 14's step)."""
    B, Hq, Lq, _ = q.shape
    Hkv = keys[0].shape[1]
    G = Hq // Hkv
    order = [s for s in sorted(range(len(keys)), key=lambda s: groups[s]) if keys[s].shape[2] > 0]

    def launch(segments, cascade):
        # split-KV for decode: the cascade's programs are per kv head (all rows in its tiles), the others per row
        rows, n_b = (B * G * Lq, 1) if cascade else (G * Lq, B)
        longest = max((keys[s].shape[2] for s in segments), default=0)
        count_m, waves = (_CASCADE_MAX_M if autotuned else block_m, 1) if cascade else (block_m, 2)
        nsplit = _num_splits(rows, n_b, Hkv, longest, q.device, count_m, waves) if Lq <= _DECODE_ROWS else 1
        return Launch(tuple(segments), cascade, nsplit)

    shared = set(shared_segments(keys, values))
    if not shared or 2 * G * Lq > block_m:
        return [launch(order, False)]
    own = [s for s in order if s not in shared]
    return [launch([s for s in order if s in shared], True)] + ([launch(own, False)] if own else [])


class _Setup(NamedTuple):
    """What a call derives from the plan's parameters and the tensors' shapes and batch strides alone, kept in
    ``SegmentParams.memo`` for the plan's later runs (one per layer of a forward)."""

    launches: list  # [Launch]
    tables: list  # per launch: (group offsets [NGR + 1], per-(segment, row) table [S', B, 4], query positions)
    knobs: torch.Tensor | None  # [3, NGR, Hq] temperature, LSE scale, log-weight
    use_ws: bool
    # the cascade's own-segment launch merges the cascade's states itself (MERGE_WS) instead of a combine launch
    merge: bool
    meta: dict  # the kernel's constexprs but ALIGNED, SPLIT, CASCADE, MERGE_WS


_SEG_TABLES = 64  # device segment tables kept per plan: one per set of K/V pointers (a forward has one per layer)
# a plan's first run on a set of tensors copies its tables to the device: that run cannot be captured
_CAPTURE = "multi_branch_attention (triton; run the plan once on the same tensors before capture)"


def _setup(q, keys, values, p: SegmentParams, tile) -> _Setup:
    # the constexprs depend on q's dtype and device too: a setup is never reused for others
    key = ("triton", tile, q.shape, q.dtype, q.device, tuple((k.shape, v.shape, k.stride(0) == 0, v.stride(0) == 0)
                                                             for k, v in zip(keys, values)))
    hit = p.memo.get(key)
    if hit is not None:
        return hit
    B, Hq, Lq, D = q.shape
    Hkv, DV = keys[0].shape[1], values[0].shape[3]
    G, dev = Hq // Hkv, q.device
    # Without calibration knobs, groups are exact attention either way: pool all segments in one softmax.
    groups = p.groups if p.has_knobs else [0] * len(keys)
    NGR = p.num_groups if p.has_knobs else 1
    launches = plan_launches(q, keys, values, groups, (tile or _FIXED_TILE)[0], autotuned=tile is None and on_gpu(dev))
    # built from the plan's host tables: indexing its device tables here would wait for the device
    h = p.host
    spos = h.segment_positions if h.segment_positions is not None else torch.zeros_like(h.seq_lens)
    rows = torch.stack([h.seq_lens, h.left_pad, h.shifts, spos], -1)  # [S, B, 4]
    tables = []
    for lc in launches:
        grp = [0] * (NGR + 1)
        for s in lc.segments:
            grp[groups[s] + 1] += 1
        seg_row = host_to_device(rows[list(lc.segments)], dev, _CAPTURE)  # [S', B, 4]
        qpos = p.query_positions.contiguous() if p.sliding_window is not None else seg_row
        tables.append((host_to_device(torch.tensor(grp).cumsum(0), dev, _CAPTURE), seg_row, qpos))
    knobs = None
    if p.has_knobs:
        ones = torch.ones(NGR, Hq, dtype=torch.float32, device=dev)
        knobs = torch.stack([
            p.temperature if p.temperature is not None else ones,
            p.lse_scale if p.lse_scale is not None else ones,
            p.log_weight if p.log_weight is not None else torch.zeros_like(ones),
        ]).contiguous()
    # Partial states go through a workspace and the combine kernel: key splits, the cascade's shared and own
    # launches, and calibrated groups (a second [BM, BDV] accumulator across the groups would make the attention
    # kernel spill). Each launch writes its own splits' slots. A cascade whose own-segment launch is one split
    # of one uncalibrated group can save the combine launch (opt-in): that launch merges the cascade's states into
    # its own. Not with softcap or window: that epilogue spills the heavy class's tiles.
    use_ws = any(lc.cascade for lc in launches) or sum(lc.nsplit for lc in launches) > 1 or knobs is not None
    merge = (os.environ.get("PSKERNELS_TRITON_CASCADE_MERGE") == "1" and len(launches) == 2 and launches[0].cascade
             and launches[1].nsplit == 1 and knobs is None and p.softcap is None and p.sliding_window is None)
    rope = p.rope if p.has_shift else None
    meta = dict(
        G=G, D=D, DV=DV, ROT=rope.rotary_dim if rope is not None else 0, GPTJ=rope is not None and rope.style == "gptj",
        HAS_SHIFT=rope is not None, SOFTCAP=p.softcap is not None, WINDOW=p.sliding_window is not None,
        HAS_KNOBS=knobs is not None, PREC="ieee" if q.dtype == torch.float32 else "tf32",
        # the Triton 3.8 interpreter multiplies bf16 dot operands as raw integer bits: feed it fp32
        DOT_DT=tl.float32 if q.dtype == torch.bfloat16 and not on_gpu(dev) else _TL_DTYPES[q.dtype],
        ES=q.element_size(), BLOCK_D=max(16, next_power_of_2(D)), BLOCK_DV=max(16, next_power_of_2(DV)),
    )
    setup = _Setup(launches, tables, knobs, use_ws, merge, meta)
    p.memo[key] = setup
    return setup


class _Tensors(NamedTuple):
    """What a run derives from its K/V tensors' addresses and strides alone, kept per such layout in
    ``SegmentParams.memo`` (a forward runs a plan once per layer, each layer on its own tensors)."""

    setup: _Setup
    metas: list  # per launch: its constexprs (the setup's, whether rows are 16-byte aligned, split, cascade)
    segment_tables: list  # per launch: its segment table on the device


def _tensors(q, keys, values, p: SegmentParams, tile) -> _Tensors:
    """The run's setup, constexprs and segment tables, made (and copied to the device) once per set of K/V
    addresses and strides: a plan's later runs on the same tensors check and copy nothing. Keyed by content, so
    tensors freed and others made at the same addresses with the same strides get tables of the same content."""
    layout = (tile, tuple((t.data_ptr(), t.stride()) for t in keys), tuple((t.data_ptr(), t.stride()) for t in values))
    cache = p.memo.setdefault("triton_tensors", {})
    hit = cache.pop(layout, None)
    if hit is None:
        check_segments(q, keys, values)
        setup = _setup(q, keys, values, p, tile)
        live = [t for lc in setup.launches for s in lc.segments for t in (keys[s], values[s])]
        if any(t.stride(2) >= 2**31 // 256 for t in live):
            raise NotImplementedError("multi_branch_attention: the triton backend needs sequence strides < 2**23 "
                                      "elements")
        es, S = q.element_size(), len(keys)
        aligned = all(t.data_ptr() % 16 == 0 and all(st % (16 // es) == 0 for st in t.stride()[:3]) for t in live)
        tables = [host_to_device(torch.tensor([
            (keys[s].data_ptr(), values[s].data_ptr(), *keys[s].stride()[:3], *values[s].stride()[:3],
             int(p.causal_last and s == S - 1)) for s in lc.segments] or [(0,) * _SEG_COLS], dtype=torch.int64),
            q.device, _CAPTURE) for lc in setup.launches]
        cascade = any(lc.cascade for lc in setup.launches)
        metas = [dict(setup.meta, ALIGNED=aligned, SPLIT=(cascade or lc.nsplit > 1) and not merges,
                      CASCADE=lc.cascade, MERGE_WS=merges)
                 for i, lc in enumerate(setup.launches) for merges in [setup.merge and i == 1]]
        hit = _Tensors(setup, metas, tables)
        if len(cache) >= _SEG_TABLES:
            del cache[next(iter(cache))]
    cache[layout] = hit  # most recently used last
    return hit


@register("multi_branch_attention", "triton", available=available)
def multi_branch_attention(q, keys, values, p: SegmentParams, *, tile=None):
    """Attention of ``q`` over the segments described by ``p``.

    ``tile`` (BLOCK_M, BLOCK_N, num_warps, num_stages) replaces the autotuner's choice on a GPU and the
    interpreter's fixed tile, so that tests can run every tile of ``_TILES`` (in the interpreter too)."""
    check_inputs("multi_branch_attention", [q, *keys, *values])
    B, Hq, Lq, D = q.shape
    Hkv, DV = keys[0].shape[1], values[0].shape[3]
    dev = q.device
    if DV == 0:
        raise NotImplementedError("multi_branch_attention: the triton backend needs a value head dim > 0")
    out = empty((B, Hq, Lq, DV), q.dtype, dev)
    lse = empty((B, Hq, Lq), torch.float32, dev)
    if lse.numel() == 0:
        return out, lse

    setup, metas, segment_tables = _tensors(q, keys, values, p, tile)
    # with a merge, only the cascade's splits go through the workspace
    NS = setup.launches[0].nsplit if setup.merge else sum(lc.nsplit for lc in setup.launches)
    NGR = setup.knobs.shape[1] if setup.knobs is not None else 1
    if setup.use_ws:
        ws_o = torch.empty((NS, NGR, B, Hq, Lq, DV), dtype=torch.float32, device=dev)
        ws_lse = torch.empty((NS, NGR, B, Hq, Lq), dtype=torch.float32, device=dev)
    rope = p.rope if p.has_shift else None
    gpu, slot = on_gpu(dev), 0
    for lc, (grp, seg_row, qpos), seg, meta in zip(setup.launches, setup.tables, segment_tables, metas):
        if not setup.use_ws:
            ws = (out, lse)
        elif meta["MERGE_WS"]:  # reads the states written before it (from slot 0) and writes the output
            ws = (ws_o, ws_lse)
        else:
            ws = (ws_o[slot:], ws_lse[slot:])
        n_merge = slot if meta["MERGE_WS"] else 0
        slot += lc.nsplit
        args = (
            q, out, lse, *ws, seg, seg_row, grp, qpos,
            setup.knobs if setup.knobs is not None else lse, rope.inv_freq if rope is not None else lse,
            *q.stride()[:3], *out.stride()[:3],
            B, Hkv, Lq, NGR, lc.nsplit, n_merge, p.scale, p.softcap or 1.0, p.sliding_window or 0,
        )
        _launch(lc, args, meta, Hq // Hkv * Lq, B, Hkv, tile, gpu)
    if setup.use_ws and not setup.merge:
        combine(ws_o, ws_lse, out, lse, setup.knobs)
    return out, lse


def _launch(lc: Launch, args, meta, rows: int, B: int, Hkv: int, tile, gpu: bool) -> None:
    """Launch ``lc``: a cascade's axis 0 tiles the ``B * rows`` query rows of each kv head, a plain launch the
    ``rows`` of each (batch row, kv head)."""
    rows, progs = (B * rows, Hkv) if lc.cascade else (rows, B * Hkv)
    if tile is None and gpu:
        _mba_fwd_tuned[lambda m: (cdiv(rows, m["BLOCK_M"]) * progs, lc.nsplit)](*args, **meta)
    else:
        bm, bn, warps, stages = tile or _FIXED_TILE
        _mba_fwd_kernel[(cdiv(rows, bm) * progs, lc.nsplit)](
            *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages, maxnreg=MAXNREG)


# Triton types of _mba_fwd_kernel's runtime arguments for ahead-of-time compiles; "T": the q/k/v element type
_ARG_TYPES = dict(q="*T", o="*T", lse="*fp32", ws_o="*fp32", ws_lse="*fp32", seg="*i64", seg_row="*i64", grp="*i64",
                  qpos="*i64", knobs="*fp32", inv_freq="*fp32", scale="fp32", softcap="fp32",
                  **dict.fromkeys("sqb sqh sqm sob soh som B HKV Lq NGR NSPLIT NMERGE window".split(), "i32"))
_OFF = dict(GPTJ=False, HAS_SHIFT=False, SOFTCAP=False, WINDOW=False, HAS_KNOBS=False, SPLIT=False, CASCADE=False,
            MERGE_WS=False)
_HEAVY = dict(SOFTCAP=True, WINDOW=True, HAS_KNOBS=True)
# The specialisations the kernel report compiles, at least one per tile class: no RoPE shift, neox over the whole
# head (the ParallelCache path; at D=80 the head is not a power of two and it takes the general path), gptj, partial
# rotary (rotary dim D / ROT_DIV), softcap + window + calibration knobs with each RoPE layout, split-KV decode, the
# cascade (always split-KV): unshifted, with per-row shifts on each RoPE path, and heavy, and the cascade's
# own-segment launch that merges its states (MERGE_WS: unsplit, no knobs, softcap or window). Lq and the other runtime
# ints stay runtime values.
AOT_VARIANTS = {
    "plain": dict(_OFF),
    "rope": dict(_OFF, HAS_SHIFT=True),
    "rope_gptj": dict(_OFF, HAS_SHIFT=True, GPTJ=True),
    "rope_partial": dict(_OFF, HAS_SHIFT=True, ROT_DIV=2),
    "heavy": dict(_OFF, **_HEAVY),
    "heavy_rope": dict(_OFF, HAS_SHIFT=True, **_HEAVY),
    "heavy_gptj": dict(_OFF, HAS_SHIFT=True, GPTJ=True, **_HEAVY),
    "split": dict(_OFF, HAS_SHIFT=True, SPLIT=True),
    "split_heavy": dict(_OFF, HAS_SHIFT=True, GPTJ=True, SPLIT=True, **_HEAVY),
    "cascade": dict(_OFF, SPLIT=True, CASCADE=True),
    "cascade_rope": dict(_OFF, HAS_SHIFT=True, SPLIT=True, CASCADE=True),
    "cascade_rope_gptj": dict(_OFF, HAS_SHIFT=True, GPTJ=True, SPLIT=True, CASCADE=True),
    "cascade_heavy": dict(_OFF, HAS_SHIFT=True, GPTJ=True, SPLIT=True, CASCADE=True, **_HEAVY),
    "merge": dict(_OFF, MERGE_WS=True),
    "merge_rope": dict(_OFF, HAS_SHIFT=True, MERGE_WS=True),
    "merge_rope_gptj": dict(_OFF, HAS_SHIFT=True, GPTJ=True, MERGE_WS=True),
}


def compile_specs(dtype: str, D: int, arch: int) -> list[CompileSpec]:
    """``_mba_fwd_kernel`` in each of ``AOT_VARIANTS`` for q/k/v of element type ``dtype`` ("fp16", "bf16", "fp32"),
    head dim ``D`` for keys and values (a multiple of 16, as are then the q/o strides), G = 4 and aligned rows,
    each with every tile the autotune prune keeps for it on compute capability ``arch``."""
    torch_dtype, BD = TENSOR_DTYPES[dtype], max(16, next_power_of_2(D))
    half = torch_dtype != torch.float32
    specs = []
    for variant, features in AOT_VARIANTS.items():
        features = dict(features)
        consts = dict(G=4, D=D, DV=D, ROT=D // features.pop("ROT_DIV", 1), **features,
                      PREC="tf32" if half else "ieee", DOT_DT=_TL_DTYPES[torch_dtype], ALIGNED=True,
                      ES=torch_dtype.itemsize, BLOCK_D=BD, BLOCK_DV=BD)
        tiles = [TileConfig(dict(BLOCK_M=bm, BLOCK_N=bn), warps, stages)
                 for bm, bn, warps, stages in tiles_for(tile_class(**consts), half, arch)]
        specs.append(compile_spec(_mba_fwd_kernel, variant, _ARG_TYPES, dtype, consts, tiles,
                                  multiple_of_16=("sqb", "sqh", "sqm", "sob", "soh", "som"), maxnreg=MAXNREG))
    return specs
