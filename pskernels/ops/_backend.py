"""Backend registry and resolution shared by every op.

Each op registers one implementation per backend name. ``backend="auto"`` (or the
``PSKERNELS_BACKEND`` environment variable) resolves to the CUDA extension on NVIDIA GPUs (else
Triton), the C++ extension on CPU (else the PyTorch reference).
"""
from __future__ import annotations

import importlib
import os
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_IMPLS: dict[str, dict[str, Callable]] = {}
_AVAILABLE: dict[str, Callable[[], bool]] = {"torch": lambda: True}
# Backends whose modules register themselves when imported; imported on first need so that
# `import pskernels` stays light (triton's import alone takes about a second).
_LAZY = {"triton": "pskernels.triton", "cpu": "pskernels._ext", "cuda": "pskernels._ext"}
_LOAD_ERRORS: dict[str, str] = {}


def _load(backend: str) -> None:
    mod = _LAZY.pop(backend, None)
    if mod is not None:
        try:
            importlib.import_module(mod)
        except ImportError as e:
            _LOAD_ERRORS[backend] = f"{type(e).__name__}: {e}"


def register(op: str, backend: str, available: Callable[[], bool] | None = None):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``."""
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"unknown backend {backend!r}")
    if available is not None:
        _AVAILABLE[backend] = available

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def backend_available(backend: str) -> bool:
    probe = _AVAILABLE.get(backend)
    return bool(probe and probe())


def available_backends(op: str | None = None) -> list[str]:
    """Backends that can run on this machine (for ``op``, or for any op)."""
    for b in list(_LAZY):
        _load(b)
    names = {b for impls in _IMPLS.values() for b in impls} if op is None else set(_IMPLS.get(op, {}))
    return [b for b in BACKENDS[1:] if b in names and backend_available(b)]


def resolve_name(op: str, backend: str, device) -> str:
    """Name of the backend ``backend`` (possibly "auto" / ``PSKERNELS_BACKEND``) selects for ``op`` on ``device``."""
    if backend == "auto":
        backend = os.environ.get("PSKERNELS_BACKEND", "auto") or "auto"
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("cpu", "torch")
        for b in order:
            _load(b)
            if b in _IMPLS.get(op, {}) and backend_available(b):
                return b
        raise RuntimeError(f"{op}: no backend available for device {device}")
    _load(backend)
    impls = _IMPLS.get(op, {})
    if backend not in impls:
        if backend in _LOAD_ERRORS:
            raise RuntimeError(f"backend: {backend!r} failed to load ({_LOAD_ERRORS[backend]})")
        raise NotImplementedError(
            f"backend: {op} has no {backend!r} implementation (implemented: {sorted(impls)})"
        )
    if not backend_available(backend):
        raise RuntimeError(f"backend: {backend!r} is not available on this machine (available: {available_backends(op)})")
    return backend


def resolve(op: str, backend: str, device, needs_grad: bool = False) -> Callable:
    """Pick ``op``'s implementation for tensors on ``device``.

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
    return _IMPLS[op][resolve_name(op, backend, device)]


def needs_grad(*tensors) -> bool:
    """True when autograd is on and any of ``tensors`` (None allowed) requires grad."""
    return torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)
