"""Per-architecture facts about Hugging Face decoders: where the layers live, each layer's RoPE."""
from __future__ import annotations

import torch.nn as nn

from ..rope import RopeSpec


def find_decoder(model: nn.Module) -> nn.Module:
    """The base decoder: the module that owns ``layers`` and ``rotary_emb`` (e.g. ``LlamaModel``)."""
    for m in model.modules():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "rotary_emb"):
            return m
    raise TypeError(
        f"model: expected a Hugging Face decoder with `layers` and `rotary_emb` (Llama, Qwen2/3, Mistral, Phi3, "
        f"Gemma 1/2/3 families), got {type(model).__name__}"
    )


def text_config(decoder: nn.Module):
    cfg = decoder.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def layer_type(decoder: nn.Module, layer_idx: int) -> str | None:
    types = getattr(text_config(decoder), "layer_types", None)
    return types[layer_idx] if types else None


def rope_spec_for_layer(decoder: nn.Module, layer_idx: int) -> RopeSpec:
    """RoPE of ``layer_idx`` built from the model's own rotary module (so scaled frequencies are exact).

    HF rotates with ``rotate_half`` (neox style). Partial rotary (Phi-3) shows up as fewer frequencies.
    """
    rot = decoder.rotary_emb
    rope_type = getattr(rot, "rope_type", "default")
    inv = getattr(rot, "inv_freq", None)
    if isinstance(rope_type, dict):  # one rotary module for several layer types (Gemma 3)
        lt = layer_type(decoder, layer_idx)
        inv = getattr(rot, f"{lt}_inv_freq", None)
        rope_type = rope_type.get(lt, "default")
    if inv is None:
        raise TypeError(f"model: cannot find the inverse RoPE frequencies of layer {layer_idx} in {type(rot).__name__}")
    # dynamic rope mutates inv_freq as sequences grow; the *original* frequencies are what cached keys
    # of short prompts were rotated with, but we refuse to re-index those types anyway.
    return RopeSpec(inv.detach().float().clone(), style="neox", rope_type=str(rope_type))


def num_layers(decoder: nn.Module) -> int:
    return len(decoder.layers)
