"""merge_states: LSE merge of partial attention states against an fp64 oracle, plus metamorphic properties."""
from __future__ import annotations

import math

import pytest
import torch

import pskernels

from op_helpers import backend_params, device_for, grad_call

OP = "merge_states"


@pytest.fixture(params=backend_params(OP))
def backend(request):
    return request.param


def oracle_merge(outs, lses):
    """fp64: w_n = softmax_n(lse_n); out = sum w_n out_n; lse = logsumexp_n lse_n; empty -> 0 / -inf."""
    o = torch.stack([t.cpu().double() for t in outs])
    s = torch.stack([t.cpu().double() for t in lses])
    lse = torch.logsumexp(s, 0)
    fin = torch.isfinite(lse)
    w = torch.where(fin, torch.exp(s - torch.where(fin, lse, torch.zeros_like(lse))), torch.zeros_like(s))
    return (w[..., None] * o).sum(0), lse


def attention_state(q, k, v, mask=None):
    """fp64 attention over one key set: (out, lse); rows without keys give (0, -inf)."""
    sc = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        sc = sc.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(sc, -1)
    fin = torch.isfinite(lse)
    p = torch.where(fin[..., None], torch.exp(sc - torch.where(fin, lse, torch.zeros_like(lse))[..., None]),
                    torch.zeros_like(sc))
    return p @ v.double(), lse


def check(out, lse, ro, rl, tol=1e-5):
    assert lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    out, lse = out.cpu().double(), lse.cpu().double()
    assert (out - ro).abs().max().item() <= tol * max(1.0, ro.abs().max().item())
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin)
    assert torch.equal(lse[~fin], rl[~fin])
    if fin.any():
        assert (lse[fin] - rl[fin]).abs().max().item() <= tol * max(1.0, rl[fin].abs().max().item())


def rnd(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape).to(device=device, dtype=dtype)


@pytest.mark.parametrize("N", [1, 2, 3, 8])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 4, 7, 64), (1, 3, 113, 80), (2, 2, 5, 128)], ids=str)
def test_against_oracle(backend, N, shape):
    dev = device_for(backend)
    outs = [rnd(*shape, device=dev) for _ in range(N)]
    lses = [rnd(*shape[:-1], device=dev) * 5 for _ in range(N)]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    assert out.shape == shape and lse.shape == shape[:-1] and out.dtype == torch.float32
    check(out, lse, *oracle_merge(outs, lses))


def test_stacked_equals_list(backend):
    dev = device_for(backend)
    outs = rnd(3, 2, 4, 5, 64, device=dev)
    lses = rnd(3, 2, 4, 5, device=dev)
    o1, l1 = pskernels.merge_states(outs, lses, backend=backend)
    o2, l2 = pskernels.merge_states(list(outs), list(lses), backend=backend)
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    check(o1, l1, *oracle_merge(list(outs), list(lses)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_self_merge(backend, dtype):
    dev = device_for(backend)
    o = rnd(2, 4, 7, 64, device=dev, dtype=dtype)
    s = rnd(2, 4, 7, device=dev) * 3
    out, lse = pskernels.merge_states([o, o], [s, s], backend=backend)
    assert out.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 0.0
    torch.testing.assert_close(out, o, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, s + math.log(2), rtol=1e-6, atol=1e-6)
    # k-fold self-merge adds ln k
    out4, lse4 = pskernels.merge_states([o] * 4, [s] * 4, backend=backend)
    torch.testing.assert_close(out4.float(), o.float(), rtol=1e-6, atol=1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(lse4, s + math.log(4), rtol=1e-6, atol=1e-6)


def test_self_merge_with_empty_states(backend):
    dev = device_for(backend)
    o = rnd(1, 2, 3, 16, device=dev)
    s = rnd(1, 2, 3, device=dev)
    s[0, 1] = float("-inf")
    o[0, 1] = 0
    out, lse = pskernels.merge_states([o, o], [s, s], backend=backend)
    assert torch.all(out[0, 1] == 0) and torch.all(lse[0, 1] == float("-inf"))
    torch.testing.assert_close(lse[0, 0], s[0, 0] + math.log(2))


def test_empty_states_contribute_nothing(backend):
    dev = device_for(backend)
    a, b = rnd(2, 3, 4, 32, device=dev), rnd(2, 3, 4, 32, device=dev)
    la, lb = rnd(2, 3, 4, device=dev), torch.full((2, 3, 4), float("-inf"), device=dev)
    b_garbage = torch.full_like(b, 1e30)  # values of an empty state must be ignored (weight exactly 0)
    out, lse = pskernels.merge_states([a, b_garbage], [la, lb], backend=backend)
    assert torch.isfinite(out).all(), "an empty state's values leaked into the merge"
    torch.testing.assert_close(out, a, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(lse, la, rtol=1e-6, atol=1e-6)


def test_all_empty(backend):
    dev = device_for(backend)
    outs = [torch.zeros(2, 3, 4, 32, device=dev) for _ in range(3)]
    lses = [torch.full((2, 3, 4), float("-inf"), device=dev) for _ in range(3)]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_mixed_empty_rows(backend):
    dev = device_for(backend)
    outs = [rnd(2, 2, 5, 16, device=dev) for _ in range(3)]
    lses = [rnd(2, 2, 5, device=dev) for _ in range(3)]
    for n in range(3):
        lses[n][1, 0, 2] = float("-inf")  # one fully empty position
    lses[0][0, 1] = float("-inf")
    lses[2][0, 1, :3] = float("-inf")
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    ro, rl = oracle_merge(outs, lses)
    ro[1, 0, 2] = 0
    check(out, lse, ro, rl)
    assert torch.all(out[1, 0, 2] == 0) and lse[1, 0, 2] == float("-inf")


@pytest.mark.parametrize("base", [100.0, -100.0, 1e4, -1e4])
def test_large_lse_values(backend, base):
    """Large LSE magnitudes must not overflow (max-subtraction). Realistic magnitudes (|lse| ~ 100) keep
    fp32 accuracy; at |lse| ~ 1e4 the fp32 LSE inputs have ulp ~1e-3, so only ~1e-3 is asked there."""
    dev = device_for(backend)
    outs = [rnd(1, 2, 3, 8, device=dev) for _ in range(3)]
    lses = [torch.full((1, 2, 3), base, device=dev) + torch.tensor([0.0, -1.0, 3.5])[i] for i in range(3)]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    check(out, lse, *oracle_merge(outs, lses), tol=1e-5 if abs(base) <= 100 else 1e-3)


def test_merge_of_partial_attention_equals_full_attention(backend):
    dev = device_for(backend)
    q = rnd(2, 4, 3, 64)
    k, v = rnd(2, 4, 50, 64), rnd(2, 4, 50, 32)
    cuts = [0, 7, 7, 31, 50]  # includes an empty part
    parts = [attention_state(q, k[:, :, a:b], v[:, :, a:b]) for a, b in zip(cuts[:-1], cuts[1:])]
    outs = [p[0].float().to(dev) for p in parts]
    lses = [p[1].float().to(dev) for p in parts]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    check(out, lse, *attention_state(q, k, v))


def test_permutation_invariance_and_associativity(backend):
    dev = device_for(backend)
    outs = [rnd(1, 2, 4, 16, device=dev) for _ in range(4)]
    lses = [rnd(1, 2, 4, device=dev) * 4 for _ in range(4)]
    o, l = pskernels.merge_states(outs, lses, backend=backend)
    o_p, l_p = pskernels.merge_states(outs[::-1], lses[::-1], backend=backend)
    torch.testing.assert_close(o_p, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_p, l, rtol=1e-5, atol=1e-5)
    o12, l12 = pskernels.merge_states(outs[:2], lses[:2], backend=backend)
    o34, l34 = pskernels.merge_states(outs[2:], lses[2:], backend=backend)
    o_t, l_t = pskernels.merge_states([o12, o34], [l12, l34], backend=backend)
    torch.testing.assert_close(o_t, o, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l_t, l, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_outs(backend, dtype):
    dev = device_for(backend)
    outs = [rnd(2, 4, 7, 64, device=dev, dtype=dtype) for _ in range(3)]
    lses = [rnd(2, 4, 7, device=dev) for _ in range(3)]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ro, rl = oracle_merge(outs, lses)
    # yardstick: the same merge written in PyTorch in the outputs' dtype
    w = torch.softmax(torch.stack(lses).float(), 0).to(dtype)
    base = (w[..., None] * torch.stack(outs)).sum(0)
    err_base = (base.cpu().double() - ro).abs().max().item()
    err = (out.cpu().double() - ro).abs().max().item()
    floor = 1e-2 if dtype == torch.bfloat16 else 1e-3
    assert err <= 2 * err_base + floor, f"err {err:.3g} vs same-dtype torch err {err_base:.3g}"
    assert (lse.cpu().double() - rl).abs().max().item() <= 1e-5 * max(1.0, rl.abs().max().item())


def test_strided_inputs(backend):
    dev = device_for(backend)
    outs = [rnd(2, 7, 4, 64, device=dev).transpose(1, 2) for _ in range(2)]  # [B, L, H, D] -> [B, H, L, D]
    lses = [rnd(2, 7, 4, device=dev).transpose(1, 2) for _ in range(2)]
    out, lse = pskernels.merge_states(outs, lses, backend=backend)
    check(out, lse, *oracle_merge(outs, lses))


def test_gradients(backend):
    dev = device_for(backend)
    outs = [rnd(1, 2, 3, 8, device=dev).requires_grad_() for _ in range(3)]
    lses = [rnd(1, 2, 3, device=dev) for _ in range(3)]
    lses[1][0, 0] = float("-inf")
    lses = [s.requires_grad_() for s in lses]
    out, lse = grad_call(backend, lambda: pskernels.merge_states(outs, lses, backend=backend))
    (out.sum() + torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)).sum()).backward()
    for t in outs + lses:
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert torch.all(outs[1].grad[0, 0] == 0)
