"""``pskernels train``: train the cache mapper + LoRA synthesizer adapter (:mod:`pskernels.synthesis.train`).

Also ``python -m pskernels.apps.train ...`` (the same flags).
"""
from __future__ import annotations

import argparse
import sys

import torch

from ..synthesis import checkpoints
from ..synthesis import train as recipe
from ..synthesis.data import build, load_jsonl
from ..synthesis.models import load_model
from ..synthesis.recompute import check_head_share
from .argtypes import int_at_least, number_at_least
from .evaluate import parse_recompute


def load_examples(args, n: int, seed: int, held_out: int = 0):
    """``(train, held_out)``.

    Training examples: the ``--data`` files concatenated (their last ``held_out`` lines held out unless
    ``--eval-data`` is given) or ``n`` examples of ``--builder``; then every ``--mix BUILDER:N`` adds N
    examples of that builder (seed ``seed``). Held-out examples: the first ``held_out`` lines of
    ``--eval-data`` (all of them when ``held_out`` is 0), else the data's last lines, else the builder at
    ``seed + 1``."""
    eval_data = getattr(args, "eval_data", None)
    data = getattr(args, "data", None)
    if data:
        ex = [e for path in ([data] if isinstance(data, str) else data) for e in load_jsonl(path)]
        if eval_data:
            train, ev = ex, []
        else:
            if held_out >= len(ex):
                raise ValueError(f"--data: {len(ex)} examples, fewer than --eval-examples + 1 = {held_out + 1}")
            train, ev = ex[: len(ex) - held_out], ex[len(ex) - held_out:]
    else:
        train = build(args.builder, n, seed=seed)
        ev = [] if eval_data or not held_out else build(args.builder, held_out, seed=seed + 1)
    for spec in getattr(args, "mix", None) or []:
        name, _, count = spec.partition(":")
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--mix: expected BUILDER:N with N >= 1 (e.g. natural:200), got {spec!r}")
        train = train + build(name, int(count), seed=seed)
    if eval_data:
        ev = load_jsonl(eval_data)
        ev = ev[:held_out] if held_out else ev
    return train, ev


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', 'tiny' (random Llama, byte tokenizer) or an HF folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", nargs="+", metavar="FILE",
                     help="training examples (JSONL, see pskernels.synthesis.data); several files are concatenated")
    src.add_argument("--builder", default="aggregation", help="aggregation | exposure | natural | distill | mixed")
    p.add_argument("--n-examples", type=int_at_least(1), default=128, help="(builder) training examples")
    p.add_argument("--mix", action="append", metavar="BUILDER:N",
                   help="add N examples of BUILDER (seed --seed) to the training examples; repeatable")
    p.add_argument("--eval-data", metavar="FILE", help="held-out examples (JSONL) evaluated during training; "
                   "with it --eval-examples counts its first lines (0: all) and no training line is held out")
    p.add_argument("--eval-examples", type=int_at_least(0), default=16,
                   help="held-out examples (builder: seed+1; data: last lines; --eval-data: its first lines)")
    p.add_argument("--steps", type=int_at_least(1), default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mapper-lr", type=float, default=None)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--answer-weight", type=number_at_least(1), default=1.0, metavar="W",
                   help="answer-weighted distillation: the KL of the target tokens stating an example's ground-truth "
                   "answer (where the teacher's continuation states it) counts W times (>= 1)")
    p.add_argument("--grad-accum", type=int_at_least(1), default=1)
    p.add_argument("--lr-schedule", default="constant", choices=list(recipe.LR_SCHEDULES),
                   help="cosine: decay to 0 at --steps")
    p.add_argument("--warmup-steps", type=int_at_least(0), default=0, help="linear lr warmup")
    p.add_argument("--scheme", default="sequential", choices=["parallel", "sequential", "right_aligned"])
    p.add_argument("--lora-r", type=int_at_least(1), default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--lora-targets", default="attn", help="modules the LoRA adapter wraps: comma-separated Linear "
                   "names (q_proj, ..., down_proj) or groups: attn (q,k,v,o), mlp (gate,up,down); e.g. attn,mlp")
    p.add_argument("--no-lora", action="store_true", help="train the mapper only")
    p.add_argument("--mapper-rank", type=int_at_least(0), default=8)
    p.add_argument("--no-mapper", action="store_true", help="train the adapter only")
    p.add_argument("--target-tokens", type=int_at_least(1), default=16,
                   help="teacher greedy tokens for examples without target")
    p.add_argument("--eval-every", type=int_at_least(0), default=50)
    p.add_argument("--save-every", type=int_at_least(1), default=None)
    p.add_argument("--log-every", type=int_at_least(0), default=10)
    p.add_argument("--recompute", default=None, metavar="HEAD[,TAIL]",
                   help="train the synthesizer to read branches whose first HEAD (and last TAIL) tokens the base "
                   "model recomputed in text order; HEAD 'prompt': each worker's own turn (nothing for examples "
                   "without one); the checkpoint records it and `pskernels eval` applies it to the trained row")
    p.add_argument("--recompute-together", action="store_true",
                   help="(--recompute) each recomputed part reads the workers' own K/V before it, not the earlier "
                   "parts' recomputation (run H48's approximation; without it: exact text order)")
    p.add_argument("--head-share", type=float, default=0.0, metavar="F",
                   help="(--recompute) each branch's head grows to at least the share F (0..1) of it, for long worker "
                   "outputs; recorded in the checkpoint, which eval and demo then read with it")
    p.add_argument("--head-share-max", type=float, default=None, metavar="F",
                   help="(--recompute) each training example's head grows to its own share, drawn once per example "
                   "uniformly between --head-share and F (up to 1: the branch recomputed whole), so that the modules "
                   "also learn where the cache needs no repair; recorded in the checkpoint's training configuration")
    p.add_argument("--exact-recomputed", action="store_true",
                   help="(--recompute) the mapper steps aside on the recomputed tokens, whose K/V are the text's "
                   "already: it maps and calibrates the workers' own tokens only (kept in the mapper's config)")
    p.add_argument("--init", metavar="CHECKPOINT", help="start from this checkpoint's mapper and adapter (a folder "
                   "written by train --out or export_checkpoint, e.g. a shipped one under pskernels/checkpoints/) "
                   "instead of fresh ones; fresh optimizer and lr schedule; it must have been trained for --model "
                   "with the same --recompute")
    p.add_argument("--link-tokens", type=int_at_least(0), default=0, metavar="K",
                   help="also train K link tokens the synthesizer runs after every branch with the branches before "
                   "it in view (KVLink; kept in the mapper, so not with --no-mapper)")
    p.add_argument("--no-cache-teacher", action="store_true", help="recompute base caches + teacher every step")
    p.add_argument("--out", required=True, help="checkpoint folder (mapper/, adapter/, trainer_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def check_init(model, path: str, recompute) -> None:
    """Refuse ``--init`` unless the checkpoint was made for ``model`` and reads its branches as this run will."""
    checkpoints.check_checkpoint(model, path, label=f"--init {path}")
    trained_with = checkpoints.trained_recompute(path)
    if trained_with != recompute:
        raise ValueError(f"--init {path}: trained with recompute {trained_with}, this run {recompute} (give the same "
                         "--recompute / --recompute-together: the synthesizer reads its branches one way)")


def run_train(args) -> int:
    recompute = (*parse_recompute(args.recompute), args.recompute_together) if args.recompute else None
    if check_head_share(args.head_share) and recompute is None:
        raise ValueError(f"--head-share: a head grows only where branches are recomputed (give --recompute), got "
                         f"{args.head_share}")
    if args.head_share_max is not None and recompute is None:
        raise ValueError(f"--head-share-max: heads grow only where branches are recomputed (give --recompute), got "
                         f"{args.head_share_max}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    if args.init:
        check_init(model, args.init, recompute)
    train_ex, eval_ex = load_examples(args, args.n_examples, args.seed, args.eval_examples)
    source = " + ".join(args.data or [args.builder]) + "".join(f" + {m}" for m in args.mix or [])
    print(f"training on {len(train_ex)} examples ({source}), {len(eval_ex)} held out; "
          f"model {args.model}, scheme {args.scheme}", flush=True)
    config = recipe.TrainConfig(
        mapper=False if args.no_mapper else None, lora=not args.no_lora, steps=args.steps, lr=args.lr,
        mapper_lr=args.mapper_lr, kl_weight=args.kl_weight, ce_weight=args.ce_weight,
        answer_weight=args.answer_weight, lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps, eval_examples=eval_ex, eval_every=args.eval_every, checkpoint_dir=args.out,
        save_every=args.save_every, resume=args.resume, seed=args.seed, scheme=args.scheme, lora_r=args.lora_r,
        lora_alpha=args.lora_alpha, lora_targets=args.lora_targets, mapper_rank=args.mapper_rank,
        grad_accum=args.grad_accum, target_tokens=args.target_tokens, log_every=args.log_every,
        cache_teacher=not args.no_cache_teacher,
        recompute=recompute, head_share=args.head_share, head_share_max=args.head_share_max,
        exact_recomputed=args.exact_recomputed, init=args.init,
        link_tokens=args.link_tokens,
        log=lambda s: print(s, flush=True),
        config_extra={"model": args.model, "data": args.data, "builder": None if args.data else args.builder,
                      "n_examples": args.n_examples, "mix": args.mix, "eval_data": args.eval_data,
                      "eval_examples": args.eval_examples})
    r = recipe.train(model, tok, train_ex, config)
    if r["evals"]:
        e0, e1 = r["evals"][0], r["evals"][-1]
        print(f"held-out KL {e0['kl']:.4f} -> {e1['kl']:.4f} nats/token; top-1 {e0['top1']:.3f} -> {e1['top1']:.3f}")
    print(f"saved to {args.out}")
    return 0


def main(argv=None) -> int:
    p = add_train_args(argparse.ArgumentParser(prog="pskernels train", description=recipe.__doc__.split("\n")[0]))
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
