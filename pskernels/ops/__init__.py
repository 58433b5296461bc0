"""Functional API: argument checks + backend dispatch, one module per op."""
from ._backend import available_backends
from .map_kv_caches import map_kv_caches
from .merge_states import merge_states
from .multi_branch_attention import multi_branch_attention
from .rotate_keys import rotate_keys

__all__ = ["multi_branch_attention", "merge_states", "rotate_keys", "map_kv_caches", "available_backends"]
