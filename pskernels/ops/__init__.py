"""The public ops: argument checks, then dispatch to a backend (one module per op, named after it)."""
from .dispatch import available_backends, resolve_backend
from .map_kv_caches import map_kv_caches
from .merge_states import merge_states
from .multi_branch_attention import AttentionPlan, multi_branch_attention, plan_multi_branch_attention
from .rotate_keys import rotate_keys

__all__ = ["multi_branch_attention", "plan_multi_branch_attention", "AttentionPlan", "merge_states", "rotate_keys",
           "map_kv_caches", "available_backends", "resolve_backend"]
