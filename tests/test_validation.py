"""Misuse of the public API: each case must raise ValueError/TypeError/NotImplementedError (or RuntimeError for
an unavailable backend) *before* any compute, with a message naming the offending argument."""
from __future__ import annotations

import re

import pytest
import torch

import pskernels
from pskernels import RopeSpec

from op_helpers import make_rope

B, HQ, HKV, LQ, D = 2, 4, 2, 3, 16
LENS = (5, 3)
ARG_ERRORS = (ValueError, TypeError, NotImplementedError)


def rope(D=D, rope_type="default", rotary_dim=None):
    return make_rope(D, rotary_dim, rope_type=rope_type)


def q_(**kw):
    return torch.randn(B, HQ, LQ, D, **kw)


def kv_(lens=LENS, h=HKV, d=D, dv=D, b=B, dtype=torch.float32):
    ks = [torch.randn(b, h, L, d, dtype=dtype) for L in lens]
    vs = [torch.randn(b, h, L, dv, dtype=dtype) for L in lens]
    return ks, vs


def mba(q=None, kv=None, **kw):
    """Closure calling multi_branch_attention with valid defaults, overridden by the case."""
    def call(backend):
        qq = q_() if q is None else q()
        ks, vs = kv_() if kv is None else kv()
        return pskernels.multi_branch_attention(qq, ks, vs, backend=backend, **kw)
    return call


def _noncontig_q():
    return torch.randn(B, HQ, D, LQ).transpose(-1, -2)


def _noncontig_k():
    ks, vs = kv_()
    ks[1] = torch.randn(B, HKV, D, LENS[1]).transpose(-1, -2)
    return ks, vs


def _single(which):
    ks, vs = kv_()
    return (ks[0], vs) if which == "keys" else (ks, vs[0])


MBA_CASES = [
    # (id, call, expected exceptions, argument name that must appear in the message)
    ("q_rank", mba(q=lambda: torch.randn(HQ, LQ, D)), ARG_ERRORS, "q"),
    ("q_not_tensor", mba(q=lambda: [[1.0]]), ARG_ERRORS, "q"),
    ("q_int_dtype", mba(q=lambda: torch.ones(B, HQ, LQ, D, dtype=torch.int64)), ARG_ERRORS, "q"),
    ("q_head_dim_zero", mba(q=lambda: torch.randn(B, HQ, LQ, 0), kv=lambda: kv_(d=0)), ARG_ERRORS, "q"),
    ("keys_tensor", mba(kv=lambda: _single("keys")), ARG_ERRORS, "keys"),
    ("values_tensor", mba(kv=lambda: _single("values")), ARG_ERRORS, "values"),
    ("keys_empty", mba(kv=lambda: ([], [])), ARG_ERRORS, "keys"),
    ("values_count", mba(kv=lambda: (kv_()[0], kv_()[1][:1])), ARG_ERRORS, "values"),
    ("key_rank", mba(kv=lambda: ([torch.randn(B, HKV, 5, D), torch.randn(HKV, 3, D)], kv_()[1])), ARG_ERRORS, "keys"),
    ("hq_not_multiple", mba(kv=lambda: kv_(h=3)), ARG_ERRORS, "keys"),
    ("hkv_differs", mba(kv=lambda: ([torch.randn(B, 2, 5, D), torch.randn(B, 1, 3, D)], kv_()[1])), ARG_ERRORS, "keys"),
    ("head_dim", mba(kv=lambda: kv_(d=D + 8)), ARG_ERRORS, "keys"),
    ("value_len", mba(kv=lambda: (kv_()[0], kv_(lens=(5, 4))[1])), ARG_ERRORS, "values"),
    ("value_dim_differs", mba(kv=lambda: (kv_()[0], [torch.randn(B, HKV, 5, D), torch.randn(B, HKV, 3, 8)])),
     ARG_ERRORS, "values"),
    ("dtype_keys", mba(kv=lambda: kv_(dtype=torch.float16)), ARG_ERRORS, "keys"),
    ("dtype_values", mba(kv=lambda: (kv_()[0], kv_(dtype=torch.bfloat16)[1])), ARG_ERRORS, "values"),
    ("batch_keys", mba(kv=lambda: kv_(b=B + 1)), ARG_ERRORS, "keys"),
    ("batch_values", mba(kv=lambda: (kv_()[0], kv_(b=1)[1])), ARG_ERRORS, "values"),
    ("q_noncontig_last", mba(q=_noncontig_q), ARG_ERRORS, "q"),
    ("keys_noncontig_last", mba(kv=_noncontig_k), ARG_ERRORS, "keys"),
    ("seq_lens_shape", mba(seq_lens=torch.tensor([5, 3])), ARG_ERRORS, "seq_lens"),
    ("seq_lens_shape_T", mba(seq_lens=torch.tensor([[5, 3], [5, 3]]).T.contiguous()[:, :1]), ARG_ERRORS, "seq_lens"),
    ("seq_lens_float", mba(seq_lens=torch.tensor([[5.0, 3.0], [3.0, 3.0]])), ARG_ERRORS, "seq_lens"),
    # a nested list of floats was converted with an int64 dtype: 4.5 silently became 4
    ("seq_lens_float_list", mba(seq_lens=[[5, 3], [2.5, 3]]), ARG_ERRORS, "seq_lens"),
    ("seq_lens_negative", mba(seq_lens=torch.tensor([[5, -1], [3, 3]])), ARG_ERRORS, "seq_lens"),
    ("seq_lens_too_long", mba(seq_lens=torch.tensor([[5, 6], [3, 3]])), ARG_ERRORS, "seq_lens"),
    ("left_pad_gt_lens", mba(seq_lens=torch.tensor([[5, 2], [3, 3]]), left_pad=torch.tensor([[0, 3], [0, 0]])),
     ARG_ERRORS, "left_pad"),
    ("left_pad_negative", mba(left_pad=torch.tensor([[0, -1], [0, 0]])), ARG_ERRORS, "left_pad"),
    ("left_pad_shape", mba(left_pad=torch.zeros(3, B, dtype=torch.int64)), ARG_ERRORS, "left_pad"),
    ("shift_without_rope", mba(position_shifts=torch.tensor([0, 4])), ARG_ERRORS, "rope"),
    ("shift_float", mba(position_shifts=torch.tensor([0.0, 4.0]), rope=rope()), ARG_ERRORS, "position_shifts"),
    ("shift_float_list", mba(position_shifts=[0, 1.5], rope=rope()), ARG_ERRORS, "position_shifts"),
    ("shift_shape", mba(position_shifts=torch.tensor([0, 4, 1]), rope=rope()), ARG_ERRORS, "position_shifts"),
    ("rope_not_spec", mba(position_shifts=torch.tensor([0, 4]), rope="llama"), ARG_ERRORS, "rope"),
    ("rope_rotary_dim_gt_D", mba(rope=rope(D=2 * D)), ARG_ERRORS, "rope"),
    ("rope_dynamic_shift", mba(position_shifts=torch.tensor([0, 4]), rope=rope(rope_type="dynamic")), ARG_ERRORS,
     "rope"),
    ("rope_longrope_shift", mba(position_shifts=torch.tensor([[0, 0], [4, 0]]), rope=rope(rope_type="longrope")),
     ARG_ERRORS, "rope"),
    ("scale_zero", mba(scale=0.0), ARG_ERRORS, "scale"),
    ("scale_nan", mba(scale=float("nan")), ARG_ERRORS, "scale"),
    ("scale_negative", mba(scale=-0.1), ARG_ERRORS, "scale"),
    ("softcap_zero", mba(softcap=0.0), ARG_ERRORS, "softcap"),
    ("softcap_negative", mba(softcap=-5.0), ARG_ERRORS, "softcap"),
    ("softcap_inf", mba(softcap=float("inf")), ARG_ERRORS, "softcap"),  # inf * tanh(x / inf) = NaN outputs
    ("scale_inf", mba(scale=float("inf")), ARG_ERRORS, "scale"),
    ("scale_str", mba(scale="x"), ARG_ERRORS, "scale"),
    ("window_without_segment_positions", mba(sliding_window=4), ARG_ERRORS, "segment_positions"),
    ("window_zero", mba(sliding_window=0, segment_positions=torch.tensor([0, 5])), ARG_ERRORS, "sliding_window"),
    ("window_float", mba(sliding_window=2.5, segment_positions=torch.tensor([0, 5])), ARG_ERRORS, "sliding_window"),
    ("window_noncausal_no_qpos", mba(sliding_window=4, segment_positions=torch.tensor([0, 5]), causal_last=False),
     ARG_ERRORS, "query_positions"),
    ("query_positions_shape", mba(sliding_window=4, segment_positions=torch.tensor([0, 5]),
                                  query_positions=torch.zeros(B, LQ + 1, dtype=torch.int64)), ARG_ERRORS,
     "query_positions"),
    ("query_positions_float", mba(sliding_window=4, segment_positions=torch.tensor([0, 5]),
                                  query_positions=torch.zeros(B, LQ)), ARG_ERRORS, "query_positions"),
    ("segment_positions_shape", mba(sliding_window=4, segment_positions=torch.tensor([0, 5, 7])), ARG_ERRORS,
     "segment_positions"),
    ("temperature_zero", mba(temperature=0.0), ARG_ERRORS, "temperature"),
    ("temperature_negative_entry", mba(temperature=torch.tensor([1.0, -0.5])), ARG_ERRORS, "temperature"),
    ("temperature_nan", mba(temperature=float("nan")), ARG_ERRORS, "temperature"),
    ("temperature_int", mba(temperature=torch.tensor([1, 1])), ARG_ERRORS, "temperature"),
    ("lse_scale_zero", mba(lse_scale=torch.tensor([1.0, 0.0])), ARG_ERRORS, "lse_scale"),
    ("lse_scale_shape", mba(lse_scale=torch.ones(3)), ARG_ERRORS, "lse_scale"),
    ("log_weight_shape", mba(log_weight=torch.zeros(2, HQ + 1)), ARG_ERRORS, "log_weight"),
    ("log_weight_inf", mba(log_weight=torch.tensor([0.0, float("inf")])), ARG_ERRORS, "log_weight"),
    ("knob_shape_vs_groups", mba(temperature=torch.ones(2), segment_groups=[0, 0]), ARG_ERRORS, "temperature"),
    ("segment_groups_length", mba(segment_groups=[0]), ARG_ERRORS, "segment_groups"),
    ("segment_groups_gap", mba(segment_groups=[0, 2]), ARG_ERRORS, "segment_groups"),
    ("segment_groups_negative", mba(segment_groups=[-1, 0]), ARG_ERRORS, "segment_groups"),
    ("backend_unknown", None, ARG_ERRORS, "backend"),
]


def _rk(k=None, delta=3, r=None):
    def call(backend):
        kk = torch.randn(B, HKV, 5, D) if k is None else k()
        return pskernels.rotate_keys(kk, delta, rope() if r is None else r, backend=backend)
    return call


ROTATE_CASES = [
    ("k_rank", _rk(k=lambda: torch.randn(HKV, 5, D)), ARG_ERRORS, "k"),
    ("k_int", _rk(k=lambda: torch.ones(B, HKV, 5, D, dtype=torch.int32)), ARG_ERRORS, "k"),
    ("k_noncontig_last", _rk(k=lambda: torch.randn(B, HKV, D, 5).transpose(-1, -2)), ARG_ERRORS, "k"),
    ("delta_float", _rk(delta=torch.tensor([1.0, 2.0])), ARG_ERRORS, "delta"),
    ("delta_python_float", _rk(delta=2.5), ARG_ERRORS, "delta"),
    ("delta_shape", _rk(delta=torch.tensor([1, 2, 3])), ARG_ERRORS, "delta"),
    ("delta_shape_2d", _rk(delta=torch.zeros(B, 4, dtype=torch.int64)), ARG_ERRORS, "delta"),
    ("delta_bool", _rk(delta=torch.tensor([True, False])), ARG_ERRORS, "delta"),
    ("rope_not_spec", _rk(r="neox"), ARG_ERRORS, "rope"),
    ("rope_rotary_dim_gt_D", _rk(r=rope(D=2 * D)), ARG_ERRORS, "rope"),
    ("rope_dynamic_nonzero", _rk(r=rope(rope_type="dynamic")), ARG_ERRORS, "rope"),
]


def _ms(outs=None, lses=None):
    def call(backend):
        o = [torch.randn(B, HQ, LQ, D) for _ in range(2)] if outs is None else outs()
        s = [torch.randn(B, HQ, LQ) for _ in range(2)] if lses is None else lses()
        return pskernels.merge_states(o, s, backend=backend)
    return call


MERGE_CASES = [
    ("empty_list", _ms(outs=lambda: [], lses=lambda: []), ARG_ERRORS, "outs"),
    ("lse_shape", _ms(lses=lambda: [torch.randn(B, HQ, LQ + 1) for _ in range(2)]), ARG_ERRORS, "lses"),
    ("outs_shapes_differ", _ms(outs=lambda: [torch.randn(B, HQ, LQ, D), torch.randn(B, HQ, LQ, D + 1)]), ARG_ERRORS,
     "outs"),
    ("count_mismatch", _ms(lses=lambda: [torch.randn(B, HQ, LQ) for _ in range(3)]), ARG_ERRORS, "lses"),
    ("lse_fp16", _ms(lses=lambda: [torch.randn(B, HQ, LQ, dtype=torch.float16) for _ in range(2)]), ARG_ERRORS,
     "lses"),
    ("lse_fp64", _ms(lses=lambda: [torch.randn(B, HQ, LQ, dtype=torch.float64) for _ in range(2)]), ARG_ERRORS,
     "lses"),
    ("outs_int", _ms(outs=lambda: [torch.ones(B, HQ, LQ, D, dtype=torch.int32) for _ in range(2)]), ARG_ERRORS,
     "outs"),
    ("outs_rank", _ms(outs=lambda: [torch.randn(HQ, LQ, D) for _ in range(2)]), ARG_ERRORS, "outs"),
    ("stacked_rank", _ms(outs=lambda: torch.randn(2, HQ, LQ, D), lses=lambda: torch.randn(2, HQ, LQ)), ARG_ERRORS,
     "outs"),
]

NL, NB, H_MAP, D_MAP, R = 2, 2, 2, 16, 4


def _map(keys=None, values=None, orig=None, new=None, r=None, **params):
    def call(backend):
        ks = [[torch.randn(1, H_MAP, 4, D_MAP) for _ in range(NB)] for _ in range(NL)] if keys is None else keys()
        vs = [[torch.randn(1, H_MAP, 4, D_MAP) for _ in range(NB)] for _ in range(NL)] if values is None else values()
        return pskernels.map_kv_caches(
            ks, vs, rope=rope(D_MAP) if r is None else r,
            orig_positions=torch.tensor([4, 8]) if orig is None else orig,
            new_positions=torch.tensor([4, 4]) if new is None else new, backend=backend,
            **{k: v() for k, v in params.items()})
    return call


def _kd():
    return torch.randn(NL, H_MAP, D_MAP, R)


def _ku():
    return torch.zeros(NL, H_MAP, R, D_MAP)


def _layer_caches(counts, L=4, d=D_MAP):
    return lambda: [[torch.randn(1, H_MAP, L, d) for _ in range(c)] for c in counts]


MAP_CASES = [
    ("keys_tensor", _map(keys=lambda: torch.randn(1, H_MAP, 4, D_MAP)), ARG_ERRORS, "keys"),
    ("keys_empty", _map(keys=lambda: [], values=lambda: []), ARG_ERRORS, "keys"),
    ("branches_per_layer", _map(keys=_layer_caches([2, 1])), ARG_ERRORS, "keys"),
    ("values_branches_per_layer", _map(values=_layer_caches([2, 3])), ARG_ERRORS, "values"),
    ("values_layers", _map(values=_layer_caches([2])), ARG_ERRORS, "values"),
    ("values_length", _map(values=_layer_caches([2, 2], L=5)), ARG_ERRORS, "values"),
    ("head_dim_differs", _map(keys=lambda: [[torch.randn(1, H_MAP, 4, D_MAP), torch.randn(1, H_MAP, 4, 8)]] * NL),
     ARG_ERRORS, "keys"),
    ("dtype_differs", _map(keys=lambda: [[torch.randn(1, H_MAP, 4, D_MAP),
                                          torch.randn(1, H_MAP, 4, D_MAP, dtype=torch.float16)]] * NL),
     ARG_ERRORS, "keys"),
    ("rope_not_spec", _map(r=object()), ARG_ERRORS, "rope"),
    ("rope_rotary_dim_gt_D", _map(r=rope(2 * D_MAP)), ARG_ERRORS, "rope"),
    ("rope_dynamic_reindex", _map(r=rope(D_MAP, rope_type="dynamic")), ARG_ERRORS, "rope"),
    ("orig_shape", _map(orig=torch.tensor([4, 8, 9])), ARG_ERRORS, "orig_positions"),
    ("new_shape", _map(new=torch.zeros(NL + 1, NB, 1, dtype=torch.int64)), ARG_ERRORS, "new_positions"),
    ("orig_float", _map(orig=torch.tensor([4.0, 8.0])), ARG_ERRORS, "orig_positions"),
    ("down_without_up", _map(k_down=_kd), ARG_ERRORS, "k_up"),
    ("up_without_down", _map(v_up=_ku), ARG_ERRORS, "v_down"),
    ("gate_without_down", _map(k_gate=lambda: torch.zeros(NL, H_MAP)), ARG_ERRORS, "k_gate"),
    ("down_shape", _map(k_down=lambda: torch.randn(NL, H_MAP, D_MAP + 1, R), k_up=_ku), ARG_ERRORS, "k_down"),
    ("down_layers", _map(k_down=lambda: torch.randn(NL + 1, H_MAP, D_MAP, R), k_up=_ku), ARG_ERRORS, "k_down"),
    ("up_shape", _map(k_down=_kd, k_up=lambda: torch.zeros(NL, H_MAP, R + 1, D_MAP)), ARG_ERRORS, "k_up"),
    ("up_rank3", _map(v_down=_kd, v_up=lambda: torch.zeros(H_MAP, R, D_MAP)), ARG_ERRORS, "v_up"),
    ("gate_shape", _map(k_down=_kd, k_up=_ku, k_gate=lambda: torch.zeros(NL, H_MAP + 1)), ARG_ERRORS, "k_gate"),
    ("params_int", _map(k_down=lambda: torch.ones(NL, H_MAP, D_MAP, R, dtype=torch.int64), k_up=_ku), ARG_ERRORS,
     "k_down"),
]


# Devices: on a CPU-only machine "meta" stands in for a second device (a tensor q's kernels cannot read).
META = torch.device("meta")


def _on_meta(i, which):
    def kv():
        ks, vs = kv_()
        (ks if which == "keys" else vs)[i] = (ks if which == "keys" else vs)[i].to(META)
        return ks, vs
    return kv


def _meta_rope():
    return RopeSpec(rope().inv_freq.to(META))


MBA_CASES += [
    ("keys_other_device", mba(kv=_on_meta(1, "keys")), ARG_ERRORS, "keys[1]"),
    ("values_other_device", mba(kv=_on_meta(0, "values")), ARG_ERRORS, "values[0]"),
    ("seq_lens_other_device", mba(seq_lens=torch.tensor([[5, 3], [3, 3]], device=META)), ARG_ERRORS, "seq_lens"),
    ("shifts_other_device", mba(position_shifts=torch.tensor([0, 4], device=META), rope=rope()), ARG_ERRORS,
     "position_shifts"),
    ("left_pad_other_device", mba(left_pad=torch.zeros(2, B, dtype=torch.int64, device=META)), ARG_ERRORS, "left_pad"),
    ("temperature_other_device", mba(temperature=torch.ones(2, device=META)), ARG_ERRORS, "temperature"),
    ("rope_other_device", mba(position_shifts=torch.tensor([0, 4]), rope=_meta_rope()), ARG_ERRORS, "rope.inv_freq"),
]
ROTATE_CASES += [
    ("delta_other_device", _rk(delta=torch.tensor([1, 2], device=META)), ARG_ERRORS, "delta"),
    ("rope_other_device", _rk(r=_meta_rope()), ARG_ERRORS, "rope.inv_freq"),
]
MERGE_CASES += [
    ("outs_mixed_devices", _ms(outs=lambda: [torch.randn(B, HQ, LQ, D), torch.randn(B, HQ, LQ, D, device=META)]),
     ARG_ERRORS, "outs[1]"),
    ("lses_other_device", _ms(lses=lambda: [torch.randn(B, HQ, LQ, device=META) for _ in range(2)]), ARG_ERRORS,
     "lses"),
]
MAP_CASES += [
    ("keys_mixed_devices", _map(keys=lambda: [[torch.randn(1, H_MAP, 4, D_MAP)] * NB,
                                              [torch.randn(1, H_MAP, 4, D_MAP, device=META)] * NB]), ARG_ERRORS,
     "keys[1][0]"),
    ("positions_other_device", _map(new=torch.tensor([4, 4], device=META)), ARG_ERRORS, "new_positions"),
    ("down_other_device", _map(k_down=lambda: _kd().to(META), k_up=_ku), ARG_ERRORS, "k_down"),
    ("rope_other_device", _map(r=RopeSpec(rope(D_MAP).inv_freq.to(META))), ARG_ERRORS, "rope.inv_freq"),
]


def _unknown_backend(op):
    def call(backend):
        if op == "multi_branch_attention":
            ks, vs = kv_()
            return pskernels.multi_branch_attention(q_(), ks, vs, backend="tpu")
        if op == "merge_states":
            return pskernels.merge_states([torch.randn(1, 1, 1, 4)], [torch.randn(1, 1, 1)], backend="tpu")
        if op == "rotate_keys":
            return pskernels.rotate_keys(torch.randn(1, 1, 1, 4), 1, rope(4), backend="tpu")
        return pskernels.map_kv_caches([[torch.randn(1, 1, 1, 4)]], [[torch.randn(1, 1, 1, 4)]], rope=rope(4),
                                       orig_positions=[0], new_positions=[1], backend="tpu")
    return call


OPS = {
    "multi_branch_attention": MBA_CASES,
    "rotate_keys": ROTATE_CASES,
    "merge_states": MERGE_CASES,
    "map_kv_caches": MAP_CASES,
}


def _cases():
    out = []
    for op, cases in OPS.items():
        for cid, call, exc, name in cases:
            if call is None:
                continue
            for b in pskernels.available_backends(op):
                out.append(pytest.param(call, exc, name, b, id=f"{op}-{cid}-{b}"))
        out.append(pytest.param(_unknown_backend(op), ARG_ERRORS, "backend", None, id=f"{op}-backend_unknown"))
    return out


def _mentions(msg, name):
    return re.search(rf"(?<![A-Za-z0-9_]){re.escape(name)}(?![A-Za-z0-9_])", msg) is not None


@pytest.mark.parametrize("call,exc,name,backend", _cases())
def test_misuse_raises_with_argument_name(call, exc, name, backend):
    with pytest.raises(exc) as ei:
        call(backend)
    msg = str(ei.value)
    assert _mentions(msg, name), f"{type(ei.value).__name__} message does not name {name!r}: {msg}"


# ----------------------------------------------------------------------------------------------
# Explicitly requested backends that are not available / not implemented
# ----------------------------------------------------------------------------------------------
def _calls_for(op, backend):
    if op == "multi_branch_attention":
        ks, vs = kv_()
        return lambda: pskernels.multi_branch_attention(q_(), ks, vs, backend=backend)
    if op == "merge_states":
        return lambda: pskernels.merge_states([torch.randn(1, 1, 1, 4)], [torch.randn(1, 1, 1)], backend=backend)
    if op == "rotate_keys":
        return lambda: pskernels.rotate_keys(torch.randn(1, 1, 1, 4), 1, rope(4), backend=backend)
    return lambda: pskernels.map_kv_caches([[torch.randn(1, 1, 1, 4)]], [[torch.randn(1, 1, 1, 4)]], rope=rope(4),
                                           orig_positions=[0], new_positions=[1], backend=backend)


@pytest.mark.parametrize("op", list(OPS))
@pytest.mark.parametrize("backend", ["cuda", "triton", "cpu"])
def test_unavailable_backend(op, backend):
    """CPU tensors + an explicitly requested backend that cannot run them: a clear error naming the backend."""
    if backend in pskernels.available_backends(op):
        pytest.skip(f"{backend} is available for {op} here")
    with pytest.raises((RuntimeError, NotImplementedError, ValueError)) as ei:
        _calls_for(op, backend)()
    assert backend in str(ei.value) and "backend" in str(ei.value), str(ei.value)


@pytest.mark.parametrize("op", list(OPS))
def test_auto_backend_works_on_cpu(op):
    _calls_for(op, "auto")()


# ----------------------------------------------------------------------------------------------
# RopeSpec construction misuse
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    (dict(inv_freq=torch.ones(4), style="llama"), "style"),
    (dict(inv_freq=torch.ones(4), rotary_dim=6), "rotary_dim"),
    (dict(inv_freq=torch.ones(0)), "inv_freq"),
    (dict(inv_freq=torch.ones(2, 2)), "inv_freq"),
    (dict(inv_freq=torch.ones(4, dtype=torch.int64)), "inv_freq"),
    (dict(inv_freq=torch.tensor([1.0, float("nan")])), "inv_freq"),
    (dict(inv_freq=torch.tensor([float("inf"), 1.0])), "inv_freq"),
], ids=["style", "rotary_dim", "empty", "2d", "int", "nan", "inf"])
def test_ropespec_misuse(kwargs, name):
    with pytest.raises(ARG_ERRORS) as ei:
        RopeSpec(**kwargs)
    assert name in str(ei.value)


# ----------------------------------------------------------------------------------------------
# Validation happens before compute and does not depend on the values of valid inputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", pskernels.available_backends("multi_branch_attention"))
def test_all_empty_inputs_give_no_nan(backend):
    ks, vs = kv_(lens=(0, 0))
    out, lse = pskernels.multi_branch_attention(q_(), ks, vs, backend=backend)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    ks, vs = kv_()
    out, lse = pskernels.multi_branch_attention(q_(), ks, vs, seq_lens=torch.zeros(2, B, dtype=torch.int64),
                                                backend=backend)
    assert not torch.isnan(out).any() and torch.all(out == 0) and torch.all(lse == float("-inf"))
    out, lse = pskernels.merge_states([torch.zeros(B, HQ, LQ, D)] * 2, [torch.full((B, HQ, LQ), float("-inf"))] * 2,
                                      backend="torch")
    assert not torch.isnan(out).any() and torch.all(lse == float("-inf"))


def test_error_before_compute_for_bad_later_segment():
    """A bad segment late in the list is reported by index."""
    ks, vs = kv_(lens=(5, 3, 2))
    ks[2] = torch.randn(B, HKV, 2, D + 1)
    with pytest.raises(ARG_ERRORS) as ei:
        pskernels.multi_branch_attention(q_(), ks, vs)
    assert "keys[2]" in str(ei.value)


@pytest.mark.parametrize("kw, name, shapes", [
    (dict(left_pad=torch.zeros(3, B, dtype=torch.int64)), "left_pad", f"[S] = [2] or [S, B] = [2, {B}]"),
    (dict(position_shifts=[0, 1.5], rope=rope()), "position_shifts", f"[S] = [2] or [S, B] = [2, {B}]"),
    (dict(seq_lens=torch.tensor([5, 3])), "seq_lens", f"[S, B] = [2, {B}]"),  # no per-segment form
])
def test_per_segment_tables_name_the_shapes_they_accept(kw, name, shapes):
    with pytest.raises(ARG_ERRORS) as ei:
        mba(**kw)("torch")
    assert str(ei.value).startswith(f"{name}: expected") and shapes in str(ei.value), str(ei.value)


# ----------------------------------------------------------------------------------------------
# NaN / Inf in the data tensors: named errors under PSKERNELS_CHECK_FINITE=1, confined propagation without
# ----------------------------------------------------------------------------------------------
def _poison(t, index, value=float("nan")):
    t = t.clone()
    t[index] = value
    return t


def _nan_q():
    return _poison(q_(), (1, 2, 0, 3))


def _nan_key():
    ks, vs = kv_()
    ks[1] = _poison(ks[1], (0, 1, 2, 0))
    return ks, vs


def _inf_value():
    ks, vs = kv_()
    vs[0] = _poison(vs[0], (1, 0, 4, 5), float("inf"))
    return ks, vs


def _map_poisoned_key():
    ks = [[torch.randn(1, H_MAP, 4, D_MAP) for _ in range(NB)] for _ in range(NL)]
    ks[1][0] = _poison(ks[1][0], (0, 1, 3, 2))
    return ks


FINITE_CASES = [
    ("mba_q_nan", mba(q=_nan_q), "q"),
    ("mba_key_nan", mba(kv=_nan_key), "keys[1]"),
    ("mba_value_inf", mba(kv=_inf_value), "values[0]"),
    ("merge_lse_nan", _ms(lses=lambda: [_poison(torch.randn(B, HQ, LQ), (0, 1, 1)), torch.randn(B, HQ, LQ)]), "lses"),
    ("merge_lse_plus_inf", _ms(lses=lambda: [torch.randn(B, HQ, LQ), _poison(torch.randn(B, HQ, LQ), (1, 0, 2),
                                                                           float("inf"))]), "lses"),
    ("merge_out_nan", _ms(outs=lambda: [_poison(torch.randn(B, HQ, LQ, D), (0, 0, 0, 0)),
                                        torch.randn(B, HQ, LQ, D)]), "outs"),
    ("rotate_k_nan", _rk(k=lambda: _poison(torch.randn(B, HKV, 5, D), (1, 1, 4, 15))), "k"),
    ("map_key_nan", _map(keys=_map_poisoned_key), "keys[1][0]"),
    ("map_up_inf", _map(k_down=_kd, k_up=lambda: _poison(_ku(), (1, 0, 2, 3), float("-inf"))), "k_up"),
]


_OP_OF_PREFIX = {"mba": "multi_branch_attention", "merge": "merge_states", "rotate": "rotate_keys",
                 "map": "map_kv_caches"}


def _finite_cases():
    return [pytest.param(call, name, b, id=f"{cid}-{b}") for cid, call, name in FINITE_CASES
            for b in pskernels.available_backends(_OP_OF_PREFIX[cid.split("_")[0]]) if b != "cuda"]


@pytest.mark.parametrize("call,name,backend", _finite_cases())
def test_non_finite_data_raises_when_checked(call, name, backend, monkeypatch):
    monkeypatch.setenv("PSKERNELS_CHECK_FINITE", "1")
    with pytest.raises(ValueError, match="expected finite values") as ei:
        call(backend)
    assert _mentions(str(ei.value), name), str(ei.value)


def _finite_mask(out):
    if isinstance(out, torch.Tensor):
        return [torch.isfinite(out)]
    return [m for o in out for m in _finite_mask(o)]


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, in the Triton interpreter
@pytest.mark.parametrize("call,name,backend", _finite_cases())
def test_non_finite_data_is_not_scanned_by_default(call, name, backend, monkeypatch):
    """Without the opt-in scan the op runs (no host sync) and the non-finite value reaches exactly the outputs
    (out and lse) it reaches in the reference: never fewer (a silently finite answer), never more."""
    monkeypatch.delenv("PSKERNELS_CHECK_FINITE", raising=False)
    torch.manual_seed(0)
    got = _finite_mask(call(backend))
    torch.manual_seed(0)
    want = _finite_mask(call("torch"))
    assert not all(m.all() for m in want)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w), (g.logical_xor(w).nonzero()[:5], name)


@pytest.mark.parametrize("backend", [b for b in pskernels.available_backends("multi_branch_attention") if b != "cuda"])
def test_non_finite_values_stay_in_the_rows_that_read_them(backend):  # CPU tensors; the GPU case: test_gpu.py
    """A NaN key of batch row 0 poisons row 0 only (out and lse); padding beyond seq_lens, zero-filled as in HF
    caches, never creates a NaN."""
    torch.manual_seed(0)
    q = q_()
    ks, vs = kv_(lens=(6, 4))
    seq_lens = torch.tensor([[5, 6], [4, 2]])
    clean = pskernels.multi_branch_attention(q, ks, vs, seq_lens=seq_lens, backend=backend)
    assert torch.isfinite(clean[0]).all() and torch.isfinite(clean[1]).all()
    for where in ((0, 1, 2, 0), (0, 0, 4, 7)):
        ks_bad = [_poison(ks[0], where), ks[1]]
        out, lse = pskernels.multi_branch_attention(q, ks_bad, vs, seq_lens=seq_lens, backend=backend)
        heads = slice(where[1] * (HQ // HKV), (where[1] + 1) * (HQ // HKV))
        assert torch.isnan(out[0, heads]).all() and torch.isnan(lse[0, heads]).all(), (where, out[0], lse[0])
        assert torch.equal(out[1], clean[0][1]) and torch.equal(lse[1], clean[1][1])


# ----------------------------------------------------------------------------------------------
# The native (C++/CUDA) backends survive the whole catalogue in one process
# ----------------------------------------------------------------------------------------------
_CATALOGUE_SCRIPT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import pskernels
import test_validation as tv

native = {"cpu", "cuda"}
ran = 0
for op, cases in tv.OPS.items():
    for cid, call, exc, name in cases:
        for b in set(pskernels.available_backends(op)) & native:
            if call is None:
                continue
            try:
                call(b)
            except exc as e:
                assert tv._mentions(str(e), name), (op, cid, b, str(e))
                ran += 1
            else:
                raise AssertionError(f"{op}/{cid}/{b}: no error")
print("CASES", ran)
"""


def test_native_backends_survive_the_catalogue_in_a_subprocess():
    """Every misuse of the table through the native backends, one after another in a fresh process: each raises
    its named error and the process exits normally (a crash or hang in native code would fail this test)."""
    import os
    import subprocess
    import sys

    native = [b for op in OPS for b in pskernels.available_backends(op) if b in ("cpu", "cuda")]
    if not native:
        pytest.skip("no native backend built (PSKERNELS_NO_EXT=1 or extension missing)")
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", _CATALOGUE_SCRIPT, here], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"returncode {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"
    ran = int(r.stdout.split("CASES")[-1])
    expected = sum(1 for op, cases in OPS.items() for _, call, _, _ in cases if call is not None
                   for b in pskernels.available_backends(op) if b in ("cpu", "cuda"))
    assert ran == expected >= 90, (ran, expected)
