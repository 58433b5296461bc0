"""Integer arguments given as lists, numbers or tensors: converted without truncation."""
from __future__ import annotations

import torch


def int_tensor(name: str, x) -> torch.Tensor:
    """``x`` (an int, nested lists of ints, a numpy or torch integer array) as an int64 tensor on its device (a list:
    on the CPU). Floats and bools raise TypeError naming ``name``: converting them with an integer dtype would
    truncate 2.5 to 2 without a word."""
    try:
        t = x if isinstance(x, torch.Tensor) else torch.as_tensor(x)
    except (TypeError, ValueError, RuntimeError) as e:
        raise TypeError(f"{name}: expected integers, got {type(x).__name__} {x!r:.60}") from e
    if t.numel() and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name}: expected integers, got {t.dtype} values")
    return t.to(torch.int64)
