"""Argument validation and normalisation for ``multi_branch_attention``.

Every backend receives the same :class:`SegmentParams`; all checks happen here, before any
compute, with messages that name the argument and the expected vs actual value. The RoPE argument
is recognised by its interface (this leaf layer does not import ``pskernels.rope``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple, Sequence

import torch

from .devices import check_same_or_cpu, host_to_device
from .integers import int_tensor

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT_DTYPES = (torch.int32, torch.int64)


class HostTables(NamedTuple):
    """Host copies (int64, contiguous) of a plan's per-(segment, row) tables, taken when it was checked.

    What the launchers build their segment tables from, so that a run never waits for the device: the CUDA op
    checks lengths and padding on the host and sends them with its table, the Triton launcher packs all four
    into its per-row table (read from q's device, each would be a device-to-host copy, a synchronisation)."""

    seq_lens: torch.Tensor  # [S, B]
    left_pad: torch.Tensor  # [S, B]
    shifts: torch.Tensor  # [S, B]
    segment_positions: torch.Tensor | None  # [S, B], given with a sliding window only


@dataclass
class SegmentParams:
    """Normalised per-segment metadata (int tensors int64 on q's device; ``host`` holds their host copies)."""

    seq_lens: torch.Tensor  # [S, B] valid end of each segment row
    left_pad: torch.Tensor  # [S, B] leading masked slots
    host: HostTables
    shifts: torch.Tensor  # [S, B] position shift (query rotated by -shift)
    has_shift: bool
    rope: object | None  # pskernels.RopeSpec on q's device
    causal_last: bool
    scale: float
    softcap: float | None
    sliding_window: int | None
    segment_positions: torch.Tensor | None  # [S, B] virtual position of slot 0
    query_positions: torch.Tensor | None  # [B, Lq]
    groups: list  # segment -> group id
    # [S] int64 on the CPU: ``groups`` for the compiled ops, which build their segment tables on the host (on q's
    # device it cost a device-to-host copy, a synchronisation, per CUDA call)
    group_ids: torch.Tensor
    num_groups: int
    temperature: torch.Tensor | None  # [G, Hq] float32
    lse_scale: torch.Tensor | None  # [G, Hq]
    log_weight: torch.Tensor | None  # [G, Hq]
    # What a backend derives from these parameters alone (launch plans, device tables), kept for the plan's later
    # runs: a plan runs once per layer of a forward, with the same parameters every time.
    memo: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def has_knobs(self) -> bool:
        return self.temperature is not None or self.lse_scale is not None or self.log_weight is not None


def _desc(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"tensor(shape={tuple(t.shape)}, dtype={t.dtype}, device={t.device})"
    return f"{type(t).__name__}"


def _check_tensor(name, t, ndim, device=None, dtype=None, last_contiguous=True):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name}: expected device {device} (same as q), got {t.device}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name}: expected dtype {dtype} (same as q), got {t.dtype}")
    if last_contiguous and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name}: expected a contiguous last dimension (stride(-1) == 1), got strides {t.stride()}")


def _segments_valid(q, keys, values) -> bool:
    """Whether every key / value passes the per-tensor checks of ``_diagnose_segments``: 4-D, q's dtype and device,
    q's batch, one kv-head count dividing q's heads, q's head dim for keys, one value head dim, K and V of a
    segment the same length, unit last stride."""
    B, Hq, _, D = q.shape
    dt, dev = q.dtype, q.device
    try:
        Hkv, Dv = keys[0].shape[1], values[0].shape[3]
        if Hkv == 0 or Hq % Hkv != 0:
            return False
        for k, v in zip(keys, values):
            ks, vs = k.shape, v.shape
            if (len(ks) != 4 or len(vs) != 4 or ks[0] != B or vs[0] != B or ks[1] != Hkv or vs[1] != Hkv
                    or ks[3] != D or vs[3] != Dv or vs[2] != ks[2] or k.dtype != dt or v.dtype != dt
                    or k.device != dev or v.device != dev or (D > 1 and k.stride(3) != 1)
                    or (Dv > 1 and v.stride(3) != 1) or not isinstance(k, torch.Tensor)
                    or not isinstance(v, torch.Tensor)):
                return False
    except (AttributeError, IndexError, TypeError):
        return False
    return True


def _diagnose_segments(q, keys, values) -> None:
    """The checks ``_segments_valid`` makes at once, per tensor: raises naming the first offending argument."""
    B, Hq, _, D = q.shape
    dev = q.device
    Hkv = Dv = None
    for s, (k, v) in enumerate(zip(keys, values)):
        _check_tensor(f"keys[{s}]", k, 4, dev, q.dtype)
        _check_tensor(f"values[{s}]", v, 4, dev, q.dtype)
        if k.shape[0] != B:
            raise ValueError(f"keys[{s}]: expected batch {B} (q's), got shape {tuple(k.shape)}")
        if v.shape[0] != B:
            raise ValueError(f"values[{s}]: expected batch {B} (q's), got shape {tuple(v.shape)}")
        if k.shape[3] != D:
            raise ValueError(f"keys[{s}]: expected head_dim {D} (q's), got shape {tuple(k.shape)}")
        if Hkv is None:
            Hkv, Dv = k.shape[1], v.shape[3]
            if Hkv == 0 or Hq % Hkv != 0:
                raise ValueError(
                    f"keys[0]: number of kv heads must divide q's {Hq} heads (GQA), got {Hkv} (shape {tuple(k.shape)})"
                )
        if k.shape[1] != Hkv:
            raise ValueError(f"keys[{s}]: expected {Hkv} kv heads (keys[0]'s), got shape {tuple(k.shape)}")
        if v.shape[1] != Hkv or v.shape[2] != k.shape[2]:
            raise ValueError(
                f"values[{s}]: expected shape [{B}, {Hkv}, {k.shape[2]}, Dv] (matching keys[{s}]), got {tuple(v.shape)}"
            )
        if v.shape[3] != Dv:
            raise ValueError(f"values[{s}]: expected value head_dim {Dv} (values[0]'s), got shape {tuple(v.shape)}")


def _positive_float(name, x, expected: str = "a finite positive float") -> float:
    """``x`` as a float in (0, inf), or a ValueError naming ``name`` (not a number, <= 0, inf or NaN)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        v = float("nan")
    if not (0 < v < float("inf")):
        raise ValueError(f"{name}: expected {expected}, got {x!r}")
    return v


def _int_table(name, t, S, B, device, allow_1d=True):
    """Accept an ``[S, B]`` (or ``[S]``, broadcast over rows) integer tensor / nested list.

    Returns its host copy (what the checks read: no device-to-host copy when the caller passes it on the host)
    and its copy on ``device``.
    """
    shapes = f"[S] = [{S}] or [S, B] = [{S}, {B}]" if allow_1d else f"[S, B] = [{S}, {B}]"
    if not isinstance(t, torch.Tensor):
        try:
            t = int_tensor(name, t)
        except TypeError as e:
            raise TypeError(f"{name}: expected an integer tensor of shape {shapes}, got {_desc(t)}") from e
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name}: expected dtype int32 or int64, got {t.dtype}")
    if t.ndim == 1 and allow_1d and t.shape[0] == S:
        t = t[:, None].expand(S, B)
    elif t.ndim != 2 or tuple(t.shape) != (S, B):
        raise ValueError(f"{name}: expected shape {shapes}, got {tuple(t.shape)}")
    check_same_or_cpu(name, t, device, "q")
    return t.to("cpu", torch.int64, copy=True).contiguous(), _on_device(t, device)


def _on_device(t, device, dtype=torch.int64):
    """A copy of ``t`` on ``device`` (the plan owns what it checked), from the host without a wait."""
    if t.device == device:
        return t.to(dtype=dtype, copy=True)
    return host_to_device(t.to(dtype), device, "plan_multi_branch_attention (make the plan before capture and "
                                               "capture its runs)")


def _check_rope(rope, head_dim, device):
    """A RopeSpec (recognised by its interface: this leaf layer does not import ``pskernels.rope``) on ``device``."""
    if not all(hasattr(rope, a) for a in ("inv_freq", "rotary_dim", "supports_reindexing", "on")):
        raise TypeError(f"rope: expected a pskernels.RopeSpec, got {type(rope).__name__}")
    if rope.rotary_dim > head_dim:
        raise ValueError(f"rope.rotary_dim: expected <= head_dim {head_dim}, got {rope.rotary_dim}")
    return rope.on(device, "q")


KNOBS = ("temperature", "lse_scale", "log_weight")
"""The calibration arguments, per (segment group, query head); only ``log_weight`` may be <= 0."""


def with_knobs(params: SegmentParams, device, **knobs) -> SegmentParams:
    """``params`` with other values of calibration knobs it already has (the same checks as when it was made):
    one layout, e.g. the layers of a forward, calibrated per call."""
    changed = {}
    for name, x in knobs.items():
        if x is None:
            continue
        had = getattr(params, name)
        if had is None:
            raise ValueError(f"{name}: the plan was made without it; give it when planning to set it per run")
        changed[name] = _knob(name, x, *had.shape, device, positive=name != "log_weight")
    # a fresh memo: what a backend derived from the knobs (Triton's setup) must not outlive them
    return dataclasses.replace(params, memo={}, **changed) if changed else params


def _knob(name, x, G, Hq, device, positive):
    if x is None:
        return None
    t = torch.as_tensor(x, dtype=torch.float32) if not isinstance(x, torch.Tensor) else x
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating tensor, got dtype {t.dtype}")
    if t.ndim == 0:
        t = t.expand(G, Hq)
    elif t.ndim == 1:
        if t.shape[0] != G:
            raise ValueError(f"{name}: expected shape [G] = [{G}] or [G, Hq] = [{G}, {Hq}], got {tuple(t.shape)}")
        t = t[:, None].expand(G, Hq)
    elif t.ndim != 2 or tuple(t.shape) != (G, Hq):
        raise ValueError(f"{name}: expected shape [G] = [{G}] or [G, Hq] = [{G}, {Hq}], got {tuple(t.shape)}")
    check_same_or_cpu(name, t, device, "q")
    if not torch.isfinite(t.detach()).all():
        raise ValueError(f"{name}: expected finite values")
    if positive and not (t.detach() > 0).all():
        raise ValueError(f"{name}: expected values > 0, got min {t.detach().min().item():g}")
    if t.requires_grad:  # trainable knobs (a mapper's): the copy stays in the autograd graph
        return t.to(device=device, dtype=torch.float32, copy=True)
    return _on_device(t, device, torch.float32)


def normalize_segments(
    q: torch.Tensor,
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    *,
    seq_lens=None,
    position_shifts=None,
    rope=None,
    causal_last: bool = True,
    scale: float | None = None,
    softcap: float | None = None,
    sliding_window: int | None = None,
    segment_positions=None,
    query_positions=None,
    left_pad=None,
    temperature=None,
    lse_scale=None,
    log_weight=None,
    segment_groups=None,
) -> SegmentParams:
    _check_tensor("q", q, 4)
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q: expected dtype float16, bfloat16, float32 or float64, got {q.dtype}")
    B, Hq, Lq, D = q.shape
    if D < 1:
        raise ValueError(f"q: expected a head dim (last dimension) >= 1, got shape {tuple(q.shape)}")
    if isinstance(keys, torch.Tensor) or isinstance(values, torch.Tensor):
        raise TypeError("keys/values: expected sequences (list/tuple) of per-segment tensors, got a single tensor")
    keys, values = list(keys), list(values)
    if len(keys) == 0:
        raise ValueError("keys: expected at least one segment, got an empty sequence")
    if len(keys) != len(values):
        raise ValueError(f"values: expected {len(keys)} segments (same as keys), got {len(values)}")
    S = len(keys)
    dev = q.device
    # one cheap test of every key / value (each call of each layer); the per-tensor checks that name the first
    # offending argument run only when it fails
    if not _segments_valid(q, keys, values):
        _diagnose_segments(q, keys, values)

    Ls = torch.tensor([k.shape[2] for k in keys], dtype=torch.int64)
    if seq_lens is None:
        lc = Ls[:, None].expand(S, B).contiguous()
        lens = _on_device(lc, dev)
    else:
        lc, lens = _int_table("seq_lens", seq_lens, S, B, dev, allow_1d=False)
        if (lc < 0).any():
            raise ValueError(f"seq_lens: expected values >= 0, got min {lc.min().item()}")
        over = lc > Ls[:, None]
        if over.any():
            s, b = (int(i) for i in over.nonzero()[0])
            raise ValueError(f"seq_lens[{s}, {b}] = {lc[s, b].item()} exceeds the segment's length L_{s} = "
                             f"{Ls[s].item()}")
    if left_pad is None:
        pc = torch.zeros(S, B, dtype=torch.int64)
        pad = torch.zeros(S, B, dtype=torch.int64, device=dev)
    else:
        pc, pad = _int_table("left_pad", left_pad, S, B, dev)
        if (pc < 0).any() or (pc > lc).any():
            raise ValueError(f"left_pad: expected 0 <= left_pad <= seq_lens elementwise, got {pc.tolist()} vs "
                             f"{lc.tolist()}")

    if position_shifts is None:
        host_shifts = torch.zeros(S, B, dtype=torch.int64)
        shifts = torch.zeros(S, B, dtype=torch.int64, device=dev)
        has_shift = False
    else:
        host_shifts, shifts = _int_table("position_shifts", position_shifts, S, B, dev)
        has_shift = bool((host_shifts != 0).any())
    if rope is not None:
        rope = _check_rope(rope, D, dev)
    if has_shift:
        if rope is None:
            raise ValueError("rope: position_shifts has non-zero entries, so a RopeSpec is required to re-index keys")
        if not rope.supports_reindexing:
            raise ValueError(
                f"rope: rope_type {rope.rope_type!r} has length-dependent frequencies; segments cannot be re-indexed "
                "(use position_shifts of 0, e.g. the 'parallel' scheme with natively positioned branches)"
            )

    if scale is None:
        scale = D ** -0.5
    scale = _positive_float("scale", scale)
    if softcap is not None:
        softcap = _positive_float("softcap", softcap, "None or a finite positive float")

    host_seg_pos = seg_pos = qpos = None
    if sliding_window is not None:
        if isinstance(sliding_window, bool) or int(sliding_window) != sliding_window or sliding_window <= 0:
            raise ValueError(f"sliding_window: expected None or a positive int, got {sliding_window!r}")
        sliding_window = int(sliding_window)
        if segment_positions is None:
            raise ValueError("segment_positions: required with sliding_window (virtual position of each segment's "
                             "slot 0)")
        host_seg_pos, seg_pos = _int_table("segment_positions", segment_positions, S, B, dev)
        if query_positions is None:
            if not causal_last:
                raise ValueError("query_positions: required with sliding_window when causal_last=False")
            qpos = seg_pos[-1, :, None] + lens[-1, :, None] - Lq + torch.arange(Lq, device=dev)
        else:
            qp = torch.as_tensor(query_positions)
            if qp.dtype not in _INT_DTYPES or qp.ndim != 2 or tuple(qp.shape) != (B, Lq):
                raise ValueError(f"query_positions: expected an integer tensor [B, Lq] = [{B}, {Lq}], got {_desc(qp)}")
            check_same_or_cpu("query_positions", qp, dev, "q")
            qpos = _on_device(qp, dev)

    if segment_groups is None:
        groups = list(range(S))
    else:
        ids = segment_groups.tolist() if isinstance(segment_groups, torch.Tensor) else segment_groups
        groups = [int(g) for g in ids]
        if len(groups) != S or min(groups) < 0:
            raise ValueError(f"segment_groups: expected {S} non-negative group ids (one per segment), got {groups}")
        missing = sorted(set(range(max(groups) + 1)) - set(groups))
        if missing:
            raise ValueError(f"segment_groups: group ids must be 0..G-1 with none unused, missing {missing}")
    G = max(groups) + 1
    temp = _knob("temperature", temperature, G, Hq, dev, positive=True)
    lsc = _knob("lse_scale", lse_scale, G, Hq, dev, positive=True)
    lw = _knob("log_weight", log_weight, G, Hq, dev, positive=False)

    return SegmentParams(
        seq_lens=lens, left_pad=pad, host=HostTables(lc, pc, host_shifts, host_seg_pos), shifts=shifts,
        has_shift=has_shift, rope=rope,
        causal_last=bool(causal_last), scale=scale, softcap=softcap, sliding_window=sliding_window,
        segment_positions=seg_pos, query_positions=qpos, groups=groups,
        group_ids=torch.tensor(groups, dtype=torch.int64), num_groups=G, temperature=temp, lse_scale=lsc,
        log_weight=lw,
    )
