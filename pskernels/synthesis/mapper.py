"""``CacheMapper``: a small learned per-layer transform that calibrates branch caches for the synthesizer.

Per layer and kv head, keys get a low-rank residual in un-rotated space (then re-rotated at their new
positions) and values a low-rank residual, optionally gated; per layer and query head, APE-style
calibration knobs (temperature ``T``, LSE scale ``S``, log-weight ``b``) rescale how much the branches
weigh against the prefix and the synthesizer's own tokens. Identity at init: ``up`` projections are
zero and the knobs are ``T = S = 1, b = 0``.

With ``exact_recomputed``, the mapper steps aside where branch tokens were recomputed in text order
(:mod:`pskernels.synthesis.recompute`): their K/V are the text's already, so it neither maps nor calibrates them
and acts on the workers' own tokens only.

Optionally (``link_tokens > 0``) it also holds trained input embeddings of ``link_tokens`` tokens that the
synthesizer runs after every branch, with the branches before it in view (KVLink's link tokens,
:mod:`pskernels.synthesis.links`); a mapper with link tokens is read through
:func:`pskernels.synthesis.links.linked_cache`, which computes them, never by a bare ``ParallelCache``.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from ..ops import map_kv_caches

CONFIG_NAME = "mapper_config.json"
WEIGHTS_NAME = "mapper.safetensors"


@dataclass
class CacheMapperConfig:
    num_layers: int
    num_kv_heads: int
    num_heads: int
    head_dim: int
    value_dim: int | None = None
    rank: int = 8
    gated: bool = True
    calibrate: bool = True
    init_temperature: float = 1.0
    init_lse_scale: float = 1.0
    link_tokens: int = 0
    hidden_size: int | None = None
    exact_recomputed: bool = False


class CacheMapper(nn.Module):
    """Learned branch-cache calibration, applied by ``ParallelCache(..., mapper=mapper)``.

    Parameters are stacked over layers so one :func:`pskernels.map_kv_caches` call maps every
    (layer, branch) pair. ``CacheMapper.for_model(model)`` sizes it from an HF model's config.

    Examples
    --------
    >>> from pskernels.synthesis import CacheMapper
    >>> m = CacheMapper(CacheMapperConfig(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16))
    >>> m.is_identity()
    True
    """

    def __init__(self, config: CacheMapperConfig):
        super().__init__()
        self.config = c = config
        NL, H, D, r = c.num_layers, c.num_kv_heads, c.head_dim, c.rank
        Dv = c.value_dim or D
        for name in ("num_layers", "num_kv_heads", "num_heads", "head_dim"):
            if not isinstance(getattr(c, name), int) or getattr(c, name) < 1:
                raise ValueError(f"{name}: expected an int >= 1, got {getattr(c, name)!r}")
        if not isinstance(r, int) or r < 0:
            raise ValueError(f"rank: expected an int >= 0, got {r!r}")
        for name in ("init_temperature", "init_lse_scale"):  # they start as logs: NaN or <= 0 has none
            v = getattr(c, name)
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name}: expected a finite number > 0, got {v!r}")
        if c.num_heads % H:
            raise ValueError(f"num_heads ({c.num_heads}) must be a multiple of num_kv_heads ({H})")
        if c.link_tokens < 0 or (c.link_tokens and not c.hidden_size):
            raise ValueError(f"link_tokens: expected 0, or > 0 with the model's hidden_size, got link_tokens "
                             f"{c.link_tokens}, hidden_size {c.hidden_size}")
        self.k_down = nn.Parameter(torch.randn(NL, H, D, r) / math.sqrt(D))
        self.k_up = nn.Parameter(torch.zeros(NL, H, r, D))
        self.v_down = nn.Parameter(torch.randn(NL, H, Dv, r) / math.sqrt(Dv))
        self.v_up = nn.Parameter(torch.zeros(NL, H, r, Dv))
        if c.gated:
            self.k_gate = nn.Parameter(torch.zeros(NL, H))
            self.v_gate = nn.Parameter(torch.zeros(NL, H))
        else:
            self.register_parameter("k_gate", None)
            self.register_parameter("v_gate", None)
        if c.calibrate:
            Hq = c.num_heads
            self.log_temperature = nn.Parameter(torch.full((NL, Hq), math.log(c.init_temperature)))
            self.log_lse_scale = nn.Parameter(torch.full((NL, Hq), math.log(c.init_lse_scale)))
            self.log_weight = nn.Parameter(torch.zeros(NL, Hq))
        else:
            for n in ("log_temperature", "log_lse_scale", "log_weight"):
                self.register_parameter(n, None)
        if c.link_tokens:  # replaced by for_model with embeddings that look like the model's
            self.link_embeddings = nn.Parameter(torch.zeros(c.link_tokens, c.hidden_size))
        else:
            self.register_parameter("link_embeddings", None)

    @classmethod
    def for_model(cls, model, **kwargs) -> "CacheMapper":
        """Size a mapper from an HF causal LM (``rank``, ``gated``, ``calibrate``, ``init_*``, ``link_tokens`` as
        kwargs). Link tokens start as random embeddings with the mean and per-dimension spread of the model's
        vocabulary (drawn from torch's global generator)."""
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        if kwargs.get("link_tokens"):
            kwargs.setdefault("hidden_size", cfg.hidden_size)
        mapper = cls(CacheMapperConfig(num_layers=cfg.num_hidden_layers,
                                       num_kv_heads=getattr(cfg, "num_key_value_heads", cfg.num_attention_heads),
                                       num_heads=cfg.num_attention_heads, head_dim=head_dim, **kwargs))
        if mapper.link_embeddings is not None:
            vocab = model.get_input_embeddings().weight.detach().float()
            with torch.no_grad():
                mapper.link_embeddings.copy_(vocab.mean(0) + vocab.std(0) * torch.randn_like(mapper.link_embeddings))
        return mapper

    @property
    def link_tokens(self) -> int:
        """Link tokens the synthesizer runs after each branch (0: none)."""
        return self.config.link_tokens

    def is_identity(self) -> bool:
        c = self.config
        ident = not c.link_tokens and bool((self.k_up == 0).all() and (self.v_up == 0).all())
        if c.calibrate:
            ident &= bool((self.log_temperature == 0).all() and (self.log_lse_scale == 0).all()
                          and (self.log_weight == 0).all())
        return ident

    def map(self, keys, values, orig_positions, new_positions, rope, layers=None, links_read: bool = False):
        """Map ``[layers][branches]`` caches (see :func:`pskernels.map_kv_caches`); differentiable when the
        mapper's parameters require grad (the op then runs its PyTorch backend). ``layers``: the model
        layer index of each entry of ``keys`` (default: all layers in order). ``links_read``: the branches
        include this mapper's link tokens (set by :func:`pskernels.synthesis.links.linked_cache`); a mapper with
        link tokens refuses branches without them, which it was not trained to read."""
        if self.config.link_tokens and not links_read:
            raise ValueError(f"mapper: trained with {self.config.link_tokens} link tokens after each branch; build "
                             "the synthesizer's cache with pskernels.synthesis.links.linked_cache(model, prefix, "
                             "branches, lengths, mapper), not ParallelCache(..., mapper=mapper)")
        dev = keys[0][0].device
        idx = None if layers is None or list(layers) == list(range(self.config.num_layers)) else list(layers)
        p = {n: (None if t is None else (t if idx is None else t[idx]).to(dev)) for n, t in
             (("k_down", self.k_down), ("k_up", self.k_up), ("k_gate", self.k_gate),
              ("v_down", self.v_down), ("v_up", self.v_up), ("v_gate", self.v_gate))}
        return map_kv_caches(keys, values, rope=rope, orig_positions=orig_positions, new_positions=new_positions,
                             **p)

    def knobs(self, layer_idx: int, device) -> dict:
        """Calibration of ``layer_idx`` as ``multi_branch_attention`` kwargs for two groups:
        group 0 = prefix + own tokens (exact attention), group 1 = the branches (calibrated)."""
        if not self.config.calibrate:
            return {}
        Hq = self.config.num_heads
        one, zero = torch.ones(1, Hq, device=device), torch.zeros(1, Hq, device=device)
        return {
            "temperature": torch.cat([one, self.log_temperature[layer_idx : layer_idx + 1].exp().to(device)]),
            "lse_scale": torch.cat([one, self.log_lse_scale[layer_idx : layer_idx + 1].exp().to(device)]),
            "log_weight": torch.cat([zero, self.log_weight[layer_idx : layer_idx + 1].to(device)]),
        }

    # ---- persistence ----------------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w") as f:
            json.dump(asdict(self.config), f, indent=2)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device=None) -> "CacheMapper":
        from safetensors.torch import load_file

        cfg_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; expected a folder written by "
                                    "CacheMapper.save_pretrained")
        with open(cfg_path) as f:
            mapper = cls(CacheMapperConfig(**json.load(f)))
        state = load_file(os.path.join(path, WEIGHTS_NAME))
        for name, t in state.items():  # a diverged run saves NaN weights; refuse them here, not as NaN logits later
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path}: parameter {name!r} of {WEIGHTS_NAME} holds non-finite values")
        mapper.load_state_dict(state)
        return mapper.to(device) if device is not None else mapper
