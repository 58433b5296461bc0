"""Tiny random Hugging Face decoders for integration tests (no downloads).

Weights are re-initialised with a larger std (and non-zero biases) so logits are far from flat and
greedy-token comparisons are meaningful.
"""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 97
_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _cfg(cls, **kw):
    args = dict(_BASE)
    args.update(kw)
    return cls(**args)


ARCHS = {
    "llama": lambda: (tf.LlamaForCausalLM, _cfg(tf.LlamaConfig)),
    "llama3_rope": lambda: (tf.LlamaForCausalLM, _cfg(tf.LlamaConfig, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    "llama_yarn": lambda: (tf.LlamaForCausalLM, _cfg(tf.LlamaConfig, rope_parameters={
        "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128})),
    "qwen2": lambda: (tf.Qwen2ForCausalLM, _cfg(tf.Qwen2Config)),
    "qwen3": lambda: (tf.Qwen3ForCausalLM, _cfg(tf.Qwen3Config, head_dim=16)),
    "mistral_sliding": lambda: (tf.MistralForCausalLM, _cfg(tf.MistralConfig, sliding_window=6, head_dim=16)),
    "phi3_partial": lambda: (tf.Phi3ForCausalLM, _cfg(tf.Phi3Config, num_key_value_heads=2, rope_parameters={
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})),
    "gemma": lambda: (tf.GemmaForCausalLM, _cfg(tf.GemmaConfig, head_dim=16)),
    "gemma2": lambda: (tf.Gemma2ForCausalLM, _cfg(tf.Gemma2Config, head_dim=16, sliding_window=6,
                                                  attn_logit_softcapping=2.0, final_logit_softcapping=30.0,
                                                  query_pre_attn_scalar=16)),
    "gemma3": lambda: (tf.Gemma3ForCausalLM, _cfg(tf.Gemma3TextConfig, head_dim=16, sliding_window=6,
                                                  query_pre_attn_scalar=16, num_hidden_layers=4,
                                                  layer_types=["sliding_attention", "full_attention"] * 2)),
}


def make_model(arch: str, attn_implementation: str = "eager", dtype=torch.float32, seed: int = 0):
    cls, cfg = ARCHS[arch]()
    torch.manual_seed(seed)
    model = cls._from_config(cfg, attn_implementation=attn_implementation, dtype=dtype).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            elif "norm" in name or "layernorm" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1 + (0.0 if "gemma" in arch else 1.0))
            else:  # biases
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model
