"""Hypothesis property tests: every compiled backend against backend="torch" on random inputs.

Drawn per example: segment counts 1-9 (and rows with 0 valid keys), lengths 0-300 (all-empty rows too),
batch 1-3, GQA ratios, head dims, shifts (negative too), fp32/bf16, strided views, causal on/off, softcap,
sliding windows, calibration knobs + segment groups. ``derandomize=True`` makes runs reproducible; the
example budget (``PSKERNELS_HYPOTHESIS_SCALE``, default 1.0) keeps the file around a minute on 2 cores.
Tensor contents come from a drawn seed (hypothesis shrinks shapes and flags, not values).

Tolerances (docs/KERNELS.md §5): fp32 within 2e-5 of the output scale (plus fp32 angle rounding for rotations);
bf16 within 2x the error of the bf16 torch implementation against the fp32 reference, plus a 1e-2 floor.
``test_zz_example_counts`` prints the number of examples run and writes ``.hypothesis/pskernels_counts.json``.
"""
from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

import pskernels

from op_helpers import backend_params, device_for, make_rope

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
SCALE = float(os.environ.get("PSKERNELS_HYPOTHESIS_SCALE", "1.0"))
COUNTS: Counter = Counter()
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


def _settings(n):
    return settings(max_examples=max(1, int(n * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _backends(op):
    """Every backend but the reference itself (the interpreter gets a handful of small examples, see _small)."""
    return [p for p in backend_params(op) if p.values[0] != "torch"]


def _small(backend):
    return backend == "triton" and not torch.cuda.is_available()


def _view(g, shape, dtype, layout):
    """A [B, H, L, D] tensor with unit last stride in one of three storage layouts."""
    B, H, L, D = shape
    if layout == "hf":  # HF's [B, L, H, D] storage, transposed
        t = torch.randn(B, L, H, D, generator=g).transpose(1, 2)
    elif layout == "slice":  # a window of a longer buffer
        t = torch.randn(B, H, L + 3, D, generator=g)[:, :, 2 : L + 2]
    else:
        t = torch.randn(B, H, L, D, generator=g)
    return t.to(dtype)


def _err(a, ref):
    return (a.double() - ref.double()).abs().max().item() if a.numel() else 0.0


def _check_close(got, want, ref32, ref_same, what, dtype, extra_rtol=0.0):
    """got/want: backend and torch outputs; ref32: torch on fp32-upcast inputs (bf16 only)."""
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.shape, want.shape, got.dtype, want.dtype)
    assert not got.isnan().any(), f"{what}: NaN"
    if not got.numel():
        return
    scale = max(1.0, want.float().abs().max().item())
    if dtype == F32:
        err, tol = _err(got, want), (2e-5 + extra_rtol) * scale
    else:
        err, tol = _err(got, ref32), 2 * _err(ref_same, ref32) + 1e-2 * scale + extra_rtol * scale
    assert err <= tol, f"{what}: max abs err {err:.3g} > {tol:.3g}"


def _check_lse(got, want, ref32, ref_same, dtype):
    assert got.dtype == F32 and got.shape == want.shape
    assert not got.isnan().any(), "lse: NaN"
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)), "-inf pattern of lse differs"
    fin = torch.isfinite(want)
    if not fin.any():
        return
    if dtype == F32:
        err, tol = _err(got[fin], want[fin]), 1e-4 + 1e-5 * want[fin].abs().max().item()
    else:
        err = _err(got[fin], ref32[fin])
        tol = 2 * _err(ref_same[fin], ref32[fin]) + 1e-2 * max(1.0, ref32[fin].abs().max().item())
    assert err <= tol, f"lse: max abs err {err:.3g} > {tol:.3g}"


# ---------------------------------------------------------------------------------- multi_branch_attention


@st.composite
def mba_cases(draw, small=False):
    maxlen = 40 if small else 300
    c = dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        dtype=draw(st.sampled_from([F32, BF16])),
        B=draw(st.integers(1, 2 if small else 3)),
        Hkv=draw(st.sampled_from([1, 2])),
        G=draw(st.sampled_from([1, 2, 3, 4])),
        DDv=draw(st.sampled_from([(16, 16), (64, 64)] if small else [(16, 16), (64, 64), (80, 80), (128, 128),
                                                                        (64, 32), (8, 24)])),
        S=draw(st.integers(1, 4 if small else 9)),
        Lq=draw(st.integers(1, 6 if small else 12)),
        causal=draw(st.booleans()),
        layout=draw(st.sampled_from(["contig", "hf", "slice"])),
        softcap=draw(st.one_of(st.none(), st.floats(0.5, 30.0))),
        window=draw(st.one_of(st.none(), st.integers(1, maxlen + 20))),
        shifts=draw(st.booleans()),
        knobs=draw(st.booleans()),
        style=draw(st.sampled_from(["neox", "gptj"])),
        partial=draw(st.booleans()),
    )
    c["lens"] = draw(st.lists(st.integers(0, maxlen), min_size=c["S"], max_size=c["S"]))
    c["fill"] = draw(st.sampled_from(["full", "ragged", "empty_rows", "none"]))
    c["groups"] = draw(st.lists(st.integers(0, c["S"] - 1), min_size=c["S"], max_size=c["S"]))
    return c


def _mba_inputs(c):
    g = torch.Generator().manual_seed(c["seed"])
    B, Hkv, G, S, Lq, dt = c["B"], c["Hkv"], c["G"], c["S"], c["Lq"], c["dtype"]
    D, Dv = c["DDv"]
    Hq = Hkv * G
    lens = list(c["lens"])
    if c["causal"]:
        lens[-1] = max(lens[-1], Lq)  # the own segment holds (at least) the queries' tokens
    q = _view(g, (B, Hq, Lq, D), dt, c["layout"])
    ks = [_view(g, (B, Hkv, L, D), dt, c["layout"]) for L in lens]
    vs = [_view(g, (B, Hkv, L, Dv), dt, "contig" if c["layout"] == "hf" else c["layout"]) for L in lens]
    Ls = torch.tensor(lens)[:, None].expand(S, B)
    if c["fill"] == "full":
        seq = Ls.clone()
    elif c["fill"] == "none":  # no valid key anywhere
        seq = torch.zeros(S, B, dtype=torch.int64)
    else:
        seq = (torch.rand(S, B, generator=g) * (Ls + 1)).long().clamp(max=Ls)
        if c["fill"] == "empty_rows":
            seq[:, 0] = 0
            if c["causal"]:
                seq[-1, 0] = 0
    kw = dict(seq_lens=seq, causal_last=c["causal"],
              left_pad=(torch.rand(S, B, generator=g) * (seq + 1) * 0.3).long().clamp(max=seq))
    rd = D if not c["partial"] else max(2, (D // 2) // 2 * 2)
    if c["shifts"]:
        kw["position_shifts"] = torch.randint(-400, 400, (S, B), generator=g)
        kw["rope"] = make_rope(D, rd, c["style"])
    if c["softcap"] is not None:
        kw["softcap"] = c["softcap"]
    if c["window"] is not None:
        starts = torch.cumsum(torch.tensor([0] + lens[:-1]), 0)
        kw["sliding_window"] = c["window"]
        kw["segment_positions"] = starts[:, None].expand(S, B) + torch.randint(0, 5, (S, B), generator=g)
        if not c["causal"]:
            kw["query_positions"] = torch.randint(0, sum(lens) + 10, (B, Lq), generator=g)
    if c["knobs"]:
        used = sorted(set(c["groups"]))
        groups = [used.index(x) for x in c["groups"]]  # ids 0..NG-1, none unused
        NG = len(used)
        kw["segment_groups"] = groups
        kw["temperature"] = torch.rand(NG, Hq, generator=g) + 0.5
        kw["lse_scale"] = torch.rand(NG, generator=g) + 0.5
        kw["log_weight"] = torch.randn(NG, Hq, generator=g)
    return q, ks, vs, kw


def _up(ts):
    return [t.float() for t in ts]


@pytest.mark.parametrize("backend", _backends("multi_branch_attention"))
def test_mba_matches_torch(backend):
    small = _small(backend)

    @_settings(3 if small else 300)
    @given(c=mba_cases(small=small))
    def run(c):
        COUNTS[f"multi_branch_attention/{backend}"] += 1
        q, ks, vs, kw = _mba_inputs(c)
        dev = device_for(backend)
        if dev.type != "cpu":
            q, ks, vs = q.to(dev), [k.to(dev) for k in ks], [v.to(dev) for v in vs]
        with torch.no_grad():
            out, lse = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)
            q, ks, vs = q.cpu(), [k.cpu() for k in ks], [v.cpu() for v in vs]
            ref_out, ref_lse = pskernels.multi_branch_attention(q, ks, vs, backend="torch", **kw)
            r32 = pskernels.multi_branch_attention(q.float(), _up(ks), _up(vs), backend="torch", **kw) \
                if c["dtype"] != F32 else (None, None)
        _check_close(out.cpu(), ref_out, r32[0], ref_out, "out", c["dtype"])
        _check_lse(lse.cpu(), ref_lse, r32[1], ref_lse, c["dtype"])

    run()


# ------------------------------------------------------------------------------------------ merge_states


@st.composite
def merge_cases(draw, small=False):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from([F32, BF16])),
        N=draw(st.integers(1, 9)), B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)),
        L=draw(st.integers(0, 8 if small else 40)), Dv=draw(st.sampled_from([1, 16, 80] if not small else [16])),
        form=draw(st.sampled_from(["stacked", "list", "strided"])), empty=draw(st.floats(0.0, 1.0)),
    )


@pytest.mark.parametrize("backend", _backends("merge_states"))
def test_merge_states_matches_torch(backend):
    @_settings(3 if _small(backend) else 200)
    @given(c=merge_cases(small=_small(backend)))
    def run(c):
        COUNTS[f"merge_states/{backend}"] += 1
        g = torch.Generator().manual_seed(c["seed"])
        N, B, H, L, Dv = c["N"], c["B"], c["H"], c["L"], c["Dv"]
        if c["form"] == "strided":
            o = torch.randn(B, H, L, Dv, N, generator=g).permute(4, 0, 1, 2, 3)  # stride(-1) != 1
        else:
            o = torch.randn(N, B, H, L, Dv, generator=g)
        o = o.to(c["dtype"])
        s = torch.randn(N, B, H, L, generator=g) * 4
        s[torch.rand(N, B, H, L, generator=g) < c["empty"]] = float("-inf")  # empty states, all-empty rows too
        dev = device_for(backend)
        args = ([o[i].to(dev) for i in range(N)], [s[i].to(dev) for i in range(N)]) if c["form"] == "list" \
            else (o.to(dev), s.to(dev))
        out, lse = pskernels.merge_states(*args, backend=backend)
        ref_out, ref_lse = pskernels.merge_states(o, s, backend="torch")
        r32 = pskernels.merge_states(o.float(), s, backend="torch") if c["dtype"] != F32 else (None, None)
        _check_close(out.cpu(), ref_out, r32[0], ref_out, "out", c["dtype"])
        _check_lse(lse.cpu(), ref_lse, r32[1], ref_lse, c["dtype"])

    run()


# ------------------------------------------------------------------------------------------- rotate_keys


def _angle_rtol(spec, maxpos):
    return 4 * maxpos * spec.inv_freq.abs().max().item() * 2.0 ** -24


@st.composite
def rotate_cases(draw, small=False):
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from([F32, BF16])),
        B=draw(st.integers(1, 3)), H=draw(st.integers(1, 4)), L=draw(st.integers(0, 20 if small else 300)),
        D=draw(st.sampled_from([16, 64] if small else [16, 64, 80, 128])),
        style=draw(st.sampled_from(["neox", "gptj"])),
        partial=draw(st.booleans()), form=draw(st.sampled_from(["int", "row", "token"])),
        layout=draw(st.sampled_from(["contig", "hf", "slice"])), maxshift=draw(st.sampled_from([3, 400, 5000])),
    )


@pytest.mark.parametrize("backend", _backends("rotate_keys"))
def test_rotate_keys_matches_torch(backend):
    @_settings(3 if _small(backend) else 200)
    @given(c=rotate_cases(small=_small(backend)))
    def run(c):
        COUNTS[f"rotate_keys/{backend}"] += 1
        g = torch.Generator().manual_seed(c["seed"])
        B, H, L, D = c["B"], c["H"], c["L"], c["D"]
        k = _view(g, (B, H, L, D), c["dtype"], c["layout"])
        m = c["maxshift"]
        delta = {"int": int(torch.randint(-m, m + 1, (1,), generator=g)),
                 "row": torch.randint(-m, m + 1, (B,), generator=g),
                 "token": torch.randint(-m, m + 1, (B, L), generator=g)}[c["form"]]
        spec = make_rope(D, D // 2 // 2 * 2 if c["partial"] else D, c["style"])
        dev = device_for(backend)
        out = pskernels.rotate_keys(k.to(dev), delta, spec, backend=backend).cpu()
        ref = pskernels.rotate_keys(k, delta, spec, backend="torch")
        assert out.is_contiguous()
        r32 = pskernels.rotate_keys(k.float(), delta, spec, backend="torch") if c["dtype"] != F32 else None
        _check_close(out, ref, r32, ref, "k", c["dtype"], extra_rtol=_angle_rtol(spec, m))

    run()


# ----------------------------------------------------------------------------------------- map_kv_caches


@st.composite
def map_cases(draw, small=False):
    NL, N = draw(st.integers(1, 2 if small else 3)), draw(st.integers(1, 3 if small else 9))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)), dtype=draw(st.sampled_from([F32, BF16])), NL=NL, N=N,
        B=draw(st.integers(1, 3)), H=draw(st.sampled_from([1, 2])),
        DDv=draw(st.sampled_from([(16, 16)] if small else [(16, 16), (64, 64), (80, 80), (128, 64)])),
        lens=draw(st.lists(st.integers(0, 16 if small else 300), min_size=NL * N, max_size=NL * N)),
        style=draw(st.sampled_from(["neox", "gptj"])), partial=draw(st.booleans()),
        k_tf=draw(st.sampled_from([None, "ungated", "gated"])), v_tf=draw(st.sampled_from([None, "ungated", "gated"])),
        r=draw(st.sampled_from([1, 4, 20])), pos_form=draw(st.sampled_from(["N", "NB", "LNB"])),
        layout=draw(st.sampled_from(["contig", "hf", "slice"])),
    )


@pytest.mark.parametrize("backend", _backends("map_kv_caches"))
def test_map_kv_caches_matches_torch(backend):
    @_settings(3 if _small(backend) else 80)
    @given(c=map_cases(small=_small(backend)))
    def run(c):
        COUNTS[f"map_kv_caches/{backend}"] += 1
        g = torch.Generator().manual_seed(c["seed"])
        NL, N, B, H, dt = c["NL"], c["N"], c["B"], c["H"], c["dtype"]
        D, Dv = c["DDv"]
        lens = c["lens"]
        ks = [[_view(g, (B, H, lens[l * N + n], D), dt, c["layout"]) for n in range(N)] for l in range(NL)]
        vs = [[_view(g, (B, H, lens[l * N + n], Dv), dt, c["layout"]) for n in range(N)] for l in range(NL)]
        shape = {"N": (N,), "NB": (N, B), "LNB": (NL, N, B)}[c["pos_form"]]
        orig, new = torch.randint(0, 300, shape, generator=g), torch.randint(-50, 2000, shape, generator=g)
        spec = make_rope(D, D // 2 // 2 * 2 if c["partial"] else D, c["style"])
        params, r = {}, c["r"]
        for side, d, tf in (("k", D, c["k_tf"]), ("v", Dv, c["v_tf"])):
            if tf is not None:
                params[f"{side}_down"] = torch.randn(NL, H, d, r, generator=g) * 0.2
                params[f"{side}_up"] = torch.randn(NL, H, r, d, generator=g) * 0.2
                if tf == "gated":
                    params[f"{side}_gate"] = torch.randn(NL, H, generator=g)
        dev = device_for(backend)
        mv = lambda x: [[t.to(dev) for t in row] for row in x]  # noqa: E731
        with torch.no_grad():
            ko, vo = pskernels.map_kv_caches(mv(ks), mv(vs), rope=spec, orig_positions=orig, new_positions=new,
                                             backend=backend, **{k: v.to(dev) for k, v in params.items()})
            rk, rv = pskernels.map_kv_caches(ks, vs, rope=spec, orig_positions=orig, new_positions=new,
                                             backend="torch", **params)
            if dt != F32:
                up = lambda x: [[t.float() for t in row] for row in x]  # noqa: E731
                r32k, r32v = pskernels.map_kv_caches(up(ks), up(vs), rope=spec, orig_positions=orig,
                                                     new_positions=new, backend="torch", **params)
        extra = _angle_rtol(spec, 2400)
        for l in range(NL):
            for n in range(N):
                assert ko[l][n].is_contiguous() and vo[l][n].is_contiguous()
                _check_close(ko[l][n].cpu(), rk[l][n], None if dt == F32 else r32k[l][n], rk[l][n], f"k[{l}][{n}]",
                             dt, extra_rtol=extra)
                _check_close(vo[l][n].cpu(), rv[l][n], None if dt == F32 else r32v[l][n], rv[l][n], f"v[{l}][{n}]",
                             dt)

    run()


# --------------------------------------------------------------------------------------------- counts


def test_zz_example_counts():
    """Runs last in this file: print and record how many examples each property test ran."""
    counts = dict(sorted(COUNTS.items()))
    print("\nhypothesis examples run:", json.dumps(counts, indent=1))
    path = os.path.join(_ROOT, ".hypothesis", "pskernels_counts.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump({"counts": counts, "scale": SCALE}, f, indent=1)
    except OSError:
        pass
    if counts:
        assert all(v > 0 for v in counts.values())
