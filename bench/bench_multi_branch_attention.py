"""multi_branch_attention vs the baselines a user would write (docs/KERNELS.md §6), side by side in one run.

Implementations (one benchmark group per shape):
    pskernels-<backend>  every backend in pskernels.available_backends("multi_branch_attention")
    cat_sdpa             torch.cat of the segments + F.scaled_dot_product_attention (enable_gqa)
    segment_merge        per-segment attention with an explicit matmul/logsumexp, then an LSE merge
    flex                 torch.compile(flex_attention) over the concatenation with a block mask
    flash_attn           torch.cat + flash_attn_func (only when flash-attn is importable, CUDA fp16/bf16)
Baselines that need the branches re-indexed (``shift`` cases) rotate the keys inside the timed function;
pskernels rotates the query instead (its point). ``test_shared_prefix_cascade_vs_per_row``: B rows sharing one
prefix (expanded batch-1 K/V), the CPU kernel's cascade against its per-row path, alternating in one run.

Run: python -m pytest bench/bench_multi_branch_attention.py --benchmark-only -q
"""
from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import pskernels
from pskernels import RopeSpec

from bench_common import DEVICE, FULL, ON_CUDA, impl_selected, skip_backend

GEOMETRIES = {  # name: (Hq, Hkv, D)
    "smollm2": (9, 3, 64),
    "llama8b": (32, 8, 128),
}


@dataclass(frozen=True)
class Case:
    Hq: int
    Hkv: int
    D: int
    prefix: int
    branches: int
    branch_len: int
    Lq: int
    dtype: str = "bf16"
    shift: bool = False
    B: int = 1
    name: str = ""

    @property
    def id(self):
        geo = self.name or f"h{self.Hq}kv{self.Hkv}d{self.D}"
        return (f"{geo}-P{self.prefix}-{self.branches}x{self.branch_len}-Lq{self.Lq}-{self.dtype}"
                + ("-shift" if self.shift else "") + (f"-B{self.B}" if self.B != 1 else ""))

    @property
    def torch_dtype(self):
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]

    @property
    def seg_lens(self):
        return [self.prefix] + [self.branch_len] * self.branches + [self.Lq]


def _cases():
    if not FULL:  # CPU-sized default sweep (~2 minutes on 2 cores)
        return [Case(*GEOMETRIES[g], prefix=64, branches=8, branch_len=512, Lq=lq, dtype=dt, name=g)
                for g, lq, dt in itertools.product(GEOMETRIES, (1, 32), ("fp32", "bf16"))]
    base = dict(Hq=32, Hkv=8, D=128, prefix=1024, branches=8, branch_len=1024, Lq=1, dtype="bf16", shift=False)
    axes = {
        "branches": [1, 2, 4, 8, 16, 32],
        "branch_len": [128, 512, 1024, 2048, 4096, 8192],
        "prefix": [0, 512, 1024, 2048, 8192],
        "Lq": [1, 16, 128],
        "Hkv": [32, 8, 4],  # GQA 1 / 4 / 8
        "D": [64, 128],
        "shift": [False, True],
    }
    if FULL == "grid":
        keys = list(axes)
        cases = [Case(**{**base, **dict(zip(keys, vals))}) for vals in itertools.product(*axes.values())]
    else:
        cases = [Case(**base)]
        for ax, vals in axes.items():
            cases += [Case(**{**base, ax: v}) for v in vals if v != base[ax]]
        # corners: biggest caches, decode and prefill; prefill of every axis value of Lq with shifts
        for lq in (1, 16, 128):
            cases.append(Case(**{**base, "branches": 32, "branch_len": 8192, "prefix": 8192, "Lq": lq}))
            cases.append(Case(**{**base, "Lq": lq, "shift": True}))
        cases.append(Case(**{**base, "Hq": 9, "Hkv": 3, "D": 64, "name": "smollm2"}))
    seen, out = set(), []
    for c in cases:
        if c.id not in seen:
            seen.add(c.id)
            out.append(c)
    return out


CASES = _cases()


def _impls():
    names = [f"pskernels-{b}" for b in pskernels.available_backends("multi_branch_attention")]
    names += ["cat_sdpa", "segment_merge", "flex", "flash_attn"]
    return [n for n in names if impl_selected(n)]


# ----------------------------------------------------------------------------------------------
# Inputs (cached per case: every implementation of a shape reads the same tensors)
# ----------------------------------------------------------------------------------------------
_CACHE: dict = {}


def inputs(case: Case):
    if case.id in _CACHE:
        return _CACHE[case.id]
    _CACHE.clear()
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = case.torch_dtype

    def mk(*shape):
        return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dt)

    q = mk(case.B, case.Hq, case.Lq, case.D)
    ks = [mk(case.B, case.Hkv, L, case.D) for L in case.seg_lens]
    vs = [mk(case.B, case.Hkv, L, case.D) for L in case.seg_lens]
    rope = RopeSpec(1.0 / 10000 ** (torch.arange(0, case.D, 2, dtype=torch.float32) / case.D))
    # shift: branches were encoded in parallel right after the prefix and are re-indexed sequentially
    shifts = [0] + [i * case.branch_len if case.shift else 0 for i in range(case.branches)] + [0]
    shifts = torch.tensor(shifts, dtype=torch.int64)
    _CACHE[case.id] = (q, ks, vs, rope, shifts)
    return _CACHE[case.id]


def byte_model(case: Case):
    """Segment K+V + Q + O + LSE bytes and matmul FLOPs (QK^T and PV, causal savings ignored)."""
    e = case.torch_dtype.itemsize
    Lk = sum(case.seg_lens)
    kv = case.B * case.Hkv * Lk * 2 * case.D * e
    qo = case.B * case.Hq * case.Lq * 2 * case.D * e + case.B * case.Hq * case.Lq * 4
    flops = 2 * case.B * case.Hq * case.Lq * Lk * 2 * case.D
    return kv + qo, flops


def _rotated(ks, rope, shifts):
    """Baselines see re-indexed branches by rotating their keys (a full read + write of those keys)."""
    return [k if int(s) == 0 else pskernels.rotate_keys(k, int(s), rope, backend="torch") for k, s in zip(ks, shifts)]


def _own_mask(case: Case, Ltot: int):
    """Bottom-right aligned causal mask over the concatenation [Lq, Ltot] (None for decode)."""
    if case.Lq == 1:
        return None
    i = torch.arange(case.Lq, device=DEVICE)[:, None]
    j = torch.arange(Ltot, device=DEVICE)[None, :]
    return j <= Ltot - case.Lq + i


def build(case: Case, impl: str):
    q, ks, vs, rope, shifts = inputs(case)
    any_shift = bool((shifts != 0).any())
    Ltot = sum(case.seg_lens)
    scale = case.D ** -0.5

    if impl.startswith("pskernels-"):
        backend = impl.split("-", 1)[1]
        skip_backend(backend)
        kw = dict(position_shifts=shifts, rope=rope) if any_shift else {}
        return lambda: pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)[0]

    if impl == "cat_sdpa":
        mask = _own_mask(case, Ltot)

        def fn():
            kk = _rotated(ks, rope, shifts) if any_shift else ks
            K, V = torch.cat(kk, dim=2), torch.cat(vs, dim=2)
            return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, enable_gqa=True)
        return fn

    if impl == "segment_merge":
        G = case.Hq // case.Hkv
        B, Lq, D = case.B, case.Lq, case.D
        own_mask = None
        if case.Lq > 1:  # rows are (group member g, query i) -> i = row % Lq; own length == Lq
            i = torch.arange(G * Lq, device=DEVICE)[:, None] % Lq
            own_mask = torch.arange(Lq, device=DEVICE)[None, :] <= i

        def fn():
            kk = _rotated(ks, rope, shifts) if any_shift else ks
            qg = q.reshape(B, case.Hkv, G * Lq, D)  # GQA: the G query heads of a kv head share one matmul
            outs, lses = [], []
            for s, (k, v) in enumerate(zip(kk, vs)):
                if k.shape[2] == 0:
                    continue
                sc = torch.matmul(qg, k.transpose(-1, -2)).float() * scale  # [B, Hkv, G*Lq, L]
                if s == len(kk) - 1 and own_mask is not None:
                    sc = sc.masked_fill(~own_mask, float("-inf"))
                lse = torch.logsumexp(sc, dim=-1)
                p = torch.exp(sc - lse[..., None]).to(v.dtype)
                outs.append(torch.matmul(p, v))
                lses.append(lse)
            w = torch.softmax(torch.stack(lses), dim=0)
            out = (w[..., None] * torch.stack(outs).float()).sum(0)
            return out.to(q.dtype).view(B, case.Hq, Lq, -1)
        return fn

    if impl == "flex":
        if os.environ.get("PSKERNELS_BENCH_FLEX", "1") == "0":
            pytest.skip("PSKERNELS_BENCH_FLEX=0")
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            block_mask = None
            if case.Lq > 1:
                off = Ltot - case.Lq

                def causal_own(b, h, qi, kv):
                    return kv <= off + qi

                block_mask = create_block_mask(causal_own, B=None, H=None, Q_LEN=case.Lq, KV_LEN=Ltot,
                                               device=str(DEVICE))
            flex = torch.compile(flex_attention, dynamic=False)

            def fn():
                kk = _rotated(ks, rope, shifts) if any_shift else ks
                K, V = torch.cat(kk, dim=2), torch.cat(vs, dim=2)
                return flex(q, K, V, block_mask=block_mask, enable_gqa=True)
            fn()  # compile now; a failure means "does not work on this device"
            return fn
        except Exception as e:  # noqa: BLE001
            pytest.skip(f"FlexAttention unavailable here: {type(e).__name__}: {str(e)[:200]}")

    if impl == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            pytest.skip("flash-attn not installed")
        if not ON_CUDA or case.dtype == "fp32":
            pytest.skip("flash-attn needs CUDA and fp16/bf16")

        def fn():
            kk = _rotated(ks, rope, shifts) if any_shift else ks
            K = torch.cat(kk, dim=2).transpose(1, 2)
            V = torch.cat(vs, dim=2).transpose(1, 2)
            return flash_attn_func(q.transpose(1, 2), K, V, causal=case.Lq > 1).transpose(1, 2)
        return fn

    raise ValueError(impl)


def _reference(case: Case):
    key = ("ref", case.id)
    if key not in _CACHE:
        q, ks, vs, rope, shifts = inputs(case)
        kw = dict(position_shifts=shifts, rope=rope) if bool((shifts != 0).any()) else {}
        _CACHE[key] = pskernels.multi_branch_attention(q, ks, vs, backend="torch", **kw)[0].float()
    return _CACHE[key]


@pytest.mark.parametrize("impl", _impls())
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_multi_branch_attention(benchmark, perf, case, impl):
    fn = build(case, impl)
    out = fn()
    # guard against a broken baseline: every implementation must compute the same attention
    err = (out.float() - _reference(case)).abs().max().item()
    tol = 1e-4 if case.dtype == "fp32" else 3e-2
    assert err <= tol, f"{impl} disagrees with pskernels (torch backend): max abs err {err:.3g}"
    nbytes, flops = byte_model(case)
    perf.run(benchmark, fn, bytes_moved=nbytes, flops=flops, group=case.id, impl=impl, max_abs_err=err,
             total_keys=sum(case.seg_lens), segments=len(case.seg_lens))


# Alternating A/B ratio on the default sweep's decode shapes: the CPU-robust comparison (§6).
RATIO_CASES = [c for c in CASES if c.Lq == 1 and c.dtype == "bf16"] if not FULL else []


@pytest.mark.parametrize("case", RATIO_CASES, ids=[c.id for c in RATIO_CASES])
@pytest.mark.parametrize("backend", pskernels.available_backends("multi_branch_attention"))
def test_ratio_vs_cat_sdpa(benchmark, perf, case, backend):
    if not (impl_selected(f"pskernels-{backend}") and impl_selected("cat_sdpa")):
        pytest.skip("not selected")
    fa = build(case, f"pskernels-{backend}")
    fb = build(case, "cat_sdpa")
    ex = perf.ratio(benchmark, fa, fb, group=f"ratio-{case.id}", a=f"pskernels-{backend}", b="cat_sdpa")
    assert math.isfinite(ex["a_over_b"])


# ----------------------------------------------------------------------------------------------
# Shared prefix, B rows (issue 14): N workers decode as one batch on a zero-copy ParallelCache(prefix, []),
# whose batch-1 prefix K/V reach the op expanded over the B rows (batch stride 0). The CPU kernel's cascade
# reads the prefix once for all rows; PSKERNELS_CPU_CASCADE=0 gives its per-row path on the same tensors
# (every row reads the whole prefix), the kernel as it was before the cascade.
# ----------------------------------------------------------------------------------------------
SHARED_CASES = [  # (geometry, prefix P, rows B, own tokens per row, Lq, dtype)
    ("smollm2", 4096, 16, 16, 1, "fp32"),
    ("smollm2", 4096, 16, 16, 1, "bf16"),
    ("smollm2", 2048, 8, 64, 1, "fp32"),
    ("smollm2", 2048, 8, 64, 7, "fp32"),
] + ([("llama8b", 8192, 32, 64, 1, "bf16")] if FULL else [])


def _shared_id(c):
    geo, P, B, own, Lq, dt = c
    return f"{geo}-shared{P}-B{B}-own{own}-Lq{Lq}-{dt}"


def _per_row(fn):
    """``fn`` with the CPU kernel's cascade switched off (read per call by the kernel)."""
    def g():
        os.environ["PSKERNELS_CPU_CASCADE"] = "0"
        try:
            return fn()
        finally:
            del os.environ["PSKERNELS_CPU_CASCADE"]
    return g


@pytest.mark.parametrize("case", SHARED_CASES, ids=[_shared_id(c) for c in SHARED_CASES])
def test_shared_prefix_cascade_vs_per_row(benchmark, perf, case):
    if "cpu" not in pskernels.available_backends("multi_branch_attention"):
        pytest.skip("the compiled extension (backend 'cpu') is not built")
    geo, P, B, own, Lq, dt = case
    Hq, Hkv, D = GEOMETRIES[geo]
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    g = torch.Generator().manual_seed(0)

    def mk(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    q = mk(B, Hq, Lq, D)
    ks = [mk(1, Hkv, P, D).expand(B, -1, -1, -1), mk(B, Hkv, own, D)]
    vs = [mk(1, Hkv, P, D).expand(B, -1, -1, -1), mk(B, Hkv, own, D)]

    def cascade():
        return pskernels.multi_branch_attention(q, ks, vs, backend="cpu")[0]

    per_row = _per_row(cascade)
    err = (cascade().float() - per_row().float()).abs().max().item()
    assert err <= (1e-4 if dtype == torch.float32 else 3e-2), f"cascade and per-row paths differ by {err:.3g}"
    ex = perf.ratio(benchmark, cascade, per_row, group=f"shared-{_shared_id(case)}", a="cascade", b="per_row")
    e = dtype.itemsize
    ex["prefix_bytes_cascade"] = Hkv * P * 2 * D * e  # read once for every row
    ex["prefix_bytes_per_row"] = B * Hkv * P * 2 * D * e
    assert math.isfinite(ex["a_over_b"])


# ----------------------------------------------------------------------------------------------
# The host work of one layer call on the Triton backend, its kernel launches stubbed (docs/GPU.md: below a few MB
# of K/V a call on a GPU is host-bound). ``call``: multi_branch_attention (a plan each time); ``plan``: making
# the plan alone; ``run``: a plan's run, as each layer of a patched model's forward does.
# ----------------------------------------------------------------------------------------------
HOST_CASE = Case(*GEOMETRIES["smollm2"], prefix=64, branches=8, branch_len=512, Lq=1, shift=True, name="smollm2")


@pytest.mark.parametrize("way", ["call", "plan", "run"])
def test_triton_host_path(benchmark, monkeypatch, way):
    if "triton" not in pskernels.available_backends("multi_branch_attention"):
        pytest.skip("the triton backend is not available")
    import pskernels.triton.multi_branch_attention as mba

    monkeypatch.setattr(mba, "_launch", lambda *a, **k: None)
    monkeypatch.setattr(mba, "combine", lambda *a, **k: None)
    q, ks, vs, rope, shifts = inputs(HOST_CASE)
    kw = dict(position_shifts=shifts, rope=rope)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend="triton", **kw)
    fn = {"call": lambda: pskernels.multi_branch_attention(q, ks, vs, backend="triton", **kw),
          "plan": lambda: pskernels.plan_multi_branch_attention(q, ks, vs, backend="triton", **kw),
          "run": lambda: plan.run(q, ks, vs)}[way]
    benchmark.group = f"triton-host-path-{HOST_CASE.id}"
    benchmark.extra_info["device"] = str(DEVICE)
    benchmark.pedantic(fn, rounds=200, warmup_rounds=20, iterations=1)
