"""Held-out evaluation of Parallel-Synthesis against text concatenation.

Settings (all read the same branch caches, computed by the base model):

* ``text_concat``  — the teacher: base model re-prefilling ``prefix + branches + prompt`` as text;
* ``parallel``     — untrained Parallel-Synthesis: base model over ``ParallelCache(prefix, branches)``;
* ``ape``          — APE-style calibration without training: a ``CacheMapper(calibrate=True,
  init_temperature=0.9, init_lse_scale=0.9)`` (identity cache transform, branch attention sharpened and
  down-weighted);
* ``trained``      — the trained mapper + LoRA adapter;
* ``recompute``    — training-free: the base model over the branches with the first (and last) tokens of each
  branch recomputed in text order (``recompute=(head, tail)``; head ``"prompt"``: each worker's own turn,
  :func:`pskernels.synthesis.workflows.worker_turn_tokens`;
  :func:`pskernels.synthesis.recompute.recompute_branches`).
  Not among the default settings.

Metrics per setting, on the target tokens (the example's ``target``, else the teacher's greedy
continuation): ``kl`` mean KL(teacher || setting) in nats/token (token-weighted), ``top1`` agreement of the
argmax with the teacher's, ``exact`` greedy continuation (``gen_tokens`` tokens) equal to the teacher's,
``accuracy`` on examples with an ``answer``: the answer found in the greedy output (:func:`answer_found`);
``answers_vs_text``: those answers paired with text concatenation's (:func:`answer_discordance`);
``sampled_accuracy`` (with ``answer_samples``): the share of sampled continuations that state it, each example's
samples drawn with the same uniforms for every setting (:func:`pskernels.synthesis.distill.sample`, common random
numbers: where two settings' distributions agree, so do their samples), so a setting's rate estimates the
probability that it states the answer without turning on greedy decoding's near ties; ``sampled_vs_text``: that
share minus text concatenation's, paired per example, with its standard error (:func:`sampled_difference`).

Per family: each per-example row keeps its ``kind``, ``split`` and raw ``scores`` (KL sum, agreeing and
target tokens, exact, correct, answered per setting); :func:`aggregate` sums them over any group of rows with
the same formulas as the overall figures, and :func:`by_family` reports every ``kind``, the training and the
held-out families (``split``) and all examples.
Command line: ``pskernels eval`` (:mod:`pskernels.apps.evaluate`).
"""
from __future__ import annotations

import functools
import math
import statistics

import torch

from .adapter import unwrap
from .answers import answer_found
from .distill import (
    TargetCache,
    check_temperature,
    eos_ids,
    kl_per_token,
    patched,
    recomputed_view,
    stored_teacher_ids,
    student_greedy,
    student_logits,
    student_samples,
    teacher_greedy,
    teacher_pass,
    teacher_samples,
    tokenize_examples,
)
from .mapper import CacheMapper
from .recompute import check_head_share, grown_heads
from .workflows import recompute_counts, split_of, worker_turn_tokens

SETTINGS = ("text_concat", "parallel", "ape", "trained", "recompute")
DEFAULT_SETTINGS = SETTINGS[:4]
RECOMPUTE = ("prompt", 0)  # (head, tail) per branch: the worker's turn, nothing at the end
APE_INIT = {"calibrate": True, "init_temperature": 0.9, "init_lse_scale": 0.9}


def ape_mapper(model, **overrides) -> CacheMapper:
    """An untrained APE-calibrated mapper (temperature 0.9, LSE scale 0.9 on the branches)."""
    return CacheMapper.for_model(unwrap(model), **{"rank": 1, **APE_INIT, **overrides})


def _decode(tokenizer, ids):
    return tokenizer.decode(ids.tolist() if hasattr(ids, "tolist") else ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tokenizer, examples, *, mapper=None, trained=True, scheme: str = "sequential",
             settings=DEFAULT_SETTINGS, gen_tokens: int = 12, target_tokens: int = 16, ape=None,
             recompute: tuple = RECOMPUTE, recompute_together: bool = False, trained_recompute=None,
             head_share: float = 0.0, trained_head_share: float = 0.0, answer_samples: int = 0,
             temperature: float = 1.0, sample_seed: int = 0) -> dict:
    """Compare the settings on held-out ``examples`` (dicts or ``TokenizedExample``).

    ``model``: the base model, or the PeftModel holding the trained adapter (the other settings run it with
    the adapter disabled). ``mapper``: the trained mapper (None: none). ``trained=False`` drops the
    ``trained`` setting. ``recompute``: (head, tail) tokens per branch the ``recompute`` setting recomputes
    (head ``"prompt"``: each worker's turn, for workflow examples), each part over the workers' K/V with
    ``recompute_together``.
    ``trained_recompute``: ``(head, tail, together)`` the trained synthesizer was trained with (its checkpoint's
    ``recompute``; :func:`pskernels.synthesis.workflows.recompute_counts`), applied to its setting.
    ``head_share`` / ``trained_head_share``: the ``recompute`` setting / the trained synthesizer reading recomputed
    branches recompute at least that share of each branch (the head grows with the branch,
    :func:`pskernels.synthesis.recompute.grown_heads`; the checkpoint's own:
    :func:`pskernels.synthesis.checkpoints.trained_head_share`).
    ``answer_samples``: continuations (``gen_tokens`` tokens at most) sampled at ``temperature`` per setting and
    example with an answer, decoded as one batch per setting, the generator seeded from ``sample_seed`` and the
    example's index (0: none).
    Returns ``{setting: {kl, top1, exact, accuracy, answers_vs_text, sampled_accuracy, sampled_vs_text, tokens, n},
    "examples": [...]}`` (:func:`aggregate`).
    """
    settings = [s for s in settings if s != "trained" or trained]
    if isinstance(answer_samples, bool) or not isinstance(answer_samples, int) or answer_samples < 0:
        raise ValueError(f"answer_samples: expected an int >= 0, got {answer_samples!r}")
    if answer_samples:
        check_temperature(temperature)
    check_head_share(head_share), check_head_share(trained_head_share)  # refused before any example runs
    weight = next(model.parameters())
    dev, dtype = weight.device, weight.dtype
    exs = tokenize_examples(tokenizer, examples, dev)
    eos = eos_ids(tokenizer)
    targets = TargetCache(target_tokens, eos)
    ape = ape if ape is not None else ape_mapper(model).to(dev)
    if mapper is not None:
        mapper = mapper.to(dev)
    cfg = {"parallel": dict(mapper=None, adapter=False), "ape": dict(mapper=ape, adapter=False),
           "trained": dict(mapper=mapper, adapter=True),
           "recompute": dict(mapper=None, adapter=False, scheme="sequential")}
    head, tail = recompute
    per_example = []
    was_training = model.training
    model.eval()
    with patched(model):
        for j, ex in enumerate(exs):
            prefix, branches, tgt, t_logits = teacher_pass(model, ex, targets, j)
            lens = [ids.numel() for ids in ex.branch_ids]  # what a growing head is a share of
            # the stored continuation's first target_tokens were just checked against the teacher's logits
            stored = j in targets.stored and gen_tokens <= target_tokens
            t_gen = stored_teacher_ids(ex, gen_tokens, eos, dtype) if stored else None
            t_gen = teacher_greedy(model, ex, prefix, gen_tokens, eos) if t_gen is None else t_gen
            row = {"id": ex.example.get("id"), "answer": ex.answer, "kind": ex.kind or "",
                   "split": split_of(ex.example), "scores": {}}
            for s in settings:
                a = row["scores"][s] = _zero()
                if s == "text_concat":
                    kl = torch.zeros(tgt.numel())
                    agree, gen = tgt.numel(), t_gen
                    draw = functools.partial(teacher_samples, model, ex, prefix, gen_tokens, answer_samples, eos)
                else:
                    kw = {"scheme": scheme, **cfg[s]}
                    if s == "trained" and trained_recompute:
                        h, t, together = recompute_counts(tokenizer, ex.example, trained_recompute)
                        kw["recompute"] = (grown_heads(h, lens, trained_head_share), t, together)
                    if s == "recompute":
                        h = worker_turn_tokens(tokenizer, ex.example) if head == "prompt" else head
                        kw["recompute"] = (grown_heads(h, lens, head_share), tail, recompute_together)
                    if kw.get("recompute"):  # computed once for the logits, the greedy answer and the samples
                        kw["recompute"] = recomputed_view(model, ex, prefix, branches, kw["recompute"])
                    s_logits = student_logits(model, ex, prefix, branches, tgt, **kw)
                    kl = kl_per_token(t_logits, s_logits)
                    agree = int((t_logits.argmax(-1) == s_logits.argmax(-1)).sum())
                    gen = student_greedy(model, ex, prefix, branches, gen_tokens, eos, **kw)
                    draw = functools.partial(student_samples, model, ex, prefix, branches, gen_tokens, answer_samples,
                                             eos, **kw)
                a["kl"] += kl.sum().item()
                a["agree"] += agree
                a["tokens"] += tgt.numel()
                a["exact"] += int(torch.equal(gen.cpu(), t_gen.cpu()))
                text = _decode(tokenizer, gen)
                row[s] = text
                if ex.answer:
                    a["answered"] += 1
                    a["correct"] += int(answer_found(ex.answer, text))
                if ex.answer and answer_samples:
                    g = torch.Generator(device=dev).manual_seed(hash((sample_seed, j)) % 2**63)
                    for ids in draw(temperature=temperature, generator=g):
                        a["samples"] += 1
                        a["sampled_correct"] += int(answer_found(ex.answer, _decode(tokenizer, ids)))
            per_example.append(row)
    model.train(was_training)
    out = aggregate(per_example, settings)
    out["examples"] = per_example
    return out


SCORE_KEYS = ("kl", "agree", "tokens", "exact", "correct", "answered", "sampled_correct", "samples")


def _zero() -> dict:
    return {k: 0.0 if k == "kl" else 0 for k in SCORE_KEYS}  # KL sums are floats, the rest counts


def ratio_of_sums(pairs):
    """``sum(y) / sum(x)`` over per-example pairs ``(y, x)``, with its standard error.

    The examples are the sampled units: the tokens of one target depend on one another, so a per-token error would
    understate the spread. The error is the ratio estimator's first-order one, ``sqrt(sum((y - R x)^2) / (n (n -
    1))) / mean(x)`` for ``R`` the ratio over ``n`` examples. Returns ``(ratio, standard error)``, the error None for
    one example; None when ``sum(x)`` is 0 (no tokens, or a baseline KL of 0)."""
    pairs = list(pairs)
    total = math.fsum(x for _, x in pairs)
    if not total:
        return None
    ratio = math.fsum(y for y, _ in pairs) / total
    n = len(pairs)
    if n < 2:
        return ratio, None
    spread = math.fsum((y - ratio * x) ** 2 for y, x in pairs) / (n * (n - 1))
    return ratio, math.sqrt(spread) / (total / n)


def sampled_difference(rows, setting: str, baseline: str = "text_concat"):
    """How much more often ``setting`` states the answer than ``baseline`` does, paired per example.

    Per row sampled in both, the share of ``setting``'s samples that state the answer minus the share of
    ``baseline``'s (both drawn with the same uniforms, so the difference is paired). Returns ``(mean, standard
    error)`` over those rows, the standard error None for one row; None without any row sampled in both."""
    d = []
    for r in rows:
        a, b = r["scores"].get(setting, {}), r["scores"].get(baseline, {})
        if a.get("samples") and b.get("samples"):
            d.append(a["sampled_correct"] / a["samples"] - b["sampled_correct"] / b["samples"])
    if not d:
        return None
    return statistics.fmean(d), statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else None


def answer_discordance(rows, setting: str, baseline: str = "text_concat"):
    """Greedy answers of ``setting`` against ``baseline``'s, paired per example with an answer.

    Returns ``(only_setting, only_baseline, p)``: the examples only ``setting``'s greedy continuation states the
    answer in, those only ``baseline``'s does, and the exact two-sided McNemar p-value of that split (a binomial
    test of the discordant examples at one half; 1.0 without any). None without an example answered in both."""
    pairs = [(r["scores"][setting]["correct"], r["scores"][baseline]["correct"]) for r in rows
             if r["scores"].get(setting, {}).get("answered") and r["scores"].get(baseline, {}).get("answered")]
    if not pairs:
        return None
    only = sum(a > b for a, b in pairs)
    only_baseline = sum(b > a for a, b in pairs)
    n = only + only_baseline
    tail = sum(math.comb(n, i) for i in range(min(only, only_baseline) + 1)) / 2 ** n
    return only, only_baseline, min(1.0, 2 * tail)


def paired_comparison(rows, baseline_rows, setting: str = "trained") -> dict | None:
    """``setting`` in ``rows`` against the same setting in ``baseline_rows``, paired per example ``id``: e.g. two
    checkpoints' results on the same workflows.

    Returns ``{n, top1, baseline_top1, top1_difference, kl_ratio, answers}`` over the examples both hold:
    ``top1_difference`` is the top-1 agreement's difference per target token (the baseline's at its rate on each
    example, where another teacher, e.g. at another dtype, gave it targets of another length) and ``kl_ratio`` the KL
    to the teacher summed over the examples divided by the baseline's, each ``[value, standard error]`` with the
    examples as the sampled units (:func:`ratio_of_sums`; None where undefined), ``answers`` the greedy answers,
    ``[only rows, only baseline, McNemar p]`` (:func:`answer_discordance`). None without an example both hold with
    ``setting``."""
    base = {r["id"]: r["scores"][setting] for r in baseline_rows if r.get("id") and setting in r["scores"]}
    pairs = [(r["scores"][setting], base[r["id"]]) for r in rows if r.get("id") in base and setting in r["scores"]]
    if not pairs:
        return None
    tokens = sum(a["tokens"] for a, _ in pairs)
    return {"n": len(pairs),
            "top1": sum(a["agree"] for a, _ in pairs) / max(tokens, 1),
            "baseline_top1": sum(b["agree"] for _, b in pairs) / max(sum(b["tokens"] for _, b in pairs), 1),
            "top1_difference": _listed(ratio_of_sums((a["agree"] - b["agree"] * a["tokens"] / max(b["tokens"], 1),
                                                      a["tokens"]) for a, b in pairs)),
            "kl_ratio": _listed(ratio_of_sums((a["kl"], b["kl"]) for a, b in pairs)),
            "answers": _listed(answer_discordance([{"scores": {"rows": a, "baseline": b}} for a, b in pairs],
                                                  "rows", "baseline"))}


def aggregate(rows, settings=None) -> dict:
    """Metrics of a group of per-example rows (``evaluate(...)["examples"]`` or a subset):
    ``{setting: {kl, kl_se, kl_vs_untrained, top1, top1_se, exact, accuracy, answers_vs_text, sampled_accuracy,
    sampled_vs_text, tokens, n}}``.
    ``kl`` and ``top1`` are token-weighted (sums over the rows divided by their target tokens), ``kl_se`` and
    ``top1_se`` their standard errors over the rows (:func:`ratio_of_sums`; None for one row), ``kl_vs_untrained``
    the setting's KL summed over the rows divided by the untrained setting's (``parallel``), ``[ratio, standard
    error]`` (:func:`kl_vs_untrained`), ``exact`` per example, ``accuracy`` over the rows with an answer (None
    without any), ``answers_vs_text`` the greedy answers paired with text concatenation's, ``[only this setting,
    only text, McNemar p]`` (:func:`answer_discordance`),
    ``sampled_accuracy`` over their samples (None without any; rows stored without sample counts have none),
    ``sampled_vs_text`` the setting's sampled answer share minus text concatenation's per example, ``[mean, standard
    error]`` (:func:`sampled_difference`). Both comparisons are None for text concatenation itself and without the
    rows they pair. ``settings``: default, those of the first row."""
    rows = list(rows)
    if settings is None:
        settings = list(rows[0]["scores"]) if rows else []
    out = {}
    for s in settings:
        a = _zero()
        for r in rows:
            for k in SCORE_KEYS:
                a[k] += r["scores"][s].get(k, 0)
        n = len(rows)
        out[s] = {"kl": a["kl"] / max(a["tokens"], 1), "kl_se": _per_token_error(rows, s, "kl"),
                  "kl_vs_untrained": _listed(kl_vs_untrained(rows, s)),
                  "top1": a["agree"] / max(a["tokens"], 1), "top1_se": _per_token_error(rows, s, "agree"),
                  "exact": a["exact"] / max(n, 1),
                  "accuracy": a["correct"] / a["answered"] if a["answered"] else None,
                  "answers_vs_text": None if s == "text_concat" else _listed(answer_discordance(rows, s)),
                  "sampled_accuracy": a["sampled_correct"] / a["samples"] if a["samples"] else None,
                  "sampled_vs_text": None if s == "text_concat" else _listed(sampled_difference(rows, s)),
                  "tokens": a["tokens"], "n": n}
    return out


def kl_vs_untrained(rows, setting: str, untrained: str = "parallel"):
    """``setting``'s KL to the teacher as a ratio to ``untrained``'s over the same rows, ``(ratio, standard error)``
    (:func:`ratio_of_sums`, paired per example); None for ``untrained`` itself, or where a row lacks it or its KL
    sums to 0."""
    if setting == untrained or any(untrained not in r["scores"] for r in rows):
        return None
    return ratio_of_sums((r["scores"][setting].get("kl", 0.0), r["scores"][untrained].get("kl", 0.0)) for r in rows)


def _per_token_error(rows, setting: str, key: str):
    """The standard error of ``key`` summed over the rows per target token (:func:`ratio_of_sums`)."""
    ratio = ratio_of_sums((r["scores"][setting].get(key, 0), r["scores"][setting].get("tokens", 0)) for r in rows)
    return None if ratio is None else ratio[1]


def _listed(values):
    return None if values is None else list(values)  # as JSON stores it, so that a stored result reads the same


def by_family(result_or_rows, settings=None) -> dict:
    """Per-family and overall aggregates (:func:`aggregate`) of an :func:`evaluate` result (or its rows).

    Returns ``{"families": {kind: metrics}, "splits": {"train": metrics, "held_out": metrics}, "all":
    metrics}``; ``families`` in first-seen order, ``splits`` only for the splits present (a row's ``split``:
    the example's field, else its workflow family's split)."""
    rows = result_or_rows["examples"] if isinstance(result_or_rows, dict) else list(result_or_rows)
    fams, splits = {}, {}
    for r in rows:
        fams.setdefault(r.get("kind") or "", []).append(r)
        if r.get("split"):
            splits.setdefault(r["split"], []).append(r)
    order = [sp for sp in ("train", "held_out") if sp in splits] + sorted(set(splits) - {"train", "held_out"})
    return {"families": {k: aggregate(v, settings) for k, v in fams.items()},
            "splits": {sp: aggregate(splits[sp], settings) for sp in order},
            "all": aggregate(rows, settings)}
