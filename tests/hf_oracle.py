"""Full-sequence oracle for ParallelCache tests: one forward over [prefix | branches | query] per row,
with a 4-D float block mask and custom position ids (the branch caches are never used)."""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch

import pskernels


@dataclass
class Case:
    prefix: torch.Tensor  # [B, P]
    branches: list  # N x [B, Lmax_i]
    lengths: torch.Tensor  # [N, B]
    query: torch.Tensor  # [B, Q] left padded
    query_mask: torch.Tensor  # [B, Q]


def make_case(B, P, lengths, q_lens, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.as_tensor(lengths, dtype=torch.int64).reshape(-1, B)
    prefix = torch.randint(3, vocab, (B, P), generator=g)
    branches = [torch.randint(3, vocab, (B, int(lengths[i].max())), generator=g) for i in range(lengths.shape[0])]
    Q = max(q_lens)
    query = torch.randint(3, vocab, (B, Q), generator=g)
    mask = torch.zeros(B, Q, dtype=torch.int64)
    for b, n in enumerate(q_lens):
        mask[b, Q - n:] = 1
        query[b, : Q - n] = 0
    return Case(prefix, branches, lengths, query, mask)


@torch.no_grad()
def branch_caches(model, case: Case, zero_copy=False):
    """Prefix cache and one cache per branch: deepcopy idiom ([prefix | branch]) or zero-copy workers."""
    prefix = model(case.prefix, use_cache=True).past_key_values
    out = []
    for ids in case.branches:
        if zero_copy:
            c = pskernels.ParallelCache(prefix, [])
        else:
            c = copy.deepcopy(prefix)
        if ids.shape[1]:
            model(ids, past_key_values=c, use_cache=True)
        out.append(c)
    return prefix, out


def oracle_rows(case: Case, b: int, branch_first=None, query_start=None, extra_tokens=()):
    """Tokens, positions and per-token segment ids of row ``b`` (branch i -> i + 1, prefix 0, query -1)."""
    P = case.prefix.shape[1]
    toks, pos, seg = list(case.prefix[b].tolist()), list(range(P)), [0] * P
    ends = [P]
    for i, ids in enumerate(case.branches):
        n = int(case.lengths[i, b])
        first = P if branch_first is None else int(branch_first[i][b])
        toks += ids[b, :n].tolist()
        pos += list(range(P, P + n))  # branches are computed at their native positions
        seg += [i + 1] * n
        if n:
            ends.append(first + n)
    qs = max(ends) if query_start is None else query_start
    real = case.query[b][case.query_mask[b].bool()].tolist() + list(extra_tokens)
    toks += real
    pos += list(range(qs, qs + len(real)))
    seg += [-1] * len(real)
    return toks, pos, seg


def oracle_mask(pos, seg, window=None):
    T = len(pos)
    pos_t, seg_t = torch.tensor(pos), torch.tensor(seg)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    causal = j <= i
    same = seg_t[:, None] == seg_t[None, :]
    key_prefix = seg_t[None, :] == 0
    is_query = seg_t[:, None] == -1
    allowed = causal & (same | key_prefix | is_query)
    if window is not None:
        allowed &= (pos_t[:, None] - pos_t[None, :]) < window
    m = torch.zeros(T, T)
    m[~allowed] = float("-inf")
    return m[None, None]


def mask_arg(model, pos, seg):
    cfg = model.config.get_text_config(decoder=True)
    types = getattr(cfg, "layer_types", None)
    w = getattr(cfg, "sliding_window", None)
    if types is not None and "sliding_attention" in types:
        return {"full_attention": oracle_mask(pos, seg), "sliding_attention": oracle_mask(pos, seg, w)}
    if w is not None and types is None:
        return oracle_mask(pos, seg, w)
    return oracle_mask(pos, seg)


@torch.no_grad()
def oracle_logits(model, case: Case, b: int, extra_tokens=(), **kw):
    toks, pos, seg = oracle_rows(case, b, extra_tokens=extra_tokens, **kw)
    out = model(torch.tensor([toks]), attention_mask=mask_arg(model, pos, seg), position_ids=torch.tensor([pos]))
    n_q = seg.count(-1)
    return out.logits[0, -n_q:]


@torch.no_grad()
def oracle_greedy(model, case: Case, b: int, steps: int, **kw):
    new = []
    for _ in range(steps):
        new.append(int(oracle_logits(model, case, b, extra_tokens=new, **kw)[-1].argmax()))
    return new
