"""Device checks shared by every op's argument checks, and the name of a dtype as reports and files write it."""
from __future__ import annotations

import torch


def check_same_or_cpu(name: str, t: torch.Tensor, device: torch.device, owner: str) -> None:
    """Small index/parameter tensors may live on ``device`` (that of ``owner``) or on the host."""
    if t.device.type != "cpu" and t.device != device:
        where = f"{device} (same as {owner})" + ("" if device.type == "cpu" else " or cpu")
        raise ValueError(f"{name}: expected device {where}, got {t.device}")


def host_to_device(t: torch.Tensor, device: torch.device, what: str) -> torch.Tensor:
    """A small host tensor on ``device`` without a wait on either side (through pinned memory, non-blocking).

    Refused inside CUDA-graph capture: the graph would record a copy from pinned memory that is freed and reused
    after the call, so a replay could read anything. ``what`` names the caller in that error.
    """
    if device.type != "cuda":
        return t.to(device)
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"{what}: copies small tables from the host to the device, which cannot be recorded in "
                           "a CUDA graph; do it before capture")
    # a fresh dense buffer: pin_memory() keeps an expanded tensor's stride-0 layout, which it cannot write into
    pinned = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return pinned.copy_(t).to(device, non_blocking=True)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name stored teachers, ``--json`` reports and ``--dtype`` use."""
    return str(dtype).removeprefix("torch.")
