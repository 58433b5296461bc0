"""``pskernels eval``: text concatenation vs Parallel-Synthesis on held-out examples
(:mod:`pskernels.synthesis.evaluate`), untrained, APE-calibrated and trained.

Also ``python -m pskernels.apps.evaluate ...`` (the same flags).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ..synthesis import evaluate as evaluation
from ..synthesis.data import build, load_jsonl
from ..synthesis.models import load_model
from ..synthesis.train import CONFIG_NAME, load_trained

SETTING_NAMES = {"text_concat": "(i) text concatenation (teacher)", "parallel": "(ii) parallel, untrained",
                 "ape": "(iii) APE calibration (T=S=0.9)", "trained": "(iv) trained mapper + adapter"}


def format_table(r: dict) -> str:
    """The result of :func:`pskernels.synthesis.evaluate.evaluate` as a table, one row per setting."""
    lines = [f"{'setting':<36}{'KL nats/tok':>12}{'top-1':>8}{'exact':>8}{'accuracy':>10}"]
    for s in evaluation.SETTINGS:
        if s in r:
            m = r[s]
            accs = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
            lines.append(f"{SETTING_NAMES[s]:<36}{m['kl']:>12.4f}{m['top1']:>8.3f}{m['exact']:>8.3f}{accs:>10}")
    any_s = next(v for k, v in r.items() if k != "examples")
    lines.append(f"({any_s['n']} held-out examples, {any_s['tokens']} target tokens)")
    return "\n".join(lines)


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    settings = evaluation.SETTINGS
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or an HF folder (the base model)")
    p.add_argument("--checkpoint", default=None, help="folder written by `pskernels train --out` (omit: no 'trained')")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="held-out examples (JSONL); all lines are evaluated")
    src.add_argument("--builder", default="aggregation", help="aggregation | exposure | distill | mixed")
    p.add_argument("--n-examples", type=int, default=32, help="(builder) held-out examples")
    p.add_argument("--seed", type=int, default=None, help="(builder) seed; default: the training seed + 1")
    p.add_argument("--scheme", default=None, help="default: the checkpoint's scheme, else sequential")
    p.add_argument("--settings", default=",".join(settings),
                   help="comma-separated subset of " + ",".join(settings) + " (text_concat is always computed)")
    p.add_argument("--gen-tokens", type=int, default=12)
    p.add_argument("--target-tokens", type=int, default=16)
    p.add_argument("--json", default=None, help="also write the results (with per-example outputs) to this file")
    p.add_argument("--threads", type=int, default=None)
    return p


def run_eval(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = {}
    if args.checkpoint and os.path.isfile(os.path.join(args.checkpoint, CONFIG_NAME)):
        with open(os.path.join(args.checkpoint, CONFIG_NAME)) as f:
            cfg = json.load(f)
    model, tok = load_model(args.model)
    if args.data:
        examples = load_jsonl(args.data)
    else:
        seed = args.seed if args.seed is not None else cfg.get("seed", 0) + 1
        examples = build(args.builder, args.n_examples, seed=seed)
    scheme = args.scheme or cfg.get("scheme", "sequential")
    mapper = None
    if args.checkpoint:
        model, mapper = load_trained(model, args.checkpoint)
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    bad = set(settings) - set(evaluation.SETTINGS)
    if bad:
        raise SystemExit(f"--settings: unknown {sorted(bad)}, expected some of {evaluation.SETTINGS}")
    r = evaluation.evaluate(model, tok, examples, mapper=mapper, trained=bool(args.checkpoint), scheme=scheme,
                            settings=["text_concat"] + [x for x in settings if x != "text_concat"],
                            gen_tokens=args.gen_tokens, target_tokens=args.target_tokens)
    print(f"model {args.model}, scheme {scheme}, checkpoint {args.checkpoint}")
    print(format_table(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def main(argv=None) -> int:
    p = add_eval_args(argparse.ArgumentParser(prog="pskernels eval",
                                              description=evaluation.__doc__.split("\n")[0]))
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
