"""Which branch tokens to repair, CacheBlend-style, if their exact K/V were free: KL and top-1 against text
concatenation of Parallel-Synthesis (base model, ``sequential`` scheme) with ``k`` tokens of every branch given the
K/V the text concatenation computes for them, the others read as their worker cached them.

Selections per branch, for each budget ``k``:

* ``head``: the first ``k`` tokens (what ``pskernels.synthesis.recompute`` recomputes);
* ``deviation``: the ``k`` tokens whose K/V differ most from the text's (summed over layers): CacheBlend's
  criterion, here with the deviation known exactly;
* ``attention``: the ``k`` tokens the text concatenation's prompt and target tokens attend to most (summed over
  layers and heads);
* ``attention_cached``: the ``k`` tokens the synthesizer's prompt attends to most reading the branches as their
  workers cached them (in text order): a rule a synthesizer could apply before recomputing, at the price of one
  forward of its prompt.

``deviation`` and ``attention`` read the text concatenation itself, so they are oracles: they bound what a
selection rule could reach, not what a cheap one does. The replaced K/V are the text's, computed with every
earlier branch whole in view, not recomputed over the workers' stale neighbours as ``recompute_branches`` does.

    python bench/selection_oracle.py --budgets 8,16,24,48 --families held_out --json oracle.json
    python bench/selection_oracle.py --budgets 48,1000 --strategies head --layers all,0:15,15:30   # which layers
    python bench/selection_oracle.py --budgets 48,1000 --strategies head --start-layer 8   # from a worker's state

Figures: docs/FIDELITY-LOG.md ("Which tokens, which layers").
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from pskernels.hf.cache import worker_cache
from pskernels.ops.rotate_keys import rotate_keys
from pskernels.rope import RopeSpec
from pskernels.synthesis import checkpoints
from pskernels.synthesis.data import load_jsonl
from pskernels.synthesis.distill import (
    Tally,
    TargetCache,
    eos_ids,
    patched,
    student_logits,
    teacher_pass,
    tokenize_examples,
)
from pskernels.synthesis.models import load_model
from pskernels.synthesis.workflow import cache_kwarg, output_cache
from pskernels.synthesis.workflows import split_of

STRATEGIES = ("head", "deviation", "attention", "attention_cached")


def text_kv(model, ex, prefix, branches, ropes, start: int = 0):
    """Per branch and layer, the text concatenation's (keys, values) of its tokens, keys rotated back to the
    worker's positions (right after the prefix), so that a worker cache can hold them. ``start > 0``: layer
    ``start`` reads each worker's own hidden states instead of the text's (what a worker could send beside its
    cache), so only layers ``start`` and above see the other branches."""
    ids = torch.cat(list(ex.branch_ids))[None]
    hook = None
    if start:
        own = torch.cat([model(b[None], **{cache_kwarg(model): copy.deepcopy(prefix)}, output_hidden_states=True)
                         .hidden_states[start] for b in ex.branch_ids], 1)  # [1, S, hidden]: each worker's

        def worker_state(module, args, kwargs):
            if args:
                return (own,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": own}

        hook = model.model.layers[start].register_forward_pre_hook(worker_state, with_kwargs=True)
    try:
        full = output_cache(model(ids, use_cache=True, **{cache_kwarg(model): copy.deepcopy(prefix)}))
    finally:
        if hook is not None:
            hook.remove()
    P, out, at = branches[0].prefix_len, [], branches[0].prefix_len
    for branch_ids in ex.branch_ids:
        n = branch_ids.numel()
        out.append([(rotate_keys(layer.keys[:, :, at:at + n], P - at, rope), layer.values[:, :, at:at + n])
                    for layer, rope in zip(full.layers, ropes)])
        at += n
    return out


def attention_mass(eager, ex, prefix, target) -> torch.Tensor:
    """``[P + branch tokens]``: attention the text concatenation's prompt and target tokens pay each position."""
    ids = torch.cat(list(ex.branch_ids) + [ex.prompt_ids, target])[None]
    att = eager(ids, **{cache_kwarg(eager): copy.deepcopy(prefix)}, output_attentions=True).attentions
    q0 = sum(b.numel() for b in ex.branch_ids)
    return sum(a[0, :, q0:].sum((0, 1)) for a in att)


def cached_attention_mass(eager, ex, prefix, branches, ropes) -> torch.Tensor:
    """``[P + branch tokens]``: attention the prompt pays each position reading the workers' K/V in text order."""
    cache, P = copy.deepcopy(prefix), branches[0].prefix_len
    starts = [P + sum(x.numel() for x in ex.branch_ids[:i]) for i in range(len(branches))]
    for li, rope in enumerate(ropes):
        layers = [(b.layers[li], ids.numel(), at) for b, ids, at in zip(branches, ex.branch_ids, starts)]
        kv = [(rotate_keys(layer.keys[:, :, :n], at - P, rope), layer.values[:, :, :n]) for layer, n, at in layers]
        cache.update(torch.cat([k for k, _ in kv], 2), torch.cat([v for _, v in kv], 2), li)
    att = eager(ex.prompt_ids[None], **{cache_kwarg(eager): cache}, output_attentions=True).attentions
    return sum(a[0].sum((0, 1)) for a in att)[:-ex.prompt_ids.numel()]


def repaired(prefix, branches, texts, picks, layers: range):
    """Worker caches whose picked tokens hold the text's K/V in ``layers`` (copies; the workers' are not
    modified)."""
    out = []
    for b, kv, idx in zip(branches, texts, picks):
        own = []
        for li, (layer, (tk, tv)) in enumerate(zip(b.layers, kv)):
            n = tk.shape[2]
            k, v = layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()
            if li in layers:
                k[:, :, idx], v[:, :, idx] = tk[:, :, idx], tv[:, :, idx]
            own.append((k, v))
        out.append(worker_cache(prefix, own))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--suite", default=str(checkpoints.DEFAULT_SUITE))
    p.add_argument("--budgets", default="8,16,24,48", help="comma-separated tokens per branch")
    p.add_argument("--start-layer", type=int, default=0, help="the replaced K/V recomputed from each worker's own "
                   "hidden states at this layer (0: the text's own K/V); layers below it keep the workers' K/V")
    p.add_argument("--layers", default="all", help="comma-separated layer ranges whose K/V are replaced, 'all' or "
                   "START:END (e.g. 0:15,15:30): each a row of its own")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--families", default="all", choices=("all", "train", "held_out"))
    p.add_argument("--target-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [int(k) for k in args.budgets.split(",")]
    strategies = args.strategies.split(",")
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        p.error(f"--strategies: expected names among {', '.join(STRATEGIES)}, got {', '.join(unknown)}")
    model, tok = load_model(args.model)
    eager = copy.deepcopy(model)
    eager.set_attn_implementation("eager")
    raw = [e for e in load_jsonl(args.suite) if args.families in ("all", split_of(e))]
    exs = tokenize_examples(tok, raw, next(model.parameters()).device)
    targets = TargetCache(args.target_tokens, eos_ids(tok))
    num_layers = model.config.num_hidden_layers
    ropes = [RopeSpec.from_model(model, li) for li in range(num_layers)]
    spans = {}
    for r in args.layers.split(","):
        a, _, b = r.partition(":")
        if r != "all" and not (a.isdigit() and b.isdigit() and int(a) < int(b) <= num_layers):
            p.error(f"--layers: expected 'all' or START:END within the model's {num_layers} layers, got {r!r}")
        span = range(num_layers) if r == "all" else range(int(a), int(b))
        spans[r] = range(max(span.start, args.start_layer), span.stop)
    if not 0 <= args.start_layer < num_layers:
        p.error(f"--start-layer: expected a layer in [0, {num_layers}), got {args.start_layer}")
    tally = Tally()  # keys: (split, selection)
    t0 = time.perf_counter()
    with patched(model), torch.no_grad():
        for j, ex in enumerate(exs):
            prefix, branches, tgt, t_logits = teacher_pass(model, ex, targets, j)
            texts = text_kv(model, ex, prefix, branches, ropes, args.start_layer)
            mass = attention_mass(eager, ex, prefix, tgt) if "attention" in strategies else None
            cached = cached_attention_mass(eager, ex, prefix, branches, ropes) if "attention_cached" in strategies \
                else None
            scores, at = [], branches[0].prefix_len
            for b, kv in zip(branches, texts):
                n = kv[0][0].shape[2]
                dev = sum((tk - layer.keys[:, :, :n]).square().sum((0, 1, 3))
                          + (tv - layer.values[:, :, :n]).square().sum((0, 1, 3))
                          for layer, (tk, tv) in zip(b.layers, kv))
                scores.append({"head": -torch.arange(n, dtype=torch.float), "deviation": dev,
                               "attention": None if mass is None else mass[at:at + n],
                               "attention_cached": None if cached is None else cached[at:at + n]})
                at += n
            runs = [("none", 0, None)] + [(s, k, r) for k in budgets for s in strategies for r in spans]
            for s, k, span in runs:
                picks = [sc["head"].topk(0).indices if s == "none" else sc[s].topk(min(k, sc[s].numel())).indices
                         for sc in scores]
                caches = repaired(prefix, branches, texts, picks, spans.get(span, range(0)))
                logits = student_logits(model, ex, prefix, caches, tgt, adapter=False)
                name = s if not k else f"{s} {k}" + (f" layers {span}" if span not in (None, "all") else "")
                tally.add([(split_of(ex.example) or "(no split)", name), ("all", name)], t_logits, logits)
            print(f"[{j + 1}/{len(exs)}] {time.perf_counter() - t0:.0f} s", flush=True)
    table = {}
    for split, sel in tally.sums:
        m, base = tally.metrics((split, sel)), tally.metrics((split, "none"))["kl"]
        table.setdefault(split, {})[sel] = {"kl": m["kl"], "ratio": m["kl"] / base if base else 0.0, "top1": m["top1"]}
    for split, rows in table.items():
        print(f"\n{split}")
        for sel, r in rows.items():
            print(f"  {sel:<28} KL {r['kl']:.4f} ({r['ratio']:.2f}x)  top-1 {r['top1']:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suite": args.suite, "budgets": budgets, "start_layer": args.start_layer, "table": table}, f,
                      indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
