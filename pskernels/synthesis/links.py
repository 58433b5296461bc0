"""Link tokens: a few trained tokens after each branch, run by the synthesizer with the branches before it in view.

A worker computed its branch after the shared prefix alone: no token of branch ``i`` has seen branches
``0 .. i-1``. Recomputing part of every branch (:mod:`pskernels.synthesis.recompute`) repairs that at the cost
of re-prefilling those tokens. KVLink instead appends a few *link tokens* with trained embeddings to each
independently cached segment and computes only them with the whole context in view; the rest of every segment is
read as it was cached. :func:`linked_cache` does this for Parallel-Synthesis: the ``K`` link tokens of a
:class:`pskernels.synthesis.CacheMapper` (``link_tokens=K``) are placed after every branch in text order and run
in ONE forward of ``N x K`` tokens (a batch row per branch), row ``i`` reading the prefix and branches
``0 .. i``; their K/V then sit between the branches of the synthesizer's cache, read through the mapper like
the branches. The link embeddings, the mapper and the LoRA adapter are trained together
(``pskernels train --link-tokens K``); gradients flow through the link forward.
"""
from __future__ import annotations

import torch

from ..hf import ParallelCache
from ..hf.cache import worker_cache
from ..rope import RopeSpec
from .recompute import _branch_length, _broadcast_worker, _own_kv
from .workflow import cache_kwarg


class _LinkedMapper:
    """``mapper`` as the synthesizer's cache reads it once its link tokens are among the branches."""

    def __init__(self, mapper):
        self.mapper = mapper

    def map(self, *args, **kwargs):
        return self.mapper.map(*args, links_read=True, **kwargs)

    def knobs(self, layer_idx, device):
        return self.mapper.knobs(layer_idx, device)


def linked_cache(model, prefix, branches, lengths, mapper, *, backend: str = "auto") -> ParallelCache:
    """The synthesizer's cache over ``prefix`` and ``branches`` in text order, each branch followed by the
    mapper's link tokens computed now, with the branches up to it in view.

    Runs under the caller's grad mode: in training the link embeddings (and the adapter, through the link
    forward) receive gradients.

    Parameters
    ----------
    model : patched causal LM (``pskernels.patch_model``), or the PeftModel of the trained synthesizer
        Runs the link tokens (with its adapter, if enabled: the synthesizer computes them).
    prefix : transformers Cache
        The shared prefix the workers ran on (batch 1).
    branches : list of ParallelCache or CacheRow
        The workers' zero-copy caches (``ParallelCache(prefix, [])``, batch 1, or ``CacheRow`` of a batched one),
        in text order.
    lengths : list of int
        Real tokens of each branch (slots a batched worker stored after them are not read).
    mapper : pskernels.synthesis.CacheMapper
        With ``link_tokens > 0``: its ``link_embeddings [K, hidden]`` are the link tokens' inputs; it maps every
        segment (branches and links) as in ``ParallelCache(..., mapper=mapper)``.

    Returns
    -------
    ParallelCache
        ``scheme="custom"``: per branch the worker's tokens (read in place), then its ``K`` link tokens, at text
        positions (branch ``i`` starts at ``P + sum(lengths[:i]) + i K``); the synthesizer's tokens follow the
        last link. The worker caches are not modified.

    Examples
    --------
    >>> import torch, pskernels
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from pskernels.synthesis import CacheMapper
    >>> from pskernels.synthesis.links import linked_cache
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> handle = pskernels.patch_model(model)
    >>> mapper = CacheMapper.for_model(model, link_tokens=2)
    >>> ids = [torch.randint(0, 64, (n,)) for n in (5, 7, 4)]   # prefix, two branches
    >>> with torch.no_grad():
    ...     prefix = model(ids[0][None], use_cache=True).past_key_values
    ...     workers = [pskernels.ParallelCache(prefix, []) for _ in ids[1:]]
    ...     for w, b in zip(workers, ids[1:]):
    ...         _ = model(b[None], past_key_values=w)
    ...     cache = linked_cache(model, prefix, workers, [7, 4], mapper)
    ...     out = model(torch.tensor([[1, 2]]), past_key_values=cache)
    >>> cache.num_branches, int(cache.query_start[0])   # branch, links, branch, links; 5 + 7 + 2 + 4 + 2
    (4, 20)
    >>> handle.remove()
    """
    K = getattr(mapper, "link_tokens", 0)
    if not K:
        raise ValueError("mapper: expected a CacheMapper with link_tokens > 0 (CacheMapper.for_model(model, "
                         f"link_tokens=K)), got {type(mapper).__name__} with {K!r} link tokens")
    branches = list(branches)
    if len(lengths) != len(branches):
        raise ValueError(f"lengths: expected one per branch ({len(branches)}), got {len(lengths)}")
    lens = []
    for i, (b, n) in enumerate(zip(branches, lengths)):
        stored = _branch_length(b, f"branches[{i}]")
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= stored:
            raise ValueError(f"lengths[{i}]: expected an int in [0, {stored}] (the branch's stored tokens), got {n!r}")
        lens.append(n)
    N, P = len(branches), ParallelCache(prefix, []).prefix_len
    starts = [P + sum(lens[:i]) + i * K for i in range(N)]
    links_at = [s + n for s, n in zip(starts, lens)]
    if N:
        visible = torch.zeros(N, N, dtype=torch.int64)  # [branch, row]: row i reads branches 0 .. i
        for row in range(N):
            visible[:row + 1, row] = torch.tensor(lens[:row + 1], dtype=torch.int64)
        own = ParallelCache(prefix, [_broadcast_worker(prefix, b, N) for b in branches], scheme="custom",
                            branch_starts=starts, branch_lengths=visible, query_start=links_at, backend=backend)
        param = next(model.parameters())
        x = mapper.link_embeddings.to(param.device, param.dtype)[None].expand(N, K, -1)  # [N, K, hidden]
        model(inputs_embeds=x, use_cache=True, logits_to_keep=1, **{cache_kwarg(model): own})
        ropes = [RopeSpec.from_model(model, li) for li in range(len(own.layers))]
    segments, seg_starts, seg_lens = [], [], []
    for i, b in enumerate(branches):
        segments += [b, worker_cache(prefix, _own_kv(own, i, 0, P - links_at[i], ropes))]
        seg_starts += [starts[i], links_at[i]]
        seg_lens += [lens[i], K]
    return ParallelCache(prefix, segments, scheme="custom", branch_starts=seg_starts, branch_lengths=seg_lens,
                         query_start=P + sum(lens) + N * K, backend=backend, mapper=_LinkedMapper(mapper))
