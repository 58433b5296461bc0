"""``map_kv_caches`` on the compiled extension: its "cpu"/"cuda" adapter and its fake implementation."""
from __future__ import annotations

import torch

from .._core.registry import register
from .loader import cpu_available, cuda_available

# The compiled op, a module attribute so that tests can record the calls the adapter makes.
_op = torch.ops.pskernels.map_kv_caches


@torch.library.register_fake("pskernels::map_kv_caches")
def _fake(keys, values, num_layers, orig_pos, new_pos, inv_freq, neox, k_down, k_up, k_gate, v_down, v_up, v_gate):
    return [t.new_empty(t.shape) for k, v in zip(keys, values) for t in (k, v)]


@register("map_kv_caches", "cuda", cuda_available)
@register("map_kv_caches", "cpu", cpu_available)
def _adapter(keys, values, orig, new, rope, params):
    # The kernel takes every (layer, branch) cache as one flat list and returns [k, v] per pair in that order.
    NL, N = len(keys), len(keys[0])
    flat = _op([k for layer in keys for k in layer], [v for layer in values for v in layer], NL, orig.contiguous(),
               new.contiguous(), rope.inv_freq, rope.style == "neox", params["k_down"], params["k_up"],
               params["k_gate"], params["v_down"], params["v_up"], params["v_gate"])
    ko = [[flat[2 * (l * N + n)] for n in range(N)] for l in range(NL)]
    vo = [[flat[2 * (l * N + n) + 1] for n in range(N)] for l in range(NL)]
    return ko, vo
