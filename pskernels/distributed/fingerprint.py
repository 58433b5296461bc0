"""What a branch's keys and values depend on, read from a Hugging Face decoder: the model fingerprint.

Two processes can exchange caches only if their models agree on every field here; the wire header carries
the sender's fingerprint and the receiver compares it with its own (:func:`compare`), naming the first field
that differs and both values.
"""
from __future__ import annotations

import struct
import weakref
import zlib
from dataclasses import dataclass

import torch

from ..rope import find_decoder, rope_spec_for_layer

# dtype <-> wire code (append only: codes are part of the wire format)
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.float8_e4m3fn, torch.float8_e5m2)
# HF rope types <-> wire code (append only); an unknown type is sent as 1000 + crc32(name) % 1_000_000
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3", "proportional")
LAYER_FIELDS = ("kv_heads", "head_dim", "window", "rotary_dim", "rope_type", "rope_theta", "rope_freqs")


def dtype_code(dtype: torch.dtype) -> int:
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype} cannot be sent (supported: {', '.join(map(str, DTYPES))})")
    return DTYPES.index(dtype)


def dtype_of(code: int):
    """The dtype of a wire code, or the code itself when it is unknown (for error messages)."""
    return DTYPES[code] if 0 <= code < len(DTYPES) else code


def rope_type_code(name: str) -> int:
    return ROPE_TYPES.index(name) if name in ROPE_TYPES else 1000 + zlib.crc32(name.encode()) % 1_000_000


def _f64_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_f64(b: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(b)))[0]


@dataclass(frozen=True)
class Fingerprint:
    """Per-model integers of the wire header. ``layers[l]`` follows :data:`LAYER_FIELDS`: kv heads, head dim,
    sliding window (0: full attention), rotary dim, rope type code, rope theta (float64 bits, 0 if unknown)
    and a crc32 of the layer's inverse frequencies and attention scaling (covers every RoPE scaling)."""

    dtype: int
    layers: tuple  # of tuples of len(LAYER_FIELDS) ints

    @property
    def n_layers(self) -> int:
        return len(self.layers)


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


def _windows(cfg, n: int) -> list[int]:
    types = getattr(cfg, "layer_types", None)
    w = getattr(cfg, "sliding_window", None)
    if types is not None:
        return [int(w or 0) if t == "sliding_attention" else 0 for t in types[:n]]
    if w is not None and getattr(cfg, "use_sliding_window", True):
        return [int(w)] * n
    return [0] * n


def _rope_theta(cfg, layer_type) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None)) if isinstance(params, dict) else None
    return float(theta) if theta is not None else 0.0


def model_dtype(model) -> torch.dtype:
    dt = getattr(model, "dtype", None)
    if isinstance(dt, torch.dtype):
        return dt
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {dtype: Fingerprint}


def fingerprint(model, dtype: torch.dtype | None = None) -> Fingerprint:
    """The fingerprint of a Hugging Face decoder (Llama, Qwen2/3, Mistral, Phi3, Gemma 1/2/3 families).

    ``dtype`` defaults to the model's dtype (that of the caches it writes). Computed once per model and dtype
    (a model's config and RoPE do not change after loading)."""
    dtype = dtype if dtype is not None else model_dtype(model)
    per_model = _CACHE.setdefault(model, {})
    if dtype not in per_model:
        per_model[dtype] = _fingerprint(model, dtype)
    return per_model[dtype]


def _fingerprint(model, dtype: torch.dtype) -> Fingerprint:
    cfg = _text_config(model)
    decoder = find_decoder(model)
    n = len(decoder.layers)
    kv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    types = getattr(cfg, "layer_types", None)
    windows = _windows(cfg, n)
    rot = decoder.rotary_emb
    layers = []
    for l in range(n):
        attn = getattr(decoder.layers[l], "self_attn", None)
        head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or \
            cfg.hidden_size // cfg.num_attention_heads
        spec = rope_spec_for_layer(decoder, l)
        lt = types[l] if types else None
        scaling = getattr(rot, f"{lt}_attention_scaling", None) if lt else None
        scaling = getattr(rot, "attention_scaling", 1.0) if scaling is None else scaling
        crc = zlib.crc32(spec.inv_freq.cpu().numpy().tobytes() + struct.pack("<d", float(scaling or 1.0)))
        layers.append((int(kv), int(head_dim), windows[l], spec.rotary_dim, rope_type_code(spec.rope_type),
                       _f64_bits(_rope_theta(cfg, lt)), crc))
    return Fingerprint(dtype_code(dtype), tuple(layers))


def _show(field: str, v: int):
    if field == "rope_theta":
        return _bits_f64(v)
    if field == "rope_type" and 0 <= v < len(ROPE_TYPES):
        return ROPE_TYPES[v]
    return v


def compare(sent: Fingerprint, mine: Fingerprint) -> str | None:
    """The first difference as ``"<field>: sender <a>, receiver <b>"``, or None when they agree."""
    if sent == mine:  # one tuple comparison in C; the field walk below only names what differs
        return None
    if sent.dtype != mine.dtype:
        return f"dtype: sender {dtype_of(sent.dtype)}, receiver {dtype_of(mine.dtype)}"
    if sent.n_layers != mine.n_layers:
        return f"layer count: sender {sent.n_layers}, receiver {mine.n_layers}"
    for l, (a, b) in enumerate(zip(sent.layers, mine.layers)):
        for field, x, y in zip(LAYER_FIELDS, a, b):
            if x != y:
                return f"layer {l} {field}: sender {_show(field, x)}, receiver {_show(field, y)}"
    return None
