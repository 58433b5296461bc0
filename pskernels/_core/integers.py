"""Integer arguments given as lists, numbers or tensors: converted without truncation."""
from __future__ import annotations

import operator

import torch


def int_scalar(name: str, x) -> int:
    """``x`` (an int, a numpy or 0-d torch integer) as an int. Floats and bools raise TypeError naming ``name``
    (``int(8.7)`` would read 8)."""
    try:
        if isinstance(x, bool):
            raise TypeError
        return operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} {x!r:.60}") from None


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
