"""Loader of the compiled extension (``pskernels._C``) and its ``"cpu"`` / ``"cuda"`` backends.

The extension is built by ``setup.py`` (``pip install -e .``). If it is missing in a source checkout it
is JIT-compiled on first use with ninja (a few minutes; a message says so). ``PSKERNELS_NO_EXT=1``
disables it: the package then runs on its Triton / PyTorch backends.
"""
from __future__ import annotations

import glob
import os
import sys

import torch

from ._core.registry import register

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_C = None
_LOAD_ERROR: str | None = None


def _jit_build():
    from torch.utils.cpp_extension import load

    sources = sorted(glob.glob(os.path.join(_ROOT, "csrc", "cpu", "*.cpp"))) + [os.path.join(_ROOT, "csrc", "bindings.cpp")]
    if not os.path.exists(sources[-1]):
        raise ImportError("pskernels._C is not built and the C++ sources are not available for a JIT build")
    print("pskernels: the C++ extension is not built; compiling it now (first use only, a few minutes)...",
          file=sys.stderr)
    return load(name="pskernels_C", sources=sources, extra_include_paths=[os.path.join(_ROOT, "csrc", "include"),
                os.path.join(_ROOT, "csrc")], extra_cflags=["-O3", "-fopenmp", "-fno-math-errno"],
                extra_ldflags=["-fopenmp"], verbose=False)


def load_extension():
    """Import (or JIT-build) the extension once; returns the module or None (reason in ``load_error()``)."""
    global _C, _LOAD_ERROR
    if _C is not None or _LOAD_ERROR is not None:
        return _C
    if os.environ.get("PSKERNELS_NO_EXT") == "1":
        _LOAD_ERROR = "disabled by PSKERNELS_NO_EXT=1"
        return None
    try:
        from . import _C as mod  # noqa: N811
    except ImportError:
        try:
            mod = _jit_build()
        except Exception as e:  # noqa: BLE001 - any build failure leaves the pure-Python backends working
            _LOAD_ERROR = f"not built and JIT build failed: {type(e).__name__}: {e}"
            return None
    _C = mod
    return _C


def load_error() -> str | None:
    return _LOAD_ERROR


def with_cuda() -> bool:
    return bool(load_extension() is not None and getattr(_C, "with_cuda", False))


def _cpu_available() -> bool:
    return load_extension() is not None


def _cuda_available() -> bool:
    return with_cuda() and torch.cuda.is_available()


if load_extension() is None:
    raise ImportError(f"pskernels._C unavailable: {_LOAD_ERROR}")

_ops = torch.ops.pskernels


@torch.library.register_fake("pskernels::multi_branch_attention")
def _(q, keys, values, seq_lens, left_pad, shifts, segment_positions, query_positions, inv_freq, rope_neox,
      causal_last, scale, softcap, window, groups, temperature, lse_scale, log_weight):
    B, Hq, Lq, _d = q.shape
    return q.new_empty(B, Hq, Lq, values[0].shape[-1]), q.new_empty(B, Hq, Lq, dtype=torch.float32)


@torch.library.register_fake("pskernels::merge_states")
def _(outs, lses):
    return outs.new_empty(outs.shape[1:]), lses.new_empty(lses.shape[1:])


@torch.library.register_fake("pskernels::rotate_keys")
def _(k, delta, inv_freq, neox):
    return k.new_empty(k.shape)


@torch.library.register_fake("pskernels::map_kv_caches")
def _(keys, values, num_layers, orig_pos, new_pos, inv_freq, neox, k_down, k_up, k_gate, v_down, v_up, v_gate):
    return [t.new_empty(t.shape) for k, v in zip(keys, values) for t in (k, v)]


def _attention(q, keys, values, p):
    rope = p.rope
    shifts = p.shifts if p.has_shift else None
    inv = rope.inv_freq if (rope is not None and shifts is not None) else None
    groups = torch.tensor(p.groups, dtype=torch.int64, device=q.device)
    return _ops.multi_branch_attention(
        q, keys, values, p.seq_lens, p.left_pad, shifts, p.segment_positions, p.query_positions, inv,
        rope is None or rope.style == "neox", p.causal_last, p.scale, p.softcap or 0.0, p.sliding_window or 0,
        groups, p.temperature, p.lse_scale, p.log_weight,
    )


def _merge(o, s):
    return _ops.merge_states(o, s)


def _rotate(k, d, rope):
    B, _, L, _ = k.shape
    d = d[:, None].expand(B, L) if d.ndim == 1 else d
    return _ops.rotate_keys(k, d.contiguous(), rope.inv_freq, rope.style == "neox")


def _map(keys, values, orig, new, rope, params):
    NL, N = len(keys), len(keys[0])
    flat = _ops.map_kv_caches([k for layer in keys for k in layer], [v for layer in values for v in layer], NL,
                              orig.contiguous(), new.contiguous(), rope.inv_freq, rope.style == "neox",
                              params["k_down"], params["k_up"], params["k_gate"], params["v_down"], params["v_up"],
                              params["v_gate"])
    ko = [[flat[2 * (l * N + n)] for n in range(N)] for l in range(NL)]
    vo = [[flat[2 * (l * N + n) + 1] for n in range(N)] for l in range(NL)]
    return ko, vo


for _backend, _avail in (("cpu", _cpu_available), ("cuda", _cuda_available)):
    register("multi_branch_attention", _backend, _avail)(_attention)
    register("merge_states", _backend, _avail)(_merge)
    register("rotate_keys", _backend, _avail)(_rotate)
    register("map_kv_caches", _backend, _avail)(_map)
