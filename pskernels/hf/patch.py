"""``patch_model`` / ``unpatch_model``: make a Hugging Face decoder accept a :class:`ParallelCache`."""
from __future__ import annotations

import torch.nn as nn

from ..rope import find_decoder, rope_spec_for_layer
from . import attention
from .cache import ParallelCache

_HANDLE_ATTR = "_pskernels_patch"


def _configs(model: nn.Module):
    """Every distinct (sub)config object whose ``_attn_implementation`` drives the model's attention."""
    seen, out = set(), []
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation") and id(cfg) not in seen:
            seen.add(id(cfg))
            out.append(cfg)
    return out


def _find_parallel_cache(args, kwargs):
    for name in ("cache", "past_key_values"):
        c = kwargs.get(name)
        if isinstance(c, ParallelCache):
            return c
    if any(isinstance(a, ParallelCache) for a in args):
        raise TypeError("pass the ParallelCache as a keyword argument (past_key_values= or cache=)")
    return None


class PatchHandle:
    """Returned by :func:`patch_model`; ``remove()`` restores the model exactly."""

    def __init__(self, model: nn.Module, backend: str):
        self.model = model
        self.backend = backend
        self.decoder = find_decoder(model)
        self._ropes = {}
        self._hooks = []
        self._original = {}
        self.removed = False

    def rope(self, layer_idx: int):
        spec = self._ropes.get(layer_idx)
        if spec is None:
            spec = rope_spec_for_layer(self.decoder, layer_idx)
            # layers with the same RoPE share one object (attention reuses validation by its identity)
            spec = next((s for s in self._ropes.values() if s.same_as(spec)), spec)
            self._ropes[layer_idx] = spec
        return spec

    def _pre_hook(self, module, args, kwargs):
        cache = _find_parallel_cache(args, kwargs)
        if cache is None:
            return None
        if len(cache.layers) and len(cache.layers) != len(self.decoder.layers):
            raise ValueError(f"ParallelCache: holds {len(cache.layers)} layers but the model has "
                             f"{len(self.decoder.layers)}; its caches come from a different model")
        x = kwargs.get("input_ids")
        if x is None:
            x = kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is None:
            raise ValueError("input_ids/inputs_embeds: one is required with a ParallelCache")
        if bool((cache.deltas != 0).any()):
            spec = self.rope(0)
            if not spec.supports_reindexing:
                raise ValueError(f"ParallelCache: scheme {cache.scheme!r} re-indexes branches, but the model's "
                                 f"rope_type {spec.rope_type!r} has length-dependent frequencies; "
                                 "use scheme='parallel'")
        vpos = cache.begin_forward(x.shape[0], x.shape[1], kwargs.get("attention_mask"), kwargs.get("position_ids"),
                                   x.device)
        kwargs["position_ids"] = vpos
        kwargs[attention.STATE_KWARG] = (cache, self)
        return args, kwargs

    def _post_hook(self, module, args, kwargs, output):
        cache = _find_parallel_cache(args, kwargs)
        if cache is not None:
            cache.end_forward()
        return None

    def remove(self) -> None:
        """Undo :func:`patch_model` (idempotent): original attention implementations and no hooks."""
        if self.removed:
            return
        for h in self._hooks:
            h.remove()
        for cfg, name in self._original.values():
            cfg._attn_implementation = name
            attention._ORIGINAL.pop(id(cfg), None)
        if getattr(self.model, _HANDLE_ATTR, None) is self:
            delattr(self.model, _HANDLE_ATTR)
        self.removed = True


def patch_model(model: nn.Module, *, backend: str = "auto") -> PatchHandle:
    """Let ``model`` read a :class:`ParallelCache` in ``model(...)`` and ``model.generate(...)``.

    Switches every (sub)config to the ``"pskernels"`` attention implementation (remembering the
    original outside the config, so ``save_pretrained`` is unaffected) and adds a forward pre-hook on
    the base decoder that sets virtual positions. Without a ``ParallelCache`` the patched model
    computes exactly what it computed before.

    Parameters
    ----------
    model : transformers PreTrainedModel
        Llama, Qwen2, Qwen3, Mistral, Phi3, Gemma, Gemma2, Gemma3 (text) families.
    backend : str
        Default kernel backend for the attention (a ParallelCache's own ``backend`` wins).

    Returns
    -------
    PatchHandle
        ``handle.remove()`` (or :func:`unpatch_model`) restores the model bit-for-bit.

    Raises
    ------
    RuntimeError
        If the model is already patched.
    """
    if getattr(model, _HANDLE_ATTR, None) is not None:
        raise RuntimeError("patch_model: model is already patched (call unpatch_model(model) or handle.remove() first)")
    attention.register()
    handle = PatchHandle(model, backend)
    with attention._LOCK:
        for cfg in _configs(model):
            orig = cfg._attn_implementation
            if orig == attention.NAME:
                raise RuntimeError("patch_model: a config already uses 'pskernels' attention without a patch handle")
            handle._original[id(cfg)] = (cfg, orig)
            attention._ORIGINAL[id(cfg)] = orig
            cfg._attn_implementation = attention.NAME
    dec = handle.decoder
    handle._hooks.append(dec.register_forward_pre_hook(handle._pre_hook, with_kwargs=True))
    handle._hooks.append(dec.register_forward_hook(handle._post_hook, with_kwargs=True, always_call=True))
    setattr(model, _HANDLE_ATTR, handle)
    return handle


def unpatch_model(model: nn.Module) -> None:
    """Undo :func:`patch_model`. Raises ``RuntimeError`` if the model is not patched."""
    handle = getattr(model, _HANDLE_ATTR, None)
    if handle is None:
        raise RuntimeError("unpatch_model: model is not patched")
    handle.remove()
