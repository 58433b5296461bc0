"""A small random Llama and a shared-prefix workflow of zero-copy worker caches, for the synthesis cache tests."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import pskernels

V = 64


def small_llama(kv_heads=2, seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=kv_heads)).eval()


def zero_copy_workflow(model, lens, seed=1, vocab=V):
    """``(prefix cache, worker caches, ids)``: ``ids[0]`` the prefix's ids, ``ids[1:]`` each worker's, of
    ``lens``; each worker ran on ``ParallelCache(prefix, [])``. The model is patched on return."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (n,), generator=g) for n in lens]
    pskernels.patch_model(model)
    with torch.no_grad():
        prefix = model(ids[0][None], use_cache=True).past_key_values
        workers = [pskernels.ParallelCache(prefix, []) for _ in ids[1:]]
        for w, b in zip(workers, ids[1:]):
            model(b[None], past_key_values=w)
    return prefix, workers, ids
