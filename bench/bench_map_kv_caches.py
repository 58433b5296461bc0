"""map_kv_caches: all (layer, branch) caches mapped in one call vs a Python loop of per-(layer, branch)
``rotate_keys`` + low-rank transform (what a user would write), side by side in one run.

Byte model: read + write of every K/V element + the transform parameters. FLOPs: the low-rank residual
(``2 * (D*r + r*D)`` per token and head, for K and V) plus the rotations (about 6 per rotated pair).

Run: python -m pytest bench/bench_map_kv_caches.py --benchmark-only -q
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import torch

import pskernels
from pskernels import RopeSpec

from bench_common import DEVICE, FULL, impl_selected, skip_backend


@dataclass(frozen=True)
class Case:
    layers: int
    Hkv: int
    D: int
    branches: int
    branch_len: int
    rank: int  # 0: no transform (pure delta rotation)
    dtype: str = "bf16"
    B: int = 1
    name: str = ""

    @property
    def id(self):
        geo = self.name or f"kv{self.Hkv}d{self.D}"
        tr = f"r{self.rank}" if self.rank else "rot"
        return f"{geo}-{self.layers}L-{self.branches}x{self.branch_len}-{tr}-{self.dtype}"

    @property
    def torch_dtype(self):
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def _cases():
    if not FULL:
        cases = [Case(layers=4, Hkv=hkv, D=d, branches=8, branch_len=128, rank=r, dtype="bf16", name=g)
                 for (g, hkv, d), r in itertools.product((("smollm2", 3, 64), ("llama8b", 8, 128)), (0, 16))]
        return cases + [Case(layers=4, Hkv=3, D=64, branches=8, branch_len=128, rank=16, dtype="fp32", name="smollm2")]
    base = dict(layers=32, Hkv=8, D=128, branches=8, branch_len=1024, rank=16, dtype="bf16")
    axes = {"branches": [1, 8, 32], "branch_len": [128, 512, 1024, 2048, 8192], "rank": [0, 16, 64]}
    if FULL == "grid":
        cases = [Case(**{**base, **dict(zip(axes, v))}) for v in itertools.product(*axes.values())]
    else:
        cases = [Case(**base)]
        for ax, vals in axes.items():
            cases += [Case(**{**base, ax: v}) for v in vals if v != base[ax]]
        cases.append(Case(**{**base, "branches": 32, "branch_len": 8192, "rank": 0}))
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


CASES = _cases()

_CACHE: dict = {}


def inputs(case: Case):
    if case.id in _CACHE:
        return _CACHE[case.id]
    _CACHE.clear()
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = case.torch_dtype

    def mk(*shape, dtype=dt, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(device=DEVICE, dtype=dtype)

    shp = (case.B, case.Hkv, case.branch_len, case.D)
    keys = [[mk(*shp) for _ in range(case.branches)] for _ in range(case.layers)]
    values = [[mk(*shp) for _ in range(case.branches)] for _ in range(case.layers)]
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, case.D, 2, dtype=torch.float32) / case.D))
    P = 64  # branches encoded in parallel after a prefix of 64, re-indexed sequentially
    orig = torch.full((case.branches,), P, dtype=torch.int64, device=DEVICE)
    new = P + torch.arange(case.branches, device=DEVICE) * case.branch_len
    params = {}
    if case.rank:
        r, L, H, D = case.rank, case.layers, case.Hkv, case.D
        for pre in ("k", "v"):
            params[f"{pre}_down"] = mk(L, H, D, r, dtype=torch.float32, s=D ** -0.5)
            params[f"{pre}_up"] = mk(L, H, r, D, dtype=torch.float32, s=0.02)
            params[f"{pre}_gate"] = mk(L, H, dtype=torch.float32)
    _CACHE[case.id] = (keys, values, rope, orig, new, params)
    return _CACHE[case.id]


def byte_model(case: Case):
    e = case.torch_dtype.itemsize
    elems = case.layers * case.branches * case.B * case.Hkv * case.branch_len * case.D * 2  # K and V
    pbytes = sum(t.numel() * t.element_size() for t in inputs(case)[5].values())
    tokens_heads = case.layers * case.branches * case.B * case.Hkv * case.branch_len
    rot_flops = tokens_heads * 6 * (case.D // 2) * (2 if case.rank else 1)
    tr_flops = tokens_heads * 2 * (2 * case.D * case.rank) * 2 if case.rank else 0
    return 2 * elems * e + pbytes, rot_flops + tr_flops


def _residual(x, down, up, gate):
    proj = torch.einsum("bhlr,hre->bhle", torch.einsum("bhld,hdr->bhlr", x, down), up)
    return x + torch.sigmoid(gate)[None, :, None, None] * proj


def build(case: Case, impl: str):
    keys, values, rope, orig, new, params = inputs(case)
    if impl.startswith("pskernels-"):
        backend = impl.split("-", 1)[1]
        skip_backend(backend)
        return lambda: pskernels.map_kv_caches(keys, values, rope=rope, orig_positions=orig, new_positions=new,
                                               backend=backend, **params)
    if impl == "loop":
        j = torch.arange(case.branch_len, device=DEVICE)

        def fn():
            ko, vo = [], []
            for l in range(case.layers):
                kr, vr = [], []
                for n in range(case.branches):
                    k, v = keys[l][n], values[l][n]
                    if params:
                        o_tok = (orig[n] + j)[None].expand(case.B, -1)
                        n_tok = (new[n] + j)[None].expand(case.B, -1)
                        raw = pskernels.rotate_keys(k, -o_tok, rope, backend="torch").float()
                        raw = _residual(raw, params["k_down"][l], params["k_up"][l], params["k_gate"][l])
                        kr.append(pskernels.rotate_keys(raw.to(k.dtype), n_tok, rope, backend="torch"))
                        vr.append(_residual(v.float(), params["v_down"][l], params["v_up"][l],
                                            params["v_gate"][l]).to(v.dtype))
                    else:
                        delta = (new[n] - orig[n]).expand(case.B)
                        kr.append(pskernels.rotate_keys(k, delta, rope, backend="torch"))
                        vr.append(v.clone())  # same contract as the op: new tensors
                ko.append(kr)
                vo.append(vr)
            return ko, vo
        return fn
    raise ValueError(impl)


def _impls():
    names = [f"pskernels-{b}" for b in pskernels.available_backends("map_kv_caches")] + ["loop"]
    return [n for n in names if impl_selected(n)]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_map_kv_caches(benchmark, perf, case, impl):
    fn = build(case, impl)
    ko, _ = fn()
    ref_k = pskernels.map_kv_caches(*inputs(case)[:2], rope=inputs(case)[2], orig_positions=inputs(case)[3],
                                    new_positions=inputs(case)[4], backend="torch", **inputs(case)[5])[0] \
        if impl != "pskernels-torch" else ko
    err = max((a.float() - b.float()).abs().max().item() for la, lb in zip(ko, ref_k) for a, b in zip(la, lb))
    tol = 1e-4 if case.dtype == "fp32" else 6e-2  # the loop rounds to bf16 between the two rotations
    assert err <= tol, f"{impl} disagrees with pskernels (torch backend): {err:.3g}"
    nbytes, flops = byte_model(case)
    perf.run(benchmark, fn, bytes_moved=nbytes, flops=flops, group=case.id, impl=impl, max_abs_err=err,
             pairs=case.layers * case.branches)
