"""torch.library.opcheck and torch.compile(fullgraph=True) over every torch.ops.pskernels.* op (CPU kernels).

The arguments are the ones the public API really passes: each case calls the public op once while recorders
stand in for the compiled ops in ``pskernels._ext.<op>``, then the recorded calls are checked.

Autograd: the compiled ops register no Autograd kernel (they are forward-only by design; the public API
routes inputs that need gradients to the differentiable ``backend="torch"``), so opcheck's
``test_autograd_registration`` does not apply; ``test_ops_have_no_autograd_kernel`` pins that down.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import pskernels

from op_helpers import make_rope

pytest.importorskip("pskernels._ext", reason="pskernels._C (compiled extension) is not built", exc_type=ImportError)

OPS = ("multi_branch_attention", "merge_states", "rotate_keys", "map_kv_caches")
pytestmark = pytest.mark.usefixtures("one_thread")


def _recorded(fn):
    """(op name, args) of every compiled op call that ``fn`` makes: the adapter of each op in pskernels._ext.<op>
    calls the module's ``_op``, replaced here by a recorder that forwards to it."""
    calls = []
    modules = [importlib.import_module(f"pskernels._ext.{op}") for op in OPS]
    saved = [m._op for m in modules]

    def recorder(name, real):
        def call(*args):
            calls.append((name, args))
            return real(*args)

        return call

    for op, m, real in zip(OPS, modules, saved):
        m._op = recorder(op, real)
    try:
        fn()
    finally:
        for m, real in zip(modules, saved):
            m._op = real
    assert calls, "the public op did not reach torch.ops.pskernels"
    return calls


def _mba_cases():
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Lq, D = 2, 4, 2, 3, 16

    def seg(n, b=B, dtype=torch.float32):
        return torch.randn(b, Hkv, n, D, generator=g, dtype=dtype)

    q = torch.randn(B, Hq, Lq, D, generator=g)
    ks, vs = [seg(5), seg(0), seg(7), seg(Lq + 2)], [seg(5), seg(0), seg(7), seg(Lq + 2)]
    lens = torch.tensor([[5, 2], [0, 0], [7, 4], [Lq + 2, Lq]])
    yield "plain", lambda: pskernels.multi_branch_attention(q, ks, vs, seq_lens=lens, backend="cpu")
    yield "shift_rope", lambda: pskernels.multi_branch_attention(
        q, ks, vs, seq_lens=lens, position_shifts=torch.tensor([0, 5, 5, 12]), rope=make_rope(D, style="gptj"),
        left_pad=torch.tensor([[0, 1], [0, 0], [0, 0], [0, 0]]), backend="cpu")
    yield "softcap_window", lambda: pskernels.multi_branch_attention(
        q, ks, vs, seq_lens=lens, softcap=5.0, sliding_window=6, segment_positions=torch.tensor([0, 5, 5, 12]),
        backend="cpu")
    yield "knobs_groups", lambda: pskernels.multi_branch_attention(
        q, ks, vs, seq_lens=lens, temperature=torch.rand(3, Hq) + 0.5, lse_scale=0.9,
        log_weight=torch.randn(3, Hq), segment_groups=[0, 1, 1, 2], backend="cpu")
    qb = q.to(torch.bfloat16)
    yield "bf16_strided", lambda: pskernels.multi_branch_attention(
        torch.randn(B, Lq, Hq, D, generator=g).to(torch.bfloat16).transpose(1, 2),
        [torch.randn(B, 6, Hkv, D, generator=g).to(torch.bfloat16).transpose(1, 2), qb[:, :Hkv]],
        [torch.randn(B, 6, Hkv, D, generator=g).to(torch.bfloat16).transpose(1, 2), qb[:, :Hkv]], backend="cpu")


def _merge_cases():
    g = torch.Generator().manual_seed(1)
    o, s = torch.randn(3, 2, 3, 4, 16, generator=g), torch.randn(3, 2, 3, 4, generator=g)
    s[0, 0, 0] = float("-inf")
    yield "stacked", lambda: pskernels.merge_states(o, s, backend="cpu")
    yield "bf16_list", lambda: pskernels.merge_states([o[0].bfloat16(), o[1].bfloat16()], [s[0], s[1]], backend="cpu")


def _rotate_cases():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 5, 16, generator=g)
    yield "scalar_neox", lambda: pskernels.rotate_keys(k, 7, make_rope(16), backend="cpu")
    yield "per_token_gptj_partial", lambda: pskernels.rotate_keys(
        k.bfloat16(), torch.randint(-50, 50, (2, 5), generator=g), make_rope(16, rotary_dim=8, style="gptj"),
        backend="cpu")


def _map_cases():
    g = torch.Generator().manual_seed(3)
    NL, B, H, D, r = 2, 2, 2, 16, 4
    # two branches per layer, the second one empty
    ks = [[torch.randn(B, H, n, D, generator=g) for n in (3, 0)] for _ in range(NL)]
    vs = [[torch.randn(B, H, n, D, generator=g) for n in (3, 0)] for _ in range(NL)]
    spec = make_rope(D)
    yield "rotate_only", lambda: pskernels.map_kv_caches(ks, vs, rope=spec, orig_positions=[0, 3],
                                                         new_positions=[4, 9], backend="cpu")
    yield "transform", lambda: pskernels.map_kv_caches(
        ks, vs, rope=spec, orig_positions=torch.tensor([[0, 1], [3, 3]]), new_positions=torch.tensor([[4, 4], [9, 2]]),
        k_down=torch.randn(NL, H, D, r, generator=g) * 0.1, k_up=torch.randn(NL, H, r, D, generator=g) * 0.1,
        k_gate=torch.randn(NL, H, generator=g), v_down=torch.randn(NL, H, D, r, generator=g) * 0.1,
        v_up=torch.randn(NL, H, r, D, generator=g) * 0.1, backend="cpu")


CASES = {"multi_branch_attention": _mba_cases, "merge_states": _merge_cases, "rotate_keys": _rotate_cases,
         "map_kv_caches": _map_cases}
PARAMS = [pytest.param(op, name, fn, id=f"{op}-{name}") for op in OPS for name, fn in CASES[op]()]


@pytest.mark.parametrize("op,case,fn", PARAMS)
def test_opcheck(op, case, fn):
    calls = _recorded(fn)
    for name, args in calls:
        assert name == op
        torch.library.opcheck(getattr(torch.ops.pskernels, name).default, args,
                              test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("op,case,fn", [p for p in PARAMS if p.values[1] in ("plain", "shift_rope", "knobs_groups",
                                                                              "stacked", "scalar_neox", "transform")])
def test_torch_compile_fullgraph(op, case, fn):
    """A function calling the op through torch.ops.pskernels traces as one graph (fake impls) and matches eager."""
    torch._dynamo.reset()
    (name, args), = _recorded(fn)[:1]
    opfn = getattr(torch.ops.pskernels, name)

    def f(*a):
        return opfn(*a)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager", dynamic=False)
    got, want = compiled(*args), f(*args)
    got = list(got) if isinstance(got, (tuple, list)) else [got]
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_ops_have_no_autograd_kernel():
    """Forward-only by design: no Autograd registration (opcheck's test_autograd_registration is not applicable);
    the public API sends inputs that need gradients to backend="torch" and refuses explicit compiled backends."""
    for op in OPS:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"pskernels::{op}", "Autograd"), op
    k = torch.randn(1, 2, 3, 16, requires_grad=True)
    with pytest.raises(NotImplementedError, match="forward-only"):
        pskernels.rotate_keys(k, 3, make_rope(16), backend="cpu")
    pskernels.rotate_keys(k, 3, make_rope(16)).sum().backward()  # auto -> torch reference
    assert k.grad is not None


def test_every_op_is_covered():
    assert {op for op, _, _ in (p.values for p in PARAMS)} == set(OPS)
    schemas = {s.name.split("::")[1] for s in torch._C._jit_get_all_schemas() if s.name.startswith("pskernels::")}
    assert schemas == set(OPS), schemas
