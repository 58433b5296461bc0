"""Held-out evaluation of Parallel-Synthesis against text concatenation.

Settings (all read the same branch caches, computed by the base model):

* ``text_concat``  — the teacher: base model re-prefilling ``prefix + branches + prompt`` as text;
* ``parallel``     — untrained Parallel-Synthesis: base model over ``ParallelCache(prefix, branches)``;
* ``ape``          — APE-style calibration without training: a ``CacheMapper(calibrate=True,
  init_temperature=0.9, init_lse_scale=0.9)`` (identity cache transform, branch attention sharpened and
  down-weighted);
* ``trained``      — the trained mapper + LoRA adapter.

Metrics per setting, on the target tokens (the example's ``target``, else the teacher's greedy
continuation): ``kl`` mean KL(teacher || setting) in nats/token (token-weighted), ``top1`` agreement of the
argmax with the teacher's, ``exact`` greedy continuation (``gen_tokens`` tokens) equal to the teacher's,
``accuracy`` on examples with an ``answer``: the answer string contained in the greedy output.
CLI: ``pskernels eval`` (:func:`add_eval_args`, :func:`run_eval`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .adapter import is_peft_model, load_synthesizer_adapter
from .mapper import CacheMapper
from .train import (CONFIG_NAME, _Targets, _tokenize_all, branch_caches, eos_ids, kl_per_token,
                    load_model, patched, student_greedy, student_logits, teacher_greedy, teacher_logits)

SETTINGS = ("text_concat", "parallel", "ape", "trained")
APE_INIT = {"calibrate": True, "init_temperature": 0.9, "init_lse_scale": 0.9}


def ape_mapper(model, **overrides) -> CacheMapper:
    """An untrained APE-calibrated mapper (temperature 0.9, LSE scale 0.9 on the branches)."""
    from .adapter import unwrap

    return CacheMapper.for_model(unwrap(model), **{"rank": 1, **APE_INIT, **overrides})


def _decode(tokenizer, ids):
    return tokenizer.decode(ids.tolist() if hasattr(ids, "tolist") else ids, skip_special_tokens=True)


@torch.no_grad()
def evaluate(model, tokenizer, examples, *, mapper=None, trained=True, scheme: str = "sequential",
             settings=SETTINGS, gen_tokens: int = 12, target_tokens: int = 16, ape=None) -> dict:
    """Compare the settings on held-out ``examples`` (dicts or ``TokenizedExample``).

    ``model``: the base model, or the PeftModel holding the trained adapter (the other settings run it with
    the adapter disabled). ``mapper``: the trained mapper (None: none). ``trained=False`` drops the
    ``trained`` setting. Returns ``{setting: {kl, top1, exact, accuracy, tokens, n}, "examples": [...]}``.
    """
    settings = [s for s in settings if s != "trained" or trained]
    dev = next(model.parameters()).device
    exs = _tokenize_all(tokenizer, examples, dev)
    eos = eos_ids(tokenizer)
    targets = _Targets(target_tokens, eos)
    ape = ape if ape is not None else ape_mapper(model).to(dev)
    if mapper is not None:
        mapper = mapper.to(dev)
    cfg = {"parallel": dict(mapper=None, adapter=False), "ape": dict(mapper=ape, adapter=False),
           "trained": dict(mapper=mapper, adapter=True)}
    acc = {s: {"kl": 0.0, "agree": 0, "tokens": 0, "exact": 0, "correct": 0, "answered": 0} for s in settings}
    per_example = []
    was_training = model.training
    model.eval()
    with patched(model):
        for j, ex in enumerate(exs):
            prefix, branches = branch_caches(model, ex)
            tgt = targets(model, ex, prefix, j)
            t_logits = teacher_logits(model, ex, prefix, tgt)
            t_gen = teacher_greedy(model, ex, prefix, gen_tokens, eos)
            row = {"id": ex.example.get("id"), "answer": ex.answer}
            for s in settings:
                a = acc[s]
                if s == "text_concat":
                    kl = torch.zeros(tgt.numel())
                    agree, gen = tgt.numel(), t_gen
                else:
                    s_logits = student_logits(model, ex, prefix, branches, tgt, scheme=scheme, **cfg[s])
                    kl = kl_per_token(t_logits, s_logits)
                    agree = int((t_logits.argmax(-1) == s_logits.argmax(-1)).sum())
                    gen = student_greedy(model, ex, prefix, branches, gen_tokens, eos, scheme=scheme, **cfg[s])
                a["kl"] += kl.sum().item()
                a["agree"] += agree
                a["tokens"] += tgt.numel()
                a["exact"] += int(torch.equal(gen.cpu(), t_gen.cpu()))
                text = _decode(tokenizer, gen)
                row[s] = text
                if ex.answer:
                    a["answered"] += 1
                    a["correct"] += int(ex.answer in text)
            per_example.append(row)
    model.train(was_training)
    n = len(exs)
    out = {}
    for s, a in acc.items():
        out[s] = {"kl": a["kl"] / max(a["tokens"], 1), "top1": a["agree"] / max(a["tokens"], 1),
                  "exact": a["exact"] / max(n, 1),
                  "accuracy": a["correct"] / a["answered"] if a["answered"] else None,
                  "tokens": a["tokens"], "n": n}
    out["examples"] = per_example
    return out


def format_table(r: dict) -> str:
    names = {"text_concat": "(i) text concatenation (teacher)", "parallel": "(ii) parallel, untrained",
             "ape": "(iii) APE calibration (T=S=0.9)", "trained": "(iv) trained mapper + adapter"}
    lines = [f"{'setting':<36}{'KL nats/tok':>12}{'top-1':>8}{'exact':>8}{'accuracy':>10}"]
    for s in SETTINGS:
        if s in r:
            m = r[s]
            accs = "-" if m["accuracy"] is None else f"{m['accuracy']:.3f}"
            lines.append(f"{names[s]:<36}{m['kl']:>12.4f}{m['top1']:>8.3f}{m['exact']:>8.3f}{accs:>10}")
    any_s = next(v for k, v in r.items() if k != "examples")
    lines.append(f"({any_s['n']} held-out examples, {any_s['tokens']} target tokens)")
    return "\n".join(lines)


def load_trained(model, checkpoint: str):
    """``(peft_model_or_model, mapper)`` from a folder written by :func:`pskernels.synthesis.train.train`."""
    mapper = None
    if os.path.isdir(os.path.join(checkpoint, "mapper")):
        mapper = CacheMapper.from_pretrained(os.path.join(checkpoint, "mapper"))
    if os.path.isdir(os.path.join(checkpoint, "adapter")) and not is_peft_model(model):
        model = load_synthesizer_adapter(model, os.path.join(checkpoint, "adapter"))
    return model, mapper


def add_eval_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2", help="'smollm2', 'tiny' or an HF folder (the base model)")
    p.add_argument("--checkpoint", default=None, help="folder written by `pskernels train --out` (omit: no 'trained')")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="held-out examples (JSONL); all lines are evaluated")
    src.add_argument("--builder", default="aggregation", help="aggregation | exposure | distill | mixed")
    p.add_argument("--n-examples", type=int, default=32, help="(builder) held-out examples")
    p.add_argument("--seed", type=int, default=None, help="(builder) seed; default: the training seed + 1")
    p.add_argument("--scheme", default=None, help="default: the checkpoint's scheme, else sequential")
    p.add_argument("--settings", default=",".join(SETTINGS),
                   help="comma-separated subset of " + ",".join(SETTINGS) + " (text_concat is always computed)")
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
        from .data import load_jsonl

        examples = load_jsonl(args.data)
    else:
        from .data import build

        seed = args.seed if args.seed is not None else cfg.get("seed", 0) + 1
        examples = build(args.builder, args.n_examples, seed=seed)
    scheme = args.scheme or cfg.get("scheme", "sequential")
    mapper = None
    if args.checkpoint:
        model, mapper = load_trained(model, args.checkpoint)
    settings = [x.strip() for x in args.settings.split(",") if x.strip()]
    bad = set(settings) - set(SETTINGS)
    if bad:
        raise SystemExit(f"--settings: unknown {sorted(bad)}, expected some of {SETTINGS}")
    r = evaluate(model, tok, examples, mapper=mapper, trained=bool(args.checkpoint), scheme=scheme,
                 settings=["text_concat"] + [x for x in settings if x != "text_concat"],
                 gen_tokens=args.gen_tokens, target_tokens=args.target_tokens)
    print(f"model {args.model}, scheme {scheme}, checkpoint {args.checkpoint}")
    print(format_table(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


def main(argv=None) -> int:
    p = add_eval_args(argparse.ArgumentParser(prog="pskernels eval", description=__doc__.split("\n")[0]))
    return run_eval(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
