"""multi_branch_attention against an independent fp64 oracle, plus metamorphic properties (docs/KERNELS.md §1, §5).

The oracle concatenates the segments, repeats K/V for GQA with ``repeat_interleave``, builds an explicit
boolean mask and runs softmax in float64. Position shifts are applied by rotating the *keys* by ``+shift``
(the op rotates the query by ``-shift``), sliding windows use virtual positions, and calibration groups are
combined explicitly with logits ``S * T * LSE(scores / T) + b``.

Every test runs for each backend in ``pskernels.available_backends("multi_branch_attention")``.
"""
from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

import pskernels
from pskernels.ref import rotate

from op_helpers import backend_params, device_for, grad_call, make_rope

OP = "multi_branch_attention"


@pytest.fixture(params=backend_params(OP))
def backend(request):
    return request.param


def rnd(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=torch.float32).to(device=device, dtype=dtype)


def make_segments(B, Hkv, lens, D, Dv=None, dtype=torch.float32, device="cpu"):
    Dv = D if Dv is None else Dv
    ks = [rnd(B, Hkv, L, D, dtype=dtype, device=device) for L in lens]
    vs = [rnd(B, Hkv, L, Dv, dtype=dtype, device=device) for L in lens]
    return ks, vs


# ----------------------------------------------------------------------------------------------
# Independent fp64 oracle
# ----------------------------------------------------------------------------------------------
def _table(x, S, B, default):
    if x is None:
        return torch.full((S, B), default, dtype=torch.int64)
    t = torch.as_tensor(x).to("cpu", torch.int64)
    if t.ndim == 1:
        t = t[:, None].expand(S, B)
    return t


def _knob(x, G, Hq, default):
    if x is None:
        return torch.full((G, Hq), float(default), dtype=torch.float64)
    t = torch.as_tensor(x).to("cpu", torch.float64)
    if t.ndim == 0:
        t = t.expand(G, Hq)
    elif t.ndim == 1:
        t = t[:, None].expand(G, Hq)
    return t


def oracle(q, keys, values, *, seq_lens=None, left_pad=None, causal_last=True, shifts=None, rope=None,
           scale=None, softcap=None, window=None, seg_pos=None, q_pos=None, groups=None,
           temperature=None, lse_scale=None, log_weight=None):
    """float64 (out [B, Hq, Lq, Dv], lse [B, Hq, Lq]) computed on CPU, differentiable w.r.t. its inputs."""
    B, Hq, Lq, D = q.shape
    S = len(keys)
    Hkv = keys[0].shape[1]
    rep = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    qd = q.to("cpu", torch.float64)
    Ls = [k.shape[2] for k in keys]
    lens = _table(seq_lens, S, B, 0) if seq_lens is not None else torch.tensor(Ls)[:, None].expand(S, B)
    pads = _table(left_pad, S, B, 0)
    sh = _table(shifts, S, B, 0)
    groups = list(range(S)) if groups is None else [int(g) for g in groups]
    G = max(groups) + 1
    T = _knob(temperature, G, Hq, 1.0)
    Sc = _knob(lse_scale, G, Hq, 1.0)
    bw = _knob(log_weight, G, Hq, 0.0)
    if window is not None:
        sp = _table(seg_pos, S, B, 0)
        if q_pos is None:  # default: the last Lq own slots
            qp = sp[-1][:, None] + lens[-1][:, None] - Lq + torch.arange(Lq)[None, :]
        else:
            qp = torch.as_tensor(q_pos).to("cpu", torch.int64)

    scores = [[] for _ in range(G)]
    masks = [[] for _ in range(G)]
    vals = [[] for _ in range(G)]
    for s in range(S):
        k = keys[s].to("cpu", torch.float64)
        v = values[s].to("cpu", torch.float64)
        L = Ls[s]
        if bool((sh[s] != 0).any()):
            k = rotate(k, sh[s][:, None, None].to(torch.float64), rope)  # re-index: R(+shift) k
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        sc = torch.matmul(qd, k.transpose(-1, -2)) * scale  # [B, Hq, Lq, L]
        if softcap is not None:
            sc = softcap * torch.tanh(sc / softcap)
        j = torch.arange(L).view(1, 1, L)
        i = torch.arange(Lq).view(1, Lq, 1)
        m = (j >= pads[s].view(B, 1, 1)) & (j < lens[s].view(B, 1, 1))  # [B, 1, L]
        m = m.expand(B, Lq, L)
        if causal_last and s == S - 1:
            m = m & (j <= lens[s].view(B, 1, 1) - Lq + i)
        if window is not None:
            kpos = sp[s].view(B, 1, 1) + j
            m = m & ((qp.view(B, Lq, 1) - kpos) < window)
        scores[groups[s]].append(sc)
        masks[groups[s]].append(m[:, None].expand(B, Hq, Lq, L))
        vals[groups[s]].append(v)

    outs, logits = [], []
    for g in range(G):
        # mask after dividing by T so that d/dT of a masked score is never 0 * inf
        sc = torch.cat(scores[g], dim=-1) / T[g].view(1, Hq, 1, 1)
        sc = sc.masked_fill(~torch.cat(masks[g], dim=-1), float("-inf"))
        vv = torch.cat(vals[g], dim=2)
        if sc.shape[-1] == 0:
            lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float64)
            o = torch.zeros(B, Hq, Lq, vv.shape[-1], dtype=torch.float64)
        else:
            lse = torch.logsumexp(sc, dim=-1)
            fin = torch.isfinite(lse)
            p = torch.exp(sc - torch.where(fin, lse, torch.zeros_like(lse))[..., None])
            p = torch.where(fin[..., None], p, torch.zeros_like(p))
            o = torch.matmul(p, vv)
        fin = torch.isfinite(lse)
        logit = Sc[g].view(1, Hq, 1) * T[g].view(1, Hq, 1) * torch.where(fin, lse, torch.zeros_like(lse)) \
            + bw[g].view(1, Hq, 1)
        logits.append(torch.where(fin, logit, torch.full_like(logit, float("-inf"))))
        outs.append(o)
    lg = torch.stack(logits)  # [G, B, Hq, Lq]
    lse = torch.logsumexp(lg, dim=0)
    fin = torch.isfinite(lse)
    w = torch.exp(lg - torch.where(fin, lse, torch.zeros_like(lse)))
    w = torch.where(fin, w, torch.zeros_like(w))
    out = (w[..., None] * torch.stack(outs)).sum(0)
    return out, lse


def oracle_kwargs(kw):
    """Map op kwargs to oracle kwargs."""
    m = dict(kw)
    ren = {"position_shifts": "shifts", "sliding_window": "window", "segment_positions": "seg_pos",
           "query_positions": "q_pos", "segment_groups": "groups"}
    return {ren.get(k, k): v for k, v in m.items()}


def check_close(out, lse, ref_out, ref_lse, rtol=1e-5, what=""):
    assert lse.dtype == torch.float32, lse.dtype
    assert not torch.isnan(out).any(), f"{what}: NaN in out"
    assert not torch.isnan(lse).any(), f"{what}: NaN in lse"
    out, lse = out.detach().cpu().double(), lse.detach().cpu().double()
    tol_o = rtol * max(1.0, ref_out.abs().max().item() if ref_out.numel() else 1.0)
    err_o = (out - ref_out).abs().max().item() if out.numel() else 0.0
    assert err_o <= tol_o, f"{what}: out max abs err {err_o:.3g} > {tol_o:.3g}"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin), f"{what}: -inf pattern of lse differs"
    assert torch.equal(lse[~fin], ref_lse[~fin]), f"{what}: non-finite lse values differ"
    if fin.any():
        tol_l = rtol * max(1.0, ref_lse[fin].abs().max().item())
        err_l = (lse[fin] - ref_lse[fin]).abs().max().item()
        assert err_l <= tol_l, f"{what}: lse max abs err {err_l:.3g} > {tol_l:.3g}"


def run_and_check(backend, q, ks, vs, rtol=1e-5, **kw):
    out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)
    B, Hq, Lq, _ = q.shape
    assert out.shape == (B, Hq, Lq, vs[0].shape[-1]) and lse.shape == (B, Hq, Lq)
    assert out.dtype == q.dtype and lse.dtype == torch.float32
    ro, rl = oracle(q, ks, vs, **oracle_kwargs(kw))
    check_close(out, lse, ro, rl, rtol=rtol, what=str({k: v for k, v in kw.items() if not torch.is_tensor(v)}))
    return out, lse


def test_oracle_matches_sdpa():
    """Sanity check of the oracle itself against torch's SDPA (GQA, bottom-right causal own segment)."""
    q = rnd(2, 6, 5, 64).double()
    ks, vs = make_segments(2, 2, (7, 13, 9), 64)
    ks, vs = [k.double() for k in ks], [v.double() for v in vs]
    out, lse = oracle(q, ks, vs)
    K, V = torch.cat(ks, 2).repeat_interleave(3, 1), torch.cat(vs, 2).repeat_interleave(3, 1)
    mask = torch.arange(29)[None, :] <= (29 - 5 + torch.arange(5))[:, None]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, K, V, attn_mask=mask))
    sc = (q @ K.transpose(-1, -2)) / 8.0
    torch.testing.assert_close(lse, torch.logsumexp(sc.masked_fill(~mask, float("-inf")), -1))


# ----------------------------------------------------------------------------------------------
# Plain correctness: lengths, GQA, head dims, empty segments, ragged rows
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lens", [(1,), (7, 113), (113, 0, 7), (1, 7, 1)], ids=str)
@pytest.mark.parametrize("Lq", [1, 7])
@pytest.mark.parametrize("causal_last", [True, False])
def test_odd_lengths(backend, lens, Lq, causal_last):
    dev = device_for(backend)
    q = rnd(2, 4, Lq, 64, device=dev)
    ks, vs = make_segments(2, 2, lens, 64, device=dev)
    run_and_check(backend, q, ks, vs, causal_last=causal_last)


@pytest.mark.parametrize("Lq", [1, 7])
def test_long_odd_segments(backend, Lq):
    """Segment lengths around block / split-KV boundaries (1023, 1025)."""
    dev = device_for(backend)
    q = rnd(1, 4, Lq, 64, device=dev)
    ks, vs = make_segments(1, 1, (1023, 1025, Lq), 64, device=dev)
    run_and_check(backend, q, ks, vs, seq_lens=torch.tensor([[1023], [1024], [Lq]]))


def test_many_segments(backend):
    """Decode over 40 segments of random length (incl. empty ones), per-row lengths and shifts."""
    dev = device_for(backend)
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(0, 40, (40,), generator=g).tolist() + [1]
    B = 2
    q = rnd(B, 8, 1, 64, device=dev)
    ks, vs = make_segments(B, 2, lens, 64, device=dev)
    seq_lens = torch.stack([torch.tensor(lens), (torch.tensor(lens) * 2) // 3])
    seq_lens[1, -1] = 1
    shifts = torch.randint(-50, 50, (len(lens), B), generator=g)
    run_and_check(backend, q, ks, vs, seq_lens=seq_lens.T.contiguous(), position_shifts=shifts, rope=make_rope(64),
                  rtol=2e-5)


@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (6, 2), (8, 2), (16, 2), (8, 1), (1, 1)],
                         ids=["mha", "gqa3", "gqa4", "gqa8", "mqa8", "single"])
def test_gqa_ratios(backend, Hq, Hkv):
    dev = device_for(backend)
    q = rnd(2, Hq, 5, 64, device=dev)
    ks, vs = make_segments(2, Hkv, (17, 33, 5), 64, device=dev)
    run_and_check(backend, q, ks, vs)


@pytest.mark.parametrize("D,Dv", [(64, 64), (80, 80), (128, 128), (64, 32), (80, 128), (128, 96)])
def test_head_dims(backend, D, Dv):
    dev = device_for(backend)
    q = rnd(1, 6, 3, D, device=dev)
    ks, vs = make_segments(1, 3, (9, 40, 3), D, Dv, device=dev)
    run_and_check(backend, q, ks, vs)


@pytest.mark.parametrize("lens", [(0, 16, 4), (16, 0, 4), (8, 0, 0, 4), (8, 16, 0), (0,), (0, 0)], ids=str)
def test_empty_segments(backend, lens):
    dev = device_for(backend)
    q = rnd(2, 4, 4, 64, device=dev)
    ks, vs = make_segments(2, 2, lens, 64, device=dev)
    out, lse = run_and_check(backend, q, ks, vs)
    if sum(lens) == 0:
        assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_ragged_seq_lens_with_zero_rows(backend):
    dev = device_for(backend)
    B, Lq = 4, 3
    q = rnd(B, 8, Lq, 64, device=dev)
    ks, vs = make_segments(B, 2, (13, 29, 6), 64, device=dev)
    seq_lens = torch.tensor([[13, 0, 5, 0],
                             [29, 17, 0, 0],
                             [6, 4, 1, 0]])  # row 3: no key at all
    out, lse = run_and_check(backend, q, ks, vs, seq_lens=seq_lens)
    assert torch.all(out[3] == 0), "all-empty row must give 0 output"
    assert torch.all(lse[3] == float("-inf")), "all-empty row must give lse -inf"
    # row 2: own length 1 < Lq = 3 so its first two queries see only segment 0 (5 keys) and nothing of own.
    assert torch.isfinite(lse[:3]).all()


def test_seq_lens_int32_and_list(backend):
    dev = device_for(backend)
    q = rnd(2, 4, 2, 64, device=dev)
    ks, vs = make_segments(2, 2, (10, 4), 64, device=dev)
    sl = [[10, 3], [4, 2]]
    o1, l1 = pskernels.multi_branch_attention(q, ks, vs, seq_lens=torch.tensor(sl, dtype=torch.int32), backend=backend)
    o2, l2 = pskernels.multi_branch_attention(q, ks, vs, seq_lens=torch.tensor(sl), backend=backend)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    ro, rl = oracle(q, ks, vs, seq_lens=sl)
    check_close(o1, l1, ro, rl)


def test_all_rows_empty_no_nan(backend):
    dev = device_for(backend)
    q = rnd(2, 4, 3, 64, device=dev)
    ks, vs = make_segments(2, 2, (5, 7, 3), 64, device=dev)
    out, lse = pskernels.multi_branch_attention(q, ks, vs, seq_lens=torch.zeros(3, 2, dtype=torch.int64),
                                                backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


@pytest.mark.parametrize("Lq", [1, 5])
def test_nan_key_poisons_exactly_the_rows_that_see_it(backend, Lq):
    """A NaN in a key is never dropped: every query that sees it gets NaN (out and lse), as softmax gives it, also
    where it is the only key a row sees in a block; queries that do not see it are untouched. A shared (cascade)
    prefix and per-row segments, with the NaN inside a block whose other keys are finite."""
    dev = device_for(backend)
    B, Hq, Hkv, D = 4, 6, 2, 32
    gen = torch.Generator().manual_seed(11)
    pk = torch.randn(1, Hkv, 300, D, generator=gen)
    pk[0, 1, 123, 5] = float("nan")  # kv head 1 of the shared prefix
    pv = torch.randn(1, Hkv, 300, D, generator=gen)
    own_k, own_v = torch.randn(B, Hkv, 40, D, generator=gen), torch.randn(B, Hkv, 40, D, generator=gen)
    own_k[2, 0, 7, 3] = float("nan")  # row 2, kv head 0
    own_k[3, 0, 0, 0] = float("nan")  # row 3 sees no prefix: this key is all kv head 0 sees
    ks = [pk.expand(B, -1, -1, -1).to(dev), own_k.to(dev)]
    vs = [pv.expand(B, -1, -1, -1).to(dev), own_v.to(dev)]
    lens = torch.tensor([[300, 300, 100, 0], [40, 40, 40, 1]])
    q = torch.randn(B, Hq, Lq, D, generator=gen).to(dev)
    out, lse = pskernels.multi_branch_attention(q, ks, vs, seq_lens=lens, backend=backend, causal_last=False)
    ro, rl = oracle(q, ks, vs, seq_lens=lens, causal_last=False)
    poisoned = torch.zeros(B, Hq, dtype=torch.bool)
    poisoned[[0, 1], 3:] = True  # rows seeing prefix key 123: their kv head 1's query heads
    poisoned[2, :3] = True
    poisoned[3, :3] = True
    assert torch.equal(lse.isnan().cpu().all(-1), poisoned) and torch.equal(lse.isnan().cpu().any(-1), poisoned)
    assert out.isnan().cpu().all(-1).all(-1)[poisoned].all() and not out.isnan().cpu()[~poisoned].any()
    keep = ~poisoned
    check_close(out.cpu()[keep], lse.cpu()[keep], ro[keep], rl[keep])


def test_left_pad(backend):
    dev = device_for(backend)
    B, Lq = 3, 4
    q = rnd(B, 4, Lq, 64, device=dev)
    ks, vs = make_segments(B, 2, (11, 9), 64, device=dev)
    seq_lens = torch.tensor([[11, 8, 11], [9, 9, 6]])
    left_pad = torch.tensor([[0, 3, 2], [2, 0, 6]])  # row 2: own segment fully padded
    run_and_check(backend, q, ks, vs, seq_lens=seq_lens, left_pad=left_pad)
    run_and_check(backend, q, ks, vs, seq_lens=seq_lens, left_pad=left_pad, causal_last=False)


@pytest.mark.parametrize("own", [1, 3, 6, 10])
@pytest.mark.parametrize("causal_last", [True, False])
def test_causal_last_alignment(backend, own, causal_last):
    """Bottom-right aligned causal own segment, including Lq > own length (early queries see no own key)."""
    dev = device_for(backend)
    Lq = 6
    q = rnd(2, 4, Lq, 64, device=dev)
    ks, vs = make_segments(2, 1, (7, own), 64, device=dev)
    run_and_check(backend, q, ks, vs, causal_last=causal_last)
    # own segment alone with Lq > own: the first Lq - own queries see nothing
    out, lse = run_and_check(backend, q, ks[1:], vs[1:], causal_last=causal_last)
    if causal_last and own < Lq:
        assert torch.all(lse[:, :, : Lq - own] == float("-inf"))
        assert torch.all(out[:, :, : Lq - own] == 0)


# ----------------------------------------------------------------------------------------------
# RoPE re-indexing
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("D,rotary_dim", [(64, None), (128, None), (80, 32), (64, 16)])
def test_position_shifts(backend, style, D, rotary_dim):
    dev = device_for(backend)
    B = 2
    rope = make_rope(D, rotary_dim, style)
    q = rnd(B, 4, 3, D, device=dev)
    ks, vs = make_segments(B, 2, (9, 17, 17, 3), D, device=dev)
    shifts = torch.tensor([[0, 0], [5, 1000], [-3, 77], [0, 0]])
    # fp32 angles: the rotation by -shift carries about |shift| * 2^-24 rad of rounding (as in HF)
    rtol = 1e-5 + 2 * 1000 * 2.0 ** -24
    run_and_check(backend, q, ks, vs, position_shifts=shifts, rope=rope, rtol=rtol)
    # 1-D [S] form broadcasts over rows; also shift the own segment
    run_and_check(backend, q, ks, vs, position_shifts=torch.tensor([2, 40, 113, -7]), rope=rope, rtol=rtol)


def test_position_shifts_zero_without_rope(backend):
    dev = device_for(backend)
    q = rnd(1, 4, 2, 64, device=dev)
    ks, vs = make_segments(1, 2, (5, 2), 64, device=dev)
    run_and_check(backend, q, ks, vs, position_shifts=torch.zeros(2, 1, dtype=torch.int64))


def test_rope_type_dynamic_zero_shifts_ok(backend):
    dev = device_for(backend)
    rope = make_rope(64, rope_type="dynamic")
    q = rnd(1, 4, 2, 64, device=dev)
    ks, vs = make_segments(1, 2, (5, 2), 64, device=dev)
    run_and_check(backend, q, ks, vs, position_shifts=torch.zeros(2, dtype=torch.int64), rope=rope)


# ----------------------------------------------------------------------------------------------
# Softcap, sliding window, scale
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("softcap", [50.0, 2.0, 0.5])
def test_softcap(backend, softcap):
    dev = device_for(backend)
    q = rnd(2, 4, 3, 64, device=dev) * 3
    ks, vs = make_segments(2, 2, (21, 0, 3), 64, device=dev)
    run_and_check(backend, q, ks, vs, softcap=softcap)


@pytest.mark.parametrize("scale", [0.3, 1.0])
def test_explicit_scale(backend, scale):
    dev = device_for(backend)
    q = rnd(1, 4, 3, 64, device=dev)
    ks, vs = make_segments(1, 2, (21, 3), 64, device=dev)
    run_and_check(backend, q, ks, vs, scale=scale)


@pytest.mark.parametrize("window", [1, 4, 16, 1000])
def test_sliding_window_default_query_positions(backend, window):
    dev = device_for(backend)
    B, Lq = 2, 3
    q = rnd(B, 4, Lq, 64, device=dev)
    ks, vs = make_segments(B, 2, (12, 10, 10, 5), 64, device=dev)
    # prefix at 0; two branches share start 12 (parallel); own after the longest branch
    seg_pos = torch.tensor([[0, 0], [12, 12], [12, 12], [22, 22]])
    seq_lens = torch.tensor([[12, 12], [10, 6], [10, 10], [5, 4]])
    run_and_check(backend, q, ks, vs, sliding_window=window, segment_positions=seg_pos, seq_lens=seq_lens)


@pytest.mark.parametrize("causal_last", [True, False])
def test_sliding_window_explicit_query_positions(backend, causal_last):
    dev = device_for(backend)
    B, Lq = 2, 4
    q = rnd(B, 4, Lq, 64, device=dev)
    ks, vs = make_segments(B, 1, (30, 7, 4), 64, device=dev)
    seg_pos = torch.tensor([0, 30, 37])
    qpos = torch.tensor([[37, 38, 39, 40], [40, 41, 42, 43]])
    run_and_check(backend, q, ks, vs, sliding_window=8, segment_positions=seg_pos, query_positions=qpos,
                  causal_last=causal_last)


def test_sliding_window_with_shifts_and_softcap(backend):
    """Gemma2-like layer: softcap + sliding window + re-indexed branches."""
    dev = device_for(backend)
    rope = make_rope(64)
    B, Lq = 2, 2
    q = rnd(B, 4, Lq, 64, device=dev)
    ks, vs = make_segments(B, 2, (8, 16, 16, 2), 64, device=dev)
    shifts = torch.tensor([0, 8, 24, 0])
    seg_pos = torch.tensor([0, 8, 24, 40])
    run_and_check(backend, q, ks, vs, position_shifts=shifts, rope=rope, sliding_window=20,
                  segment_positions=seg_pos, softcap=30.0)


# ----------------------------------------------------------------------------------------------
# Calibration knobs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", ["scalar", "per_group", "per_head"])
@pytest.mark.parametrize("groups", [None, [0, 1, 1, 2], [0, 0, 0, 1], [0, 0, 0, 0]], ids=str)
def test_calibration_knobs(backend, form, groups):
    dev = device_for(backend)
    Hq, S = 4, 4
    G = S if groups is None else max(groups) + 1
    q = rnd(2, Hq, 3, 64, device=dev)
    ks, vs = make_segments(2, 2, (9, 14, 0, 3), 64, device=dev)
    if form == "scalar":
        T, Sc, b = 0.7, 1.3, -0.4
    elif form == "per_group":
        T = torch.linspace(0.5, 1.5, G)
        Sc = torch.linspace(1.2, 0.8, G)
        b = torch.linspace(-1.0, 1.0, G)
    else:
        T = torch.rand(G, Hq) + 0.5
        Sc = torch.rand(G, Hq) + 0.5
        b = torch.randn(G, Hq)
    seq_lens = torch.tensor([[9, 2], [14, 0], [0, 0], [3, 3]])
    run_and_check(backend, q, ks, vs, temperature=T, lse_scale=Sc, log_weight=b, segment_groups=groups,
                  seq_lens=seq_lens)
    # each knob alone
    run_and_check(backend, q, ks, vs, temperature=T, segment_groups=groups)
    run_and_check(backend, q, ks, vs, lse_scale=Sc, segment_groups=groups)
    run_and_check(backend, q, ks, vs, log_weight=b, segment_groups=groups)


def test_knobs_at_defaults_are_exact(backend):
    dev = device_for(backend)
    q = rnd(2, 4, 3, 64, device=dev)
    ks, vs = make_segments(2, 2, (9, 14, 3), 64, device=dev)
    o0, l0 = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    o1, l1 = pskernels.multi_branch_attention(q, ks, vs, temperature=1.0, lse_scale=1.0, log_weight=0.0,
                                              backend=backend)
    torch.testing.assert_close(o1, o0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
    # pooling segments into one group with default knobs is exact attention too
    o2, l2 = pskernels.multi_branch_attention(q, ks, vs, segment_groups=[0, 0, 0], backend=backend)
    torch.testing.assert_close(o2, o0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, l0, rtol=1e-5, atol=1e-5)


def test_ape_setting(backend):
    """APE: contexts share one start position (via shifts), T = S = 0.9, all non-own segments in one group."""
    dev = device_for(backend)
    rope = make_rope(64)
    B, Lq = 2, 4
    q = rnd(B, 6, Lq, 64, device=dev)
    lens = (5, 12, 9, 15, 4)  # prefix, 3 contexts, own
    ks, vs = make_segments(B, 2, lens, 64, device=dev)
    # contexts were encoded sequentially after the prefix (5, 17, 26); APE moves them all to start 5
    shifts = torch.tensor([0, 0, -12, -21, 0])
    groups = [0, 0, 0, 0, 1]
    T = torch.tensor([0.9, 1.0])
    Sc = torch.tensor([0.9, 1.0])
    run_and_check(backend, q, ks, vs, position_shifts=shifts, rope=rope, segment_groups=groups,
                  temperature=T, lse_scale=Sc)


# ----------------------------------------------------------------------------------------------
# Strided views, low precision
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_views(backend, dtype):
    """Every operand a strided view (the CPU kernel's BLAS reads K/V in place with their row strides); bf16 too."""
    dev = device_for(backend)
    B, Hq, Hkv, Lq, D = 2, 6, 3, 5, 64
    r = lambda *shape: rnd(*shape, dtype=dtype, device=dev)  # noqa: E731
    q = r(B, Lq, Hq, D).transpose(1, 2)  # HF [B, L, H, D] -> [B, H, L, D]
    k0 = r(B, 19, Hkv, D).transpose(1, 2)
    v0 = r(B, 19, Hkv, D).transpose(1, 2)
    big_k = r(B, Hkv, 50, D)
    big_v = r(B, Hkv, 50, 2 * D)
    k1, v1 = big_k[:, :, 7:30], big_v[:, :, 7:30, :D]  # slice along L and along the value dim
    k2 = r(B, Hkv, 5, 2 * D)[..., D:]  # second half of the last dim (row stride 2D)
    v2 = r(B, 2 * Hkv, 5, D)[:, ::2]  # every other head
    ks, vs = [k0, k1, k2], [v0, v1, v2]
    assert not any(t.is_contiguous() for t in (q, k0, v1, k2, v2))
    if dtype == torch.float32:
        out, lse = run_and_check(backend, q, ks, vs)
    else:
        out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
        _check_low_precision(out, oracle(q, ks, vs)[0], _sdpa_same_dtype(q, ks, vs), dtype)
    out_c, lse_c = pskernels.multi_branch_attention(q.contiguous(), [k.contiguous() for k in ks],
                                                    [v.contiguous() for v in vs], backend=backend)
    torch.testing.assert_close(out, out_c, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, lse_c, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_keys_broadcast_or_overlapping_along_the_sequence(backend, dtype):
    """K/V views whose rows along the keys are less than a row apart (expanded: stride 0; overlapping windows of one
    buffer) are read correctly: a BLAS cannot take them as its matrix (MKL refuses the call), so the CPU kernel
    copies such blocks first."""
    dev = device_for(backend)
    B, Hq, Hkv, D, L, Lq = 2, 6, 3, 64, 300, 9

    def overlapping():  # row j = buffer[j : j + D] (views made in the final dtype: .to() would copy them)
        return rnd(B * Hkv * (L + D), dtype=dtype, device=dev).as_strided((B, Hkv, L, D), (Hkv * (L + D), L + D, 1, 1))

    k0, v0 = overlapping(), rnd(B, Hkv, L, D, dtype=dtype, device=dev)  # distinct scores weigh distinct values
    k1, v1 = rnd(B, Hkv, 1, D, dtype=dtype, device=dev).expand(B, Hkv, L, D), overlapping()  # one key: stride 0
    assert k0.stride(2) == 1 and k1.stride(2) == 0 and v1.stride(2) == 1
    q = rnd(B, Hq, Lq, D, dtype=dtype, device=dev)
    ks, vs = [k0, k1], [v0, v1]
    out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    ref_out, ref_lse = pskernels.multi_branch_attention(q.float(), [k.float().contiguous() for k in ks],
                                                        [v.float().contiguous() for v in vs], backend="torch")
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-4)


def _check_low_precision(out, ref_out, base, dtype):
    """A 16-bit result against the fp64 oracle: within twice the error of ``base`` (same-dtype SDPA) plus a floor."""
    err_base = (base.cpu().double() - ref_out).abs().max().item()
    err = (out.cpu().double() - ref_out).abs().max().item()
    floor = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert err <= 2 * err_base + floor, f"err {err:.3g} vs same-dtype SDPA err {err_base:.3g} (floor {floor})"


def _sdpa_same_dtype(q, ks, vs):
    """torch.cat + SDPA (bottom-right causal own segment) in q's dtype: the error yardstick."""
    Lq = q.shape[2]
    K, V = torch.cat(ks, 2), torch.cat(vs, 2)
    Ltot, own = K.shape[2], ks[-1].shape[2]
    j = torch.arange(Ltot)
    i = torch.arange(Lq)
    mask = (j[None, :] < Ltot - own) | (j[None, :] - (Ltot - own) <= own - Lq + i[:, None])
    rep = q.shape[1] // K.shape[1]
    K, V = K.repeat_interleave(rep, 1), V.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, K, V, attn_mask=mask.to(q.device))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("shape", [(4, 4, 1, 64, (64, 128, 1)), (8, 2, 7, 128, (33, 113, 7)),
                                   (6, 2, 3, 80, (5, 64, 64, 3))], ids=["decode", "prefill", "d80"])
def test_low_precision(backend, dtype, shape):
    dev = device_for(backend)
    Hq, Hkv, Lq, D, lens = shape
    q = rnd(2, Hq, Lq, D, dtype=dtype, device=dev)
    ks, vs = make_segments(2, Hkv, lens, D, dtype=dtype, device=dev)
    out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ro, rl = oracle(q, ks, vs)
    _check_low_precision(out, ro, _sdpa_same_dtype(q, ks, vs), dtype)
    # lse is fp32 computed from low-precision inputs: compare against the oracle loosely
    assert (lse.cpu().double() - rl).abs().max().item() <= 2e-2 * max(1.0, rl.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_shifted(backend, dtype):
    dev = device_for(backend)
    rope = make_rope(64)
    q = rnd(2, 4, 3, 64, dtype=dtype, device=dev)
    ks, vs = make_segments(2, 2, (16, 40, 3), 64, dtype=dtype, device=dev)
    shifts = torch.tensor([0, 300, 0])
    out, lse = pskernels.multi_branch_attention(q, ks, vs, position_shifts=shifts, rope=rope, backend=backend)
    ro, rl = oracle(q, ks, vs, shifts=shifts, rope=rope)
    # yardstick: same-dtype SDPA over keys rotated in fp32 then cast back
    ks_rot = [ks[0], rotate(ks[1].float(), torch.tensor(300.0), rope).to(dtype), ks[2]]
    _check_low_precision(out, ro, _sdpa_same_dtype(q, ks_rot, vs), dtype)


# ----------------------------------------------------------------------------------------------
# Metamorphic properties
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_single_branch_shift_equals_sequential_prefill(backend, style):
    """A branch encoded at positions 0.. and shifted by P equals plain sequential prefill (cat + SDPA)."""
    dev = device_for(backend)
    D, Hq, Hkv, P, Lb, Lo = 64, 4, 2, 11, 23, 5
    rope = make_rope(D, style=style)
    raw_p, raw_b, raw_o = (rnd(1, Hkv, n, D) for n in (P, Lb, Lo))
    vs = [rnd(1, Hkv, n, D, device=dev) for n in (P, Lb, Lo)]
    pos = torch.arange(P + Lb + Lo, dtype=torch.float64)
    k_seq = rotate(torch.cat([raw_p, raw_b, raw_o], 2).double(), pos, rope)  # sequential positions
    q_raw = rnd(1, Hq, Lo, D).double()
    q = rotate(q_raw, pos[-Lo:], rope).float().to(dev)
    k_branch_stored = rotate(raw_b.double(), torch.arange(Lb, dtype=torch.float64), rope)  # encoded at 0..
    ks = [k_seq[:, :, :P].float().to(dev), k_branch_stored.float().to(dev), k_seq[:, :, P + Lb:].float().to(dev)]
    out, lse = pskernels.multi_branch_attention(q, ks, vs, position_shifts=torch.tensor([0, P, 0]), rope=rope,
                                                backend=backend)
    # sequential prefill reference: causal attention of the last Lo queries over the full sequence
    K = k_seq.repeat_interleave(Hq // Hkv, 1)
    V = torch.cat(vs, 2).cpu().double().repeat_interleave(Hq // Hkv, 1)
    Ltot = P + Lb + Lo
    mask = torch.arange(Ltot)[None, :] <= (Ltot - Lo + torch.arange(Lo))[:, None]
    ref = F.scaled_dot_product_attention(q.cpu().double(), K, V, attn_mask=mask)
    sc = (q.cpu().double() @ K.transpose(-1, -2)) * D ** -0.5
    ref_lse = torch.logsumexp(sc.masked_fill(~mask, float("-inf")), -1)
    check_close(out, lse, ref, ref_lse, rtol=2e-5)


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_shift_equals_rotated_keys(backend, style):
    dev = device_for(backend)
    rope = make_rope(128, 64, style)
    q = rnd(2, 8, 4, 128, device=dev)
    ks, vs = make_segments(2, 4, (16, 24, 24, 4), 128, device=dev)
    shifts = torch.tensor([[0, 0], [16, 3], [-40, 16], [0, 0]])
    o1, l1 = pskernels.multi_branch_attention(q, ks, vs, position_shifts=shifts, rope=rope, backend=backend)
    ks_rot = [pskernels.rotate_keys(k, shifts[s].to(dev), rope, backend="torch") for s, k in enumerate(ks)]
    o2, l2 = pskernels.multi_branch_attention(q, ks_rot, vs, backend=backend)
    torch.testing.assert_close(o1, o2, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(l1, l2, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("cut", [0, 1, 20, 41])
def test_split_segment_equals_unsplit(backend, cut):
    dev = device_for(backend)
    rope = make_rope(64)
    q = rnd(2, 4, 3, 64, device=dev)
    ks, vs = make_segments(2, 2, (41, 3), 64, device=dev)
    k, v = ks[0], vs[0]
    sh = torch.tensor([7, 0])
    sh3 = torch.tensor([7, 7, 0])
    o1, l1 = pskernels.multi_branch_attention(q, ks, vs, position_shifts=sh, rope=rope, backend=backend)
    o2, l2 = pskernels.multi_branch_attention(q, [k[:, :, :cut], k[:, :, cut:], ks[1]],
                                              [v[:, :, :cut], v[:, :, cut:], vs[1]], position_shifts=sh3, rope=rope,
                                              backend=backend)
    torch.testing.assert_close(o2, o1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)


def test_split_segment_via_merge_states(backend):
    """Two partial calls (causal_last=False) merged by merge_states equal one call over both segments."""
    dev = device_for(backend)
    q = rnd(2, 6, 4, 64, device=dev)
    ks, vs = make_segments(2, 3, (30, 0, 17), 64, device=dev)
    seq_lens = torch.tensor([[30, 12], [0, 0], [17, 0]])
    o_full, l_full = pskernels.multi_branch_attention(q, ks, vs, seq_lens=seq_lens, causal_last=False,
                                                      backend=backend)
    parts = [pskernels.multi_branch_attention(q, [ks[s]], [vs[s]], seq_lens=seq_lens[s:s + 1], causal_last=False,
                                              backend=backend) for s in range(3)]
    o_m, l_m = pskernels.merge_states([p[0] for p in parts], [p[1] for p in parts], backend="torch")
    torch.testing.assert_close(o_m, o_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_m, l_full, rtol=1e-5, atol=1e-5)
    # seq split of one segment merged
    k, v = ks[0], vs[0]
    a = pskernels.multi_branch_attention(q, [k[:, :, :10]], [v[:, :, :10]], causal_last=False, backend=backend)
    b = pskernels.multi_branch_attention(q, [k[:, :, 10:]], [v[:, :, 10:]], causal_last=False, backend=backend)
    o_ab, l_ab = pskernels.merge_states([a[0], b[0]], [a[1], b[1]], backend="torch")
    o_k, l_k = pskernels.multi_branch_attention(q, [k], [v], causal_last=False, backend=backend)
    torch.testing.assert_close(o_ab, o_k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_ab, l_k, rtol=1e-5, atol=1e-5)


def test_rows_are_independent(backend):
    dev = device_for(backend)
    B = 3
    q = rnd(B, 4, 2, 64, device=dev)
    ks, vs = make_segments(B, 2, (9, 13, 2), 64, device=dev)
    seq_lens = torch.tensor([[9, 0, 4], [13, 5, 0], [2, 1, 2]])
    o, l = pskernels.multi_branch_attention(q, ks, vs, seq_lens=seq_lens, backend=backend)
    for b in range(B):
        ob, lb = pskernels.multi_branch_attention(q[b:b + 1], [k[b:b + 1] for k in ks], [v[b:b + 1] for v in vs],
                                                  seq_lens=seq_lens[:, b:b + 1], backend=backend)
        torch.testing.assert_close(ob[0], o[b], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lb[0], l[b], rtol=1e-6, atol=1e-6)


def test_segment_order_invariance_without_causal(backend):
    dev = device_for(backend)
    q = rnd(1, 4, 3, 64, device=dev)
    ks, vs = make_segments(1, 2, (9, 13, 4), 64, device=dev)
    o1, l1 = pskernels.multi_branch_attention(q, ks, vs, causal_last=False, backend=backend)
    o2, l2 = pskernels.multi_branch_attention(q, ks[::-1], vs[::-1], causal_last=False, backend=backend)
    torch.testing.assert_close(o1, o2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def _loss(out, lse):
    fin = torch.isfinite(lse)
    return (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype, device=out.device)).sum() \
        + torch.where(fin, lse, torch.zeros_like(lse)).sum() * 0.1


@pytest.mark.parametrize("with_temperature", [False, True], ids=["S_b", "T_S_b"])
def test_gradients_finite_with_empty_row_and_segment(backend, with_temperature):
    dev = device_for(backend)
    B, Hq, G = 3, 4, 2
    q = rnd(B, Hq, 3, 64, device=dev).requires_grad_()
    ks, vs = make_segments(B, 2, (9, 0, 13, 3), 64, device=dev)
    ks = [k.requires_grad_() for k in ks]
    vs = [v.requires_grad_() for v in vs]
    T = (torch.rand(G, Hq) + 0.5).to(dev).requires_grad_()
    Sc = (torch.rand(G, Hq) + 0.5).to(dev).requires_grad_()
    b = torch.randn(G, Hq).to(dev).requires_grad_()
    seq_lens = torch.tensor([[9, 0, 0], [0, 0, 0], [13, 6, 0], [3, 1, 0]])  # row 2 all empty
    out, lse = grad_call(backend, lambda: pskernels.multi_branch_attention(
        q, ks, vs, seq_lens=seq_lens, segment_groups=[0, 0, 1, 1], temperature=T if with_temperature else None,
        lse_scale=Sc, log_weight=b, backend=backend))
    assert torch.all(out[2] == 0) and torch.all(lse[2] == float("-inf"))
    _loss(out, lse).backward()
    named = [("q", q), ("S", Sc), ("b", b)] + [(f"k{i}", k) for i, k in enumerate(ks)] \
        + [(f"v{i}", v) for i, v in enumerate(vs)] + ([("T", T)] if with_temperature else [])
    missing = [n for n, t in named if t.grad is None]
    assert not missing, f"no gradient for {missing}"
    bad = [n for n, t in named if not torch.isfinite(t.grad).all()]
    assert not bad, f"non-finite gradients for {bad}"
    assert torch.all(q.grad[2] == 0), "the all-empty row must get zero gradient"
    assert q.grad[:2].abs().sum() > 0 and Sc.grad.abs().sum() > 0 and b.grad.abs().sum() > 0


def test_gradients_match_oracle(backend):
    dev = device_for(backend)
    B, Hq, G = 2, 4, 2
    rope = make_rope(64, style="gptj")
    q0 = rnd(B, Hq, 3, 64, device=dev)
    ks0, vs0 = make_segments(B, 2, (9, 7, 3), 64, device=dev)
    T0, S0, b0 = torch.rand(G, Hq) + 0.5, torch.rand(G, Hq) + 0.5, torch.randn(G, Hq)
    # no query has an empty group here (the fp64 oracle's logsumexp has NaN gradients for all -inf rows)
    kw = dict(seq_lens=torch.tensor([[9, 4], [7, 7], [3, 3]]), position_shifts=torch.tensor([0, 5, 0]), rope=rope,
              segment_groups=[0, 0, 1], softcap=20.0)

    def grads(fn, dtype, device):
        def leaf(x):
            return x.detach().clone().to(device, dtype).requires_grad_()

        q = leaf(q0)
        ks = [leaf(k) for k in ks0]
        vs = [leaf(v) for v in vs0]
        T, S, b = (leaf(x) for x in (T0, S0, b0))
        out, lse = grad_call(backend, lambda: fn(q, ks, vs, T, S, b))
        _loss(out, lse).backward()
        return [t.grad.cpu().double() for t in [q, *ks, *vs, T, S, b]]

    g_op = grads(lambda q, ks, vs, T, S, b: pskernels.multi_branch_attention(
        q, ks, vs, temperature=T, lse_scale=S, log_weight=b, backend=backend, **kw), torch.float32, dev)
    g_or = grads(lambda q, ks, vs, T, S, b: oracle(q, ks, vs, temperature=T, lse_scale=S, log_weight=b,
                                                   **oracle_kwargs(kw)), torch.float64, "cpu")
    names = ["q", "k0", "k1", "k2", "v0", "v1", "v2", "T", "S", "b"]
    bad = []
    for n, a, r in zip(names, g_op, g_or):
        assert torch.isfinite(r).all(), f"oracle grad {n} not finite"
        tol = 1e-4 * max(1.0, r.abs().max().item())
        err = (a - r).abs().max().item()
        if not err <= tol:
            bad.append(f"{n}: err {err:.3g} (tol {tol:.3g})")
    assert not bad, "gradients differ from the fp64 oracle: " + "; ".join(bad)


@pytest.mark.parametrize("masking", ["causal_last", "seq_lens", "left_pad", "sliding_window", "none"])
def test_temperature_gradient_with_masked_keys(backend, masking):
    """d out / d temperature must be finite whenever some keys are masked (not only for empty rows)."""
    dev = device_for(backend)
    q = rnd(1, 4, 3, 64, device=dev)
    ks, vs = make_segments(1, 2, (9, 3), 64, device=dev)
    kw = {"causal_last": masking == "causal_last"}
    if masking == "seq_lens":
        kw["seq_lens"] = torch.tensor([[5], [3]])
    elif masking == "left_pad":
        kw["left_pad"] = torch.tensor([[2], [0]])
    elif masking == "sliding_window":
        kw.update(sliding_window=4, segment_positions=torch.tensor([0, 9]), query_positions=torch.tensor([[9, 10, 11]]))
    T = torch.tensor([0.8, 1.2], device=dev, requires_grad=True)
    out, lse = grad_call(backend, lambda: pskernels.multi_branch_attention(q, ks, vs, temperature=T,
                                                                             backend=backend, **kw))
    _loss(out, lse).backward()
    assert torch.isfinite(T.grad).all(), f"temperature gradient {T.grad.tolist()} with masked keys ({masking})"
    assert T.grad.abs().sum() > 0


_EMPTY_QUERY_SCRIPT = r"""
import sys, torch, pskernels
backend = sys.argv[1]
for name, B, Lq in (("Lq=0", 2, 0), ("B=0", 0, 3)):
    q = torch.randn(B, 4, Lq, 16)
    ks = [torch.randn(B, 2, 5, 16), torch.randn(B, 2, Lq, 16)]
    vs = [torch.randn(B, 2, 5, 8), torch.randn(B, 2, Lq, 8)]
    try:
        out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    except ValueError as e:  # a clear refusal naming q is acceptable too
        assert "q" in str(e), (name, str(e))
        print(name, "refused:", e, flush=True)
        continue
    assert out.shape == (B, 4, Lq, 8) and lse.shape == (B, 4, Lq), (name, out.shape, lse.shape)
    print(name, "ok", flush=True)
"""


def test_empty_queries(backend):
    """Lq = 0 / B = 0: empty outputs of the right shape (or a ValueError naming q), never an obscure error or a
    crash. Run in a subprocess so that a crashing backend fails this test instead of killing the session."""
    import os
    import subprocess
    import sys

    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", _EMPTY_QUERY_SCRIPT, backend], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, f"returncode {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-2000:]}"


def test_output_is_fresh_tensor(backend):
    """The op must not alias or modify its inputs."""
    dev = device_for(backend)
    q = rnd(1, 4, 2, 64, device=dev)
    ks, vs = make_segments(1, 2, (5, 2), 64, device=dev)
    before = [t.clone() for t in [q, *ks, *vs]]
    out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    for a, b in zip(before, [q, *ks, *vs]):
        assert torch.equal(a, b)
    assert out.data_ptr() not in {t.data_ptr() for t in [q, *ks, *vs]}
    assert math.isfinite(out.abs().sum().item())


# ----------------------------------------------------------------------------------------------
# plan once, run many
# ----------------------------------------------------------------------------------------------
def _plan_case(dev, dtype=torch.float32):
    ks, vs = make_segments(2, 2, (13, 0, 9, 5), 16, dtype=dtype, device=dev)
    kw = dict(seq_lens=torch.tensor([[13, 7], [0, 0], [9, 0], [5, 4]]), position_shifts=torch.tensor([0, 3, -2, 0]),
              rope=make_rope(16), softcap=30.0)
    return ks, vs, kw


def test_plan_runs_equal_one_shot_calls(backend):
    dev = device_for(backend)
    ks, vs, kw = _plan_case(dev)
    q0 = rnd(2, 4, 3, 16, device=dev)
    plan = pskernels.plan_multi_branch_attention(q0, ks, vs, backend=backend, **kw)
    assert plan.backend == backend and backend in repr(plan)
    for _ in range(3):  # fresh tensors of the planned layout, as the layers of a forward
        q = rnd(2, 4, 3, 16, device=dev)
        ks2, vs2 = [torch.randn_like(k) for k in ks], [torch.randn_like(v) for v in vs]
        out, lse = plan.run(q, ks2, vs2)
        ref_out, ref_lse = pskernels.multi_branch_attention(q, ks2, vs2, backend=backend, **kw)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_plan_keeps_the_tables_it_checked(backend):
    """A plan holds copies of its lengths and padding (on the host for the compiled ops' checks and tables, on
    q's device for the kernels): changing the caller's tables afterwards changes no run of any backend."""
    dev = device_for(backend)
    ks, vs, kw = _plan_case(dev)
    kw["left_pad"] = torch.tensor([[2, 0], [0, 0], [1, 0], [0, 0]])
    q = rnd(2, 4, 3, 16, device=dev)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend=backend, **kw)
    p = plan.params
    assert all(t.device.type == "cpu" for t in p.host if t is not None)
    assert torch.equal(p.host.seq_lens, kw["seq_lens"]) and torch.equal(p.host.left_pad, kw["left_pad"])
    assert torch.equal(p.seq_lens.cpu(), kw["seq_lens"]) and torch.equal(p.left_pad.cpu(), kw["left_pad"])
    want = plan.run(q, ks, vs)
    kw["seq_lens"].fill_(0)
    kw["left_pad"].fill_(0)
    got = plan.run(q, ks, vs)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert torch.equal(p.host.seq_lens, p.seq_lens.cpu()) and int(p.host.seq_lens.sum()) > 0


def test_plan_auto_resolves_a_backend_name():
    ks, vs, kw = _plan_case("cpu")
    plan = pskernels.plan_multi_branch_attention(rnd(2, 4, 3, 16), ks, vs, **kw)
    assert plan.backend == pskernels.ops.resolve_backend(OP, "auto", torch.device("cpu"))


def _bad_runs():
    """(label, how to spoil (q, keys, values), argument named in the error)."""
    return [
        ("q_shape", lambda q, ks, vs: (q[:, :, :2], ks, vs), "q"),
        ("q_dtype", lambda q, ks, vs: (q.double(), ks, vs), "q"),
        ("q_not_tensor", lambda q, ks, vs: (q.tolist(), ks, vs), "q"),
        ("segment_count", lambda q, ks, vs: (q, ks[:-1], vs[:-1]), "keys/values"),
        ("key_length", lambda q, ks, vs: (q, [ks[0][:, :, :12]] + ks[1:], vs), "keys[0]"),
        ("value_dtype", lambda q, ks, vs: (q, ks, vs[:2] + [vs[2].double()] + vs[3:]), "values[2]"),
        ("value_device", lambda q, ks, vs: (q, ks, vs[:3] + [vs[3].to("meta")]), "values[3]"),
        ("key_not_tensor", lambda q, ks, vs: (q, ks[:3] + [None], vs), "keys[3]"),
    ]


@pytest.mark.parametrize("label, spoil, name", _bad_runs(), ids=[c[0] for c in _bad_runs()])
def test_plan_run_refuses_another_layout(label, spoil, name):
    ks, vs, kw = _plan_case("cpu")
    q = rnd(2, 4, 3, 16)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, **kw)
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}: expected"):
        plan.run(*spoil(q, ks, vs))


def test_plan_run_with_a_non_unit_last_stride(backend):
    """The reference computes on any strides; the kernels refuse a non-unit last stride, naming the segment."""
    dev = device_for(backend)
    ks, vs, kw = _plan_case(dev)
    q = rnd(2, 4, 3, 16, device=dev)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend=backend, **kw)
    strided = [ks[0].transpose(2, 3).contiguous().transpose(2, 3)] + ks[1:]
    if backend == "torch":
        out, lse = plan.run(q, strided, vs)
        assert torch.equal(out, plan.run(q, ks, vs)[0])
    else:
        with pytest.raises((ValueError, RuntimeError), match=r"keys\[0\]"):
            plan.run(q, strided, vs)


def _knobs(G, Hq, seed):
    g = torch.Generator().manual_seed(seed)
    return dict(temperature=0.5 + torch.rand(G, Hq, generator=g), lse_scale=0.5 + torch.rand(G, Hq, generator=g),
                log_weight=torch.randn(G, Hq, generator=g))


def test_plan_runs_with_per_call_calibration(backend):
    """One plan, calibrated per run (a mapper's per-layer knobs): each run equals the one-shot call with its knobs;
    a knob not given keeps the plan's."""
    dev = device_for(backend)
    ks, vs, kw = _plan_case(dev)
    kw["segment_groups"] = [0, 1, 1, 0]
    q = rnd(2, 4, 3, 16, device=dev)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend=backend, **kw, **_knobs(2, 4, 0))
    for layer in range(1, 4):
        knobs = {n: t.to(dev) for n, t in _knobs(2, 4, layer).items()}
        out, lse = plan.run(q, ks, vs, **knobs)
        ref_out, ref_lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw, **knobs)
        assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    only_t = plan.run(q, ks, vs, temperature=knobs["temperature"])
    ref = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw, **dict(_knobs(2, 4, 0),
                                           temperature=knobs["temperature"].cpu()))
    assert torch.equal(only_t[0], ref[0])
    assert torch.equal(plan.run(q, ks, vs)[0], pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw,
                                                                                **_knobs(2, 4, 0))[0])


@pytest.mark.parametrize("knobs, match", [
    (dict(temperature=torch.ones(3, 4)), r"temperature: expected shape \[G\] = \[2\] or \[G, Hq\] = \[2, 4\], got "
                                         r"\(3, 4\)"),
    (dict(lse_scale=torch.zeros(2, 4)), r"lse_scale: expected values > 0, got min 0"),
    (dict(log_weight=torch.full((2, 4), float("nan"))), r"log_weight: expected finite values"),
    (dict(temperature=torch.ones(2, 4, dtype=torch.int64)), r"temperature: expected a floating tensor"),
], ids=["shape", "not_positive", "not_finite", "integer"])
def test_plan_run_checks_its_calibration(knobs, match):
    ks, vs, kw = _plan_case("cpu")
    q = rnd(2, 4, 3, 16)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, segment_groups=[0, 1, 1, 0], **kw, **_knobs(2, 4, 0))
    with pytest.raises((ValueError, TypeError), match=match):
        plan.run(q, ks, vs, **knobs)
    bare = pskernels.plan_multi_branch_attention(q, ks, vs, **kw)
    with pytest.raises(ValueError, match=r"temperature: the plan was made without it; give it when planning"):
        bare.run(q, ks, vs, temperature=torch.ones(4, 4))


def test_plan_falls_back_to_the_reference_when_grad_is_needed():
    ks, vs, kw = _plan_case("cpu")
    q = rnd(2, 4, 3, 16)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, **kw)
    q.requires_grad_(True)
    out, _ = plan.run(q, ks, vs)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------------------------
# Cascade (shared-prefix) attention of the C++ CPU kernel (issue 14)
# ----------------------------------------------------------------------------------------------
# A segment stored once for every batch row (batch-1 K/V expanded over B rows, batch stride 0, as
# pskernels.hf.ParallelCache passes a shared prefix) is attended by the stacked queries of all rows in one
# pass over its K/V (csrc/cpu/ and csrc/cuda/multi_branch_attention, "Cascade"); per-row metadata still
# applies per row. The Triton launcher's cascade has its own tests (tests/test_triton_cascade.py).
_CASCADE_EVENT = "pskernels::multi_branch_attention::{}_cascade"
_CASCADE_SWITCH = "PSKERNELS_{}_CASCADE"
cpu_kernel = pytest.mark.skipif("cpu" not in pskernels.available_backends(OP),
                                reason="the compiled extension (backend 'cpu') is not built")
cuda_kernel = pytest.mark.skipif("cuda" not in pskernels.available_backends(OP),
                                 reason="needs a CUDA device and the CUDA extension")
cascade_backend = pytest.mark.parametrize("cbackend", [pytest.param("cpu", marks=cpu_kernel),
                                                       pytest.param("cuda", marks=cuda_kernel)])


def _cascade_segments(B, Hkv, D, layout, dtype, gen, device="cpu"):
    """Keys, values and per-row ``seq_lens``/``left_pad`` for ``layout``: ("shared" | "row", L) per segment.

    Shared segments are batch-1 tensors expanded to B rows; their valid lengths differ across rows, with
    row 0 seeing the whole segment and row 1 none of it. Every segment gets some left padding on some rows.
    """
    ks, vs, lens, pads = [], [], [], []
    for kind, L in layout:
        rows = 1 if kind == "shared" else B
        k = torch.randn(rows, Hkv, L, D, generator=gen).to(device, dtype)
        v = torch.randn(rows, Hkv, L, D, generator=gen).to(device, dtype)
        if kind == "shared":
            k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
        n = torch.randint(L // 2, L + 1, (B,), generator=gen)
        if kind == "shared":
            n[0] = L
            if B > 1:
                n[1] = 0
        p = torch.randint(0, 4, (B,), generator=gen).clamp(max=n)
        p[0] = 0
        ks.append(k)
        vs.append(v)
        lens.append(n)
        pads.append(p)
    return ks, vs, torch.stack(lens), torch.stack(pads)


def _check_cascade(q, ks, vs, rtol=1e-5, backend="cpu", **kw):
    """The kernel of ``backend`` against the fp64 oracle; bf16/fp16 outputs may differ by their own rounding."""
    out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)
    ro, rl = oracle(q, ks, vs, **oracle_kwargs(kw))
    what = str({k: v for k, v in kw.items() if not torch.is_tensor(v)})
    if q.dtype == torch.float32:
        check_close(out, lse, ro, rl, rtol=rtol, what=what)
    else:  # inputs are exact in fp64: lse is fp32-accurate, out carries one rounding to q's dtype (2^-8 of bf16)
        check_close(ro, lse, ro, rl, rtol=rtol, what=what)
        check_close(out, lse, ro, rl, rtol=2.0 ** -8, what=what)
    return out, lse


def _cascade_taken(fn, backend="cpu"):
    """``fn()`` and whether the kernel of ``backend`` ran a cascade pass (its profiler event, recorded on the host
    by both the CPU and the CUDA launcher)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        res = fn()
    return res, any(e.name == _CASCADE_EVENT.format(backend) for e in prof.events())


def _cascade_expected(backend, Lq):
    """Whether this file's cases (G = 3 query heads per kv head, B >= 5) take the cascade: the CPU kernel stacks
    any query rows; the CUDA kernel only where stacking at least halves its 16-row tiles' passes, so a 21-row
    prefill (G * Lq = 3 * 7, already two tiles per row) keeps the per-row pass."""
    return backend == "cpu" or Lq == 1


@cascade_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Lq", [1, 7], ids=["decode", "prefill"])
@pytest.mark.parametrize("Hq,Hkv", [(4, 4), (9, 3), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
@pytest.mark.parametrize("B", [1, 2, 5, 16, 64])
def test_cascade_shared_prefix(B, Hq, Hkv, Lq, dtype, cbackend):
    """B rows share one prefix (ragged per-row lengths, a row that sees none of it, left padding) and have
    ragged own segments; the prefix spans several key blocks and splits."""
    gen = torch.Generator().manual_seed(B * 100 + Hq * 10 + Lq)
    dev = device_for(cbackend)
    ks, vs, lens, pads = _cascade_segments(B, Hkv, 64, [("shared", 600), ("row", 23)], dtype, gen, dev)
    q = torch.randn(B, Hq, Lq, 64, generator=gen).to(dev, dtype)
    _check_cascade(q, ks, vs, backend=cbackend, seq_lens=lens, left_pad=pads)


@cpu_kernel
@pytest.mark.parametrize("Lq", [1, 7], ids=["decode", "prefill"])
@pytest.mark.parametrize("B", [2, 16])
def test_cascade_shared_prefix_fp16_cpu(B, Lq):
    """fp16 through the CPU kernel's 16-bit BLAS path (MKL's gemm_f16f16f32), cascade and per-row passes."""
    gen = torch.Generator().manual_seed(B * 10 + Lq)
    ks, vs, lens, pads = _cascade_segments(B, 3, 64, [("shared", 600), ("row", 23)], torch.float16, gen)
    q = torch.randn(B, 9, Lq, 64, generator=gen).to(torch.float16)
    _check_cascade(q, ks, vs, backend="cpu", seq_lens=lens, left_pad=pads)


def _feature_case(feature, B, Lq, gen):
    """(layout, op kwargs) of one cascade feature test; kwargs that depend on the segments come as callables."""
    S2 = [("shared", 300), ("row", 19)]
    if feature == "shifts":  # per-row shifts of the shared segment, row 0 unshifted
        def kw(lens):
            sh = torch.randint(-50, 1000, (2, B), generator=gen)
            sh[:, 0] = 0
            return dict(position_shifts=sh, rope=make_rope(64))
        return S2, kw
    if feature == "softcap":
        return S2, lambda lens: dict(softcap=2.0)
    if feature == "window":  # per-row segment starts and query positions: each row sees another part
        def kw(lens):
            seg_pos = torch.stack([torch.zeros(B, dtype=torch.int64), lens[0] + torch.arange(B)])
            q_pos = seg_pos[1][:, None] + lens[1][:, None] - Lq + torch.arange(Lq)[None, :]
            return dict(sliding_window=150, segment_positions=seg_pos, query_positions=q_pos)
        return S2, kw
    if feature == "knobs":  # two shared segments in different groups, one pooled with a row's branch
        def kw(lens):
            G = 3
            return dict(segment_groups=[0, 0, 1, 2], temperature=torch.rand(G, 6, generator=gen) + 0.5,
                        lse_scale=torch.rand(G, 6, generator=gen) + 0.5, log_weight=torch.randn(G, 6, generator=gen))
        return [("shared", 300), ("row", 40), ("shared", 100), ("row", 9)], kw
    if feature == "not_first":
        return [("row", 50), ("shared", 300), ("row", 17)], lambda lens: {}
    if feature == "shared_last":  # the causal own segment itself is shared, with per-row lengths
        return [("shared", 300), ("shared", 20)], lambda lens: {}
    if feature == "everything":
        def kw(lens):
            sh = torch.randint(-20, 500, (3, B), generator=gen)
            seg_pos = torch.stack([torch.zeros(B, dtype=torch.int64), lens[0], lens[0] + lens[1]])
            return dict(position_shifts=sh, rope=make_rope(64, style="gptj"), softcap=5.0, sliding_window=200,
                        segment_positions=seg_pos, segment_groups=[0, 1, 1], temperature=0.8, lse_scale=1.2,
                        log_weight=torch.tensor([0.3, -0.2]))
        return [("shared", 400), ("shared", 30), ("row", 11)], kw
    raise ValueError(feature)


@cascade_backend
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("Lq", [1, 7], ids=["decode", "prefill"])
@pytest.mark.parametrize("B", [5, 16])
@pytest.mark.parametrize("feature", ["shifts", "softcap", "window", "knobs", "not_first", "shared_last",
                                     "everything"])
def test_cascade_features(feature, B, Lq, dtype, cbackend):
    gen = torch.Generator().manual_seed(len(feature) * 1000 + B * 10 + Lq)
    dev = device_for(cbackend)
    layout, make_kw = _feature_case(feature, B, Lq, gen)
    ks, vs, lens, pads = _cascade_segments(B, 2, 64, layout, dtype, gen, dev)
    kw = make_kw(lens)
    if "sliding_window" in kw:  # virtual positions of padded slots stay where they are: keep slot 0 valid
        pads = torch.zeros_like(pads)
    q = torch.randn(B, 6, Lq, 64, generator=gen).to(dev, dtype) * (3 if "softcap" in kw else 1)
    shifts = kw.get("position_shifts")
    rtol = 1e-5 + (2 * int(shifts.abs().max()) * 2.0 ** -24 if shifts is not None else 0)
    out, lse = _check_cascade(q, ks, vs, rtol=rtol, backend=cbackend, seq_lens=lens, left_pad=pads, **kw)
    (out2, lse2), taken = _cascade_taken(lambda: pskernels.multi_branch_attention(
        q, ks, vs, backend=cbackend, seq_lens=lens, left_pad=pads, **kw), cbackend)
    assert taken == _cascade_expected(cbackend, Lq), "the shared segments did not take the expected pass"
    assert torch.equal(out2, out) and torch.equal(lse2, lse), "two identical calls differ"


@cascade_backend
@pytest.mark.parametrize("Lq", [1, 7], ids=["decode", "prefill"])
def test_cascade_is_taken_and_equals_per_row_path(Lq, cbackend, monkeypatch):
    """Expanded (batch stride 0) K/V go through the cascade, a contiguous copy of them and B = 1 do not;
    PSKERNELS_CPU_CASCADE=0 (PSKERNELS_CUDA_CASCADE=0) turns it off. All of them compute the same attention."""
    gen = torch.Generator().manual_seed(Lq)
    B = 16
    dev = device_for(cbackend)
    ks, vs, lens, pads = _cascade_segments(B, 3, 64, [("shared", 700), ("row", 16)], torch.float32, gen, dev)
    q = torch.randn(B, 9, Lq, 64, generator=gen).to(dev)
    kw = dict(seq_lens=lens, left_pad=pads)

    def call(keys, values, qq=q, **extra):
        return pskernels.multi_branch_attention(qq, keys, values, backend=cbackend, **{**kw, **extra})

    assert ks[0].stride(0) == 0 and vs[0].stride(0) == 0
    (out, lse), taken = _cascade_taken(lambda: call(ks, vs), cbackend)
    assert taken == _cascade_expected(cbackend, Lq)
    copies = ([k.contiguous() for k in ks], [v.contiguous() for v in vs])
    (out_c, lse_c), taken_c = _cascade_taken(lambda: call(*copies), cbackend)
    assert not taken_c
    torch.testing.assert_close(out, out_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, lse_c, rtol=1e-5, atol=1e-5)
    switch = _CASCADE_SWITCH.format(cbackend.upper())
    monkeypatch.setenv(switch, "0")
    (out_off, lse_off), taken_off = _cascade_taken(lambda: call(ks, vs), cbackend)
    assert not taken_off
    torch.testing.assert_close(out_off, out_c, rtol=1e-5, atol=1e-5)
    monkeypatch.delenv(switch)
    one = ([k[:1] for k in ks], [v[:1] for v in vs])
    (out_1, _), taken_1 = _cascade_taken(
        lambda: call(*one, qq=q[:1], seq_lens=lens[:, :1], left_pad=pads[:, :1]), cbackend)
    assert not taken_1
    torch.testing.assert_close(out_1, out[:1], rtol=1e-5, atol=1e-5)


@cascade_backend
def test_cascade_rows_without_any_key_no_nan(cbackend):
    """Rows whose shared length is 0 and whose own queries see nothing give out = 0, lse = -inf; a shared
    segment that no row sees at all is skipped."""
    B, Lq = 4, 3
    gen = torch.Generator().manual_seed(7)
    dev = device_for(cbackend)
    ks, vs, _, _ = _cascade_segments(B, 1, 64, [("shared", 300), ("shared", 50), ("row", 5)], torch.float32, gen,
                                     dev)
    lens = torch.tensor([[300, 0, 120, 0], [0, 0, 0, 0], [5, 2, 0, 0]])
    q = torch.randn(B, 4, Lq, 64, generator=gen).to(dev)
    out, lse = _check_cascade(q, ks, vs, backend=cbackend, seq_lens=lens)
    assert torch.all(lse[1, :, 0] == float("-inf")) and torch.all(out[1, :, 0] == 0)  # row 1, query 0: no key
    assert torch.all(lse[3] == float("-inf")) and torch.all(out[3] == 0)  # row 3: no key at all
