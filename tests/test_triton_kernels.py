"""Triton backend vs the PyTorch reference, through the public ops.

Without CUDA the kernels run in the Triton interpreter on CPU tensors; with CUDA every tensor the tests make is a
CUDA tensor (default device), so the same tests run the compiled, autotuned kernels.
"""
import math
import os
import subprocess
import sys

import pytest
import torch

import pskernels
import pskernels.triton  # noqa: F401  registers backend="triton" whatever ops/ imports
from pskernels.triton.multi_branch_attention import _num_splits

from op_helpers import make_rope

pytestmark = pytest.mark.interpreter

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
ATOL = {F32: 1e-4, F16: 4e-3, BF16: 3e-2}
RTOL = {F32: 0.0, F16: 2e-3, BF16: 1.6e-2}  # one rounding step of the output dtype


@pytest.fixture(autouse=True)
def _default_device():
    if torch.cuda.is_available():
        with torch.device("cuda"):
            yield
    else:
        yield


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # library-allocated outputs start as NaN: a missed write fails the comparison
    monkeypatch.setenv("PSKERNELS_DEBUG_NAN", "1")


def _assert_close(a, b, dtype):
    assert not a.isnan().any(), "NaN in triton output"
    torch.testing.assert_close(a.float(), b.float(), atol=ATOL[dtype], rtol=RTOL[dtype])


def _mba(q, keys, values, **kw):
    out, lse = pskernels.multi_branch_attention(q, keys, values, backend="triton", **kw)
    ref_out, ref_lse = pskernels.multi_branch_attention(q, keys, values, backend="torch", **kw)
    assert out.dtype == q.dtype and lse.dtype == F32
    _assert_close(out, ref_out, q.dtype)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "-inf pattern of lse differs"
    assert not lse.isnan().any()
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=1e-4 if q.dtype == F32 else 2e-2, rtol=0)
    return out, lse


def _segments(B, Hkv, lens, D, Dv, dtype):
    keys = [torch.randn(B, Hkv, n, D, dtype=dtype) for n in lens]
    values = [torch.randn(B, Hkv, n, Dv, dtype=dtype) for n in lens]
    return keys, values


# ---------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 2), (4, 1)])
@pytest.mark.parametrize("Lq", [1, 7, 13])
def test_mba_ragged_gqa(dtype, Hq, Hkv, Lq):
    B, D = 2, 64
    lens = (7, 13, Lq + 3)
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    keys, values = _segments(B, Hkv, lens, D, D, dtype)
    seq_lens = torch.tensor([[7, 3], [0, 13], [Lq + 3, Lq + 1]])
    left_pad = torch.tensor([[2, 0], [0, 1], [0, 1]])
    _mba(q, keys, values, seq_lens=seq_lens, left_pad=left_pad)


@pytest.mark.parametrize("style,rd", [("neox", 64), ("neox", 32), ("gptj", 64), ("gptj", 16)])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_mba_position_shifts(style, rd, dtype):
    B, Hq, Hkv, Lq, D = 2, 4, 2, 5, 64
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    keys, values = _segments(B, Hkv, (9, 6, 5), D, D, dtype)
    shifts = torch.tensor([[0, 0], [9, -3], [15, 1000]])
    _mba(q, keys, values, position_shifts=shifts, rope=make_rope(rd, style=style))


@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (96, 64), (128, 128), (256, 80)])
def test_mba_head_dims(D, Dv):
    B, Hq, Hkv, Lq = 1, 2, 1, 3
    q = torch.randn(B, Hq, Lq, D)
    keys, values = _segments(B, Hkv, (5, 17, 3), D, Dv, F32)
    _mba(q, keys, values, position_shifts=torch.tensor([0, 5, 2]), rope=make_rope(D // 2 if D == 80 else D))


def test_mba_softcap_sliding_window():
    B, Hq, Hkv, Lq, D = 2, 6, 2, 7, 64
    q = torch.randn(B, Hq, Lq, D)
    keys, values = _segments(B, Hkv, (12, 10, 9), D, D, F32)
    seg_pos = torch.tensor([[0, 0], [12, 12], [22, 20]])
    _mba(q, keys, values, softcap=3.0, sliding_window=9, segment_positions=seg_pos,
         seq_lens=torch.tensor([[12, 11], [10, 7], [9, 8]]))
    # explicit query positions, no causal own segment
    qpos = torch.arange(Lq)[None].expand(B, Lq) + torch.tensor([[25], [18]])
    _mba(q, keys, values, sliding_window=4, segment_positions=seg_pos, query_positions=qpos, causal_last=False)


@pytest.mark.parametrize("Lq", [13, 3, 1])  # 13: no key split, calibrated groups merged through the workspace
def test_mba_knobs_and_groups(Lq):
    B, Hq, Hkv, D = 2, 4, 2, 64
    q = torch.randn(B, Hq, Lq, D)
    keys, values = _segments(B, Hkv, (6, 40, 0, 33, Lq + 1), D, D, F32)
    seq_lens = torch.tensor([[6, 6], [40, 0], [0, 0], [30, 0], [Lq + 1, Lq]])
    kw = dict(seq_lens=seq_lens, position_shifts=torch.tensor([0, 6, 6, 6, 40]), rope=make_rope(64, style="gptj"))
    # APE-style: branches pooled into one group; group 2 holds an empty segment and a ragged one
    _mba(q, keys, values, temperature=0.9, lse_scale=0.9, segment_groups=[0, 1, 2, 2, 3], **kw)
    _mba(q, keys, values, temperature=torch.rand(3, Hq) + 0.5, lse_scale=torch.rand(3) + 0.5,
         log_weight=torch.randn(3, Hq), segment_groups=[0, 1, 1, 1, 2], **kw)


def test_mba_strided_views():
    B, Hq, Hkv, Lq, D = 2, 6, 2, 4, 80
    big = torch.randn(B, Hkv, 20, D)
    prefix_k, prefix_v = big[:, :, 3:10], torch.randn(B, Hkv, 20, D)[:, :, 5:12]
    hf_k = torch.randn(B, 11, Hkv, D).transpose(1, 2)  # HF [B, L, H, D] storage
    hf_v = torch.randn(B, 11, Hkv, D).transpose(1, 2)
    own = torch.randn(B, Lq, 2 * Hkv, D)[:, :, ::2].transpose(1, 2)  # every other head
    q = torch.randn(B, Lq, Hq, D).transpose(1, 2)
    assert not (prefix_k.is_contiguous() or hf_k.is_contiguous() or own.is_contiguous() or q.is_contiguous())
    _mba(q, [prefix_k, hf_k, own], [prefix_v, hf_v, own], position_shifts=torch.tensor([0, 7, 3]),
         rope=make_rope(32))


def test_mba_empty_segments_and_rows():
    B, Hq, Hkv, Lq, D = 2, 4, 2, 5, 64
    q = torch.randn(B, Hq, Lq, D)
    keys, values = _segments(B, Hkv, (0, 8, 3), D, D, F32)
    # row 1: prefix absent and only 3 own tokens for 5 queries -> its first two queries see nothing
    seq_lens = torch.tensor([[0, 0], [8, 0], [3, 3]])
    out, lse = _mba(q, keys, values, seq_lens=seq_lens)
    assert torch.isinf(lse[1, :, :2]).all() and (out[1, :, :2] == 0).all()
    # nothing visible anywhere
    out, lse = _mba(q, keys, values, seq_lens=torch.zeros(3, B, dtype=torch.int64))
    assert (out == 0).all() and torch.isneginf(lse).all()
    out, lse = _mba(q, keys[:1], values[:1])
    assert (out == 0).all() and torch.isneginf(lse).all()


def test_mba_plan_runs_on_other_tensors_of_its_layout():
    """A plan keeps its launch setup and each set of K/V pointers' segment table (SegmentParams.memo) across
    runs: runs alternating between the tensors of two "layers" each get their own layer's answer, and a
    repeated layer copies no new table. The cascade and a plain launch both run (shared prefix + own tokens)."""
    B, Hq, Hkv, Lq, D = 3, 4, 2, 1, 32
    kw = dict(position_shifts=torch.tensor([[0, 0, 0], [9, 8, 7]]), rope=make_rope(32),
              seq_lens=torch.tensor([[9, 9, 9], [4, 2, 3]]))

    def layer():
        prefix = [torch.randn(1, Hkv, 9, D).expand(B, -1, -1, -1) for _ in range(2)]
        own = [torch.randn(B, Hkv, 4, D) for _ in range(2)]
        return torch.randn(B, Hq, Lq, D), [prefix[0], own[0]], [prefix[1], own[1]]

    layers = [layer(), layer()]
    plan = pskernels.plan_multi_branch_attention(*layers[0], backend="triton", **kw)
    refs = [pskernels.multi_branch_attention(*t, backend="torch", **kw) for t in layers]
    for i in (0, 1, 0, 1):
        out, lse = plan.run(*layers[i])
        _assert_close(out, refs[i][0], F32)
        torch.testing.assert_close(lse, refs[i][1], atol=1e-4, rtol=0)
    tensors = plan.params.memo["triton_tensors"]
    assert len(tensors) == 2 and all(len(t.segment_tables) == 2 for t in tensors.values())  # 2 layers x (cascade, own)
    # a layer's tensors freed and others made in their place get their own tables, never a stale one
    layers[0] = layer()
    out, _ = plan.run(*layers[0])
    _assert_close(out, pskernels.multi_branch_attention(*layers[0], backend="torch", **kw)[0], F32)


def test_mba_launch_setup_reads_only_the_plans_host_tables():
    """The launch setup (a plan's first run on its layout) builds its per-row tables from the plan's host copies:
    with the device tables swapped for tensors that hold no values (meta), it builds the same tables. Reading the
    device tables would be a device-to-host copy, i.e. a wait for the GPU in the middle of a step. The case has
    1-D (broadcast) shifts and segment positions, a cascade launch and a plain one, a window and knobs."""
    import dataclasses

    from pskernels._core.segments import normalize_segments
    from pskernels.triton.multi_branch_attention import _setup

    B, Hq, Hkv, Lq, D = 3, 4, 2, 1, 32
    prefix = [torch.randn(1, Hkv, 9, D).expand(B, -1, -1, -1) for _ in range(2)]
    own = [torch.randn(B, Hkv, 4, D) for _ in range(2)]
    q, keys, values = torch.randn(B, Hq, Lq, D), [prefix[0], own[0]], [prefix[1], own[1]]
    kw = dict(position_shifts=torch.tensor([0, 9]), rope=make_rope(32), seq_lens=torch.tensor([[9, 9, 9], [4, 2, 3]]),
              sliding_window=6, segment_positions=torch.tensor([0, 9]), temperature=torch.tensor([1.0, 0.9]))
    p = normalize_segments(q, keys, values, **kw)
    meta = {f: getattr(p, f).to("meta") for f in ("seq_lens", "left_pad", "shifts", "segment_positions")}
    blind = dataclasses.replace(p, memo={}, **meta)
    want, got = _setup(q, keys, values, p, None), _setup(q, keys, values, blind, None)
    assert [lc.cascade for lc in got.launches] == [True, False]
    for (g_grp, g_rows, _), (w_grp, w_rows, _) in zip(got.tables, want.tables):
        assert torch.equal(g_grp, w_grp) and torch.equal(g_rows, w_rows)
    assert torch.equal(got.tables[0][1][:, :, 2], torch.zeros(1, B, dtype=torch.int64))  # the prefix: no shift
    assert torch.equal(got.tables[1][1][:, :, 2], torch.full((1, B), 9))


@pytest.mark.parametrize("dtype", [F32, F16])
def test_mba_decode_split_kv(dtype):
    B, Hq, Hkv, Lq, D = 1, 8, 2, 1, 64
    lens = (70, 0, 45, 1)
    assert _num_splits(Hq // Hkv * Lq, B, Hkv, max(lens), torch.empty(0).device) > 1, "split-KV path not taken"
    q = torch.randn(B, Hq, Lq, D, dtype=dtype)
    keys, values = _segments(B, Hkv, lens, D, D, dtype)
    kw = dict(position_shifts=torch.tensor([0, 70, 70, 115]), rope=make_rope(64),
              seq_lens=torch.tensor([[70], [0], [41], [1]]), left_pad=torch.tensor([[5], [0], [0], [0]]))
    _mba(q, keys, values, **kw)
    _mba(q, keys, values, softcap=5.0, sliding_window=60, segment_positions=torch.tensor([0, 70, 70, 115]), **kw)
    _mba(q, keys, values, temperature=torch.tensor([1.0, 0.8, 1.2]), log_weight=torch.tensor([0.0, 0.5, -0.5]),
         segment_groups=[0, 1, 1, 2], **kw)


def test_host_grid_helpers_match_triton():
    """The launchers' host-side cdiv / next_power_of_2 (Triton's own cost microseconds per call) agree with
    Triton's on every size a launch can see."""
    import triton

    from pskernels.triton.utils import cdiv, next_power_of_2

    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 4100))
    assert all(cdiv(a, b) == triton.cdiv(a, b) for a in range(0, 300) for b in (1, 2, 3, 16, 64, 128, 256))


def test_mba_unsupported_inputs_raise():
    q = torch.randn(1, 2, 3, 64, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="float64"):
        pskernels.multi_branch_attention(q, [q], [q], backend="triton")
    q = torch.randn(1, 2, 3, 64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        pskernels.multi_branch_attention(q, [q.detach()], [q.detach()], backend="triton")
    with torch.no_grad():
        _mba(q, [q.detach()], [q.detach()])
    # the backend itself refuses a key that requires grad (the ops layer routes such calls to the reference)
    from pskernels._core.registry import implementations
    from pskernels._core.segments import normalize_segments

    k = torch.randn(1, 2, 3, 64, requires_grad=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        implementations("multi_branch_attention")["triton"](q.detach(), [k], [k], normalize_segments(q, [k], [k]))


# ------------------------------------------------------------------------------------------ merge_states


@pytest.mark.parametrize("dtype", [F32, F16])
def test_merge_states(dtype):
    N, B, H, L, Dv = 3, 2, 3, 5, 80
    o, s = torch.randn(N, B, H, L, Dv, dtype=dtype), torch.randn(N, B, H, L) * 3
    s[0, 0, 0] = float("-inf")  # one empty state
    s[:, 1, 1, 2] = float("-inf")  # all empty -> 0, -inf
    out, lse = pskernels.merge_states(o, s, backend="triton")
    ref_out, ref_lse = pskernels.merge_states(o, s, backend="torch")
    _assert_close(out, ref_out, dtype)
    assert torch.equal(lse.isneginf(), ref_lse.isneginf()) and (out[1, 1, 2] == 0).all()
    torch.testing.assert_close(lse[ref_lse.isfinite()], ref_lse[ref_lse.isfinite()], atol=1e-5, rtol=0)


def test_merge_states_list_strided_and_self_merge():
    B, H, L, Dv = 2, 3, 4, 64
    o = torch.randn(B, L, H, Dv).transpose(1, 2)
    s = torch.randn(B, L, H).transpose(1, 2)
    out, lse = pskernels.merge_states([o, o], [s, s], backend="triton")
    torch.testing.assert_close(out, o, atol=1e-6, rtol=0)
    torch.testing.assert_close(lse, s + math.log(2), atol=1e-5, rtol=0)
    stacked = torch.randn(B, H, L, Dv, 2).permute(4, 0, 1, 2, 3)  # [N, B, H, L, Dv], stride(-1) != 1
    lses = torch.randn(2, B, H, L)
    out, lse = pskernels.merge_states(stacked, lses, backend="triton")
    ref_out, ref_lse = pskernels.merge_states(stacked, lses, backend="torch")
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------- rotate_keys


@pytest.mark.parametrize("style,rd", [("neox", 80), ("neox", 32), ("gptj", 80), ("gptj", 16)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_rotate_keys(style, rd, dtype):
    B, H, L, D = 2, 3, 13, 80
    k = torch.randn(B, L + 4, H, D, dtype=dtype).transpose(1, 2)[:, :, 2 : 2 + L]
    spec = make_rope(rd, style=style)
    for delta in (7, torch.tensor([5, -300]), torch.randint(-2000, 2000, (B, L))):
        out = pskernels.rotate_keys(k, delta, spec, backend="triton")
        assert out.is_contiguous() and out.dtype == dtype
        _assert_close(out, pskernels.rotate_keys(k, delta, spec, backend="torch"), dtype)
    if dtype == F32:
        back = pskernels.rotate_keys(pskernels.rotate_keys(k, 1234, spec, backend="triton"), -1234, spec,
                                     backend="triton")
        torch.testing.assert_close(back, k, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- map_kv_caches


def _map(keys, values, orig, new, spec, dtype, **params):
    a = pskernels.map_kv_caches(keys, values, rope=spec, orig_positions=orig, new_positions=new, backend="triton",
                                **params)
    b = pskernels.map_kv_caches(keys, values, rope=spec, orig_positions=orig, new_positions=new, backend="torch",
                                **params)
    for side_a, side_b in zip(a, b):
        assert len(side_a) == len(side_b)
        for row_a, row_b in zip(side_a, side_b):
            for x, y in zip(row_a, row_b):
                assert x.shape == y.shape and x.dtype == y.dtype and x.is_contiguous()
                _assert_close(x, y, dtype)
    return a


@pytest.mark.parametrize("style,rd", [("neox", 80), ("gptj", 32)])
@pytest.mark.parametrize("dtype", [F32, F16])
def test_map_kv_caches(style, rd, dtype):
    NL, N, B, H, D, Dv, r = 2, 3, 2, 2, 80, 64, 4
    lens = [[5, 0, 17], [3, 9, 1]]  # ragged per (layer, branch), one empty branch
    keys = [[torch.randn(B, n, H, D, dtype=dtype).transpose(1, 2) for n in row] for row in lens]
    values = [[torch.randn(B, H, n + 2, Dv, dtype=dtype)[:, :, 1 : n + 1] for n in row] for row in lens]
    orig, new = torch.randint(0, 50, (NL, N, B)), torch.randint(0, 500, (NL, N, B))
    spec = make_rope(rd, style=style)
    out = _map(keys, values, orig, new, spec, dtype)
    assert all(torch.equal(x, y) for row_o, row_v in zip(out[1], values) for x, y in zip(row_o, row_v))
    _map(keys, values, orig, new, spec, dtype,
         k_down=torch.randn(NL, H, D, r) * 0.1, k_up=torch.randn(NL, H, r, D) * 0.1, k_gate=torch.randn(NL, H),
         v_down=torch.randn(NL, H, Dv, r) * 0.1, v_up=torch.randn(NL, H, r, Dv) * 0.1)
    _map(keys, values, torch.tensor([3, 0, 7]), torch.tensor([[0, 1], [5, 5], [9, 2]]), spec, dtype,
         v_down=torch.randn(NL, H, Dv, 20) * 0.1, v_up=torch.randn(NL, H, 20, Dv) * 0.1, v_gate=torch.randn(NL, H))


def test_map_kv_caches_requires_grad_raises():
    k = torch.randn(1, 2, 3, 64)
    down = torch.zeros(1, 2, 64, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backend='torch'"):
        pskernels.map_kv_caches([[k]], [[k]], rope=make_rope(64), orig_positions=[0], new_positions=[5],
                                k_down=down, k_up=torch.zeros(1, 2, 4, 64), backend="triton")


# ------------------------------------------------------------------------------------- GPU compilation

_COMPILE_SCRIPT = r"""
import dataclasses
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from pskernels.triton import combine, map_kv_caches, multi_branch_attention as mba, rotate_keys
from pskernels.triton.utils import TileConfig, compile_spec, fixed_tile

def build(kernel, arg_types, consts, tiles):
    # no alignment attributes: the code for any pointers and strides
    spec = dataclasses.replace(compile_spec(kernel, "", arg_types, "bf16", consts, tiles), attrs={})
    for tile in spec.tiles:
        k = triton.compile(spec.source(tile), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=tile.num_warps, num_stages=tile.num_stages))
        assert k.metadata.shared <= 227 * 1024, (kernel.__name__, k.metadata.shared)

base = dict(G=4, D=128, DV=128, ROT=128, PREC="tf32", DOT_DT=tl.bfloat16, ALIGNED=True, ES=2, BLOCK_D=128,
            BLOCK_DV=128)
# prefill: every feature; decode: split-KV with the runtime ints Triton specialises to constants (== 1)
prefill = dict(base, GPTJ=False, HAS_SHIFT=True, SOFTCAP=True, WINDOW=True, HAS_KNOBS=True, SPLIT=False,
               CASCADE=False, MERGE_WS=False)
decode = dict(base, GPTJ=True, HAS_SHIFT=True, SOFTCAP=False, WINDOW=False, HAS_KNOBS=False, SPLIT=True,
              CASCADE=False, MERGE_WS=False, B=1, HKV=1, Lq=1, NGR=1, window=1)
# the cascade's decode over a shared, unshifted prefix (several batch rows: B stays a runtime value)
cascade = dict(decode, GPTJ=False, HAS_SHIFT=False, CASCADE=True)
del cascade["B"]
# its own-segment launch, merging the cascade's states (NMERGE a runtime value)
merge = dict(cascade, HAS_SHIFT=True, SPLIT=False, CASCADE=False, MERGE_WS=True)
for consts in (prefill, decode, cascade, merge):
    tiles = mba.tiles_for(mba.tile_class(**consts), True, 90)
    build(mba._mba_fwd_kernel, mba._ARG_TYPES, consts,
          [TileConfig(dict(BLOCK_M=bm, BLOCK_N=bn), w, st) for bm, bn, w, st in tiles])
# combine's states in the fp32 split-KV workspace, merged into a bf16 output
build(combine._combine_kernel, dict(combine._ARG_TYPES, o="*fp32"),
      dict(DV=80, HAS_KNOBS=True, BLOCK_DV=128, NGR=1, NS=1), [fixed_tile(BLOCK_L=combine.BLOCK_L)])
build(rotate_keys._rotate_keys_kernel, rotate_keys._ARG_TYPES, dict(D=80, ROT=32, GPTJ=False, BLOCK_D=128, H=1),
      [fixed_tile(BLOCK_L=rotate_keys.BLOCK_L)])
build(map_kv_caches._map_kv_kernel, map_kv_caches._ARG_TYPES,
      dict(D=128, DV=80, ROT=64, GPTJ=True, K_TF=True, K_GATE=True, V_TF=True, V_GATE=False, ALIGNED=True, VEC=8,
           BLOCK_D=128, BLOCK_DV=128, BLOCK_RK=16, BLOCK_RV=16, B=1, H=1), [fixed_tile(BLOCK_L=map_kv_caches.BLOCK_L)])
"""


def test_kernels_compile_for_hopper():
    """The interpreter accepts code the compiler rejects: compile every kernel for sm_90 (no GPU needed)."""
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.parametrize("cap", [(8, 0), (8, 9), (9, 0), (12, 0)])
def test_autotune_prune_keeps_the_spill_free_tiles(monkeypatch, cap):
    """The launcher's prune (runs only on a GPU) keeps exactly the measured tiles of the specialisation's class
    for the device's arch, all with maxnreg, and drops tiles over the arch's shared-memory budget."""
    from pskernels.triton import multi_branch_attention as m

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
    arch = 10 * cap[0] + cap[1]
    base = dict(G=4, D=128, DV=128, ROT=128, GPTJ=False, HAS_SHIFT=True, SOFTCAP=False, WINDOW=False,
                HAS_KNOBS=False, SPLIT=False, BLOCK_D=128, BLOCK_DV=128)
    cases = [(base, "rope"), (dict(base, GPTJ=True), "rope_any"), (dict(base, ROT=64), "rope_any"),
             (dict(base, HAS_SHIFT=False), "plain"), (dict(base, HAS_KNOBS=True), "heavy"),
             (dict(base, HAS_SHIFT=False, WINDOW=True), "heavy"),
             (dict(base, GPTJ=True, SOFTCAP=True), "heavy_rope_any"),
             (dict(base, SPLIT=True), "split"), (dict(base, SPLIT=True, HAS_KNOBS=True), "split_heavy")]
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        q = torch.empty(1, 4, 1, 128, dtype=dtype)
        for kw, cls in cases:
            assert m.tile_class(**kw) == cls, kw
            kept = m._prune(m._GPU_CONFIGS, {"q": q}, **kw)
            assert {m._tile(c) for c in kept} == set(m.tiles_for(cls, dtype != torch.float32, arch)), (dtype, cls)
            assert all(c.maxnreg == m.MAXNREG for c in kept)
    # D = 256 in half precision: 128x64 with 2 stages needs 192 KB, over A100's 163 KB but within H100's 227 KB
    q = torch.empty(1, 4, 1, 256, dtype=torch.bfloat16)
    big = dict(base, D=256, DV=256, ROT=256, HAS_SHIFT=False, BLOCK_D=256, BLOCK_DV=256)
    kept = {m._tile(c) for c in m._prune(m._GPU_CONFIGS, {"q": q}, **big)}
    assert ((128, 64, 8, 2) in kept) == (arch >= 90) and kept
