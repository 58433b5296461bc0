"""Log-sum-exp merge of partial attention states."""
from __future__ import annotations

import torch

from .. import ref
from .._core import finite
from .._core.registry import register
from .dispatch import needs_grad, resolve


def _stack(name, x, ndim):
    if isinstance(x, torch.Tensor):
        if x.ndim != ndim + 1:
            raise ValueError(f"{name}: expected a stacked tensor with {ndim + 1} dims or a sequence, got shape "
                             f"{tuple(x.shape)}")
        return x
    x = list(x)
    if not x:
        raise ValueError(f"{name}: expected at least one state, got an empty sequence")
    for i, t in enumerate(x):
        if not isinstance(t, torch.Tensor) or t.ndim != ndim:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}[{i}]: expected a {ndim}-dim tensor, got {got}")
        if t.shape != x[0].shape or t.dtype != x[0].dtype or t.device != x[0].device:
            raise ValueError(
                f"{name}[{i}]: expected shape {tuple(x[0].shape)}, dtype {x[0].dtype}, device {x[0].device} "
                f"(as {name}[0]), got {tuple(t.shape)}, {t.dtype}, {t.device}"
            )
    return torch.stack(x)


def merge_states(outs, lses, *, backend: str = "auto"):
    """Merge partial attention outputs computed over disjoint key sets.

    Parameters
    ----------
    outs : sequence of N Tensors ``[B, H, L, Dv]`` or Tensor ``[N, B, H, L, Dv]``
    lses : sequence of N float32 Tensors ``[B, H, L]`` or Tensor ``[N, B, H, L]``
        Natural-log LSE of each state; ``-inf`` marks an empty state (contributes nothing).
    backend : {"auto", "triton", "cuda", "cpu", "torch"}

    Returns
    -------
    out : Tensor ``[B, H, L, Dv]`` in the dtype of ``outs``
    lse : float32 Tensor ``[B, H, L]``

    Examples
    --------
    >>> import math, torch, pskernels
    >>> o, s = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3)
    >>> out, lse = pskernels.merge_states([o, o], [s, s])
    >>> torch.allclose(out, o, atol=1e-6), torch.allclose(lse, s + math.log(2))
    (True, True)
    """
    o = _stack("outs", outs, 4)
    s = _stack("lses", lses, 3)
    if o.shape[:-1] != s.shape:
        raise ValueError(f"lses: expected shape {tuple(o.shape[:-1])} (outs without the last dim), got "
                         f"{tuple(s.shape)}")
    if s.dtype != torch.float32:
        raise TypeError(f"lses: expected dtype float32, got {s.dtype}")
    if not o.is_floating_point():
        raise TypeError(f"outs: expected a floating dtype, got {o.dtype}")
    if o.device != s.device:
        raise ValueError(f"lses: expected device {o.device} (same as outs), got {s.device}")
    if finite.enabled():
        finite.check_finite("lses", s, allow_neg_inf=True)
        finite.check_finite("outs", o)
    return resolve("merge_states", backend, o.device, needs_grad(o, s))(o, s)


@register("merge_states", "torch")
def _torch_impl(o, s):
    return ref.merge_states(o, s)
