"""A fan-out / synthesize agent workflow on one model: shared prefix, N workers, one synthesizer.

The workers run as one batched ``generate`` on a zero-copy ``ParallelCache(prefix, [])``: the prefix is
stored once and each worker's cache row holds only its own tokens. The synthesizer then reads those rows
as branches (:class:`pskernels.CacheRow`) instead of re-prefilling their text.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch

from ..hf import CacheRow, ParallelCache
from .adapter import unwrap


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` during 5.x; the name this version takes. A PEFT model
    forwards its keyword arguments as they are, so the name is read from the model it wraps."""
    return "cache" if "cache" in inspect.signature(unwrap(model).forward).parameters else "past_key_values"


def output_cache(out):
    c = out.get("cache") if hasattr(out, "get") else None
    return c if c is not None else out.past_key_values


@dataclass
class Workers:
    prefix: object  # the shared prefix cache (batch 1)
    cache: ParallelCache  # batched worker cache (N rows, own tokens = the branches)
    branch_ids: list  # per worker: token ids of its branch (instruction + answer) as stored in the cache
    answer_ids: list  # per worker: generated answer ids (without padding)

    def branches(self):
        return [CacheRow(self.cache, i) for i in range(len(self.branch_ids))]

    @property
    def branch_lengths(self):
        return [len(b) for b in self.branch_ids]


def left_padded(worker_ids: list, pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """``worker_ids`` (N 1-D tensors) as one left-padded batch: ``ids [N, L]`` and ``attention_mask [N, L]``."""
    n, L = len(worker_ids), max(len(w) for w in worker_ids)
    ids = torch.full((n, L), pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros(n, L, dtype=torch.long, device=device)
    for i, w in enumerate(worker_ids):
        ids[i, L - len(w):] = w
        mask[i, L - len(w):] = 1
    return ids, mask


@torch.no_grad()
def run_workers(model, prefix_ids: torch.Tensor, worker_ids: list, *, max_new_tokens: int, eos_token_id,
                pad_token_id: int, **generate_kwargs) -> Workers:
    """Prefill the shared prefix once, then let N workers generate in one left-padded batch.

    ``prefix_ids [1, P]``; ``worker_ids``: N 1-D tensors (each worker's instruction after the prefix).
    The model must be patched (:func:`pskernels.patch_model`).
    """
    kw = cache_kwarg(model)
    prefix = output_cache(model(prefix_ids, use_cache=True))
    ids, mask = left_padded(worker_ids, pad_token_id, prefix_ids.device)
    L = ids.shape[1]
    workers = ParallelCache(prefix, [], reserve=L + max_new_tokens - 1)  # every slot generate can write
    out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos_token_id, pad_token_id=pad_token_id, **generate_kwargs, **{kw: workers})
    gen = out[:, L:]
    steps = gen.shape[1]
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
    branch_ids, answers = [], []
    for i, w in enumerate(worker_ids):
        row = gen[i].tolist()
        stop = next((t + 1 for t, tok in enumerate(row) if tok in eos), steps)
        answers.append(torch.tensor(row[:stop], dtype=torch.long))
        cached = min(stop, steps - 1)  # the token generated at the last step is never fed back
        branch_ids.append(torch.cat([w.cpu(), torch.tensor(row[:cached], dtype=torch.long)]))
    return Workers(prefix, workers, branch_ids, answers)


@torch.no_grad()
def text_concat_cache(model, prefix, branch_ids: list, query_ids: torch.Tensor):
    """Text concatenation (the baseline): copy the cached prefix, re-prefill every branch's tokens and the
    synthesis prompt after it. Returns (cache, logits of the last position)."""
    kw = cache_kwarg(model)
    cache = copy.deepcopy(prefix)
    text = torch.cat([b.to(query_ids.device) for b in branch_ids] + [query_ids[0]])[None]
    logits = model(text, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
    return cache, logits
