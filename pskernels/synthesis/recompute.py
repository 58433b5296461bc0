"""Branch heads and tails recomputed in text order: a training-free trade of some TTFT for fidelity.

A worker computed its branch after the shared prefix alone, so no token of branch ``i`` has seen branches
``0 .. i-1``: that missing cross-branch context is what separates Parallel-Synthesis from re-prefilling the
text. CacheBlend recomputes a few selected tokens of each independently cached chunk, EPIC (LegoLink) the first
tokens of each chunk, KVLink trained link tokens at each chunk's end. :func:`recompute_branches` recomputes the
first ``head`` and the last ``tail`` tokens of every branch: they run again, in text order, over the prefix and
everything before them (earlier branches with their recomputed parts, the worker's own middle tokens), at the
positions the text gives them (the ``sequential`` scheme), and their new K/V replace the worker's for the
synthesizer; the middle stays the worker's, read in place. ``head`` and ``tail`` covering every branch give the
text concatenation itself (up to float rounding); 0 and 0 give plain Parallel-Synthesis.

Which end matters was measured (docs/FIDELITY-LOG.md, "Recomputing the branches' first tokens"): on the
reference suite's held-out families, the head (where a worker's input sits) carries most of the gap, the tail
little. Cost: one forward of the ``head`` and ``tail`` tokens of every branch, packed at their text positions over
the prefix and the workers' tokens between them, against re-prefilling every branch token for text concatenation
(a model whose sliding window is shorter than the text runs ``2 N`` forwards at most instead, one per part).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from transformers import DynamicCache

from ..hf import CacheRow, ParallelCache
from ..hf.attention import NAME as PATCHED_ATTENTION
from ..hf.attention import original_impl
from ..hf.cache import worker_cache
from ..ops.rotate_keys import rotate_keys
from ..rope import RopeSpec, find_decoder
from .workflow import cache_kwarg


def _branch_length(branch, name: str) -> int:
    """Real tokens of a batch-1 zero-copy worker cache or of one row (``CacheRow``) of a batched one."""
    cache, row = (branch.cache, branch.row) if isinstance(branch, CacheRow) else (branch, None)
    if not isinstance(cache, ParallelCache) or cache.branches:
        raise TypeError(f"{name}: expected a worker's zero-copy ParallelCache(prefix, []) or a CacheRow of one, got "
                        f"{type(branch).__name__}")
    if row is None and cache.batch != 1:
        raise ValueError(f"{name}: expected a batch-1 worker cache, got {cache.batch} rows (pass CacheRow(cache, i))")
    pad = cache._own_pad[row or 0] if cache._own_pad is not None else 0
    return cache.get_seq_length() - int(pad)


def _per_branch(name: str, n, count: int) -> list[int]:
    def ok(x):
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    if ok(n):
        return [n] * count
    if isinstance(n, (list, tuple)) and len(n) == count and all(ok(x) for x in n):
        return list(n)
    raise ValueError(f"{name}: expected an int >= 0 or one per branch ({count}), got {n!r}")


def is_share(x) -> bool:
    """Whether ``x`` is a number (not a bool) in [0, 1]."""
    return not isinstance(x, bool) and isinstance(x, (int, float)) and 0.0 <= x <= 1.0


def check_head_share(share) -> float:
    """``share`` as a float, or a ValueError naming ``head_share`` unless it is a number in [0, 1]."""
    if not is_share(share):
        raise ValueError(f"head_share: expected a number in [0, 1], got {share!r}")
    return float(share)


def describe_recompute(how, head_share: float = 0.0) -> str:
    """``(head, tail, together)`` in words: which tokens of each branch are recomputed (``head`` ``"prompt"``: each
    worker's instruction; ``head_share``: heads grown to that share of a longer branch)."""
    head, tail, _ = how
    what = "each worker's instruction" if head == "prompt" else f"the first {head} tokens of each branch"
    what += f" (at least {head_share:.0%} of it)" if head_share else ""
    return what + (f" and its last {tail}" if tail else "")


def grown_heads(head, lengths, share: float = 0.0) -> list[int]:
    """Per branch, the head recomputed when it grows with the branch: ``max(head, ceil(share * n))`` tokens of a
    branch of ``n`` (at most ``n``). ``head``: an int or one per branch; ``share`` in [0, 1] (0: ``head`` as is).

    A fixed head recomputes most of a short branch and little of a long one; a share keeps the recomputed part
    of long worker outputs in proportion (docs/FIDELITY-LOG.md, "Long worker outputs").

    >>> grown_heads(48, [80, 120, 220], share=0.4)
    [48, 48, 88]
    """
    lengths = list(lengths)
    share = check_head_share(share)
    heads = _per_branch("head", head, len(lengths))
    return [min(n, max(h, math.ceil(share * n - 1e-9))) for h, n in zip(heads, lengths)]  # 0.7 * 10 is 7, not 8


class RecomputedBranches(NamedTuple):
    """The segments :func:`recompute_branches` reads, in text order: recomputed parts and the workers' middles.
    Computed once, they serve any number of synthesizer caches (:meth:`cache`), e.g. one per training step of a
    mapper (the recomputation does not depend on it)."""

    prefix: object
    segments: list
    starts: list
    skips: list
    lengths: list
    backend: str
    recomputed: list  # indices of the recomputed segments

    def cache(self, mapper=None, query_start=None) -> ParallelCache:
        """A fresh ``ParallelCache`` (scheme ``custom``) over the segments, read through ``mapper`` (one with
        ``exact_recomputed`` leaves the recomputed segments as they are)."""
        exact = self.recomputed if mapper is not None and mapper.config.exact_recomputed else None
        return ParallelCache(self.prefix, self.segments, scheme="custom", branch_starts=self.starts,
                             branch_skip=self.skips, branch_lengths=self.lengths, query_start=query_start,
                             backend=self.backend, mapper=mapper, exact_branches=exact)


@torch.no_grad()
def recompute_branches(model, prefix, branches, branch_ids, *, head=0, tail=0, together: bool = False,
                       mapper=None, backend: str = "auto", head_share: float = 0.0) -> ParallelCache:
    """The synthesizer's cache over ``prefix`` and ``branches`` in text order, with the first ``head`` and the
    last ``tail`` tokens of every branch recomputed with the branches before it in view.

    Parameters
    ----------
    model : patched causal LM (``pskernels.patch_model``)
        Runs the recomputation; pass the model the synthesizer will be (e.g. the base model, adapter disabled).
    prefix : transformers Cache
        The shared prefix the workers ran on (batch 1).
    branches : list of ParallelCache or CacheRow
        The workers' zero-copy caches (``ParallelCache(prefix, [])``, batch 1, or ``CacheRow`` of a batched one), in
        text order.
    branch_ids : list of 1-D int tensors
        The token ids of each branch: its length (slots the worker stored after them, e.g. a batched worker's
        tokens after its EOS, are not read).
    head, tail : int or sequence of int (one per branch)
        Tokens recomputed at the start and at the end of each branch (a branch shorter than ``head + tail`` is
        recomputed whole); 0 and 0 recompute nothing (the ``sequential`` scheme). Per branch, e.g. ``head`` =
        each worker's prompt length: its input recomputed, its output read in place.
    together : bool
        False (exact): every part reads the parts recomputed before it in text order; all parts run in one
        forward, packed in text order and masked by text position (one forward per part where a sliding window
        shorter than the text bites). True: one forward for all parts (a batch row each), each reading the prefix
        and the tokens before it as their workers computed them (no part sees another's recomputation): the
        approximation run H48 was trained with, kept for it.
    mapper : pskernels.synthesis.CacheMapper, optional
        The synthesizer's trained mapper, applied by the returned cache to every segment (not used while
        recomputing).
    head_share : float
        In [0, 1]: the head grows with the branch, at least ``ceil(head_share * n)`` tokens of a branch of ``n``
        (:func:`grown_heads`); 0 keeps ``head`` as given.

    Returns
    -------
    ParallelCache
        ``scheme="custom"``, per branch: its recomputed head, the worker's tokens in between (read in place,
        ``branch_skip`` / ``branch_lengths``), its recomputed tail, at the positions the text concatenation gives
        them. The worker caches are not modified.

    Examples
    --------
    >>> import torch, pskernels
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> from pskernels.synthesis.recompute import recompute_branches
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> handle = pskernels.patch_model(model)
    >>> ids = [torch.randint(0, 64, (n,)) for n in (5, 7, 4)]   # prefix, two branches
    >>> with torch.no_grad():
    ...     prefix = model(ids[0][None], use_cache=True).past_key_values
    ...     workers = [pskernels.ParallelCache(prefix, []) for _ in ids[1:]]
    ...     for w, b in zip(workers, ids[1:]):
    ...         _ = model(b[None], past_key_values=w)
    ...     cache = recompute_branches(model, prefix, workers, ids[1:], head=2, tail=1)
    ...     out = model(torch.tensor([[1, 2]]), past_key_values=cache)
    >>> cache.num_branches, out.logits.shape   # per branch: head, the worker's middle, tail
    (6, torch.Size([1, 2, 64]))
    >>> handle.remove()
    """
    return recomputed_segments(model, prefix, branches, branch_ids, head=head, tail=tail, together=together,
                               backend=backend, head_share=head_share).cache(mapper=mapper)


@torch.no_grad()
def recomputed_segments(model, prefix, branches, branch_ids, *, head=0, tail=0, together: bool = False,
                        backend: str = "auto", head_share: float = 0.0) -> RecomputedBranches:
    """What :func:`recompute_branches` computes (same arguments but the mapper), before any cache reads it."""
    branches, branch_ids = list(branches), [torch.as_tensor(t) for t in branch_ids]
    if len(branch_ids) != len(branches):
        raise ValueError(f"branch_ids: expected one id tensor per branch ({len(branches)}), got {len(branch_ids)}")
    heads, tails = _per_branch("head", head, len(branches)), _per_branch("tail", tail, len(branches))
    lens = []
    for i, (c, ids) in enumerate(zip(branches, branch_ids)):
        stored = _branch_length(c, f"branches[{i}]")
        if ids.ndim != 1 or ids.numel() > stored:
            raise ValueError(f"branch_ids[{i}]: expected a 1-D tensor of at most the branch's {stored} stored tokens, "
                             f"got shape {tuple(ids.shape)}")
        lens.append(ids.numel())
    heads = grown_heads(heads, lens, head_share)
    P = ParallelCache(prefix, []).prefix_len
    text_starts = [P + sum(lens[:i]) for i in range(len(lens))]
    cuts = []  # per branch: (head, tail) recomputed
    for n, h, t in zip(lens, heads, tails):
        h = min(h, n)
        cuts.append((h, min(t, n - h)))
    parts = [(i, a, r) for i, (n, (h, t)) in enumerate(zip(lens, cuts)) for a, r in ((0, h), (n - t, t)) if r]
    ropes = [RopeSpec.from_model(model, li) for li in range(len(prefix.layers))]
    done = None  # every part's segment, computed in one forward (None: one forward per part, in text order)
    if together and parts:
        done = iter(_recompute_together(model, prefix, branches, branch_ids, lens, text_starts, parts, ropes,
                                        backend))
    elif parts and _packs_exactly(model, text_starts[-1] + lens[-1]):
        done = iter(_recompute_packed(model, prefix, branches, branch_ids, lens, text_starts, cuts, parts, ropes))
    view = RecomputedBranches(prefix, [], [], [], [], backend, [])
    segments, starts, skips, seg_lens = view.segments, view.starts, view.skips, view.lengths

    def recomputed(ids, at):
        """``ids`` at text position ``at`` as a segment of their new K/V (run here over the segments so far)."""
        view.recomputed.append(len(segments))
        if done is not None:
            segments.append(next(done))
        else:
            own = view.cache(query_start=at)
            model(ids.to(next(model.parameters()).device)[None], use_cache=True, logits_to_keep=1,
                  **{cache_kwarg(model): own})
            segments.append(worker_cache(prefix, _own_kv(own, 0, 0, P - at, ropes)))
        starts.append(at)
        skips.append(0)
        seg_lens.append(ids.numel())

    for c, ids, n, (h, t), pos in zip(branches, branch_ids, lens, cuts, text_starts):
        if h:
            recomputed(ids[:h], pos)
        if n - h - t:  # the worker's own K/V of the tokens in between
            segments.append(c)
            starts.append(pos)
            skips.append(h)
            seg_lens.append(n - t)
        if t:
            recomputed(ids[n - t:], pos + n - t)
    return view


def _own_kv(cache: ParallelCache, row: int, pad: int, shift: int, ropes) -> list:
    """Row ``row``'s own tokens (after ``pad`` slots) of every layer, keys re-rotated by ``shift`` (``ropes``: each
    layer's RoPE): computed at their text positions, they become a worker's tokens right after the prefix."""
    return [(rotate_keys(layer.keys[row:row + 1, :, pad:], shift, rope), layer.values[row:row + 1, :, pad:])
            for layer, rope in zip(cache.layers, ropes)]


def _worker_row(branch) -> tuple:
    """``(cache, row, pad)``: where a worker cache or a ``CacheRow`` of one keeps the branch's tokens."""
    cache, row = (branch.cache, branch.row) if isinstance(branch, CacheRow) else (branch, 0)
    return cache, row, int(cache._own_pad[row]) if cache._own_pad is not None else 0


def _broadcast_worker(prefix, branch, rows: int) -> ParallelCache:
    """A branch as a zero-copy worker cache of ``rows`` rows, each the same view of its K/V (no copy)."""
    cache, row, pad = _worker_row(branch)
    kv = [(layer.keys[row:row + 1].expand(rows, -1, -1, -1), layer.values[row:row + 1].expand(rows, -1, -1, -1))
          for layer in cache.layers]
    return worker_cache(prefix, kv, pad=[pad] * rows)


def _recompute_together(model, prefix, branches, branch_ids, lens, text_starts, parts, ropes, backend) -> list:
    """Every part ``(branch i, first token a, tokens r)`` recomputed in one forward, a left-padded batch row each,
    reading the prefix, branches ``< i`` and branch ``i``'s first ``a`` tokens as their workers computed them."""
    B, N, P = len(parts), len(branches), text_starts[0]
    visible = torch.zeros(N, B, dtype=torch.int64)
    L = max(r for _, _, r in parts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    at = []
    for row, (i, a, r) in enumerate(parts):
        visible[:i, row] = torch.tensor(lens[:i], dtype=torch.int64)
        visible[i, row] = a
        ids[row, L - r:] = branch_ids[i][a:a + r]
        mask[row, L - r:] = 1
        at.append(text_starts[i] + a)
    own = ParallelCache(prefix, [_broadcast_worker(prefix, b, B) for b in branches], scheme="custom",
                        branch_starts=text_starts, branch_lengths=visible, query_start=at, backend=backend)
    dev = next(model.parameters()).device
    # only the K/V are wanted: logits_to_keep=1 spares the LM head over every recomputed token (a fifth of the
    # forward's FLOPs on SmolLM2)
    model(ids.to(dev), attention_mask=mask.to(dev), use_cache=True, logits_to_keep=1, **{cache_kwarg(model): own})
    return [worker_cache(prefix, _own_kv(own, row, L - r, P - at[row], ropes)) for row, (_, _, r) in enumerate(parts)]


def _packs_exactly(model, text_len: int) -> bool:
    """The packed forward reads what the in-order forwards read: every attention layer of ``model`` takes an additive
    4D mask (eager or SDPA as ``patch_model`` found it; flash attention takes none) and has no sliding window
    shorter than ``text_len`` tokens (its own ``sliding_window``, else the config's), which the in-order forwards
    apply per layer."""
    decoder = find_decoder(model)
    cfg = decoder.config.get_text_config(decoder=True) if hasattr(decoder.config, "get_text_config") else decoder.config
    for layer in decoder.layers:
        attn = getattr(layer, "self_attn", None)
        own = getattr(attn, "config", cfg)
        impl = own._attn_implementation
        if (original_impl(own) if impl == PATCHED_ATTENTION else impl) not in ("eager", "sdpa"):
            return False
        window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
        if window is not None and window < text_len:
            return False
    return True


def _recompute_packed(model, prefix, branches, branch_ids, lens, text_starts, cuts, parts, ropes) -> list:
    """Every part ``(branch i, first token a, tokens r)`` recomputed exactly in one forward: the parts packed in text
    order as one sequence at their text positions, over an ordinary cache of the prefix and the workers' tokens
    between the parts (keys re-rotated at their text positions), with a mask by text position. A part's token sees
    the prefix, every worker token before it in the text and the packed tokens before it (the earlier parts, as
    recomputed in this forward): layer by layer, what the one-forward-per-part recomputation reads."""
    P = text_starts[0]
    dev = next(model.parameters()).device
    middles, middle_pos = [], []  # per branch with a middle: (cache, row, slots, shift); its text positions
    for c, n, (h, t), start in zip(branches, lens, cuts, text_starts):
        if n - h - t:
            worker, row, pad = _worker_row(c)
            middles.append((worker, row, pad + h, pad + n - t, start - P))
            middle_pos.append(torch.arange(start + h, start + n - t))
    cache = DynamicCache()
    for l, layer in enumerate(prefix.layers):
        keys, values = [layer.keys], [layer.values]
        for worker, row, a, b, shift in middles:
            own = worker.layers[l]
            keys.append(rotate_keys(own.keys[row:row + 1, :, a:b], shift, ropes[l]))
            values.append(own.values[row:row + 1, :, a:b])
        cache.update(torch.cat(keys, 2), torch.cat(values, 2), l)
    ids = torch.cat([branch_ids[i][a:a + r] for i, a, r in parts]).to(dev)
    pos = torch.cat([torch.arange(text_starts[i] + a, text_starts[i] + a + r) for i, a, r in parts])
    kept = torch.cat(middle_pos) if middle_pos else torch.zeros(0, dtype=torch.long)
    Q, M = pos.numel(), kept.numel()
    visible = torch.cat([torch.ones(Q, P, dtype=torch.bool), kept[None, :] < pos[:, None],
                         torch.ones(Q, Q, dtype=torch.bool).tril()], 1)  # [Q, P + M + Q]
    dtype = next(model.parameters()).dtype
    mask = torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min)
    model(ids[None], position_ids=pos[None].to(dev), attention_mask=mask[None, None].to(dev), use_cache=True,
          logits_to_keep=1, **{cache_kwarg(model): cache})
    out, at = [], P + M
    for i, a, r in parts:
        shift = P - (text_starts[i] + a)  # from its text positions to a worker's right after the prefix
        out.append(worker_cache(prefix, [(rotate_keys(layer.keys[:, :, at:at + r], shift, rope),
                                          layer.values[:, :, at:at + r]) for layer, rope in zip(cache.layers, ropes)]))
        at += r
    return out
