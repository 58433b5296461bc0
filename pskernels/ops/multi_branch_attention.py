"""Attention over a list of separately stored KV segments (prefix, branches, own tokens)."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ref
from .._segments import SegmentParams, normalize_segments
from ..rope import RopeSpec
from . import _finite
from ._backend import needs_grad, register, resolve


def multi_branch_attention(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    seq_lens: torch.Tensor | None = None,
    position_shifts: torch.Tensor | None = None,
    rope: RopeSpec | None = None,
    causal_last: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    segment_positions: torch.Tensor | None = None,
    query_positions: torch.Tensor | None = None,
    left_pad: torch.Tensor | None = None,
    temperature: torch.Tensor | float | None = None,
    lse_scale: torch.Tensor | float | None = None,
    log_weight: torch.Tensor | float | None = None,
    segment_groups: Sequence[int] | None = None,
    backend: str = "auto",
):
    """Softmax attention of ``q`` over ``S`` key/value segments, without concatenating them.

    Segment ``s`` is re-indexed by ``position_shifts[s]``: because RoPE is relative, this rotates the
    *query* by ``-shift`` for that segment, so cached keys are never rewritten. Segments are combined by
    log-sum-exp merging; an empty segment (or row) contributes nothing and never produces NaN.

    Parameters
    ----------
    q : Tensor ``[B, Hq, Lq, D]``
        float16/bfloat16/float32, RoPE already applied at the queries' (virtual) positions.
    keys, values : sequence of S Tensors ``[B, Hkv, L_s, D]`` / ``[B, Hkv, L_s, Dv]``
        Same dtype and device as ``q``; any strides with ``stride(-1) == 1`` (HF's transposed views
        are read without copies). ``Hq % Hkv == 0``: query head ``h`` reads kv head ``h // (Hq // Hkv)``.
    seq_lens : int Tensor ``[S, B]``, optional
        Valid length of each segment row (right padding beyond; 0 = absent). Default: ``L_s``.
    position_shifts : int Tensor ``[S, B]`` or ``[S]``, optional
        Segment ``s`` is seen at original position ``+ shift``. Non-zero shifts need ``rope``.
    rope : RopeSpec, optional
        Frequencies/style used to rotate the query by ``-shift`` (``RopeSpec.from_model(model)``).
    causal_last : bool
        The last segment holds the queries' own tokens: causal, bottom-right aligned (query ``i`` sees
        own slot ``j`` iff ``j <= seq_lens[-1] - Lq + i``).
    scale : float, optional
        Score scale, default ``D ** -0.5``.
    softcap : float, optional
        Logit soft-capping ``c * tanh(score / c)`` (Gemma 2), applied after ``scale``.
    sliding_window : int, optional
        Keys with ``query_pos - key_pos >= sliding_window`` are masked, using virtual positions:
        slot ``j`` of segment ``s`` sits at ``segment_positions[s] + j``.
    segment_positions : int Tensor ``[S, B]`` or ``[S]``, optional
        Virtual position of slot 0 of each segment (required with ``sliding_window``).
    query_positions : int Tensor ``[B, Lq]``, optional
        Virtual positions of the queries; with ``causal_last`` defaults to those of the last
        ``Lq`` own slots.
    left_pad : int Tensor ``[S, B]``, optional
        Number of leading masked slots per segment row (HF left padding of the own tokens).
    temperature, lse_scale, log_weight : float or Tensor ``[G]`` / ``[G, Hq]``, optional
        Calibration per group ``g`` (APE-style): group ``g`` enters the final merge with logit
        ``lse_scale * T * LSE_g(scores / T) + log_weight`` and values ``softmax(scores / T) V``.
        Defaults (1, 1, 0) give exact attention.
    segment_groups : sequence of S ints, optional
        Group id per segment (``0..G-1``); segments of one group share one softmax. Default: one
        group per segment.
    backend : {"auto", "triton", "cuda", "cpu", "torch"}

    Returns
    -------
    out : Tensor ``[B, Hq, Lq, Dv]`` in q's dtype
    lse : float32 Tensor ``[B, Hq, Lq]``
        Natural-log log-sum-exp of the (calibrated) scores; ``-inf`` for queries that see no key.

    Examples
    --------
    >>> import torch, pskernels
    >>> q = torch.randn(1, 8, 4, 64)
    >>> prefix, branch, own = (torch.randn(1, 2, n, 64) for n in (16, 32, 4))
    >>> out, lse = pskernels.multi_branch_attention(q, [prefix, branch, own], [prefix, branch, own])
    >>> out.shape, lse.shape
    (torch.Size([1, 8, 4, 64]), torch.Size([1, 8, 4]))
    """
    params = normalize_segments(
        q, keys, values, seq_lens=seq_lens, position_shifts=position_shifts, rope=rope, causal_last=causal_last,
        scale=scale, softcap=softcap, sliding_window=sliding_window, segment_positions=segment_positions,
        query_positions=query_positions, left_pad=left_pad, temperature=temperature, lse_scale=lse_scale,
        log_weight=log_weight, segment_groups=segment_groups,
    )
    return attend_normalized(q, keys, values, params, backend)


def attend_normalized(q, keys, values, params: SegmentParams, backend: str = "auto"):
    """:func:`multi_branch_attention` with arguments :func:`normalize_segments` already checked.

    For callers that validate once and attend many times with the same layout (the HF integration
    reuses one validation for every layer of a forward whose segment shapes match).
    """
    if _finite.enabled():
        _finite.check_finite("q", q)
        for s, (k, v) in enumerate(zip(keys, values)):
            _finite.check_finite(f"keys[{s}]", k)
            _finite.check_finite(f"values[{s}]", v)
    if q.numel() == 0:  # no query rows: nothing to attend (no backend has to handle empty grids)
        B, Hq, Lq, _ = q.shape
        return q.new_zeros(B, Hq, Lq, values[0].shape[-1]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
    grad = needs_grad(q, *keys, *values, params.temperature, params.lse_scale, params.log_weight)
    impl = resolve("multi_branch_attention", backend, q.device, grad)
    return impl(q, list(keys), list(values), params)


@register("multi_branch_attention", "torch")
def _torch_impl(q, keys, values, params: SegmentParams):
    return ref.multi_branch_attention(q, keys, values, params)
