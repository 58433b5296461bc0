"""The ``"pskernels"`` attention implementation registered with transformers.

Without an active :class:`ParallelCache` it delegates to the model's original implementation (so a
patched model is bit-identical to the unpatched one); with one, it runs
:func:`pskernels.multi_branch_attention` over ``[prefix, branch_1..N, own tokens]``.
"""
from __future__ import annotations

import sys
import threading

from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .._core.segments import KNOBS
from ..ops import plan_multi_branch_attention

NAME = "pskernels"
STATE_KWARG = "pskernels_state"

# id(config) -> original attention implementation name; entries live while a model is patched.
_ORIGINAL: dict[int, str] = {}
_LOCK = threading.Lock()


def original_impl(config) -> str:
    try:
        return _ORIGINAL[id(config)]
    except KeyError:
        raise RuntimeError(
            "attention implementation 'pskernels' is set on a config that pskernels.patch_model did not patch; "
            "use pskernels.patch_model(model) instead of setting it by hand"
        ) from None


def _delegate(module, name):
    if name == "eager" or name is None:
        fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if fn is None:
            raise RuntimeError(f"cannot find eager_attention_forward for {type(module).__name__}")
        return fn
    return ALL_ATTENTION_FUNCTIONS[name]


def pskernels_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        sliding_window=None, softcap=None, **kwargs):
    state = kwargs.pop(STATE_KWARG, None)
    if state is None:
        extra = {} if sliding_window is None else {"sliding_window": sliding_window}
        if softcap is not None:
            extra["softcap"] = softcap
        return _delegate(module, original_impl(module.config))(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **extra, **kwargs
        )
    cache, handle = state
    if dropout and module.training:
        raise NotImplementedError("attention dropout is not supported with a ParallelCache (set model.eval() or "
                                  "dropout=0)")
    layer = module.layer_idx
    keys, values, meta, layout = cache.segments(layer, key, value, sliding_window, handle.rope)
    backend = cache.backend if cache.backend != "auto" else handle.backend
    rope = handle.rope(layer)
    # Layers of one forward share the segment layout: plan it once, run it on every layer whose shapes, dtype,
    # RoPE and scaling match, with the layer's own calibration knobs (a mapper's). The handle keeps each layer's
    # RopeSpec alive, so its id identifies it.
    key_ = (layout, query.shape, key.shape, value.shape, query.dtype, id(rope), scaling, softcap)
    plan = cache.plans.get(key_)
    if plan is None:
        plan = cache.plans[key_] = plan_multi_branch_attention(query, keys, values, rope=rope, scale=scaling,
                                                               softcap=softcap, backend=backend, **meta)
        out, _ = plan.run(query, keys, values)
    else:
        out, _ = plan.run(query, keys, values, **{k: meta[k] for k in KNOBS if k in meta})
    return out.transpose(1, 2).contiguous(), None


def pskernels_mask(*args, config=None, **kwargs):
    return ALL_MASK_ATTENTION_FUNCTIONS[original_impl(config)](*args, config=config, **kwargs)


def register() -> None:
    """Register the attention and mask functions once per process (idempotent)."""
    AttentionInterface.register(NAME, pskernels_attention)
    AttentionMaskInterface.register(NAME, pskernels_mask)
