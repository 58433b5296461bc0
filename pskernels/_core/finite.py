"""Opt-in scan of the ops' data tensors for NaN/Inf: ``PSKERNELS_CHECK_FINITE=1``.

Configuration arguments (scale, softcap, calibration knobs, RoPE frequencies) are always checked for finite
values. Data tensors (queries, caches, partial states, mapper weights) are not by default: a scan reads every
element and, on a GPU, synchronises with the host, which costs as much as the op itself on a decode step.
Without the scan a non-finite input reaches exactly the outputs that depend on it, as in the references (out
and lse alike); empty segments and padding never create one. With the scan (a debugging aid, like
``torch.autograd.detect_anomaly``) the op raises before any compute, naming the argument and the first bad
index. Padding slots of keys/values (beyond ``seq_lens``) are scanned too: the reference multiplies them by
zero weights, and ``0 * NaN`` is NaN.
"""
from __future__ import annotations

import os

import torch

ENV = "PSKERNELS_CHECK_FINITE"


def enabled() -> bool:
    return os.environ.get(ENV, "0") == "1"


def check_finite(name: str, t: torch.Tensor | None, *, allow_neg_inf: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` when ``t`` holds NaN or +-Inf (``-inf`` allowed if asked)."""
    if t is None or t.device.type == "meta" or t.numel() == 0 or not t.is_floating_point():
        return
    t = t.detach()
    bad = torch.isnan(t) | (t == float("inf")) if allow_neg_inf else ~torch.isfinite(t)
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise ValueError(f"{name}: expected finite values ({ENV}=1), got {int(bad.sum())} non-finite, the first "
                         f"{t[first].item()} at index {first}")
