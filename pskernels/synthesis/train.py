"""Training recipe for the synthesizer: cache mapper + LoRA adapter, distilled from text concatenation.

Per example (batch 1):

1. the frozen *base* model (adapter disabled, ``torch.no_grad``) computes the shared prefix cache and one
   zero-copy branch cache per worker (``ParallelCache(prefix, [])``: only the branch tokens are stored);
2. the **teacher** is the same base model reading the *text concatenation*
   ``prefix + branches + prompt + target`` (the prefix cache copied, the rest re-prefilled); its
   distributions over the target tokens are kept (no grad). Examples without ``target`` (distillation)
   use the teacher's greedy continuation, computed once online;
3. the **student** is the patched model *with* its adapter reading ``prompt + target`` over
   ``ParallelCache(prefix, branches, scheme=..., mapper=mapper)``;
4. loss = ``kl_weight * KL(teacher || student) + ce_weight * CE(student, target)``, averaged over the
   target tokens. Only the mapper and the LoRA parameters are trained (autograd makes the patched
   attention and the mapper run their differentiable PyTorch backends).

``train(...)`` prints a line every ``log_every`` steps, evaluates held-out KL / top-1 agreement every
``eval_every`` steps and checkpoints (``mapper/`` via ``CacheMapper.save_pretrained``, ``adapter/`` via
PEFT, ``trainer_state.pt`` with optimizer state, step, history and RNG) every ``save_every`` steps;
``resume=True`` continues from the checkpoint exactly (the example order is a function of ``seed`` and the
step). CLI: ``pskernels train`` (:func:`add_train_args`, :func:`run_train`).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from ..hf import ParallelCache, patch_model
from .adapter import add_synthesizer_adapter, base_model, is_peft_model, load_adapter_weights, lora_parameters, unwrap
from .data import TokenizedExample, build, load_jsonl, tokenize_example
from .mapper import CacheMapper
from .workflow import cache_kwarg, output_cache

STATE_NAME = "trainer_state.pt"
CONFIG_NAME = "train_config.json"


# ---- building blocks (shared with evaluate.py) -----------------------------------------------------------
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


def _kw(model):
    return cache_kwarg(unwrap(model))


@torch.no_grad()
def branch_caches(model, ex: TokenizedExample):
    """Prefix cache and zero-copy worker caches, computed by the base model (adapter disabled).
    ``model`` must be patched."""
    kw = _kw(model)
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
        out = model(ids, use_cache=True, logits_to_keep=T + 1, **{_kw(model): copy.deepcopy(prefix)})
    return out.logits[0, :-1].float()


def synth_cache(prefix, branches, mapper=None, scheme="sequential"):
    return ParallelCache(prefix, branches, scheme=scheme, mapper=mapper)


def student_logits(model, ex: TokenizedExample, prefix, branches, target: torch.Tensor, *, mapper=None,
                   scheme: str = "sequential", adapter: bool = True) -> torch.Tensor:
    """Parallel synthesis: logits ``[T, V]`` predicting each target token from the branch caches.
    ``adapter=False`` runs the base model (untrained Parallel-Synthesis / APE settings)."""
    dev = next(model.parameters()).device
    T = target.numel()
    ids = torch.cat([ex.prompt_ids, target]).to(dev)[None]
    ctx = contextlib.nullcontext() if adapter else base_model(model)
    with ctx:
        out = model(ids, use_cache=True, logits_to_keep=T + 1,
                    **{_kw(model): synth_cache(prefix, branches, mapper, scheme)})
    return out.logits[0, :-1].float()


@torch.no_grad()
def greedy(model, first_ids: torch.Tensor, cache, n: int, eos=None) -> torch.Tensor:
    """Greedy continuation of ``first_ids`` (1-D) over ``cache`` (stops after ``eos``, which is kept)."""
    dev = next(model.parameters()).device
    kw = _kw(model)
    ids = first_ids.to(dev)[None]
    out = []
    eos = set() if eos is None else ({eos} if isinstance(eos, int) else set(eos))
    for _ in range(n):
        logits = model(ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[0, -1]
        tok = int(logits.argmax())
        out.append(tok)
        if tok in eos:
            break
        ids = torch.tensor([[tok]], device=dev)
    return torch.tensor(out, dtype=torch.long)


@torch.no_grad()
def teacher_greedy(model, ex: TokenizedExample, prefix, n: int, eos=None) -> torch.Tensor:
    with base_model(model):
        first = torch.cat(list(ex.branch_ids) + [ex.prompt_ids])
        return greedy(model, first, copy.deepcopy(prefix), n, eos)


@torch.no_grad()
def student_greedy(model, ex, prefix, branches, n, eos=None, *, mapper=None, scheme="sequential", adapter=True):
    ctx = contextlib.nullcontext() if adapter else base_model(model)
    with ctx:
        return greedy(model, ex.prompt_ids, synth_cache(prefix, branches, mapper, scheme), n, eos)


def kl_per_token(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) in nats for each position: ``[T]``."""
    t = F.log_softmax(teacher.float(), -1)
    s = F.log_softmax(student.float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def eos_ids(tokenizer):
    return getattr(tokenizer, "eos_token_id", None)


# ---- the trainer -----------------------------------------------------------------------------------------
def _order(n: int, micro: int, seed: int) -> int:
    """Index of the example used at micro-step ``micro``: a fresh permutation per epoch (resumable)."""
    epoch, i = divmod(micro, n)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(n, generator=g)[i])


class _Targets:
    """Target ids per example: the example's own, or the teacher's greedy continuation (cached)."""

    def __init__(self, n_tokens, eos):
        self.n, self.eos, self.cache = n_tokens, eos, {}

    def __call__(self, model, ex, prefix, key):
        if ex.target_ids is not None and ex.target_ids.numel():
            return ex.target_ids
        if key not in self.cache:
            t = teacher_greedy(model, ex, prefix, self.n, self.eos)
            self.cache[key] = t
        return self.cache[key]


@torch.no_grad()
def _prepare(model, ex, targets, key, store=None):
    """(prefix, branches, target ids, teacher logits) of one example, all from the frozen base model;
    kept in ``store`` (a dict) when given, so later epochs skip the base-model forwards."""
    if store is not None and key in store:
        return store[key]
    prefix, branches = branch_caches(model, ex)
    tgt = targets(model, ex, prefix, key)
    t_logits = teacher_logits(model, ex, prefix, tgt)
    out = (prefix, branches, tgt, t_logits)
    if store is not None:
        store[key] = out
    return out


@torch.no_grad()
def quick_eval(model, examples, *, mapper=None, scheme="sequential", adapter=True, targets=None, store=None) -> dict:
    """Mean KL to the teacher (nats/token) and top-1 agreement on the target tokens. ``store``: a dict
    keeping each example's base-model caches and teacher logits across calls."""
    targets = targets or _Targets(16, None)
    kl_sum, agree, tokens = 0.0, 0, 0
    for j, ex in enumerate(examples):
        prefix, branches, tgt, t = _prepare(model, ex, targets, ("eval", j), store)
        s = student_logits(model, ex, prefix, branches, tgt, mapper=mapper, scheme=scheme, adapter=adapter)
        kl_sum += kl_per_token(t, s).sum().item()
        agree += int((t.argmax(-1) == s.argmax(-1)).sum())
        tokens += tgt.numel()
    return {"kl": kl_sum / max(tokens, 1), "top1": agree / max(tokens, 1), "tokens": tokens}


def _save(dirpath, model, mapper, opt, step, history, evals, config):
    os.makedirs(dirpath, exist_ok=True)
    if mapper is not None:
        mapper.save_pretrained(os.path.join(dirpath, "mapper"))
    if is_peft_model(model):
        model.save_pretrained(os.path.join(dirpath, "adapter"))
    with open(os.path.join(dirpath, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    state = {"step": step, "optimizer": opt.state_dict(), "history": history, "evals": evals,
             "rng": torch.get_rng_state()}
    tmp = os.path.join(dirpath, STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(dirpath, STATE_NAME))


def _tokenize_all(tokenizer, examples, device):
    out = []
    for ex in examples:
        out.append(ex if isinstance(ex, TokenizedExample) else tokenize_example(tokenizer, ex, device=device))
    return out


LR_SCHEDULES = ("constant", "cosine")


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) of ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def train(model, tokenizer, examples, *, mapper=None, lora=True, steps: int = 100, lr: float = 1e-3,
          kl_weight: float = 1.0, ce_weight: float = 0.0, eval_examples=None, eval_every: int = 0,
          checkpoint_dir=None, save_every: int | None = None, resume: bool = False, seed: int = 0,
          scheme: str = "sequential", lora_r: int = 8, lora_alpha: int = 16, mapper_rank: int = 8,
          mapper_lr: float | None = None, grad_accum: int = 1, max_grad_norm: float | None = 1.0,
          target_tokens: int = 16, cache_teacher: bool = True, log_every: int = 10, log=print,
          lr_schedule: str = "constant", warmup_steps: int = 0, config_extra: dict | None = None) -> dict:
    """Train the mapper and the LoRA adapter to match text-concatenation synthesis.

    Parameters
    ----------
    model : HF causal LM or peft.PeftModel
        With ``lora=True`` a plain model is wrapped by :func:`add_synthesizer_adapter` (in place; the
        returned ``result["model"]`` is the PeftModel). The base weights are never updated.
    tokenizer : HF tokenizer (or any object with ``encode``); used to tokenize ``examples`` (dicts in the
        :mod:`pskernels.synthesis.data` format, or ``TokenizedExample``).
    mapper : CacheMapper, None or False
        ``None``: a fresh ``CacheMapper.for_model(model, rank=mapper_rank)`` (identity at init);
        ``False``: train without a mapper.
    steps, lr, kl_weight, ce_weight, grad_accum, max_grad_norm : optimisation (AdamW; ``mapper_lr``
        overrides the mapper's lr).
    lr_schedule, warmup_steps : ``"constant"`` or ``"cosine"`` (decay to 0 at ``steps``), after a linear
        warmup of ``warmup_steps``; a function of the step only, so a resumed run follows the same curve.
    eval_examples, eval_every : held-out examples and how often (in steps) to report their KL / top-1.
    checkpoint_dir, save_every, resume : checkpoints (default every ``eval_every`` steps and at the end);
        ``resume=True`` restores mapper, adapter, optimizer, step, history and RNG from ``checkpoint_dir``.
    seed : ``torch.manual_seed(seed)`` and the example order.
    scheme : ParallelCache scheme the student reads the branches with.
    target_tokens : teacher greedy tokens for examples without ``target`` (distillation).
    cache_teacher : keep every example's base-model caches and teacher logits in memory after its first
        use (the base model is frozen, so they never change; ~4 MB per 100-token example on SmolLM2-135M
        plus ``T x vocab`` floats of teacher logits); ``False`` recomputes them every step.

    Returns
    -------
    dict with ``history`` (per step: step, loss, kl, ce, seconds), ``evals`` (per evaluation: step, kl,
    top1), ``model`` (the PeftModel or model), ``mapper``, ``step``.
    """
    torch.manual_seed(seed)
    if not examples:
        raise ValueError("examples: expected at least one training example")
    if lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {lr_schedule!r}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {warmup_steps}")
    if lora and not is_peft_model(model):
        model = add_synthesizer_adapter(model, r=lora_r, alpha=lora_alpha)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad_(False)
    if not lora:
        for p in lora_parameters(model):
            p.requires_grad_(False)
    model.eval()  # no dropout (the patched attention refuses attention dropout in training mode)
    dev = next(model.parameters()).device
    state_path = os.path.join(checkpoint_dir, STATE_NAME) if checkpoint_dir else None
    resuming = bool(resume and state_path and os.path.isfile(state_path))
    if mapper is None:
        mdir = os.path.join(checkpoint_dir, "mapper") if checkpoint_dir else None
        if resuming and mdir and os.path.isdir(mdir):
            mapper = CacheMapper.from_pretrained(mdir)
        else:
            mapper = CacheMapper.for_model(unwrap(model), rank=mapper_rank)
    mapper = mapper or None
    if mapper is not None:
        mapper.to(dev)
    groups = []
    if mapper is not None:
        groups.append({"params": list(mapper.parameters()), "lr": mapper_lr or lr})
    lp = lora_parameters(model) if lora else []
    if lp:
        groups.append({"params": lp, "lr": lr})
    if not groups:
        raise ValueError("nothing to train: lora=False and mapper=False")
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in groups for p in g["params"]]

    train_ex = _tokenize_all(tokenizer, examples, dev)
    eval_ex = _tokenize_all(tokenizer, eval_examples or [], dev)
    eos = eos_ids(tokenizer)
    targets = _Targets(target_tokens, eos)
    config = {"scheme": scheme, "lora": bool(lora), "lora_r": lora_r, "lora_alpha": lora_alpha,
              "mapper": mapper is not None, "mapper_rank": mapper.config.rank if mapper is not None else None,
              "lr": lr, "mapper_lr": mapper_lr, "kl_weight": kl_weight, "ce_weight": ce_weight, "seed": seed,
              "grad_accum": grad_accum, "target_tokens": target_tokens, "train_examples": len(train_ex),
              "lr_schedule": lr_schedule, "warmup_steps": warmup_steps,
              **(config_extra or {})}
    history, evals, step = [], [], 0
    if resuming:
        st = torch.load(state_path, weights_only=False)
        if mapper is not None and os.path.isdir(os.path.join(checkpoint_dir, "mapper")):
            mapper.load_state_dict(CacheMapper.from_pretrained(os.path.join(checkpoint_dir, "mapper")).state_dict())
        if lp and os.path.isdir(os.path.join(checkpoint_dir, "adapter")):
            load_adapter_weights(model, os.path.join(checkpoint_dir, "adapter"))
        opt.load_state_dict(st["optimizer"])
        step, history, evals = st["step"], st["history"], st["evals"]
        torch.set_rng_state(st["rng"])
        log(f"resumed from {checkpoint_dir} at step {step}")
    save_every = save_every or eval_every or steps

    store = {} if cache_teacher else None

    def do_eval():
        r = quick_eval(model, eval_ex, mapper=mapper, scheme=scheme, targets=targets, store=store)
        evals.append({"step": step, "kl": r["kl"], "top1": r["top1"]})
        log(f"eval step {step}: held-out KL {r['kl']:.4f} nats/token, top-1 agreement {r['top1']:.3f}")

    with patched(model):
        if eval_ex and eval_every and not resuming:
            do_eval()
        t0 = time.perf_counter()
        while step < steps:
            ts = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
            for a in range(grad_accum):
                idx = _order(len(train_ex), step * grad_accum + a, seed)
                ex = train_ex[idx]
                prefix, branches, tgt, t_logits = _prepare(model, ex, targets, ("train", idx), store)
                s_logits = student_logits(model, ex, prefix, branches, tgt, mapper=mapper, scheme=scheme)
                kl = kl_per_token(t_logits, s_logits).mean()
                ce = F.cross_entropy(s_logits, tgt) if ce_weight else torch.zeros((), device=dev)
                loss = kl_weight * kl + ce_weight * ce
                (loss / grad_accum).backward()
                tot["loss"] += loss.item() / grad_accum
                tot["kl"] += kl.item() / grad_accum
                tot["ce"] += ce.item() / grad_accum
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            factor = lr_factor(step, steps, lr_schedule, warmup_steps)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            opt.step()
            step += 1
            history.append({"step": step, **tot, "seconds": time.perf_counter() - ts})
            if log_every and (step % log_every == 0 or step == steps):
                recent = history[-log_every:]
                log(f"step {step}/{steps}: loss {sum(h['loss'] for h in recent) / len(recent):.4f} "
                    f"kl {sum(h['kl'] for h in recent) / len(recent):.4f} "
                    f"({(time.perf_counter() - t0) / max(len(recent), 1):.2f} s/step)")
                t0 = time.perf_counter()
            if eval_ex and eval_every and step % eval_every == 0:
                do_eval()
            if checkpoint_dir and (step % save_every == 0 or step == steps):
                _save(checkpoint_dir, model, mapper, opt, step, history, evals, config)
    return {"history": history, "evals": evals, "model": model, "mapper": mapper, "step": step, "config": config}


# ---- CLI -------------------------------------------------------------------------------------------------
def load_model(name: str, dtype=torch.float32):
    """``smollm2`` (SmolLM2-135M-Instruct, offline), ``tiny`` (random 2-layer Llama + byte tokenizer) or an
    HF model folder. Returns ``(model, tokenizer)``."""
    if name == "smollm2":
        from .models import load_smollm2

        return load_smollm2(dtype=dtype)
    if name == "tiny":
        from ..demo import tiny_llama
        from .data import ByteTokenizer

        tok = ByteTokenizer()
        return tiny_llama(hidden=128, layers=2, heads=4, kv_heads=2, vocab=tok.vocab_size), tok
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).eval(), AutoTokenizer.from_pretrained(name)


def load_examples(args, n: int, seed: int, held_out: int = 0):
    """``(train, held_out)`` from ``--data`` (last ``held_out`` lines held out) or ``--builder``."""
    if getattr(args, "data", None):
        ex = load_jsonl(args.data)
        if held_out >= len(ex):
            raise ValueError(f"--data: {len(ex)} examples, fewer than --eval-examples + 1 = {held_out + 1}")
        return ex[: len(ex) - held_out], ex[len(ex) - held_out:]
    return build(args.builder, n, seed=seed), build(args.builder, held_out, seed=seed + 1) if held_out else []


def add_train_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--model", default="smollm2",
                   help="'smollm2', 'tiny' (random Llama, byte tokenizer) or an HF folder")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="training examples (JSONL, see pskernels.synthesis.data)")
    src.add_argument("--builder", default="aggregation", help="aggregation | exposure | distill | mixed")
    p.add_argument("--n-examples", type=int, default=128, help="(builder) training examples")
    p.add_argument("--eval-examples", type=int, default=16,
                   help="held-out examples (builder: seed+1; data: last lines)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mapper-lr", type=float, default=None)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--ce-weight", type=float, default=0.0)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr-schedule", default="constant", choices=list(LR_SCHEDULES),
                   help="cosine: decay to 0 at --steps")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear lr warmup")
    p.add_argument("--scheme", default="sequential", choices=["parallel", "sequential", "right_aligned"])
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=int, default=16)
    p.add_argument("--no-lora", action="store_true", help="train the mapper only")
    p.add_argument("--mapper-rank", type=int, default=8)
    p.add_argument("--no-mapper", action="store_true", help="train the adapter only")
    p.add_argument("--target-tokens", type=int, default=16, help="teacher greedy tokens for examples without target")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=None)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-cache-teacher", action="store_true", help="recompute base caches + teacher every step")
    p.add_argument("--out", required=True, help="checkpoint folder (mapper/, adapter/, trainer_state.pt)")
    p.add_argument("--resume", action="store_true", help="continue from --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def run_train(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_model(args.model)
    train_ex, eval_ex = load_examples(args, args.n_examples, args.seed, args.eval_examples)
    print(f"training on {len(train_ex)} examples ({args.data or args.builder}), {len(eval_ex)} held out; "
          f"model {args.model}, scheme {args.scheme}", flush=True)
    r = train(model, tok, train_ex, mapper=False if args.no_mapper else None, lora=not args.no_lora,
              steps=args.steps, lr=args.lr, mapper_lr=args.mapper_lr, kl_weight=args.kl_weight,
              ce_weight=args.ce_weight, lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
              eval_examples=eval_ex, eval_every=args.eval_every,
              checkpoint_dir=args.out, save_every=args.save_every, resume=args.resume, seed=args.seed,
              scheme=args.scheme, lora_r=args.lora_r, lora_alpha=args.lora_alpha, mapper_rank=args.mapper_rank,
              grad_accum=args.grad_accum, target_tokens=args.target_tokens, log_every=args.log_every,
              cache_teacher=not args.no_cache_teacher,
              log=lambda s: print(s, flush=True),
              config_extra={"model": args.model, "data": args.data, "builder": None if args.data else args.builder,
                            "n_examples": args.n_examples, "eval_examples": args.eval_examples})
    if r["evals"]:
        e0, e1 = r["evals"][0], r["evals"][-1]
        print(f"held-out KL {e0['kl']:.4f} -> {e1['kl']:.4f} nats/token; top-1 {e0['top1']:.3f} -> {e1['top1']:.3f}")
    print(f"saved to {args.out}")
    return 0


def main(argv=None) -> int:
    p = add_train_args(argparse.ArgumentParser(prog="pskernels train", description=__doc__.split("\n")[0]))
    return run_train(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
