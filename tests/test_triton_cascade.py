"""Cascade (shared-prefix) attention of the Triton backend against the reference.

N workers decode as one batch on a zero-copy ``ParallelCache(prefix, [])``: the batch-1 prefix K/V reach the op
expanded over the B rows (batch stride 0). The launcher reads such shared segments in cascade launches, whose
M tile packs the queries of every row of a kv head, and the rows' own segments in a plain launch; the combine
kernel merges the two by LSE, or, opted in (PSKERNELS_TRITON_CASCADE_MERGE=1), the own launch merges the
cascade's states into its own (one split, no calibrated groups, no softcap or window).
Each case records the kernel launches and asserts which segments each read, how its grid tiles the rows (so a
case meant for the cascade cannot pass on the plain path) and which of the two merges ran, then compares with
the reference: per-row lengths, padding, shifts, windows and causal limits differ between the rows of a tile.
Without CUDA this runs in the interpreter (small shapes); on a GPU the same cases run compiled.
"""
import os

import pytest
import torch
import triton

from pskernels import RopeSpec, ref
from pskernels._core.segments import normalize_segments
from pskernels.triton import multi_branch_attention as mba
from pskernels.triton.utils import MODE

from op_helpers import tile_params

pytestmark = [pytest.mark.interpreter,
              pytest.mark.skipif(MODE == "compiled" and not torch.cuda.is_available(), reason="compiled, no GPU")]
DEV = "cuda" if MODE == "compiled" else "cpu"
F32, BF16 = torch.float32, torch.bfloat16
ATOL, RTOL, LSE_ATOL = {F32: 1e-4, BF16: 3e-2}, {F32: 0.0, BF16: 1.6e-2}, {F32: 1e-4, BF16: 2e-2}
P = 37  # shared prefix: two 16-key tiles and a partial one in the interpreter's tile


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    # library-allocated outputs start as NaN: a missed write fails the comparison
    monkeypatch.setenv("PSKERNELS_DEBUG_NAN", "1")


def _rope(D, rd=None, style="neox"):
    rd = rd or D
    return RopeSpec(1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float32) / rd), style=style)


class _Recorder:
    """Stands in for a kernel (plain or autotuned): records each launch's grid (counted in ``block_m``-row tiles
    when the autotuner picks the tile), segment table and constexprs, then launches."""

    def __init__(self, kernel, launches, block_m):
        self.kernel, self.launches, self.block_m = kernel, launches, block_m

    def __getitem__(self, grid):
        def launch(*args, **meta):
            g = grid(dict(meta, BLOCK_M=self.block_m)) if callable(grid) else grid
            self.launches.append(dict(grid=tuple(g), k_ptrs=args[5][:, 0].tolist(), meta=meta))
            return self.kernel[grid](*args, **meta)

        return launch


def _run(q, keys, values, monkeypatch, *, shared, tile=None, **kw):
    """Attention through the launcher, checked against the reference; ``shared``: the segments a cascade launch
    must read (empty: one plain launch of every live segment)."""
    p = normalize_segments(q, keys, values, **kw)
    bm = (tile or mba._FIXED_TILE)[0]
    launches, combines = [], []
    for name in ("_mba_fwd_kernel", "_mba_fwd_tuned"):
        monkeypatch.setattr(mba, name, _Recorder(getattr(mba, name), launches, bm))
    combine = mba.combine
    monkeypatch.setattr(mba, "combine", lambda *a, **k: combines.append(1) or combine(*a, **k))
    out, lse = mba.multi_branch_attention(q, keys, values, p, tile=tile)

    B, Hq, Lq, _ = q.shape
    Hkv = keys[0].shape[1]
    rows = Hq // Hkv * Lq
    ptrs = lambda segs: sorted(keys[s].data_ptr() for s in segs)  # noqa: E731
    own = [s for s, k in enumerate(keys) if k.shape[2] > 0 and s not in shared]
    want = [(True, ptrs(shared), triton.cdiv(B * rows, bm) * Hkv)] if shared else []
    want += [(False, ptrs(own), triton.cdiv(rows, bm) * B * Hkv)] if own or not shared else []
    got = [(m["meta"]["CASCADE"], sorted(x for x in m["k_ptrs"] if x), m["grid"][0]) for m in launches]
    assert got == want, "launch plan"
    # the cascade's states: merged by the own-segment launch when it is one split of one uncalibrated group
    merges = [m["meta"]["MERGE_WS"] for m in launches]
    merged = (os.environ.get("PSKERNELS_TRITON_CASCADE_MERGE") == "1" and bool(shared and own)
              and launches[1]["grid"][1] == 1 and not p.has_knobs and p.softcap is None and p.sliding_window is None)
    assert merges == [False, merged][:len(launches)], "merge in the own launch"
    uses_workspace = bool(shared) or sum(m["grid"][1] for m in launches) > 1 or p.has_knobs
    assert len(combines) == int(uses_workspace and not merged), "combine launch"

    ref_out, ref_lse = ref.multi_branch_attention(q, keys, values, p)
    assert not out.isnan().any() and not lse.isnan().any(), "NaN in triton output"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=ATOL[q.dtype], rtol=RTOL[q.dtype])
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "-inf pattern of lse differs"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=LSE_ATOL[q.dtype], rtol=0)
    return out, lse, merged


def _shared(Hkv, L, D, dtype, hf_layout=False):
    """Batch-1 K/V as a cache stores them: ``[1, Hkv, L, D]``, or HF's ``[1, L, Hkv, D]`` storage seen as
    ``[1, Hkv, L, D]``."""
    if hf_layout:
        return [torch.randn(1, L, Hkv, D, dtype=dtype, device=DEV).transpose(1, 2) for _ in range(2)]
    return [torch.randn(1, Hkv, L, D, dtype=dtype, device=DEV) for _ in range(2)]


def _workers(B, Hq, Hkv, Lq, D, dtype, hf_layout=False):
    """q and segments (shared prefix expanded over the B rows, a ragged branch, the causal own segment) with
    per-row metadata: row 1 sees none of the prefix, the others a ragged, left-padded part of it; every row has
    its own shifts, so the rows of a cascade tile rotate their queries differently."""
    pk, pv = _shared(Hkv, P, D, dtype, hf_layout)
    n_branch, n_own = 9, Lq + 4
    keys = [pk.expand(B, -1, -1, -1)] + [torch.randn(B, Hkv, n, D, dtype=dtype, device=DEV) for n in (n_branch, n_own)]
    values = [pv.expand(B, -1, -1, -1)] + [torch.randn(B, Hkv, n, D, dtype=dtype, device=DEV)
                                           for n in (n_branch, n_own)]
    b = torch.arange(B)
    prefix_len = torch.where(b == 1, 0, P - b * 7 % 13)
    branch_len = b * 5 % (n_branch + 1)
    own_len = Lq + b % 5
    seq_lens = torch.stack([prefix_len, branch_len, own_len])
    left_pad = torch.stack([torch.minimum(b % 4, prefix_len), (branch_len > 2).long(), torch.zeros_like(b)])
    shifts = torch.stack([b % 3, P + b, P + n_branch + b])
    q = torch.randn(B, Hq, Lq, D, dtype=dtype, device=DEV)
    return q, keys, values, dict(seq_lens=seq_lens, left_pad=left_pad, position_shifts=shifts, rope=_rope(D))


@pytest.mark.parametrize("merge", ["0", "1"])
@pytest.mark.parametrize("B", [2, 5, 9])
@pytest.mark.parametrize("Hq,Hkv", [(2, 2), (3, 1), (8, 1)])  # GQA 1, 3, 8
def test_decode(B, Hq, Hkv, merge, monkeypatch):
    monkeypatch.setenv("PSKERNELS_TRITON_CASCADE_MERGE", merge)
    q, keys, values, kw = _workers(B, Hq, Hkv, 1, 32, F32)
    _run(q, keys, values, monkeypatch, shared=[0], **kw)


def test_own_launch_merges_the_cascade_or_leaves_it_to_the_combine(monkeypatch):
    """Opted in, both ways of merging the cascade's partial states run and agree with the reference: the
    own-segment launch merges them when it is one split (many rows); a split own launch (a long own segment on
    few rows), calibrated groups and a window leave them to the combine kernel."""
    monkeypatch.setenv("PSKERNELS_TRITON_CASCADE_MERGE", "1")
    q, keys, values, kw = _workers(9, 3, 1, 1, 32, F32)
    assert _run(q, keys, values, monkeypatch, shared=[0], **kw)[2]
    q, keys, values, kw = _workers(2, 2, 1, 1, 32, F32)
    long_own = [torch.randn(2, 1, 300, 32, device=DEV) for _ in range(2)]
    keys[2], values[2] = long_own
    kw["seq_lens"][2] = torch.tensor([300, 1])
    assert mba.plan_launches(q, keys, values, [0, 0, 0])[1].nsplit > 1
    assert not _run(q, keys, values, monkeypatch, shared=[0], **kw)[2]
    q, keys, values, kw = _workers(9, 3, 1, 1, 32, F32)
    assert not _run(q, keys, values, monkeypatch, shared=[0], temperature=torch.tensor([1.0, 0.8, 1.2]),
                    segment_groups=[0, 1, 2], **kw)[2]
    assert not _run(q, keys, values, monkeypatch, shared=[0], sliding_window=30,
                    segment_positions=torch.tensor([0, 37, 46]), **kw)[2]


@pytest.mark.parametrize("B,Hq,Hkv,dtype,hf_layout", [(5, 6, 2, BF16, True), (9, 8, 1, BF16, False),
                                                        (2, 3, 1, F32, True)])
def test_decode_bf16_and_hf_layout(B, Hq, Hkv, dtype, hf_layout, monkeypatch):
    q, keys, values, kw = _workers(B, Hq, Hkv, 1, 16, dtype, hf_layout)
    _run(q, keys, values, monkeypatch, shared=[0], **kw)


@pytest.mark.parametrize("B,Hq,Hkv,tile", [(5, 2, 2, None), (9, 3, 1, (32, 16, 4, 3)), (2, 8, 1, (64, 16, 4, 3))])
def test_prefill(B, Hq, Hkv, tile, monkeypatch):
    """Lq = 3: the causal own segment limits each query differently; a row's G * 3 queries take at most half of
    the M tile, so the rows are packed."""
    q, keys, values, kw = _workers(B, Hq, Hkv, 3, 32, F32)
    _run(q, keys, values, monkeypatch, shared=[0], tile=tile, **kw)


@pytest.mark.parametrize("style,rd", [("gptj", 32), ("neox", 16), ("gptj", 16)])
def test_rope_layouts(style, rd, monkeypatch):
    """The general RoPE path (gptj, partial rotary) with per-row shifts of the shared segment."""
    q, keys, values, kw = _workers(5, 6, 2, 1, 32, F32)
    kw["position_shifts"][0] = torch.tensor([5, -3, 0, 1000, 2])
    _run(q, keys, values, monkeypatch, shared=[0], **dict(kw, rope=_rope(32, rd, style)))


@pytest.mark.parametrize("Lq", [1, 3])
def test_softcap_and_sliding_window(Lq, monkeypatch):
    """The window ends inside the prefix at another slot for each row (own positions differ per row)."""
    B = 5
    q, keys, values, kw = _workers(B, 2, 1, Lq, 16, F32)
    seg_pos = torch.stack([torch.zeros(B, dtype=torch.long), torch.full((B,), P), P + 9 + torch.arange(B) * 2])
    _run(q, keys, values, monkeypatch, shared=[0], softcap=4.0, sliding_window=30, segment_positions=seg_pos, **kw)
    # explicit query positions, no causal own segment
    qpos = P + 9 + torch.arange(Lq)[None] + torch.arange(B)[:, None] * 3
    _run(q, keys, values, monkeypatch, shared=[0], softcap=4.0, sliding_window=25, segment_positions=seg_pos,
         query_positions=qpos, causal_last=False, **kw)


@pytest.mark.parametrize("Lq", [1, 3])
def test_knobs_and_groups(Lq, monkeypatch):
    """Calibrated groups: the shared prefix pooled with a branch (APE-style), alone in its group, and a group
    that only holds per-row segments; the combine kernel applies the knobs to the merged shared + own states."""
    B, Hq = 5, 4
    q, keys, values, kw = _workers(B, Hq, 2, Lq, 16, F32)
    _run(q, keys, values, monkeypatch, shared=[0], temperature=0.9, lse_scale=0.9, segment_groups=[0, 0, 1], **kw)
    _run(q, keys, values, monkeypatch, shared=[0], temperature=torch.rand(3, Hq) + 0.5, lse_scale=torch.rand(3) + 0.5,
         log_weight=torch.randn(3, Hq), segment_groups=[0, 1, 2], **kw)


def test_shared_segments_not_first(monkeypatch):
    """Two shared segments (a system prompt and a task context), neither first, one of them empty for a row and
    pooled with a per-row branch in a calibrated group; a row that sees nothing at all gives 0 and -inf."""
    B, Hq, Hkv, Lq, D = 5, 3, 1, 1, 16
    q, keys, values, kw = _workers(B, Hq, Hkv, Lq, D, F32)
    ck, cv = _shared(Hkv, 20, D, F32)
    keys.append(ck.expand(B, -1, -1, -1))
    values.append(cv.expand(B, -1, -1, -1))
    ctx = dict(seq_lens=[20, 0, 17, 20, 9], left_pad=[0, 0, 3, 1, 0], position_shifts=[0] * B)
    order = [1, 0, 3, 2]  # branch, prefix, context, own
    keys, values = [keys[s] for s in order], [values[s] for s in order]
    for name, row in ctx.items():
        kw[name] = torch.cat([kw[name], torch.tensor([row])])[order]
        kw[name][:, 1] = 0  # row 1: nothing anywhere
    out, lse, _ = _run(q, keys, values, monkeypatch, shared=[1, 2], **kw)
    assert (out[1] == 0).all() and torch.isneginf(lse[1]).all()
    _run(q, keys, values, monkeypatch, shared=[1, 2], temperature=0.8, log_weight=torch.tensor([0.3, -0.2]),
         segment_groups=[0, 0, 1, 1], **kw)


@pytest.mark.parametrize("Lq", [1, 3])
def test_every_segment_shared(Lq, monkeypatch):
    """All rows share all segments, the causal last one included (rows own lengths, so their causal limits
    differ): one cascade launch and no plain one."""
    B, Hq, Hkv, D = 5, 2, 1, 16
    q = torch.randn(B, Hq, Lq, D, device=DEV)
    kv = [_shared(Hkv, n, D, F32) for n in (P, Lq + 6)]
    keys, values = [k.expand(B, -1, -1, -1) for k, _ in kv], [v.expand(B, -1, -1, -1) for _, v in kv]
    seq_lens = torch.stack([torch.tensor([P, 0, 30, 12, 1]), Lq + torch.tensor([6, 0, 3, 1, 5])])
    _run(q, keys, values, monkeypatch, shared=[0, 1], seq_lens=seq_lens, left_pad=torch.tensor([[0, 0, 4, 2, 1],
                                                                                                 [0, 0, 2, 0, 0]]))


def test_plan():
    """The cascade is planned only for segments every row shares (K and V broadcast, B > 1) when a row's queries
    take at most half of the M tile; the rest keep the one plain launch of today."""
    B, Hq, Hkv, D = 5, 3, 1, 16
    q1, q3 = (torch.randn(B, Hq, Lq, D, device=DEV) for Lq in (1, 3))
    _, keys, values, _ = _workers(B, Hq, Hkv, 1, D, F32)
    rest = [k.contiguous() for k in keys]
    plan = mba.plan_launches(q1, keys, values, [0, 0, 0])
    assert [(lc.segments, lc.cascade) for lc in plan] == [((0,), True), ((1, 2), False)]
    # the cascade's split-KV counts the packed programs (one per kv head here), not one per row; the interpreter's
    # 32-key chunks split the 37-key prefix, a GPU's 256-key chunks keep it whole (seen on an H200)
    assert plan[0].nsplit == mba._num_splits(B * Hq // Hkv, 1, Hkv, P, q1.device) == (2 if MODE == "interpreter" else 1)
    # autotuned cascade launches count their programs with the largest tile the tuner may pick (Hopper, half)
    assert mba._CASCADE_MAX_M == 128 == max(t[0] for t in mba.tiles_for("cascade", True, 90))
    # groups order the segments, the shared one included
    assert [lc.segments for lc in mba.plan_launches(q1, keys, values, [1, 0, 1])] == [(0,), (1, 2)]
    # the same data materialised per row, or only K broadcast: no shared segment
    assert mba.shared_segments(rest, values) == [] and mba.shared_segments([keys[0]] + rest[1:], rest) == []
    assert [(lc.segments, lc.cascade) for lc in mba.plan_launches(q1, rest, values, [0] * 3)] == [((0, 1, 2), False)]
    # prefill: 3 heads x 3 queries fill more than half of a 16-row tile; with 32 rows they are packed
    assert [lc.cascade for lc in mba.plan_launches(q3, keys, values, [0] * 3)] == [False]
    assert [lc.cascade for lc in mba.plan_launches(q3, keys, values, [0] * 3, 32)] == [True, False]
    # one row: nothing to share
    assert mba.shared_segments([k[:1] for k in keys], [v[:1] for v in values]) == []
    # an empty shared segment is not launched
    empty = torch.zeros(1, Hkv, 0, D, device=DEV).expand(B, -1, -1, -1)
    assert mba.plan_launches(q1, [empty] + keys[1:], [empty] + values[1:], [0] * 3) == [
        mba.Launch((1, 2), False, mba._num_splits(Hq // Hkv, B, Hkv, 9, q1.device))]


# cascade tile class -> (RoPE shift style or None, softcap + window + calibration knobs)
CASCADE_CLASSES = {"cascade": (None, False), "cascade_rope": ("neox", False), "cascade_heavy": ("gptj", True)}


def _cascade_tiles():
    """(class, half precision, tile) for every distinct (BLOCK_M, BLOCK_N) of a cascade class on sm_80 or sm_90."""
    assert set(CASCADE_CLASSES) == {c for c in mba._TILES["half"] if c.startswith("cascade")}
    return tile_params(CASCADE_CLASSES)


@pytest.mark.parametrize("cls,half,tile", _cascade_tiles())
def test_cascade_tile(cls, half, tile, monkeypatch):
    """Every tile a GPU may launch a cascade with, in a specialisation of its class: the packed rows (B x 3 heads)
    end inside a tile, as do the prefix and the per-row ranges."""
    bm, bn = tile[:2]
    dtype = torch.float16 if half else F32
    style, heavy = CASCADE_CLASSES[cls]
    B, Hq, D = bm // 3 + 2, 3, 16
    pk, pv = _shared(1, 2 * bn + 5, D, dtype)
    own = [torch.randn(B, 1, 4, D, dtype=dtype, device=DEV) for _ in range(2)]
    keys, values = [pk.expand(B, -1, -1, -1), own[0]], [pv.expand(B, -1, -1, -1), own[1]]
    b = torch.arange(B)
    kw = dict(seq_lens=torch.stack([2 * bn + 5 - b % 7, 1 + b % 4]), left_pad=torch.stack([b % 3, torch.zeros_like(b)]))
    if style is not None:
        kw.update(rope=_rope(D, style=style), position_shifts=torch.stack([b % 5, 2 * bn + 5 + b]))
    if heavy:
        starts = torch.stack([torch.zeros_like(b), 2 * bn + 5 + b])
        kw.update(softcap=5.0, sliding_window=bn + 3, segment_positions=starts, segment_groups=[0, 1],
                  temperature=torch.rand(2, Hq) + 0.5, log_weight=torch.randn(2, Hq))
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=DEV)
    p = normalize_segments(q, keys, values, **kw)
    launches = []
    monkeypatch.setattr(mba, "_mba_fwd_kernel", _Recorder(mba._mba_fwd_kernel, launches, bm))
    out, lse = mba.multi_branch_attention(q, keys, values, p, tile=tile)
    assert [(mba.tile_class(**m["meta"]), m["meta"]["BLOCK_M"], m["grid"][0]) for m in launches[:1]] == [
        (cls, bm, triton.cdiv(B * Hq, bm))]
    ref_out, ref_lse = ref.multi_branch_attention(q, keys, values, p)
    atol, rtol = (4e-3, 2e-3) if half else (ATOL[F32], RTOL[F32])
    assert not out.isnan().any(), "NaN in triton output"
    torch.testing.assert_close(out.float(), ref_out.float(), atol=atol, rtol=rtol)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)), "-inf pattern of lse differs"
    fin = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[fin], ref_lse[fin].float(), atol=2e-2 if half else 1e-4, rtol=0)
