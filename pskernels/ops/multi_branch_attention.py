"""Attention over a list of separately stored KV segments (prefix, branches, own tokens).

Two ways in: :func:`multi_branch_attention` validates and attends in one call;
:func:`plan_multi_branch_attention` validates a segment layout once and returns an :class:`AttentionPlan`
whose :meth:`~AttentionPlan.run` attends many times with tensors of that layout (the layers of a forward, the
heads of a model that share one layout), paying only a shape/dtype/device comparison per call.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import ref
from .._core import finite
from .._core.registry import register
from .._core.segments import SegmentParams, normalize_segments, with_knobs
from ..rope import RopeSpec
from .dispatch import needs_grad, resolve, select

OP = "multi_branch_attention"


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
    return plan_multi_branch_attention(
        q, keys, values, seq_lens=seq_lens, position_shifts=position_shifts, rope=rope, causal_last=causal_last,
        scale=scale, softcap=softcap, sliding_window=sliding_window, segment_positions=segment_positions,
        query_positions=query_positions, left_pad=left_pad, temperature=temperature, lse_scale=lse_scale,
        log_weight=log_weight, segment_groups=segment_groups, backend=backend,
    ).run(q, keys, values)


def plan_multi_branch_attention(
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
) -> "AttentionPlan":
    """Validate a segment layout once; the returned plan attends with any tensors of that layout.

    Takes exactly the arguments of :func:`multi_branch_attention`. ``q``, ``keys`` and ``values`` serve as
    templates: their shapes, dtype and device define the layout (their values are not read). Every check of
    :func:`multi_branch_attention` runs here, and the backend is resolved here.

    Returns
    -------
    AttentionPlan
        ``plan.run(q, keys, values) -> (out, lse)`` for tensors with the templates' shapes, dtype and device
        (any strides with ``stride(-1) == 1``); other shapes, dtypes or devices raise ``ValueError`` naming the
        argument, a non-unit last stride an error of the backend naming it.

    Examples
    --------
    >>> import torch, pskernels
    >>> prefix, branch, own = (torch.randn(1, 2, n, 64) for n in (16, 32, 4))
    >>> plan = pskernels.plan_multi_branch_attention(torch.empty(1, 8, 4, 64), [prefix, branch, own],
    ...                                              [prefix, branch, own])
    >>> for layer in range(3):  # e.g. the layers of a model, each with its own tensors of the same shapes
    ...     out, lse = plan.run(torch.randn(1, 8, 4, 64), [prefix, branch, own], [prefix, branch, own])
    >>> out.shape, lse.shape, lse.dtype
    (torch.Size([1, 8, 4, 64]), torch.Size([1, 8, 4]), torch.float32)
    """
    params = normalize_segments(
        q, keys, values, seq_lens=seq_lens, position_shifts=position_shifts, rope=rope, causal_last=causal_last,
        scale=scale, softcap=softcap, sliding_window=sliding_window, segment_positions=segment_positions,
        query_positions=query_positions, left_pad=left_pad, temperature=temperature, lse_scale=lse_scale,
        log_weight=log_weight, segment_groups=segment_groups,
    )
    return AttentionPlan(q, keys, values, params, backend)


class AttentionPlan:
    """A validated layout of :func:`multi_branch_attention`; build it with :func:`plan_multi_branch_attention`.

    Attributes
    ----------
    params : SegmentParams
        The normalised segment metadata every backend receives.
    backend : str
        The backend name the plan resolved (``"cpu"``, ``"cuda"``, ``"triton"`` or ``"torch"``).
    """

    __slots__ = ("params", "backend", "_requested", "_impl", "_q_shape", "_k_shapes", "_v_shapes", "_dtype",
                 "_device", "_scan_finite")

    def __init__(self, q, keys, values, params: SegmentParams, backend: str):
        self.params = params
        self._requested = backend
        self._q_shape = q.shape
        self._k_shapes, self._v_shapes = [k.shape for k in keys], [v.shape for v in values]
        self._dtype, self._device = q.dtype, q.device
        self._scan_finite = finite.enabled()  # read once: the environment lookup would cost more than the check
        grad = needs_grad(q, *keys, *values, params.temperature, params.lse_scale, params.log_weight)
        self.backend, self._impl = select(OP, backend, q.device, grad)

    def _check(self, q, keys, values) -> None:
        # Runs once per call (per layer of a forward, over dozens of segments), so the fast path reads only the
        # cheapest attributes (``is_cpu`` costs less than ``device``) and a per-tensor diagnosis runs only when
        # something is off. A non-unit last stride is refused by the kernels themselves (TORCH_CHECK, the Triton
        # launcher); the reference computes on any strides.
        dt, dev = self._dtype, self._device
        if not isinstance(q, torch.Tensor) or q.shape != self._q_shape or q.dtype != dt or q.device != dev:
            raise ValueError(f"q: expected shape {tuple(self._q_shape)}, dtype {dt}, device {dev} (the plan's), got "
                             f"{_desc(q)}")
        try:
            same = (len(keys) == len(self._k_shapes) and len(values) == len(self._v_shapes)
                    and [t.shape for t in keys] == self._k_shapes and [t.shape for t in values] == self._v_shapes)
            if same:
                tensors = (*keys, *values)
                if dev.type == "cpu":
                    same = all([t.dtype is dt and t.is_cpu for t in tensors])
                else:
                    same = all([t.dtype is dt and t.device == dev for t in tensors])
        except AttributeError:  # not a tensor
            same = False
        if not same:
            self._diagnose(keys, values)

    def _diagnose(self, keys, values):
        dt, dev = self._dtype, self._device
        if len(keys) != len(self._k_shapes) or len(values) != len(self._v_shapes):
            raise ValueError(f"keys/values: expected {len(self._k_shapes)} segments (the plan's), got "
                             f"{len(keys)} / {len(values)}")
        for name, ts, shapes in (("keys", keys, self._k_shapes), ("values", values, self._v_shapes)):
            for s, (t, shape) in enumerate(zip(ts, shapes)):
                if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dt or t.device != dev:
                    raise ValueError(f"{name}[{s}]: expected shape {tuple(shape)}, dtype {dt}, device {dev} (the "
                                     f"plan's), got {_desc(t)}")

    def run(self, q: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], *,
            temperature=None, lse_scale=None, log_weight=None):
        """Attend with the plan's layout.

        Parameters
        ----------
        q, keys, values : Tensors with the shapes, dtype and device the plan was made with.
        temperature, lse_scale, log_weight : optional
            This call's calibration, for a plan made with these knobs (checked as when planning): e.g. a mapper's
            per-layer knobs over the layers of a forward. None: the plan's.

        Returns
        -------
        out : Tensor ``[B, Hq, Lq, Dv]`` in q's dtype
        lse : float32 Tensor ``[B, Hq, Lq]`` (natural log; ``-inf`` for queries that see no key)
        """
        keys, values = list(keys), list(values)
        self._check(q, keys, values)
        p = self.params
        if temperature is not None or lse_scale is not None or log_weight is not None:
            p = with_knobs(p, self._device, temperature=temperature, lse_scale=lse_scale, log_weight=log_weight)
        if self._scan_finite:
            finite.check_finite("q", q)
            for s, (k, v) in enumerate(zip(keys, values)):
                finite.check_finite(f"keys[{s}]", k)
                finite.check_finite(f"values[{s}]", v)
        if q.numel() == 0:  # no query rows: nothing to attend (no backend has to handle empty grids)
            B, Hq, Lq, _ = q.shape
            return q.new_zeros(B, Hq, Lq, values[0].shape[-1]), q.new_zeros(B, Hq, Lq, dtype=torch.float32)
        impl = self._impl
        if self.backend != "torch" and torch.is_grad_enabled() and needs_grad(q, *keys, *values, p.temperature,
                                                                               p.lse_scale, p.log_weight):
            impl = resolve(OP, self._requested, q.device, True)
        return impl(q, keys, values, p)

    def __repr__(self) -> str:
        S = len(self._k_shapes)
        return f"AttentionPlan(q={tuple(self._q_shape)}, segments={S}, dtype={self._dtype}, backend={self.backend!r})"


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}, strides {t.stride()}"
    return type(t).__name__


@register(OP, "torch")
def _torch_impl(q, keys, values, params: SegmentParams):
    return ref.multi_branch_attention(q, keys, values, params)
