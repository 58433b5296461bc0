"""Synthesizer adapter: a PEFT LoRA on the attention projections, trained so the model generates well
from a non-sequential :class:`pskernels.ParallelCache`.

The workers (and the text-concatenation teacher) keep the *base* model: compute their caches inside
``with base_model(peft_model):`` (PEFT's ``disable_adapter()``). The LoRA ``B`` matrices start at zero,
so a fresh adapter computes exactly what the base model computes.

Composes with :func:`pskernels.patch_model`: patch the PEFT-wrapped model (or the base model before
wrapping; ``patch_model`` finds the decoder by scanning modules for ``layers`` + ``rotary_emb``, and the
LoRA layers replace only the projections inside the attention modules).

Example
-------
>>> # peft_model = add_synthesizer_adapter(model, r=8)
>>> # handle = pskernels.patch_model(peft_model)
>>> # with base_model(peft_model), torch.no_grad():
>>> #     prefix = peft_model(prefix_ids, use_cache=True).past_key_values   # workers: base model
>>> # out = peft_model(prompt_ids, past_key_values=ParallelCache(prefix, branches, mapper=mapper))
"""
from __future__ import annotations

import contextlib
import os
import warnings

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGET_GROUPS = {"attn": DEFAULT_TARGETS, "mlp": ("gate_proj", "up_proj", "down_proj")}
PEFT_PIP = "pip install 'peft>=0.17'  (or: pip install 'pskernels[train]')"


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ModuleNotFoundError(f"the synthesizer adapter needs the package 'peft': run `{PEFT_PIP}`") from e
    return peft


@contextlib.contextmanager
def _wrapping():
    """PEFT reads transformers' deprecated ``is_gradient_checkpointing`` when it wraps a model: a FutureWarning on
    every load that the caller can do nothing about. Only that warning is silenced, only while wrapping."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def add_synthesizer_adapter(model, r: int = 8, alpha: int = 16, target_modules=DEFAULT_TARGETS, dropout: float = 0.0,
                            adapter_name: str = "default"):
    """Wrap ``model`` in a PEFT LoRA adapter on ``target_modules`` (the base weights are frozen).

    Note: PEFT injects the LoRA layers into ``model`` in place; with the adapter disabled (or ``B = 0``,
    as at init) the model computes exactly what it computed before.

    Returns
    -------
    peft.PeftModel
    """
    peft = _peft()
    if is_peft_model(model):
        raise ValueError("model: already a PeftModel (add_synthesizer_adapter wraps a plain HF model)")
    target_modules = resolve_targets(model, target_modules)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                          bias="none", task_type="CAUSAL_LM")
    with _wrapping():
        return peft.get_peft_model(model, cfg, adapter_name=adapter_name)


def resolve_targets(model, targets) -> tuple:
    """The module names a LoRA adapter on ``targets`` wraps: names of ``torch.nn.Linear`` modules of ``model``
    (the last component of their path, e.g. ``q_proj``) or the groups of :data:`TARGET_GROUPS` (``attn``,
    ``mlp``); a comma-separated string is split. Raises ValueError naming a target no Linear layer has."""
    import torch

    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = []
    for t in targets:
        for n in TARGET_GROUPS.get(t, (t,)):
            if n not in names:
                names.append(n)
    if not names:
        raise ValueError("target_modules: expected at least one module name")
    have = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [n for n in names if n not in have]
    if missing:
        raise ValueError(f"target_modules: {missing} name no Linear layer of the model; expected names from "
                         f"{sorted(have)} or groups {sorted(TARGET_GROUPS)}")
    return tuple(names)


def peft_targets(model) -> tuple:
    """The module names the LoRA adapter of a PeftModel wraps (sorted)."""
    return tuple(sorted(model.peft_config[model.active_adapter].target_modules))


@contextlib.contextmanager
def base_model(model):
    """Run ``model`` without its adapter (PEFT ``disable_adapter()``); a no-op for a plain model.

    Use it for everything the base model computes: the shared prefix, the workers' branch caches and the
    text-concatenation teacher."""
    if is_peft_model(model):
        with model.disable_adapter():
            yield model
    else:
        yield model


def unwrap(model):
    """The underlying Hugging Face model of a PeftModel (the model itself otherwise)."""
    return model.get_base_model() if is_peft_model(model) else model


def lora_parameters(model) -> list:
    """The trainable LoRA parameters of a PeftModel ([] for a plain model)."""
    if not is_peft_model(model):
        return []
    return [p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad]


def save_adapter(model, path: str | os.PathLike) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's format) in ``path``."""
    model.save_pretrained(str(path))


def load_adapter_weights(model, path: str | os.PathLike) -> None:
    """Load adapter weights saved by :func:`save_adapter` into an existing PeftModel (in place)."""
    peft = _peft()
    from peft.utils import load_peft_weights

    weights = load_peft_weights(str(path), device=str(next(model.parameters()).device))
    res = peft.set_peft_model_state_dict(model, weights)
    unexpected = getattr(res, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"{path}: adapter weights do not match the model (unexpected keys {unexpected[:4]}...)")


def load_synthesizer_adapter(model, path: str | os.PathLike, is_trainable: bool = False):
    """Wrap a plain HF ``model`` with an adapter saved by :func:`save_adapter`."""
    peft = _peft()
    with _wrapping():
        return peft.PeftModel.from_pretrained(model, str(path), is_trainable=is_trainable)
