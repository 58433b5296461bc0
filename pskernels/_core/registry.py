"""Backend registry: each op has one implementation per backend name.

Kernel packages (``ref`` via ``ops``, ``triton``, ``_ext``) register their implementations here when they are
imported; ``ops`` decides when to import them and which one a call gets (:mod:`pskernels.ops.dispatch`).
"""
from __future__ import annotations

from typing import Callable

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
_IMPLS: dict[str, dict[str, Callable]] = {}
_AVAILABLE: dict[str, Callable[[], bool]] = {"torch": lambda: True}


def register(op: str, backend: str, available: Callable[[], bool] | None = None):
    """Decorator: register ``fn`` as ``op``'s implementation on ``backend``.

    ``available`` (once per backend) answers whether the backend can run on this machine.
    """
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"backend: expected one of {BACKENDS[1:]}, got {backend!r}")
    if available is not None:
        _AVAILABLE[backend] = available

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def implementations(op: str) -> dict[str, Callable]:
    """``backend -> implementation`` of ``op`` registered so far."""
    return _IMPLS.get(op, {})


def registered_backends() -> set[str]:
    """Every backend name some op has an implementation on."""
    return {b for impls in _IMPLS.values() for b in impls}


def backend_available(backend: str) -> bool:
    probe = _AVAILABLE.get(backend)
    return bool(probe and probe())
