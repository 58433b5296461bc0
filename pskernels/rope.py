"""RoPE description shared by every backend: frequencies, style and rotary dimension.

Rotating by a position *delta* is exact for RoPE because rotations compose:
``R(a) R(b) = R(a + b)``. We therefore only ever need the model's ``inv_freq``;
HF's ``attention_scaling`` (yarn/longrope mscale) multiplies cos/sin of the *absolute*
rotation already baked into cached keys and must not be applied again to a delta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ._core.devices import check_same_or_cpu

__all__ = ["RopeSpec", "REINDEX_UNSAFE_ROPE_TYPES", "find_decoder", "rope_spec_for_layer"]

# Frequencies of these rope types depend on the sequence length seen so far, so a key rotated at
# one time cannot be re-indexed with the frequencies of another: refuse shifts for them.
REINDEX_UNSAFE_ROPE_TYPES = frozenset({"dynamic", "longrope"})


@dataclass(frozen=True)
class RopeSpec:
    """Rotary position embedding parameters.

    Parameters
    ----------
    inv_freq : torch.Tensor
        float32 ``[rotary_dim // 2]`` inverse frequencies (``theta_i``), as in HF's rotary modules.
    style : {"neox", "gptj"}
        ``"neox"``: HF ``rotate_half`` (dimension ``i`` pairs with ``i + rotary_dim/2``);
        ``"gptj"``: interleaved pairs ``(2i, 2i+1)``.
    rotary_dim : int, optional
        Number of leading head dimensions that are rotated (partial rotary, e.g. Phi-3);
        defaults to ``2 * len(inv_freq)``. The remaining dimensions are left untouched.
    rope_type : str
        HF rope type the frequencies came from ("default", "llama3", "yarn", "linear", ...).
        ``"dynamic"`` and ``"longrope"`` cannot be re-indexed (see :attr:`supports_reindexing`).

    Examples
    --------
    >>> import torch
    >>> from pskernels import RopeSpec
    >>> spec = RopeSpec(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    >>> spec.rotary_dim
    64
    """

    inv_freq: torch.Tensor
    style: str = "neox"
    rotary_dim: int | None = None
    rope_type: str = "default"

    def __post_init__(self):
        inv = self.inv_freq
        if not isinstance(inv, torch.Tensor) or inv.ndim != 1 or inv.numel() == 0:
            raise ValueError(
                f"RopeSpec.inv_freq: expected a non-empty 1-D tensor, got "
                f"{type(inv).__name__}{tuple(inv.shape) if isinstance(inv, torch.Tensor) else ''}"
            )
        if not inv.is_floating_point():
            raise ValueError(f"RopeSpec.inv_freq: expected a floating tensor, got dtype {inv.dtype}")
        if inv.device.type != "meta" and not bool(torch.isfinite(inv).all()):
            raise ValueError(f"RopeSpec.inv_freq: expected finite values, got {inv.tolist()}")
        object.__setattr__(self, "inv_freq", inv.detach().to(torch.float32))
        if self.style not in ("neox", "gptj"):
            raise ValueError(f"RopeSpec.style: expected 'neox' or 'gptj', got {self.style!r}")
        rd = 2 * inv.numel() if self.rotary_dim is None else int(self.rotary_dim)
        if rd != 2 * inv.numel():
            raise ValueError(
                f"RopeSpec.rotary_dim: expected 2 * len(inv_freq) = {2 * inv.numel()}, got {rd}"
            )
        object.__setattr__(self, "rotary_dim", rd)

    @property
    def supports_reindexing(self) -> bool:
        """False for rope types whose frequencies change with sequence length."""
        return self.rope_type not in REINDEX_UNSAFE_ROPE_TYPES

    def same_as(self, other: "RopeSpec") -> bool:
        """Same style, rotary dim, rope type and frequencies (``==`` would compare the tensors elementwise)."""
        return (self.style, self.rotary_dim, self.rope_type) == (other.style, other.rotary_dim, other.rope_type) and \
            self.inv_freq.device == other.inv_freq.device and torch.equal(self.inv_freq, other.inv_freq)

    def to(self, device) -> "RopeSpec":
        """Copy with ``inv_freq`` on ``device``."""
        return RopeSpec(self.inv_freq.to(device), self.style, self.rotary_dim, self.rope_type)

    def on(self, device: torch.device, tensor_name: str) -> "RopeSpec":
        """This spec with its frequencies on ``device`` (that of ``tensor_name``); they may live there or on cpu."""
        check_same_or_cpu("rope.inv_freq", self.inv_freq, device, tensor_name)
        return self if self.inv_freq.device == device else self.to(device)

    @classmethod
    def from_model(cls, model, layer_idx: int | None = None) -> "RopeSpec":
        """Build the spec from a Hugging Face model (or its base decoder / config-bearing module).

        Uses the model's own rotary module so llama3/linear/yarn scaled frequencies are exact.
        For models with one rotary module per layer type (Gemma 3), ``layer_idx`` selects the
        layer's type (default: layer 0).
        """
        return rope_spec_for_layer(find_decoder(model), 0 if layer_idx is None else layer_idx)


# Reading a Hugging Face decoder's RoPE needs only torch.nn: the modules are found by their attributes.
def find_decoder(model: nn.Module) -> nn.Module:
    """The base decoder: the module that owns ``layers`` and ``rotary_emb`` (e.g. ``LlamaModel``)."""
    for m in model.modules() if isinstance(model, nn.Module) else ():
        if isinstance(getattr(m, "layers", None), nn.ModuleList) and hasattr(m, "rotary_emb"):
            return m
    raise TypeError(
        f"model: expected a Hugging Face decoder with `layers` and `rotary_emb` (Llama, Qwen2/3, Mistral, Phi3, "
        f"Gemma 1/2/3 families), got {type(model).__name__}"
    )


def layer_type(decoder: nn.Module, layer_idx: int) -> str | None:
    """The decoder's ``config.layer_types[layer_idx]`` (e.g. "sliding_attention"), None if it has none."""
    cfg = decoder.config
    cfg = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    types = getattr(cfg, "layer_types", None)
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
