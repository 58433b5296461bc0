"""Wording of device mismatch errors (shared by every op's argument checks)."""
from __future__ import annotations

import torch


def same_or_cpu(device: torch.device, owner: str) -> str:
    """``"cuda:0 (same as q) or cpu"`` — small index/parameter tensors may also live on the host."""
    return f"{device} (same as {owner})" + ("" if device.type == "cpu" else " or cpu")
