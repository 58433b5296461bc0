"""Rotate cached keys by a position delta."""
from __future__ import annotations

import torch

from .. import ref
from .._core import finite
from .._core.devices import check_same_or_cpu
from .._core.registry import register
from ..rope import RopeSpec
from .dispatch import needs_grad, resolve


def rotate_keys(k: torch.Tensor, delta, rope: RopeSpec, *, backend: str = "auto") -> torch.Tensor:
    """Return ``R(delta) k``: keys rotated at position ``p`` become keys rotated at ``p + delta``.

    Parameters
    ----------
    k : Tensor ``[B, H, L, D]``
        float16/bfloat16/float32, any strides with ``stride(-1) == 1``.
    delta : int, or int Tensor ``[B]`` (per row) or ``[B, L]`` (per token)
    rope : RopeSpec
        ``rope.rotary_dim <= D``; the remaining dims are copied unchanged.
    backend : {"auto", "triton", "cuda", "cpu", "torch"}

    Returns
    -------
    Tensor ``[B, H, L, D]``, new and contiguous, in k's dtype.

    Examples
    --------
    >>> import torch, pskernels
    >>> spec = pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    >>> k = torch.randn(1, 2, 5, 64)
    >>> back = pskernels.rotate_keys(pskernels.rotate_keys(k, 7, spec), -7, spec)
    >>> torch.allclose(back, k, atol=1e-5)
    True
    """
    if not isinstance(k, torch.Tensor) or k.ndim != 4:
        raise ValueError("k: expected a tensor [B, H, L, D], got "
                         f"{tuple(k.shape) if isinstance(k, torch.Tensor) else type(k).__name__}")
    if not k.is_floating_point():
        raise TypeError(f"k: expected a floating dtype, got {k.dtype}")
    if k.shape[-1] > 1 and k.stride(-1) != 1:
        raise ValueError(f"k: expected a contiguous last dimension (stride(-1) == 1), got strides {k.stride()}")
    if not isinstance(rope, RopeSpec):
        raise TypeError(f"rope: expected a pskernels.RopeSpec, got {type(rope).__name__}")
    if rope.rotary_dim > k.shape[-1]:
        raise ValueError(f"rope.rotary_dim: expected <= head_dim {k.shape[-1]}, got {rope.rotary_dim}")
    B, _, L, _ = k.shape
    d = torch.as_tensor(delta)
    check_same_or_cpu("delta", d, k.device, "k")
    if d.is_floating_point() or d.dtype == torch.bool:
        raise TypeError(f"delta: expected an int or an integer tensor, got dtype {d.dtype}")
    if d.ndim == 0:
        d = d.expand(B)
    if d.shape not in ((B,), (B, L)):
        raise ValueError(f"delta: expected an int, [B] = [{B}] or [B, L] = [{B}, {L}], got shape {tuple(d.shape)}")
    if bool((d != 0).any()) and not rope.supports_reindexing:
        raise ValueError(f"rope: rope_type {rope.rope_type!r} has length-dependent frequencies; keys cannot be "
                         "re-indexed")
    d = d.to(device=k.device, dtype=torch.int64)
    rope = rope.on(k.device, "k")
    if finite.enabled():
        finite.check_finite("k", k)
    return resolve("rotate_keys", backend, k.device, needs_grad(k))(k, d, rope)


@register("rotate_keys", "torch")
def _torch_impl(k, d, rope):
    return ref.rotate_keys(k, d, rope).contiguous()
