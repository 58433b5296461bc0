"""Which implementation an op call runs: ``backend=`` / ``PSKERNELS_BACKEND``, device, autograd.

``backend="auto"`` resolves to the CUDA extension on NVIDIA GPUs (else Triton), the C++ extension on CPU
(else the PyTorch reference). Kernel packages are imported on first need, so that ``import pskernels``
stays light (triton's import alone takes about a second); importing one registers its implementations
in :mod:`pskernels._core.registry`.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

from .._core.registry import BACKENDS, backend_available, implementations, registered_backends

_LAZY = {"triton": "pskernels.triton", "cpu": "pskernels._ext", "cuda": "pskernels._ext"}
_LOAD_ERRORS: dict[str, str] = {}


def _load(backend: str) -> None:
    mod = _LAZY.pop(backend, None)
    if mod is not None:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"


def load_error(backend: str) -> str | None:
    """Why ``backend``'s kernel package failed to import (None if it loaded or was never tried)."""
    return _LOAD_ERRORS.get(backend)


def available_backends(op: str | None = None) -> list[str]:
    """Backends that can run on this machine (for ``op``, or for any op).

    Examples
    --------
    >>> import pskernels
    >>> "torch" in pskernels.available_backends("merge_states")
    True
    """
    for b in list(_LAZY):
        _load(b)
    names = registered_backends() if op is None else set(implementations(op))
    return [b for b in BACKENDS[1:] if b in names and backend_available(b)]


def resolve_backend(op: str, backend: str, device: torch.device) -> str:
    """Name of the backend that ``backend`` ("auto" reads ``PSKERNELS_BACKEND``) selects for ``op`` on ``device``."""
    if backend == "auto":
        backend = os.environ.get("PSKERNELS_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for b in order:
            _load(b)
            if b in implementations(op) and backend_available(b):
                return b
        raise RuntimeError(f"{op}: no backend available for device {device}")
    _load(backend)
    impls = implementations(op)
    if backend not in impls:
        if backend in _LOAD_ERRORS:
            raise RuntimeError(f"backend: {backend!r} failed to load ({_LOAD_ERRORS[backend]})")
        raise NotImplementedError(
            f"backend: {op} has no {backend!r} implementation (implemented: {sorted(impls)})"
        )
    if not backend_available(backend):
        raise RuntimeError(f"backend: {backend!r} is not available on this machine (available: "
                           f"{available_backends(op)})")
    return backend


def resolve(op: str, backend: str, device: torch.device, needs_grad: bool = False) -> Callable:
    """Pick ``op``'s implementation for tensors on ``device`` (see :func:`select`)."""
    return select(op, backend, device, needs_grad)[1]


def select(op: str, backend: str, device: torch.device, needs_grad: bool = False) -> tuple[str, Callable]:
    """``(backend name, implementation)`` of ``op`` for tensors on ``device``.

    The compiled kernels are forward-only: when autograd must flow (``needs_grad``), "auto" picks the
    differentiable PyTorch reference and an explicit other backend is refused.
    """
    if needs_grad:
        if backend == "auto":
            backend = os.environ.get("PSKERNELS_BACKEND", "auto") or "auto"
        if backend not in ("auto", "torch"):
            raise NotImplementedError(f"backend: {op} on {backend!r} is forward-only; inputs require grad, "
                                      "use backend='torch' (or 'auto') to differentiate")
        backend = "torch"
    name = resolve_backend(op, backend, device)
    return name, implementations(op)[name]


def needs_grad(*tensors) -> bool:
    """True when autograd is on and any of ``tensors`` (None allowed) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
