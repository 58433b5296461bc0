"""KL and top-1 against text concatenation of Parallel-Synthesis with the first / last tokens of each branch
recomputed (``pskernels.synthesis.recompute``), for several (head, tail) at once over one workflow suite: the
teacher's side is computed once per example. Reported per split (training / held-out families) and overall.

    python bench/recompute_sweep.py --heads 0,8,16,32,48 --tails 0 --json sweep.json
    python bench/recompute_sweep.py --heads 0,prompt --tails 0     # prompt: each worker's own prompt (its input)

Figures: docs/FIDELITY-LOG.md ("Recomputing the branches' first tokens").
"""
from __future__ import annotations

import argparse
import json
import time

import torch

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
from pskernels.synthesis.workflows import split_of, worker_turn_tokens


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--suite", default=str(checkpoints.DEFAULT_SUITE))
    p.add_argument("--heads", default="0,8,16,32", help="comma-separated ints, or 'prompt': per branch, the worker's "
                   "own turn (its instruction)")
    p.add_argument("--tails", default="0")
    p.add_argument("--together", action="store_true", help="all recomputed parts of an example in one forward")
    p.add_argument("--target-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    heads = [h if h == "prompt" else int(h) for h in args.heads.split(",")]
    pairs = [(h, t) for h in heads for t in map(int, args.tails.split(","))]
    model, tok = load_model(args.model)
    raw = load_jsonl(args.suite)
    exs = tokenize_examples(tok, raw, next(model.parameters()).device)
    targets = TargetCache(args.target_tokens, eos_ids(tok))
    tally = Tally()  # keys: (split, pair)
    t0 = time.perf_counter()
    with patched(model), torch.no_grad():
        for j, ex in enumerate(exs):
            prefix, branches, tgt, t_logits = teacher_pass(model, ex, targets, j)
            for pair in pairs:
                h, t = pair
                if h == "prompt":
                    h = worker_turn_tokens(tok, raw[j])
                s = student_logits(model, ex, prefix, branches, tgt, adapter=False,
                                   recompute=(h, t, args.together) if h or t else None)
                tally.add([(split_of(raw[j]), pair), ("all", pair)], t_logits, s)
    rows = [{"split": split, "head": h, "tail": t, **tally.metrics((split, (h, t)))}
            for split, (h, t) in sorted(tally.sums, key=lambda k: (k[0], str(k[1])))]
    print(f"{len(exs)} examples of {args.suite}, {time.perf_counter() - t0:.0f} s")
    print(f"{'split':<10}{'head':>6}{'tail':>6}{'KL':>10}{'x untrained':>13}{'top-1':>8}")
    base = {r["split"]: r["kl"] for r in rows if r["head"] == 0 and r["tail"] == 0}
    for r in rows:
        rel = f"{r['kl'] / base[r['split']]:.2f}x" if r["split"] in base else "-"
        print(f"{r['split']:<10}{r['head']!s:>6}{r['tail']:>6}{r['kl']:>10.4f}{rel:>13}{r['top1']:>8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"suite": args.suite, "model": args.model, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
