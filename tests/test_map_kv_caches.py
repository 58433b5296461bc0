"""map_kv_caches (docs/KERNELS.md §2) against an independent fp64 computation, plus identity/zero-init properties."""
from __future__ import annotations

import pytest
import torch

import pskernels
from pskernels.ref import rotate

from op_helpers import backend_params, device_for, grad_call, make_rope

OP = "map_kv_caches"


@pytest.fixture(params=backend_params(OP))
def backend(request):
    return request.param


def rnd(*shape, device="cpu", dtype=torch.float32):
    return torch.randn(*shape).to(device=device, dtype=dtype)


def make_caches(NL, lens, B, H, D, Dv, device="cpu", dtype=torch.float32):
    keys = [[rnd(B, H, L, D, device=device, dtype=dtype) for L in lens] for _ in range(NL)]
    values = [[rnd(B, H, L, Dv, device=device, dtype=dtype) for L in lens] for _ in range(NL)]
    return keys, values


def make_params(NL, H, D, Dv, r, device="cpu", gated=True, zero_up=False, which="kv"):
    p = {}
    for pre, dim in (("k", D), ("v", Dv)):
        if pre not in which:
            continue
        p[f"{pre}_down"] = rnd(NL, H, dim, r, device=device) / dim ** 0.5
        up = torch.zeros(NL, H, r, dim, device=device) if zero_up else rnd(NL, H, r, dim, device=device) / r ** 0.5
        p[f"{pre}_up"] = up
        if gated:
            p[f"{pre}_gate"] = rnd(NL, H, device=device)
    return p


def full_positions(pos, NL, N, B):
    t = torch.as_tensor(pos).to(torch.int64)
    if t.ndim == 1:
        t = t[None, :, None].expand(NL, N, B)
    elif t.ndim == 2:
        t = t[None].expand(NL, N, B)
    return t


def oracle(keys, values, rope, orig, new, params):
    """fp64, written from the spec: un-rotate by -(o+j), x + sigmoid(g) (x @ down) @ up per head, re-rotate."""
    NL, N = len(keys), len(keys[0])
    B = keys[0][0].shape[0]
    o_all, n_all = full_positions(orig, NL, N, B), full_positions(new, NL, N, B)

    def residual(x, down, up, gate):
        proj = torch.einsum("bhlr,hre->bhle", torch.einsum("bhld,hdr->bhlr", x, down.double()), up.double())
        g = torch.ones(x.shape[1], dtype=torch.float64) if gate is None else torch.sigmoid(gate.double())
        return x + g.view(1, -1, 1, 1) * proj

    ko, vo = [], []
    for l in range(NL):
        kr, vr = [], []
        for n in range(N):
            k = keys[l][n].detach().cpu().double()
            v = values[l][n].detach().cpu().double()
            L = k.shape[2]
            j = torch.arange(L, dtype=torch.float64)
            po = o_all[l, n].double()[:, None, None] + j  # [B, 1, L]
            pn = n_all[l, n].double()[:, None, None] + j
            x = rotate(k, -po, rope)
            if "k_down" in params:
                x = residual(x, params["k_down"][l].cpu(), params["k_up"][l].cpu(),
                             None if params.get("k_gate") is None else params["k_gate"][l].cpu())
            kr.append(rotate(x, pn, rope))
            if "v_down" in params:
                v = residual(v, params["v_down"][l].cpu(), params["v_up"][l].cpu(),
                             None if params.get("v_gate") is None else params["v_gate"][l].cpu())
            vr.append(v)
        ko.append(kr)
        vo.append(vr)
    return ko, vo


def max_pos(*pos):
    return max(int(torch.as_tensor(p).abs().max()) for p in pos)


def check_nested(out, ref, tol, what):
    assert len(out) == len(ref)
    for l, (ol, rl) in enumerate(zip(out, ref)):
        assert len(ol) == len(rl)
        for n, (a, r) in enumerate(zip(ol, rl)):
            assert a.shape == r.shape, f"{what}[{l}][{n}] shape {tuple(a.shape)} != {tuple(r.shape)}"
            assert a.is_contiguous(), f"{what}[{l}][{n}] not contiguous"
            assert not torch.isnan(a).any()
            if a.numel():
                err = (a.detach().cpu().double() - r).abs().max().item()
                t = tol * max(1.0, r.abs().max().item())
                assert err <= t, f"{what}[{l}][{n}]: max abs err {err:.3g} > {t:.3g}"


def rot_rtol(rope, *pos, extra=0):
    """1e-5 plus fp32 angle rounding (|angle| * 2^-24 rad per rotation; two rotations with a transform)."""
    angle = (max_pos(*pos) + extra) * rope.inv_freq.abs().max().item()
    return 1e-5 + 4 * angle * 2.0 ** -24


# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["neox", "gptj"])
@pytest.mark.parametrize("D,rotary_dim", [(64, None), (128, 64), (80, 32)])
def test_identity_is_delta_rotation(backend, style, D, rotary_dim):
    dev = device_for(backend)
    rope = make_rope(D, rotary_dim, style)
    NL, lens, B, H = 3, (1, 7, 113), 2, 2
    keys, values = make_caches(NL, lens, B, H, D, 48, device=dev)
    orig = torch.tensor([[5, 0], [12, 40], [200, 3]])
    new = torch.tensor([[5, 5], [5, 100], [7, 0]])
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                     backend=backend)
    for l in range(NL):
        for n in range(len(lens)):
            exp = pskernels.rotate_keys(keys[l][n], (new[n] - orig[n]).to(dev), rope, backend="torch")
            torch.testing.assert_close(ko[l][n], exp, rtol=1e-5, atol=1e-5)
            assert torch.equal(vo[l][n], values[l][n]), "values must pass through unchanged without a transform"
    check_nested(ko, oracle(keys, values, rope, orig, new, {})[0], rot_rtol(rope, orig, new, extra=113), "keys")


@pytest.mark.parametrize("gated", [True, False], ids=["gated", "ungated"])
@pytest.mark.parametrize("which", ["kv", "k", "v"])
def test_transform_against_oracle(backend, gated, which):
    dev = device_for(backend)
    D, Dv, r = 64, 32, 8
    rope = make_rope(D)
    NL, lens, B, H = 3, (7, 1, 33), 2, 2
    keys, values = make_caches(NL, lens, B, H, D, Dv, device=dev)
    params = make_params(NL, H, D, Dv, r, device=dev, gated=gated, which=which)
    orig = torch.tensor([[10, 10], [17, 3], [18, 0]])
    new = torch.tensor([[10, 0], [10, 3], [10, 50]])
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                     backend=backend, **params)
    rk, rv = oracle(keys, values, rope, orig, new, params)
    tol = rot_rtol(rope, orig, new, extra=33)
    check_nested(ko, rk, tol, "keys")
    check_nested(vo, rv, 1e-5, "values")
    if "k" not in which:
        for l in range(NL):
            for n in range(len(lens)):
                exp = pskernels.rotate_keys(keys[l][n], (new[n] - orig[n]).to(dev), rope, backend="torch")
                torch.testing.assert_close(ko[l][n], exp, rtol=1e-5, atol=1e-5)
    if "v" not in which:
        for l in range(NL):
            for n in range(len(lens)):
                assert torch.equal(vo[l][n], values[l][n])


def test_repeated_positions_across_branches_and_layers(backend):
    """The CPU kernel shares rotation tables between mappings with equal positions: branches with the same
    positions but other lengths, and layers whose positions differ, must each get their own rotation."""
    dev = device_for(backend)
    D, r = 64, 4
    rope = make_rope(D)
    NL, lens, B, H = 3, (5, 12, 5, 0), 2, 3
    keys, values = make_caches(NL, lens, B, H, D, D, device=dev)
    params = make_params(NL, H, D, D, r, device=dev)
    orig = torch.tensor([[[7, 7], [7, 7], [7, 2], [7, 7]]] * NL)
    new = torch.stack([torch.tensor([[9, 9], [9, 9], [9, 4], [9, 9]]) + 5 * l for l in range(NL)])
    for p in (params, {}):
        ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                         backend=backend, **p)
        rk, rv = oracle(keys, values, rope, orig, new, p)
        check_nested(ko, rk, rot_rtol(rope, orig, new, extra=12), "keys")
        check_nested(vo, rv, 1e-5, "values")


@pytest.mark.parametrize("style", ["neox", "gptj"])
def test_transform_partial_rotary_dv_eq_d(backend, style):
    dev = device_for(backend)
    D, r = 80, 4
    rope = make_rope(D, 32, style)
    keys, values = make_caches(2, (5, 9), 1, 3, D, D, device=dev)
    params = make_params(2, 3, D, D, r, device=dev)
    orig, new = torch.tensor([30, 35]), torch.tensor([30, 30])
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                     backend=backend, **params)
    rk, rv = oracle(keys, values, rope, orig, new, params)
    check_nested(ko, rk, rot_rtol(rope, orig, new, extra=9), "keys")
    check_nested(vo, rv, 1e-5, "values")


def test_position_forms_agree(backend):
    """[N], [N, B] and [layers, N, B] forms give the same result; per-layer positions differ per layer."""
    dev = device_for(backend)
    rope = make_rope(64)
    NL, lens, B, H = 2, (4, 6, 3), 3, 1
    keys, values = make_caches(NL, lens, B, H, 64, 64, device=dev)
    params = make_params(NL, H, 64, 64, 4, device=dev)
    o1, n1 = torch.tensor([4, 8, 14]), torch.tensor([4, 4, 4])
    o2, n2 = o1[:, None].expand(3, B), n1[:, None].expand(3, B)
    o3, n3 = o1[None, :, None].expand(NL, 3, B), n1[None, :, None].expand(NL, 3, B)
    a = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=o1, new_positions=n1, backend=backend, **params)
    b = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=o2, new_positions=n2, backend=backend, **params)
    c = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=o3.clone(), new_positions=n3.clone(),
                                backend=backend, **params)
    for x, y in ((a, b), (a, c)):
        for l in range(NL):
            for n in range(3):
                torch.testing.assert_close(x[0][l][n], y[0][l][n], rtol=0, atol=0)
                torch.testing.assert_close(x[1][l][n], y[1][l][n], rtol=0, atol=0)
    # genuinely per-layer, per-row positions
    o4 = torch.randint(0, 300, (NL, 3, B))
    n4 = torch.randint(0, 300, (NL, 3, B))
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=o4, new_positions=n4, backend=backend,
                                     **params)
    rk, rv = oracle(keys, values, rope, o4, n4, params)
    check_nested(ko, rk, rot_rtol(rope, o4, n4, extra=6), "keys")
    check_nested(vo, rv, 1e-5, "values")
    # int32 positions accepted
    ko32, _ = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=o4.int(), new_positions=n4.int(),
                                      backend=backend, **params)
    for l in range(NL):
        for n in range(3):
            torch.testing.assert_close(ko32[l][n], ko[l][n], rtol=0, atol=0)


def test_zero_init_up_equals_delta_rotation(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    NL, lens, B, H = 2, (7, 12), 2, 2
    keys, values = make_caches(NL, lens, B, H, 64, 64, device=dev)
    params = make_params(NL, H, 64, 64, 8, device=dev, zero_up=True)
    orig, new = torch.tensor([[3, 9], [10, 16]]), torch.tensor([[3, 3], [3, 3]])
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                     backend=backend, **params)
    for l in range(NL):
        for n in range(2):
            exp = pskernels.rotate_keys(keys[l][n], (new[n] - orig[n]).to(dev), rope, backend="torch")
            torch.testing.assert_close(ko[l][n], exp, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(vo[l][n], values[l][n], rtol=0, atol=0)


def test_empty_branch(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    keys, values = make_caches(2, (0, 5), 1, 2, 64, 64, device=dev)
    params = make_params(2, 2, 64, 64, 4, device=dev)
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=[3, 3], new_positions=[0, 3],
                                     backend=backend, **params)
    assert ko[0][0].shape == (1, 2, 0, 64) and vo[1][0].shape == (1, 2, 0, 64)
    rk, rv = oracle(keys, values, rope, [3, 3], [0, 3], params)
    check_nested(ko, rk, 1e-5, "keys")
    check_nested(vo, rv, 1e-5, "values")


def test_strided_inputs(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    keys = [[rnd(2, 9, 2, 64, device=dev).transpose(1, 2), rnd(2, 2, 20, 64, device=dev)[:, :, 3:14]]]
    values = [[rnd(2, 9, 2, 64, device=dev).transpose(1, 2), rnd(2, 2, 11, 128, device=dev)[..., 64:]]]
    params = make_params(1, 2, 64, 64, 4, device=dev)
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=[7, 16], new_positions=[7, 7],
                                     backend=backend, **params)
    rk, rv = oracle(keys, values, rope, [7, 16], [7, 7], params)
    check_nested(ko, rk, rot_rtol(rope, [16], extra=11), "keys")
    check_nested(vo, rv, 1e-5, "values")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision(backend, dtype):
    dev = device_for(backend)
    rope = make_rope(128)
    keys, values = make_caches(2, (9, 17), 2, 2, 128, 128, device=dev, dtype=dtype)
    params = make_params(2, 2, 128, 128, 8, device=dev)
    orig, new = torch.tensor([20, 29]), torch.tensor([20, 20])
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                     backend=backend, **params)
    assert ko[0][0].dtype == dtype and vo[0][0].dtype == dtype
    rk, rv = oracle(keys, values, rope, orig, new, params)
    # fp32 math, one rounding at the end: ~1 ulp of the magnitude (plus a floor)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 2 ** -10
    check_nested(ko, rk, tol, "keys")
    check_nested(vo, rv, tol, "values")


@pytest.mark.parametrize("with_transform", [False, True], ids=["identity", "transform"])
def test_outputs_are_new_tensors(backend, with_transform):
    """Documented: "nested lists of new contiguous Tensors" -- outputs must never alias the input caches
    (callers write into the mapped caches), including values when there is no value transform."""
    dev = device_for(backend)
    rope = make_rope(64)
    keys, values = make_caches(2, (5, 3), 1, 2, 64, 64, device=dev)
    params = make_params(2, 2, 64, 64, 4, device=dev, which="k") if with_transform else {}
    ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=[9, 14], new_positions=[9, 14],
                                     backend=backend, **params)
    in_ptrs = {t.data_ptr() for l in keys + values for t in l}
    aliased = [f"{what}[{l}][{n}]" for what, out in (("keys", ko), ("values", vo))
               for l in range(2) for n in range(2) if out[l][n].data_ptr() in in_ptrs]
    assert not aliased, f"outputs alias the inputs: {aliased}"


def test_inputs_not_modified(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    keys, values = make_caches(2, (5, 3), 1, 2, 64, 64, device=dev)
    before = [t.clone() for l in keys + values for t in l]
    params = make_params(2, 2, 64, 64, 4, device=dev)
    pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=[9, 14], new_positions=[0, 0],
                            backend=backend, **params)
    for a, b in zip(before, [t for l in keys + values for t in l]):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


def test_gradients_reach_params(backend):
    dev = device_for(backend)
    rope = make_rope(64)
    NL, H = 2, 2
    keys, values = make_caches(NL, (6, 4), 2, H, 64, 32, device=dev)
    params = {k: v.requires_grad_() for k, v in make_params(NL, H, 64, 32, 4, device=dev).items()}
    ko, vo = grad_call(backend, lambda: pskernels.map_kv_caches(
        keys, values, rope=rope, orig_positions=[6, 12], new_positions=[6, 6], backend=backend, **params))
    loss = sum((t * torch.linspace(-1, 1, t.shape[-1], device=dev)).sum() for l in ko + vo for t in l)
    loss.backward()
    for name, p in params.items():
        assert p.grad is not None, f"no gradient reaches {name}"
        assert torch.isfinite(p.grad).all(), f"non-finite gradient for {name}"
        assert p.grad.abs().sum() > 0, f"zero gradient for {name}"
        # every layer gets its own gradient
        assert all(p.grad[l].abs().sum() > 0 for l in range(NL)), f"{name}: a layer got no gradient"


def test_gradients_zero_init_up(backend):
    """With up = 0 (init), gradients reach up (and the gate/down get exactly zero), so training can start."""
    dev = device_for(backend)
    rope = make_rope(64)
    keys, values = make_caches(1, (6,), 1, 2, 64, 64, device=dev)
    params = {k: v.requires_grad_() for k, v in make_params(1, 2, 64, 64, 4, device=dev, zero_up=True).items()}
    ko, vo = grad_call(backend, lambda: pskernels.map_kv_caches(
        keys, values, rope=rope, orig_positions=[4], new_positions=[0], backend=backend, **params))
    (ko[0][0].pow(2).sum() + vo[0][0].pow(3).sum()).backward()
    assert params["k_up"].grad.abs().sum() > 0 and params["v_up"].grad.abs().sum() > 0
    assert torch.all(params["k_down"].grad == 0) and torch.all(params["k_gate"].grad == 0)


def test_gradcheck_fp64(backend):
    dev = device_for(backend)
    if backend != "torch":
        pytest.skip("gradcheck in float64 on the reference backend only")
    rope = make_rope(8)
    keys, values = make_caches(1, (3,), 1, 1, 8, 4, device=dev, dtype=torch.float64)
    p = make_params(1, 1, 8, 4, 2, device=dev)
    p = {k: v.double().requires_grad_() for k, v in p.items()}
    names = list(p)

    def fn(*args):
        kw = dict(zip(names, args))
        ko, vo = pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=[5], new_positions=[1],
                                         backend=backend, **kw)
        return ko[0][0], vo[0][0]

    assert torch.autograd.gradcheck(fn, tuple(p[n] for n in names), eps=1e-6, atol=1e-5)
