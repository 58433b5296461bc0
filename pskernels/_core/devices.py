"""Device checks shared by every op's argument checks."""
from __future__ import annotations

import torch


def check_same_or_cpu(name: str, t: torch.Tensor, device: torch.device, owner: str) -> None:
    """Small index/parameter tensors may live on ``device`` (that of ``owner``) or on the host."""
    if t.device.type != "cpu" and t.device != device:
        where = f"{device} (same as {owner})" + ("" if device.type == "cpu" else " or cpu")
        raise ValueError(f"{name}: expected device {where}, got {t.device}")
