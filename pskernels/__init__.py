"""pskernels: fused kernels + Hugging Face integration for Parallel-Synthesis.

Public API
----------
Ops (``backend="auto"|"triton"|"cuda"|"cpu"|"torch"``):
    multi_branch_attention, merge_states, rotate_keys, map_kv_caches, available_backends
Plan once, run many (the layers of a forward):
    plan_multi_branch_attention -> AttentionPlan.run
RoPE:
    RopeSpec
Hugging Face:
    patch_model, unpatch_model, ParallelCache, CacheRow
"""
from .ops import (
    AttentionPlan,
    available_backends,
    map_kv_caches,
    merge_states,
    multi_branch_attention,
    plan_multi_branch_attention,
    rotate_keys,
)
from .rope import RopeSpec

__version__ = "0.1.0"

_HF = {"patch_model", "unpatch_model", "ParallelCache", "CacheRow"}

__all__ = [
    "multi_branch_attention", "plan_multi_branch_attention", "AttentionPlan", "merge_states", "rotate_keys",
    "map_kv_caches", "available_backends",
    "RopeSpec", "patch_model", "unpatch_model", "ParallelCache", "CacheRow", "__version__",
]


def __getattr__(name):
    # transformers is imported only when the HF integration is used.
    if name in _HF:
        from . import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'pskernels' has no attribute {name!r}")
