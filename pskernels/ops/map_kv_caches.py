"""Batched per-layer cache mapping: un-rotate, low-rank residual transform, re-rotate."""
from __future__ import annotations

import torch

from .. import ref
from .._core import finite
from .._core.devices import check_same_or_cpu
from .._core.registry import register
from ..rope import RopeSpec
from .dispatch import needs_grad, resolve


def _positions(name, t, NL, N, B, device):
    t = torch.as_tensor(t)
    if t.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    if t.ndim == 1 and t.shape[0] == N:
        t = t[None, :, None].expand(NL, N, B)
    elif t.ndim == 2 and tuple(t.shape) == (N, B):
        t = t[None].expand(NL, N, B)
    elif not (t.ndim == 3 and tuple(t.shape) == (NL, N, B)):
        raise ValueError(
            f"{name}: expected shape [N] = [{N}], [N, B] = [{N}, {B}] or [layers, N, B] = [{NL}, {N}, {B}], "
            f"got {tuple(t.shape)}"
        )
    check_same_or_cpu(name, t, device, "the caches")
    return t.to(device=device, dtype=torch.int64)


def _transform(prefix, down, up, gate, NL, H, D, device):
    if down is None and up is None:
        if gate is not None:
            raise ValueError(f"{prefix}_gate: given without {prefix}_down/{prefix}_up")
        return None, None, None
    if down is None or up is None:
        raise ValueError(f"{prefix}_down and {prefix}_up: give both or neither")
    for name, t in ((f"{prefix}_down", down), (f"{prefix}_up", up)):
        if not isinstance(t, torch.Tensor) or t.ndim != 4 or not t.is_floating_point():
            raise ValueError(f"{name}: expected a floating tensor [layers, Hkv, ...] with 4 dims, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name}: expected device {device} (same as the caches), got {t.device}")
    r = down.shape[-1]
    if tuple(down.shape) != (NL, H, D, r):
        raise ValueError(f"{prefix}_down: expected shape [layers, Hkv, D, r] = [{NL}, {H}, {D}, r], got "
                         f"{tuple(down.shape)}")
    if tuple(up.shape) != (NL, H, r, D):
        raise ValueError(f"{prefix}_up: expected shape [layers, Hkv, r, D] = [{NL}, {H}, {r}, {D}], got "
                         f"{tuple(up.shape)}")
    if gate is not None:
        if not isinstance(gate, torch.Tensor) or tuple(gate.shape) != (NL, H) or not gate.is_floating_point():
            raise ValueError(f"{prefix}_gate: expected a floating tensor [layers, Hkv] = [{NL}, {H}], got "
                             f"{tuple(gate.shape) if isinstance(gate, torch.Tensor) else type(gate).__name__}")
        if gate.device != device:
            raise ValueError(f"{prefix}_gate: expected device {device}, got {gate.device}")
    return down, up, gate


def map_kv_caches(
    keys,
    values,
    *,
    rope: RopeSpec,
    orig_positions,
    new_positions,
    k_down: torch.Tensor | None = None,
    k_up: torch.Tensor | None = None,
    k_gate: torch.Tensor | None = None,
    v_down: torch.Tensor | None = None,
    v_up: torch.Tensor | None = None,
    v_gate: torch.Tensor | None = None,
    backend: str = "auto",
):
    """Map every (layer, branch) cache in one call: re-index keys and apply a learned transform.

    For layer ``l``, branch ``n``, row ``b``, slot ``j`` (original position ``o = orig + j``, new
    position ``p = new + j``)::

        k_out = R(p) (k_raw + sigmoid(k_gate[l]) * (k_raw @ k_down[l]) @ k_up[l]),  k_raw = R(-o) k
        v_out = v + sigmoid(v_gate[l]) * (v @ v_down[l]) @ v_up[l]

    per kv head. Without a transform (``k_down=None``) keys get the pure delta rotation ``R(p - o)``.
    Differentiable on the ``"torch"`` backend (gradients reach the transform parameters).

    Parameters
    ----------
    keys, values : ``[layers][N]`` nested sequences of Tensors ``[B, Hkv, L_n, D]`` / ``[B, Hkv, L_n, Dv]``
        One list of N branch caches per layer (same N, B, Hkv, D, dtype and device everywhere).
    rope : RopeSpec
    orig_positions, new_positions : int Tensor ``[N]``, ``[N, B]`` or ``[layers, N, B]``
        Position of slot 0 of each branch row, before and after re-indexing.
    k_down, k_up : Tensor ``[layers, Hkv, D, r]`` / ``[layers, Hkv, r, D]``, optional
    k_gate : Tensor ``[layers, Hkv]``, optional
        Gate logits (sigmoid); ungated when None.
    v_down, v_up, v_gate : same for values (with ``Dv``).
    backend : {"auto", "triton", "cuda", "cpu", "torch"}

    Returns
    -------
    keys_out, values_out : ``[layers][N]`` nested lists of new contiguous Tensors in the input dtype.

    Examples
    --------
    >>> import torch, pskernels
    >>> spec = pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 32, 2) / 32))
    >>> ks = [[torch.randn(1, 2, 5, 32)] for _ in range(3)]
    >>> ko, vo = pskernels.map_kv_caches(ks, ks, rope=spec, orig_positions=[10], new_positions=[4])
    >>> torch.allclose(ko[0][0], pskernels.rotate_keys(ks[0][0], -6, spec), atol=1e-5)
    True
    """
    if isinstance(keys, torch.Tensor) or isinstance(values, torch.Tensor):
        raise TypeError("keys/values: expected nested sequences [layers][branches] of tensors")
    keys, values = [list(x) for x in keys], [list(x) for x in values]
    if not keys or not keys[0]:
        raise ValueError("keys: expected at least one layer with at least one branch")
    if len(values) != len(keys):
        raise ValueError(f"values: expected {len(keys)} layers (as keys), got {len(values)}")
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a pskernels.RopeSpec, got {type(rope).__name__}")
    NL, N = len(keys), len(keys[0])
    k0, v0 = keys[0][0], values[0][0]
    if not isinstance(k0, torch.Tensor) or k0.ndim != 4 or not isinstance(v0, torch.Tensor) or v0.ndim != 4:
        raise ValueError("keys[0][0]/values[0][0]: expected tensors [B, Hkv, L, D]")
    B, H, _, D = k0.shape
    Dv = v0.shape[-1]
    dev, dt = k0.device, k0.dtype
    if not k0.is_floating_point():
        raise TypeError(f"keys[0][0]: expected a floating dtype, got {dt}")
    for l in range(NL):
        if len(keys[l]) != N or len(values[l]) != N:
            raise ValueError(f"keys[{l}]/values[{l}]: expected {N} branches (as keys[0]), got "
                             f"{len(keys[l])}/{len(values[l])}")
        for n in range(N):
            k, v = keys[l][n], values[l][n]
            for name, t, last in ((f"keys[{l}][{n}]", k, D), (f"values[{l}][{n}]", v, Dv)):
                if not isinstance(t, torch.Tensor) or t.ndim != 4:
                    raise ValueError(f"{name}: expected a tensor [B, Hkv, L, D], got "
                                     f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
                if t.shape[0] != B or t.shape[1] != H or t.shape[3] != last:
                    raise ValueError(f"{name}: expected shape [{B}, {H}, L, {last}], got {tuple(t.shape)}")
                if t.dtype != dt or t.device != dev:
                    raise ValueError(f"{name}: expected dtype {dt} on {dev} (as keys[0][0]), got {t.dtype} on "
                                     f"{t.device}")
                if t.shape[-1] > 1 and t.stride(-1) != 1:
                    raise ValueError(f"{name}: expected a contiguous last dimension, got strides {t.stride()}")
            if v.shape[2] != k.shape[2]:
                raise ValueError(f"values[{l}][{n}]: expected length {k.shape[2]} (as keys), got {v.shape[2]}")
    if rope.rotary_dim > D:
        raise ValueError(f"rope.rotary_dim: expected <= head_dim {D}, got {rope.rotary_dim}")
    orig = _positions("orig_positions", orig_positions, NL, N, B, dev)
    new = _positions("new_positions", new_positions, NL, N, B, dev)
    params = {}
    params["k_down"], params["k_up"], params["k_gate"] = _transform("k", k_down, k_up, k_gate, NL, H, D, dev)
    params["v_down"], params["v_up"], params["v_gate"] = _transform("v", v_down, v_up, v_gate, NL, H, Dv, dev)
    if not rope.supports_reindexing and (params["k_down"] is not None or bool((orig != new).any())):
        raise ValueError(f"rope: rope_type {rope.rope_type!r} has length-dependent frequencies; keys cannot be "
                         "re-indexed")
    rope = rope.on(dev, "keys[0][0]")
    if finite.enabled():
        for l, (kl, vl) in enumerate(zip(keys, values)):
            for n, (k, v) in enumerate(zip(kl, vl)):
                finite.check_finite(f"keys[{l}][{n}]", k)
                finite.check_finite(f"values[{l}][{n}]", v)
        for name, t in params.items():
            finite.check_finite(name, t)
    grad = needs_grad(*(t for layer in keys + values for t in layer), *params.values())
    return resolve("map_kv_caches", backend, dev, grad)(keys, values, orig, new, rope, params)


@register("map_kv_caches", "torch")
def _torch_impl(keys, values, orig, new, rope, params):
    ko, vo = [], []
    for l in range(len(keys)):
        a, b = ref.map_kv_caches([keys[l]], [values[l]], orig[l], new[l], rope,
                                 {k: (None if t is None else t[l : l + 1]) for k, t in params.items()})
        ko.append([t.contiguous() for t in a[0]])
        vo.append([t.contiguous() for t in b[0]])
    return ko, vo
