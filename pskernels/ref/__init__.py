"""Pure-PyTorch fp32 references: the semantics of every op, imported by tests and benchmarks."""
from .map_kv_caches import low_rank_residual, map_kv_caches
from .merge_states import merge_states
from .multi_branch_attention import multi_branch_attention, segment_mask
from .rotate_keys import rotate, rotate_keys

__all__ = [
    "multi_branch_attention", "segment_mask", "merge_states", "rotate", "rotate_keys",
    "map_kv_caches", "low_rank_residual",
]
