"""rotate_keys against an independent complex-number RoPE oracle, plus metamorphic properties."""
from __future__ import annotations

import pytest
import torch

import pskernels

from op_helpers import backend_params, device_for, grad_call, make_rope

OP = "rotate_keys"


@pytest.fixture(params=backend_params(OP))
def backend(request):
    return request.param


def oracle_rotate(k, delta, rope):
    """fp64 complex rotation: pair p of the rotated dims is multiplied by exp(i * delta * inv_freq[p])."""
    x = k.detach().cpu().double()
    B, H, L, D = x.shape
    d = torch.as_tensor(delta).cpu().double()
    if d.ndim == 0:
        d = d.expand(B)
    d = d[:, None, None] if d.ndim == 1 else d[:, None, :]  # [B, 1, 1] or [B, 1, L]
    rd = rope.rotary_dim
    half = rd // 2
    inv = rope.inv_freq.double()
    if rope.style == "neox":
        c = torch.complex(x[..., :half], x[..., half:rd])
    else:
        c = torch.complex(x[..., 0:rd:2], x[..., 1:rd:2])
    c = c * torch.polar(torch.ones_like(d[..., None] * inv), d[..., None] * inv)
    out = x.clone()
    if rope.style == "neox":
        out[..., :half], out[..., half:rd] = c.real, c.imag
    else:
        out[..., 0:rd:2], out[..., 1:rd:2] = c.real, c.imag
    return out


def rot_tol(ref, delta, rope, rel=1e-5):
    """fp32 tolerance of a rotation: ``rel`` plus the rounding of the fp32 angle ``delta * inv_freq``
    (about ``|angle| * 2^-24`` radians, inherent to fp32 RoPE as computed by HF)."""
    angle = torch.as_tensor(delta).abs().max().item() * rope.inv_freq.abs().max().item()
    return max(1.0, ref.abs().max().item()) * (rel + 2 * angle * 2.0 ** -24)


def rnd(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape).to(device=device, dtype=dtype)


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("D,rotary_dim", [(64, None), (80, None), (128, None), (128, 64), (80, 32), (64, 2)])
@pytest.mark.parametrize("delta_kind", ["int", "row", "token"])
def test_against_oracle(backend, style, D, rotary_dim, delta_kind):
    dev = device_for(backend)
    rope = make_rope(D, rotary_dim, style)
    B, L = 3, 7
    k = rnd(B, 2, L, D, device=dev)
    delta = {"int": 37, "row": torch.tensor([0, -5, 4096]),
             "token": torch.randint(-3000, 3000, (B, L))}[delta_kind]
    out = pskernels.rotate_keys(k, delta, rope, backend=backend)
    assert out.shape == k.shape and out.dtype == k.dtype and out.is_contiguous()
    ref = oracle_rotate(k, delta, rope)
    err = (out.cpu().double() - ref).abs().max().item()
    assert err <= rot_tol(ref, delta, rope), err
    rd = rope.rotary_dim
    assert torch.equal(out[..., rd:], k[..., rd:]), "pass-through dims must be copied exactly"


@pytest.mark.parametrize("L", [1, 7, 113])
def test_odd_lengths_and_heads(backend, L):
    dev = device_for(backend)
    rope = make_rope(64)
    k = rnd(2, 3, L, 64, device=dev)
    out = pskernels.rotate_keys(k, torch.tensor([3, -11]), rope, backend=backend)
    ref = oracle_rotate(k, torch.tensor([3, -11]), rope)
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_rotate_then_unrotate(backend, style, dtype):
    dev = device_for(backend)
    rope = make_rope(128, 96, style)
    k = rnd(2, 4, 9, 128, device=dev, dtype=dtype)
    for delta in (5, torch.tensor([1000, -77]), torch.randint(-500, 500, (2, 9))):
        back = pskernels.rotate_keys(pskernels.rotate_keys(k, delta, rope, backend=backend), -delta, rope,
                                     backend=backend)
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        torch.testing.assert_close(back.float(), k.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
def test_zero_delta_is_exact(backend, dtype):
    dev = device_for(backend)
    rope = make_rope(64, style="gptj")
    k = rnd(2, 2, 5, 64, device=dev, dtype=dtype)
    out = pskernels.rotate_keys(k, 0, rope, backend=backend)
    assert torch.equal(out, k)
    assert out.data_ptr() != k.data_ptr(), "rotate_keys must return a new tensor"


def test_composition(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    k = rnd(2, 2, 6, 64, device=dev)
    a, b = torch.tensor([7, -30]), torch.tensor([100, 3])
    two = pskernels.rotate_keys(pskernels.rotate_keys(k, a, rope, backend=backend), b, rope, backend=backend)
    one = pskernels.rotate_keys(k, a + b, rope, backend=backend)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-5)


def test_relative_property(backend):
    """<R(a) q, R(b) k> depends only on a - b."""
    dev = device_for(backend)
    rope = make_rope(64)
    q, k = rnd(1, 1, 1, 64, device=dev), rnd(1, 1, 1, 64, device=dev)
    dots = []
    for a, b in [(0, -9), (9, 0), (1009, 1000), (-3, -12)]:
        qa = pskernels.rotate_keys(q, a, rope, backend=backend)
        kb = pskernels.rotate_keys(k, b, rope, backend=backend)
        dots.append((qa * kb).sum().item())
    assert max(dots) - min(dots) <= 1e-4 * max(1.0, abs(dots[0]))


def test_matches_hf_style_rotation(backend):
    """Rotating by Δ keys that were rotated at positions p gives keys rotated at p + Δ (HF rotate_half form)."""
    dev = device_for(backend)
    D = 64
    rope = make_rope(D)
    x = rnd(1, 2, 10, D).double()
    pos = torch.arange(10, dtype=torch.float64) + 5

    def hf_apply(x, pos):
        freqs = pos[:, None] * rope.inv_freq.double()[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x1, x2 = x[..., : D // 2], x[..., D // 2:]
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    k = hf_apply(x, pos).float().to(dev)
    out = pskernels.rotate_keys(k, 20, rope, backend=backend)
    torch.testing.assert_close(out.cpu().double(), hf_apply(x, pos + 20), rtol=1e-5, atol=1e-5)


def test_strided_input(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    k = rnd(2, 7, 3, 64, device=dev).transpose(1, 2)  # HF [B, L, H, D] -> [B, H, L, D]
    out = pskernels.rotate_keys(k, torch.tensor([4, 9]), rope, backend=backend)
    assert out.is_contiguous()
    ref = oracle_rotate(k, torch.tensor([4, 9]), rope)
    assert (out.cpu().double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    k2 = rnd(2, 3, 7, 128, device=dev)[..., 64:]
    out2 = pskernels.rotate_keys(k2, -3, rope, backend=backend)
    ref2 = oracle_rotate(k2, -3, rope)
    assert (out2.cpu().double() - ref2).abs().max().item() <= 1e-5 * max(1.0, ref2.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(backend, dtype):
    dev = device_for(backend)
    rope = make_rope(128)
    k = rnd(2, 2, 9, 128, device=dev, dtype=dtype)
    out = pskernels.rotate_keys(k, torch.tensor([100, -2000]), rope, backend=backend)
    assert out.dtype == dtype
    ref = oracle_rotate(k, torch.tensor([100, -2000]), rope)
    # fp32 math, one final rounding: within one ulp of the output magnitude
    tol = (2 ** -8 if dtype == torch.bfloat16 else 2 ** -11) * ref.abs().max().item()
    assert (out.cpu().double() - ref).abs().max().item() <= tol


def test_int32_delta_and_dynamic_rope_zero_delta(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    k = rnd(2, 2, 4, 64, device=dev)
    a = pskernels.rotate_keys(k, torch.tensor([3, 4], dtype=torch.int32), rope, backend=backend)
    b = pskernels.rotate_keys(k, torch.tensor([3, 4]), rope, backend=backend)
    assert torch.equal(a, b)
    dyn = make_rope(64, rope_type="dynamic")
    assert torch.equal(pskernels.rotate_keys(k, 0, dyn, backend=backend), k)


def test_gradients(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    k = rnd(1, 2, 3, 64, device=dev).requires_grad_()
    out = grad_call(backend, lambda: pskernels.rotate_keys(k, 17, rope, backend=backend))
    g = torch.randn_like(out)
    out.backward(g)
    # rotation is orthogonal: the gradient is the inverse rotation of g
    torch.testing.assert_close(k.grad, pskernels.rotate_keys(g, -17, rope, backend="torch"), rtol=1e-5, atol=1e-5)
