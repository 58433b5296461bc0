"""Teacher and student of the synthesizer distillation, shared by training and evaluation.

Per example (batch 1), everything reads the same branch caches:

* :func:`branch_caches`: the frozen *base* model (adapter disabled) computes the shared prefix cache and
  one zero-copy cache per worker (``ParallelCache(prefix, [])``: only the branch tokens are stored);
* the **teacher** (:func:`teacher_logits`, :func:`teacher_greedy`, :func:`teacher_samples`) is the base model
  reading the *text concatenation* ``prefix + branches + prompt (+ target)`` (the prefix cache copied, the rest
  re-prefilled);
* the **student** (:func:`student_logits`, :func:`student_greedy`, :func:`student_samples`) is the patched model,
  with or without its adapter, reading ``prompt (+ target)`` over ``ParallelCache(prefix, branches, scheme=...,
  mapper=mapper)``
  (:func:`pskernels.synthesis.synthesizer.synthesizer_cache`: for a mapper with link tokens, over
  :func:`pskernels.synthesis.links.linked_cache`);
* :func:`kl_per_token` compares their distributions on the target tokens. Examples without a ``target``
  (distillation) are scored on the teacher's greedy continuation (:class:`TargetCache`).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .._core.devices import dtype_name
from ..hf import ParallelCache, patch_model
from .adapter import base_model, unwrap
from .data import TokenizedExample, tokenize_example
from .recompute import RecomputedBranches, recomputed_segments
from .synthesizer import synthesizer_cache
from .workflow import cache_kwarg, output_cache


@contextlib.contextmanager
def patched(model):
    """Patch ``model`` for the duration (no-op if it, or its base model, is already patched)."""
    if getattr(model, "_pskernels_patch", None) is not None or getattr(unwrap(model), "_pskernels_patch", None):
        yield model
        return
    handle = patch_model(model)
    try:
        yield model
    finally:
        handle.remove()


def tokenize_examples(tokenizer, examples, device) -> list[TokenizedExample]:
    """``examples`` (dicts in the :mod:`pskernels.synthesis.data` format, or ``TokenizedExample``) tokenized."""
    return [ex if isinstance(ex, TokenizedExample) else tokenize_example(tokenizer, ex, device=device)
            for ex in examples]


def eos_ids(tokenizer):
    """The tokenizer's end-of-sequence id(s), or None: where greedy decoding stops."""
    return getattr(tokenizer, "eos_token_id", None)


@torch.no_grad()
def recomputed_view(model, ex: TokenizedExample, prefix, branches, recompute, adapter: bool = True,
                    head_share: float = 0.0):
    """The segments ``recompute=(head, tail, together)`` gives one example (:func:`recomputed_segments`, heads
    growing to ``head_share`` of a branch), computed by the base model (``adapter=True``: the adapter is disabled
    for it; False: the caller already did)."""
    head, tail, together = recompute
    # the recomputed K/V are the teacher's (the base model's); the synthesizer's mapper reads them as branches
    with base_model(model) if adapter else contextlib.nullcontext():
        return recomputed_segments(model, prefix, branches, ex.branch_ids, head=head, tail=tail, together=together,
                                   head_share=head_share)


def _synthesis_cache(model, ex, prefix, branches, mapper, scheme, recompute, adapter):
    if not recompute:
        return synthesizer_cache(model, prefix, branches, mapper, scheme=scheme)
    if getattr(mapper, "link_tokens", 0):
        raise ValueError(f"recompute: a mapper with link tokens reads the branches as they were cached, got recompute "
                         f"{recompute!r}")
    if scheme != "sequential":
        raise ValueError(f"recompute: recomputed branch parts read the branches in text order (scheme 'sequential'), "
                         f"got scheme {scheme!r}")
    if not isinstance(recompute, RecomputedBranches):
        recompute = recomputed_view(model, ex, prefix, branches, recompute, adapter)
    return recompute.cache(mapper=mapper)


@torch.no_grad()
def branch_caches(model, ex: TokenizedExample):
    """Prefix cache and zero-copy worker caches, computed by the base model (adapter disabled).
    ``model`` must be patched."""
    kw = cache_kwarg(model)
    dev = next(model.parameters()).device
    with base_model(model):
        prefix = output_cache(model(ex.prefix_ids.to(dev)[None], use_cache=True))
        branches = []
        for ids in ex.branch_ids:
            c = ParallelCache(prefix, [])
            model(ids.to(dev)[None], use_cache=True, **{kw: c})
            branches.append(c)
    return prefix, branches


@torch.no_grad()
def teacher_logits(model, ex: TokenizedExample, prefix, target: torch.Tensor) -> torch.Tensor:
    """Text concatenation (base model): logits ``[T, V]`` predicting each target token."""
    dev = next(model.parameters()).device
    T = target.numel()
    ids = torch.cat(list(ex.branch_ids) + [ex.prompt_ids, target]).to(dev)[None]
    with base_model(model):
        out = model(ids, use_cache=True, logits_to_keep=T + 1, **{cache_kwarg(model): copy.deepcopy(prefix)})
    return out.logits[0, :-1].float()


def student_logits(model, ex: TokenizedExample, prefix, branches, target: torch.Tensor, *, mapper=None,
                   scheme: str = "sequential", adapter: bool = True, recompute=None) -> torch.Tensor:
    """Parallel synthesis: logits ``[T, V]`` predicting each target token from the branch caches.
    ``adapter=False`` runs the base model (untrained Parallel-Synthesis / APE settings); ``recompute=(head, tail,
    together)`` first recomputes that many tokens at each end of every branch in text order
    (:func:`pskernels.synthesis.recompute.recompute_branches`), or reads those already recomputed
    (:func:`recomputed_view`)."""
    dev = next(model.parameters()).device
    T = target.numel()
    ids = torch.cat([ex.prompt_ids, target]).to(dev)[None]
    with _student_cache(model, ex, prefix, branches, mapper, scheme, adapter, recompute) as cache:
        out = model(ids, use_cache=True, logits_to_keep=T + 1, **{cache_kwarg(model): cache})
    return out.logits[0, :-1].float()


@torch.no_grad()
def greedy(model, first_ids: torch.Tensor, cache, n: int, eos=None) -> torch.Tensor:
    """Greedy continuation of ``first_ids`` (1-D) over ``cache`` (stops after ``eos``, which is kept)."""
    dev = next(model.parameters()).device
    kw = cache_kwarg(model)
    ids = first_ids.to(dev)[None]
    out = []
    eos = _eos_set(eos)
    for _ in range(n):
        tok = int(model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[0, -1].argmax())
        out.append(tok)
        if tok in eos:
            break
        ids = torch.tensor([[tok]], device=dev)
    return torch.tensor(out, dtype=torch.long)


def check_temperature(temperature) -> None:
    """Refuse a sampling temperature that is not a finite number > 0 (NaN, 0, inf, a bool), naming it."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")


@torch.no_grad()
def sample(model, first_ids: torch.Tensor, cache, n: int, samples: int, eos=None, *, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """``samples`` continuations of ``first_ids`` (1-D) over ``cache``, decoded as one batch (``cache`` holds
    ``samples`` rows, or one that broadcasts, as a :class:`ParallelCache`'s prefix and branches do); each stops after
    ``eos`` (kept) or ``n`` tokens.

    Token ``t`` of continuation ``k`` is the first whose cumulative probability under ``softmax(logits /
    temperature)`` (vocabulary order) exceeds ``u[k, t]``, ``u = torch.rand(samples, n, generator=generator)``
    drawn up front (inverse-CDF sampling): callers seeding the generator alike draw with the same uniforms, so
    where their distributions agree they draw the same tokens (common random numbers), and continuation ``k``
    does not depend on how many others are decoded beside it."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples: expected an int >= 1, got {samples!r}")
    check_temperature(temperature)
    dev = next(model.parameters()).device
    kw = cache_kwarg(model)
    u = torch.rand(samples, n, generator=generator, device=dev if generator is None else generator.device).to(dev)
    ids = first_ids.to(dev)[None].expand(samples, -1)
    toks = torch.zeros(samples, n, dtype=torch.long, device=dev)
    lengths = torch.full((samples,), n)
    eos = torch.tensor(sorted(_eos_set(eos)), dtype=torch.long, device=dev)
    for t in range(n):
        logits = model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].float()
        cdf = torch.softmax(logits / temperature, -1).cumsum(-1)  # [samples, V]
        # scaled by the last entry: a sum that rounds below 1 never leaves u past the end
        toks[:, t] = torch.searchsorted(cdf, (u[:, t] * cdf[:, -1])[:, None], right=True)[:, 0]
        ended = torch.isin(toks[:, t], eos).cpu() & (lengths == n)
        lengths[ended] = t + 1
        if bool((lengths <= t + 1).all()):
            break
        ids = toks[:, t : t + 1]
    return [toks[k, : int(lengths[k])].cpu() for k in range(samples)]


@torch.no_grad()
def teacher_greedy(model, ex: TokenizedExample, prefix, n: int, eos=None) -> torch.Tensor:
    """The teacher's greedy continuation (``n`` tokens at most) of ``branches + prompt`` after ``prefix``."""
    with base_model(model):
        first = torch.cat(list(ex.branch_ids) + [ex.prompt_ids])
        return greedy(model, first, copy.deepcopy(prefix), n, eos)


@torch.no_grad()
def teacher_samples(model, ex: TokenizedExample, prefix, n: int, samples: int, eos=None, **sampling):
    """``samples`` continuations (:func:`sample`, ``sampling``: its ``temperature`` and ``generator``) the teacher
    samples after ``prefix + branches + prompt``; the branches are prefilled once, the prompt on every row."""
    dev = next(model.parameters()).device
    with base_model(model):
        cache = copy.deepcopy(prefix)
        if ex.branch_ids:
            model(torch.cat(list(ex.branch_ids)).to(dev)[None], use_cache=True, logits_to_keep=1,
                  **{cache_kwarg(model): cache})
        cache.batch_repeat_interleave(samples)
        return sample(model, ex.prompt_ids, cache, n, samples, eos, **sampling)


@contextlib.contextmanager
def _student_cache(model, ex, prefix, branches, mapper, scheme, adapter, recompute):
    """The student's cache over the branches, inside the adapter's context (``adapter=False``: the base model)."""
    with contextlib.nullcontext() if adapter else base_model(model):
        yield _synthesis_cache(model, ex, prefix, branches, mapper, scheme, recompute, adapter)


@torch.no_grad()
def student_greedy(model, ex, prefix, branches, n, eos=None, *, mapper=None, scheme="sequential", adapter=True,
                   recompute=None):
    """The student's greedy continuation (``n`` tokens at most) of the prompt over the branch caches."""
    with _student_cache(model, ex, prefix, branches, mapper, scheme, adapter, recompute) as cache:
        return greedy(model, ex.prompt_ids, cache, n, eos)


@torch.no_grad()
def student_samples(model, ex, prefix, branches, n, samples, eos=None, *, mapper=None, scheme="sequential",
                    adapter=True, recompute=None, **sampling):
    """``samples`` continuations (:func:`sample`) the student samples after the prompt over the branch caches, one
    batch reading them once."""
    with _student_cache(model, ex, prefix, branches, mapper, scheme, adapter, recompute) as cache:
        return sample(model, ex.prompt_ids, cache, n, samples, eos, **sampling)


def kl_per_token(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats for each position: ``[T]``."""
    t = F.log_softmax(teacher.float(), -1)
    s = F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


class Tally:
    """KL to the teacher and top-1 agreement summed per key (a split; a split and a setting), read back per target
    token: what every fidelity table averages (validation, evaluation sweeps)."""

    def __init__(self):
        self.sums = {}  # key -> [KL sum, agreeing tokens, tokens]

    def add(self, keys, teacher: torch.Tensor, student: torch.Tensor) -> None:
        """Count logits ``[T, V]`` of one example under each of ``keys``."""
        kl = kl_per_token(teacher, student).sum().item()
        agree = int((teacher.argmax(-1) == student.argmax(-1)).sum())
        for key in keys:
            acc = self.sums.setdefault(key, [0.0, 0, 0])
            acc[0] += kl
            acc[1] += agree
            acc[2] += teacher.shape[0]

    def metrics(self, key) -> dict:
        """``{kl, top1, tokens}`` of ``key``: KL in nats per token, the share of tokens whose top-1 agrees."""
        kl, agree, tokens = self.sums.get(key, (0.0, 0, 0))
        return {"kl": kl / max(tokens, 1), "top1": agree / max(tokens, 1), "tokens": tokens}


def _eos_set(eos) -> set:
    return set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))


def stored_teacher_dtype(example) -> str | None:
    """The dtype the teacher continuation stored with ``example`` (a dict) was decoded in: its ``teacher`` field's
    ``dtype``, ``"float32"`` in files that predate the field; None without a stored teacher."""
    t = example.get("teacher") if isinstance(example, dict) else None
    return t.get("dtype", "float32") if t else None


def stored_teacher_ids(ex: TokenizedExample, n: int, eos=None, dtype: torch.dtype = torch.float32
                       ) -> torch.Tensor | None:
    """The teacher's greedy continuation stored with ``ex`` (its ``teacher`` field), cut to ``n`` tokens and
    after the first ``eos``; None when absent, decoded in another dtype than ``dtype`` (the teacher's: a greedy
    continuation is that dtype's own) or too short for ``n`` (stored with fewer tokens asked for)."""
    if stored_teacher_dtype(ex.example) != dtype_name(dtype):
        return None
    t = ex.example["teacher"]
    ids, stop = t["ids"], _eos_set(eos)
    end = next((i + 1 for i, tok in enumerate(ids) if tok in stop), None)
    if end is not None and end <= n:  # greedy ended there, whatever the budget
        return torch.tensor(ids[:end], dtype=torch.long)
    if t["tokens"] < n or len(ids) < min(n, t["tokens"]):
        return None
    return torch.tensor(ids[:n], dtype=torch.long)


class TargetCache:
    """Target ids per example: the example's own, or the teacher's greedy continuation (computed once per key,
    or read from the example's ``teacher`` field when it was stored there by a model of the teacher's dtype;
    :func:`teacher_pass` checks it).

    Parameters
    ----------
    n_tokens : int
        Length of the teacher's continuation for examples without ``target``.
    eos : int, list of int or None
        Where that continuation stops.
    """

    def __init__(self, n_tokens, eos):
        self.n, self.eos, self.cache, self.stored = n_tokens, eos, {}, set()

    def __call__(self, model, ex, prefix, key):
        if ex.target_ids is not None and ex.target_ids.numel():
            return ex.target_ids
        if key not in self.cache:
            ids = stored_teacher_ids(ex, self.n, self.eos, next(model.parameters()).dtype)
            if ids is not None:
                self.stored.add(key)
            else:
                ids = teacher_greedy(model, ex, prefix, self.n, self.eos)
            self.cache[key] = ids
        return self.cache[key]


# A stored continuation token whose teacher logit is this far below the teacher's best one was not this model's
# greedy choice. Incremental decoding (how it was stored) and one teacher-forced forward (how it is checked)
# differ by float rounding only: far below this in fp32, and a near-tie may flip either way.
STORED_TEACHER_SLACK = 0.05


def check_stored_teacher(ex: TokenizedExample, target: torch.Tensor, logits: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``target`` (stored ids) is the greedy continuation the teacher's ``logits``
    ``[T, V]`` (predicting each of its tokens, teacher-forced) give, up to :data:`STORED_TEACHER_SLACK`."""
    best = logits.max(-1)
    mine = logits.gather(-1, target.to(logits.device)[:, None])[:, 0]
    bad = (mine < best.values - STORED_TEACHER_SLACK).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise ValueError(
            f"example {ex.example.get('id', '') if isinstance(ex.example, dict) else ''!r}: its stored 'teacher' ids "
            f"are not this model's greedy continuation (token {t}: stored {int(target[t])}, the teacher's argmax "
            f"{int(best.indices[t])}, logits {float(mine[t]):.3f} vs {float(best.values[t]):.3f}); the file was built "
            "with another model: rebuild it or drop the 'teacher' fields")


class TeacherPass(NamedTuple):
    """What the frozen base model computes for one example: its caches, the targets and the teacher's logits."""

    prefix: object
    branches: list
    target_ids: torch.Tensor
    teacher_logits: torch.Tensor


@torch.no_grad()
def teacher_pass(model, ex: TokenizedExample, targets: TargetCache, key, store: dict | None = None) -> TeacherPass:
    """The base-model side of one example. ``store`` (a dict) keeps it under ``key``, so that later calls (the
    next epoch, the next held-out evaluation) skip the base-model forwards; the base model is frozen."""
    if store is not None and key in store:
        return store[key]
    prefix, branches = branch_caches(model, ex)
    target = targets(model, ex, prefix, key)
    logits = teacher_logits(model, ex, prefix, target)
    if key in targets.stored:
        check_stored_teacher(ex, target, logits)
    out = TeacherPass(prefix, branches, target, logits)
    if store is not None:
        store[key] = out
    return out
