"""Training recipe for the synthesizer: cache mapper + LoRA adapter, distilled from text concatenation.

Per example (batch 1), with the building blocks of :mod:`pskernels.synthesis.distill`:

1. the frozen *base* model (adapter disabled, ``torch.no_grad``) computes the shared prefix cache and one
   zero-copy branch cache per worker (``ParallelCache(prefix, [])``: only the branch tokens are stored);
2. the **teacher** is the same base model reading the *text concatenation*
   ``prefix + branches + prompt + target`` (the prefix cache copied, the rest re-prefilled); its
   distributions over the target tokens are kept (no grad). Examples without ``target`` (distillation)
   use the teacher's greedy continuation, computed once online;
3. the **student** is the patched model *with* its adapter reading ``prompt + target`` over
   ``ParallelCache(prefix, branches, scheme=..., mapper=mapper)``;
4. loss = ``kl_weight * KL(teacher || student) + ce_weight * CE(student, target)``, averaged over the
   target tokens (with ``answer_weight``, the KL of the tokens stating the example's ground-truth answer counts
   that many times). Only the mapper and the LoRA parameters are trained (autograd makes the patched
   attention and the mapper run their differentiable PyTorch backends).

``train(model, tokenizer, examples, TrainConfig(...))`` prints a line every ``log_every`` steps, evaluates
held-out KL / top-1 agreement every ``eval_every`` steps and checkpoints (``mapper/`` via
``CacheMapper.save_pretrained``, ``adapter/`` via PEFT, ``trainer_state.pt`` with optimizer state, step,
history and RNG) every ``save_every`` steps; ``resume=True`` continues from the checkpoint exactly (the
example order is a function of ``seed`` and the step); :func:`load_trained` reads a checkpoint back.
Command line: ``pskernels train`` (:mod:`pskernels.apps.train`).
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from .adapter import (
    DEFAULT_TARGETS,
    add_synthesizer_adapter,
    is_peft_model,
    load_adapter_weights,
    load_synthesizer_adapter,
    lora_parameters,
    peft_targets,
    unwrap,
)
from .answers import answer_token_weights
from .distill import (
    Tally,
    TargetCache,
    eos_ids,
    kl_per_token,
    patched,
    recomputed_view,
    student_logits,
    teacher_pass,
    tokenize_examples,
)
from .mapper import CacheMapper
from .recompute import check_head_share, is_share
from .workflows import recompute_counts

STATE_NAME = "trainer_state.pt"
CONFIG_NAME = "train_config.json"
MAPPER_DIR = "mapper"
ADAPTER_DIR = "adapter"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainConfig:
    """How :func:`train` trains the mapper and the LoRA adapter.

    Attributes
    ----------
    mapper : CacheMapper, None or False
        ``None``: a fresh ``CacheMapper.for_model(model, rank=mapper_rank)`` (identity at init);
        ``False``: train without a mapper.
    lora : bool
        Train a LoRA adapter (a plain model is wrapped by :func:`add_synthesizer_adapter`, ``lora_r`` /
        ``lora_alpha`` on ``lora_targets``: module names or the groups ``attn`` / ``mlp``).
    steps, lr, kl_weight, ce_weight, grad_accum, max_grad_norm
        Optimisation (AdamW; ``mapper_lr`` overrides the mapper's lr).
    answer_weight
        Answer-weighted distillation: in an example with an ``answer`` whose target (the teacher's continuation)
        states it, the KL of the tokens stating it counts ``answer_weight`` times
        (:func:`pskernels.synthesis.answers.answer_token_weights`; the loss is still divided by the target's
        length); 1: every target token alike.
    lr_schedule, warmup_steps
        ``"constant"`` or ``"cosine"`` (decay to 0 at ``steps``), after a linear warmup of ``warmup_steps``; a
        function of the step only, so a resumed run follows the same curve.
    eval_examples, eval_every
        Held-out examples and how often (in steps) to report their KL / top-1.
    checkpoint_dir, save_every, resume
        Checkpoints (default every ``eval_every`` steps and at the end); ``resume=True`` restores mapper,
        adapter, optimizer, step, history and RNG from ``checkpoint_dir``.
    seed
        ``torch.manual_seed(seed)`` and the example order.
    scheme
        ParallelCache scheme the student reads the branches with.
    target_tokens
        Teacher greedy tokens for examples without ``target`` (distillation).
    cache_teacher
        Keep every example's base-model caches and teacher logits in memory after its first use (the base
        model is frozen, so they never change; ~4 MB per 100-token example on SmolLM2-135M plus
        ``T x vocab`` floats of teacher logits, plus the recomputed parts with ``recompute``); ``False``
        recomputes them every step.
    link_tokens
        ``K > 0``: a fresh mapper also trains ``K`` link tokens the synthesizer runs after every branch with the
        branches before it in view (:mod:`pskernels.synthesis.links`); their embeddings train at the mapper's lr.
    recompute
        ``(head, tail, together)``: the student reads the branches with that many tokens at each end recomputed in
        text order by the base model (:func:`pskernels.synthesis.recompute.recompute_branches`), in training and in
        the held-out evaluations; head ``"prompt"``: each worker's own turn
        (:func:`pskernels.synthesis.workflows.worker_turn_tokens`; nothing for examples without worker turns,
        e.g. natural text). The synthesizer trained so expects its branches recomputed the same way.
    head_share
        With ``recompute``: each branch's head grows to at least that share of it
        (:func:`pskernels.synthesis.recompute.grown_heads`), for long branches; recorded as ``head_share``.
    head_share_max
        With ``recompute``: each training example's head grows to its own share, drawn once from ``seed`` and the
        example's index, uniformly in ``[head_share, head_share_max]`` (the held-out evaluations read at
        ``head_share``), so that the modules also learn on branches recomputed up to whole, where the cache needs
        no repair; recorded as ``head_share_max`` (None: every example at ``head_share``).
    exact_recomputed
        With ``recompute``: a fresh mapper steps aside on the recomputed tokens (neither maps nor calibrates them,
        :class:`pskernels.synthesis.CacheMapperConfig`), whose K/V are already the text's.
    init
        A checkpoint folder (``mapper/`` and/or ``adapter/``, e.g. a shipped synthesizer) to start from instead of
        a fresh mapper and adapter; the optimizer and the lr schedule start fresh. ``model`` must be plain; check
        first that the checkpoint was made for it (:func:`pskernels.synthesis.checkpoints.check_checkpoint`, as
        ``pskernels train --init`` does). Ignored when resuming (the run's own weights are restored).
    log_every, log
        A progress line through ``log`` every ``log_every`` steps (0: none).
    config_extra
        More entries for the checkpoint's ``train_config.json``.
    """

    mapper: CacheMapper | None | bool = None
    lora: bool = True
    steps: int = 100
    lr: float = 1e-3
    kl_weight: float = 1.0
    ce_weight: float = 0.0
    answer_weight: float = 1.0
    eval_examples: list | None = None
    eval_every: int = 0
    checkpoint_dir: str | None = None
    save_every: int | None = None
    resume: bool = False
    seed: int = 0
    scheme: str = "sequential"
    lora_r: int = 8
    lora_alpha: int = 16
    lora_targets: tuple = DEFAULT_TARGETS
    mapper_rank: int = 8
    mapper_lr: float | None = None
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    target_tokens: int = 16
    cache_teacher: bool = True
    log_every: int = 10
    log: Callable[[str], None] = print
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    recompute: tuple | None = None
    head_share: float = 0.0
    head_share_max: float | None = None
    exact_recomputed: bool = False
    init: str | None = None
    link_tokens: int = 0
    config_extra: dict | None = None


def lr_factor(step: int, steps: int, schedule: str, warmup_steps: int = 0) -> float:
    """Multiplier of the base lr for optimizer step ``step`` (0-based) of ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(steps - warmup_steps, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup_steps, span) / span))


def _example_index(n: int, micro: int, seed: int) -> int:
    """Index of the example used at micro-step ``micro``: a fresh permutation per epoch (resumable)."""
    epoch, i = divmod(micro, n)
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return int(torch.randperm(n, generator=g)[i])


@torch.no_grad()
def quick_eval(model, examples, *, mapper=None, scheme="sequential", adapter=True, targets=None, store=None,
               view=None) -> dict:
    """Mean KL to the teacher (nats/token) and top-1 agreement on the target tokens, overall and, under
    ``"splits"``, per ``split`` of the examples that carry one (workflow families: ``"train"`` /
    ``"held_out"``). ``store``: a dict keeping each example's base-model caches and teacher logits across
    calls. ``view(key, example, prefix, branches)``: the example's recomputed branch segments
    (:func:`pskernels.synthesis.distill.recomputed_view`) the student reads, or None."""
    targets = targets or TargetCache(16, None)
    tally = Tally()  # keys: None (overall) and each example's split
    for j, ex in enumerate(examples):
        prefix, branches, tgt, t = teacher_pass(model, ex, targets, ("eval", j), store)
        recompute = view(("eval", j), ex, prefix, branches) if view else None
        s = student_logits(model, ex, prefix, branches, tgt, mapper=mapper, scheme=scheme, adapter=adapter,
                           recompute=recompute)
        split = ex.example.get("split") if isinstance(ex.example, dict) else None
        tally.add({None, split}, t, s)
    out = tally.metrics(None)
    splits = sorted(k for k in tally.sums if k is not None)
    if splits:
        out["splits"] = {k: tally.metrics(k) for k in splits}
    return out


def _save(dirpath, model, mapper, opt, step, history, evals, config):
    os.makedirs(dirpath, exist_ok=True)
    if mapper is not None:
        mapper.save_pretrained(os.path.join(dirpath, MAPPER_DIR))
    if is_peft_model(model):
        model.save_pretrained(os.path.join(dirpath, ADAPTER_DIR))
    with open(os.path.join(dirpath, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    state = {"step": step, "optimizer": opt.state_dict(), "history": history, "evals": evals,
             "rng": torch.get_rng_state()}
    tmp = os.path.join(dirpath, STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, os.path.join(dirpath, STATE_NAME))


def load_trained(model, checkpoint: str):
    """``(peft_model_or_model, mapper)`` from a folder written by :func:`train` (``mapper`` is None when the
    folder holds no mapper; ``model`` is wrapped with the folder's adapter, if any, unless already a PeftModel)."""
    mapper = None
    if os.path.isdir(os.path.join(checkpoint, MAPPER_DIR)):
        mapper = CacheMapper.from_pretrained(os.path.join(checkpoint, MAPPER_DIR))
    if os.path.isdir(os.path.join(checkpoint, ADAPTER_DIR)) and not is_peft_model(model):
        model = load_synthesizer_adapter(model, os.path.join(checkpoint, ADAPTER_DIR))
    return model, mapper


def _saved_config(checkpoint_dir: str) -> dict:
    path = os.path.join(checkpoint_dir, CONFIG_NAME)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _check(examples, config: TrainConfig) -> None:
    if not examples:
        raise ValueError("examples: expected at least one training example")
    if config.lr_schedule not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule: expected one of {LR_SCHEDULES}, got {config.lr_schedule!r}")
    w = config.answer_weight
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 1:
        raise ValueError(f"answer_weight: expected a finite number >= 1, got {w!r}")
    if config.warmup_steps < 0:
        raise ValueError(f"warmup_steps: expected >= 0, got {config.warmup_steps}")
    if config.recompute is not None:
        r = config.recompute
        ok = isinstance(r, (tuple, list)) and len(r) == 3 and (r[0] == "prompt" or _count(r[0])) and _count(r[1])
        if not ok or list(r[:2]) == [0, 0]:
            raise ValueError(f"recompute: expected (head, tail, together) with head an int >= 0 or 'prompt', tail an "
                             f"int >= 0, not both 0, got {r!r}")
        if config.scheme != "sequential":
            raise ValueError(f"recompute: recomputed branch parts read the branches in text order (scheme "
                             f"'sequential'), got scheme {config.scheme!r}")
    if check_head_share(config.head_share) and config.recompute is None:
        raise ValueError(f"head_share: a head grows only where branches are recomputed (recompute=None), got "
                         f"{config.head_share}")
    m = config.head_share_max
    if m is not None and (not is_share(m) or m < config.head_share or config.recompute is None):
        raise ValueError(f"head_share_max: expected a share in [head_share, 1] ({config.head_share}) with recompute "
                         f"set, got {config.head_share_max!r}, recompute {config.recompute!r}")
    if config.exact_recomputed and (config.recompute is None or config.mapper is not None or config.init):
        raise ValueError(f"exact_recomputed: a fresh mapper (mapper=None, no init) reading recomputed branches "
                         f"(recompute set) steps aside on them, got recompute {config.recompute!r}, mapper "
                         f"{config.mapper!r}, init {config.init!r}")
    if config.init is not None:
        if not os.path.isdir(os.path.join(config.init, MAPPER_DIR)) and \
                not os.path.isdir(os.path.join(config.init, ADAPTER_DIR)):
            raise FileNotFoundError(f"init: expected a checkpoint folder with {MAPPER_DIR}/ and/or {ADAPTER_DIR}/, got "
                                    f"{config.init!r}")
        if config.mapper is not None or config.link_tokens:
            raise ValueError("init: the mapper starts from the checkpoint's (mapper=None, no new link tokens), got "
                             f"mapper={config.mapper!r}, link_tokens={config.link_tokens}")
    if not _count(config.link_tokens):
        raise ValueError(f"link_tokens: expected an int >= 0, got {config.link_tokens!r}")
    if config.link_tokens:
        if config.mapper is not None:
            raise ValueError("link_tokens: the link embeddings live in a fresh mapper (mapper=None), got a mapper "
                             "passed in or mapper=False")
        if config.recompute is not None or config.scheme != "sequential":
            raise ValueError(f"link_tokens: link tokens follow the branches in text order, read as they were cached "
                             f"(scheme 'sequential', no recompute), got scheme {config.scheme!r}, recompute "
                             f"{config.recompute!r}")


def example_head_share(config: TrainConfig, key) -> float:
    """The head share example ``key`` (``("train", index)`` or ``("eval", index)``) is read at: ``head_share``,
    or for a training example with ``head_share_max`` its own draw in ``[head_share, head_share_max]``, the same
    in every epoch and on resume."""
    if config.head_share_max is None or key[0] != "train":
        return config.head_share
    draw = random.Random(f"head share {config.seed} {key[1]}").random()
    return config.head_share + draw * (config.head_share_max - config.head_share)


def _count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _trainable_model(model, config: TrainConfig, resuming: bool):
    """``model`` with the LoRA adapter (when ``config.lora``; ``config.init``'s when it has one) as the only
    trainable parameters, in eval mode."""
    init_adapter = os.path.join(config.init, ADAPTER_DIR) if config.init and not resuming else None
    if config.lora and init_adapter and os.path.isdir(init_adapter):
        if is_peft_model(model):
            raise ValueError(f"model: already a PeftModel; init {config.init!r} holds an adapter to start from")
        model = load_synthesizer_adapter(model, init_adapter, is_trainable=True)
    elif config.lora and not is_peft_model(model):
        model = add_synthesizer_adapter(model, r=config.lora_r, alpha=config.lora_alpha,
                                        target_modules=config.lora_targets)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            p.requires_grad_(False)
    if not config.lora:
        for p in lora_parameters(model):
            p.requires_grad_(False)
    model.eval()  # no dropout (the patched attention refuses attention dropout in training mode)
    return model


def _initial_mapper(model, config: TrainConfig, resuming: bool):
    """The mapper to train (None: none): the given one, the checkpoint's when resuming, else a fresh one."""
    mapper = config.mapper
    if mapper is None:
        mapper_dir = os.path.join(config.checkpoint_dir, MAPPER_DIR) if config.checkpoint_dir else None
        init_dir = os.path.join(config.init, MAPPER_DIR) if config.init else None
        if resuming and mapper_dir and os.path.isdir(mapper_dir):
            mapper = CacheMapper.from_pretrained(mapper_dir)
        elif not resuming and init_dir and os.path.isdir(init_dir):
            mapper = CacheMapper.from_pretrained(init_dir)
        else:
            mapper = CacheMapper.for_model(unwrap(model), rank=config.mapper_rank, link_tokens=config.link_tokens,
                                           exact_recomputed=config.exact_recomputed)
    return mapper or None


def train(model, tokenizer, examples, config: TrainConfig | None = None) -> dict:
    """Train the mapper and the LoRA adapter to match text-concatenation synthesis.

    Parameters
    ----------
    model : HF causal LM or peft.PeftModel
        With ``config.lora`` a plain model is wrapped by :func:`add_synthesizer_adapter` (in place; the
        returned ``result["model"]`` is the PeftModel). The base weights are never updated.
    tokenizer : HF tokenizer (or any object with ``encode``)
        Tokenizes ``examples`` and ``config.eval_examples``.
    examples : list
        Dicts in the :mod:`pskernels.synthesis.data` format, or ``TokenizedExample``.
    config : TrainConfig
        Everything else (default: ``TrainConfig()``).

    Returns
    -------
    dict with ``history`` (per step: step, loss, kl, ce, seconds), ``evals`` (per evaluation: step, kl,
    top1), ``model`` (the PeftModel or model), ``mapper``, ``step`` and ``config`` (as saved in
    ``train_config.json``).
    """
    cfg = config or TrainConfig()
    torch.manual_seed(cfg.seed)
    _check(examples, cfg)
    state_path = os.path.join(cfg.checkpoint_dir, STATE_NAME) if cfg.checkpoint_dir else None
    resuming = bool(cfg.resume and state_path and os.path.isfile(state_path))
    model = _trainable_model(model, cfg, resuming)
    dev = next(model.parameters()).device
    mapper = _initial_mapper(model, cfg, resuming)
    if mapper is not None:
        mapper.to(dev)
    groups = []
    if mapper is not None:
        groups.append({"params": list(mapper.parameters()), "lr": cfg.mapper_lr or cfg.lr})
    lp = lora_parameters(model) if cfg.lora else []
    if lp:
        groups.append({"params": lp, "lr": cfg.lr})
    if not groups:
        raise ValueError("nothing to train: lora=False and mapper=False")
    opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=0.0)
    base_lrs = [g["lr"] for g in opt.param_groups]
    params = [p for g in groups for p in g["params"]]

    train_ex = tokenize_examples(tokenizer, examples, dev)
    eval_ex = tokenize_examples(tokenizer, cfg.eval_examples or [], dev)
    targets = TargetCache(cfg.target_tokens, eos_ids(tokenizer))
    lora_cfg = model.peft_config[model.active_adapter] if lp else None  # init's adapter: its own r and alpha
    saved_config = {"scheme": cfg.scheme, "lora": bool(cfg.lora),
                    "lora_r": lora_cfg.r if lora_cfg else cfg.lora_r,
                    "lora_alpha": lora_cfg.lora_alpha if lora_cfg else cfg.lora_alpha,
                    "lora_targets": list(peft_targets(model)) if lp else None,
                    "mapper": mapper is not None, "mapper_rank": mapper.config.rank if mapper is not None else None,
                    "lr": cfg.lr, "mapper_lr": cfg.mapper_lr, "kl_weight": cfg.kl_weight, "ce_weight": cfg.ce_weight,
                    "answer_weight": cfg.answer_weight,
                    "seed": cfg.seed, "grad_accum": cfg.grad_accum, "target_tokens": cfg.target_tokens,
                    "train_examples": len(train_ex), "lr_schedule": cfg.lr_schedule,
                    "warmup_steps": cfg.warmup_steps,
                    "recompute": list(cfg.recompute) if cfg.recompute else None, "head_share": cfg.head_share,
                    "head_share_max": cfg.head_share_max,
                    "exact_recomputed": bool(mapper is not None and mapper.config.exact_recomputed),
                    "init": cfg.init, "link_tokens": cfg.link_tokens, **(cfg.config_extra or {})}
    history, evals, step = [], [], 0
    if resuming:
        before = _saved_config(cfg.checkpoint_dir)
        trained_with = before.get("recompute")
        if trained_with != saved_config["recompute"]:
            raise ValueError(f"recompute: the run in {cfg.checkpoint_dir} was trained with recompute {trained_with}, "
                             f"resumed with {saved_config['recompute']} (the synthesizer reads its branches one way)")
        grown = before.get("head_share") or 0.0
        if grown != cfg.head_share:
            raise ValueError(f"head_share: the run in {cfg.checkpoint_dir} was trained with head_share {grown}, "
                             f"resumed with {cfg.head_share}")
        drawn_up_to = before.get("head_share_max")
        if drawn_up_to != cfg.head_share_max:
            raise ValueError(f"head_share_max: the run in {cfg.checkpoint_dir} was trained with head_share_max "
                             f"{drawn_up_to}, resumed with {cfg.head_share_max}")
        stepped_aside = before.get("exact_recomputed", False)
        if stepped_aside != cfg.exact_recomputed:
            raise ValueError(f"exact_recomputed: the run in {cfg.checkpoint_dir} was trained with exact_recomputed "
                             f"{stepped_aside}, resumed with {cfg.exact_recomputed}")
        weighed = before.get("answer_weight", 1.0)
        if weighed != cfg.answer_weight:
            raise ValueError(f"answer_weight: the run in {cfg.checkpoint_dir} was trained with answer_weight "
                             f"{weighed}, resumed with {cfg.answer_weight}")
        saved_config["init"] = before.get("init")
        linked = before.get("link_tokens") or 0
        if linked != cfg.link_tokens:
            raise ValueError(f"link_tokens: the run in {cfg.checkpoint_dir} was trained with {linked} link tokens, "
                             f"resumed with {cfg.link_tokens}")
        st = torch.load(state_path, weights_only=False)
        mapper_dir = os.path.join(cfg.checkpoint_dir, MAPPER_DIR)
        if mapper is not None and os.path.isdir(mapper_dir):
            mapper.load_state_dict(CacheMapper.from_pretrained(mapper_dir).state_dict())
        if lp and os.path.isdir(os.path.join(cfg.checkpoint_dir, ADAPTER_DIR)):
            load_adapter_weights(model, os.path.join(cfg.checkpoint_dir, ADAPTER_DIR))
        opt.load_state_dict(st["optimizer"])
        step, history, evals = st["step"], st["history"], st["evals"]
        torch.set_rng_state(st["rng"])
        cfg.log(f"resumed from {cfg.checkpoint_dir} at step {step}")
    save_every = cfg.save_every or cfg.eval_every or cfg.steps

    store = {} if cfg.cache_teacher else None
    weights = {}  # example index -> its target tokens' KL weights (the targets never change)
    views = {}  # example key -> its recomputed branch segments (with cache_teacher: the base model is frozen)

    def view(key, ex, prefix, branches):
        if not cfg.recompute:
            return None
        if key in views:
            return views[key]
        v = recomputed_view(model, ex, prefix, branches, recompute_counts(tokenizer, ex.example, cfg.recompute),
                            head_share=example_head_share(cfg, key))
        if store is not None:
            views[key] = v
        return v

    def do_eval():
        r = quick_eval(model, eval_ex, mapper=mapper, scheme=cfg.scheme, targets=targets, store=store, view=view)
        evals.append({"step": step, **{k: r[k] for k in ("kl", "top1", "splits") if k in r}})
        per_split = "".join(f"; {k}: KL {m['kl']:.4f}, top-1 {m['top1']:.3f}" for k, m in r.get("splits", {}).items())
        cfg.log(f"eval step {step}: held-out KL {r['kl']:.4f} nats/token, top-1 agreement {r['top1']:.3f}"
                + per_split)

    with patched(model):
        if eval_ex and cfg.eval_every and not resuming:
            do_eval()
        t0 = time.perf_counter()
        while step < cfg.steps:
            ts = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            tot = {"loss": 0.0, "kl": 0.0, "ce": 0.0}
            for a in range(cfg.grad_accum):
                idx = _example_index(len(train_ex), step * cfg.grad_accum + a, cfg.seed)
                ex = train_ex[idx]
                prefix, branches, tgt, t_logits = teacher_pass(model, ex, targets, ("train", idx), store)
                s_logits = student_logits(model, ex, prefix, branches, tgt, mapper=mapper, scheme=cfg.scheme,
                                          recompute=view(("train", idx), ex, prefix, branches))
                if idx not in weights:
                    weights[idx] = answer_token_weights(tokenizer, ex.answer, tgt, cfg.answer_weight)
                kl = (kl_per_token(t_logits, s_logits) * weights[idx]).mean()
                ce = F.cross_entropy(s_logits, tgt) if cfg.ce_weight else torch.zeros((), device=dev)
                loss = cfg.kl_weight * kl + cfg.ce_weight * ce
                (loss / cfg.grad_accum).backward()
                tot["loss"] += loss.item() / cfg.grad_accum
                tot["kl"] += kl.item() / cfg.grad_accum
                tot["ce"] += ce.item() / cfg.grad_accum
            if cfg.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            factor = lr_factor(step, cfg.steps, cfg.lr_schedule, cfg.warmup_steps)
            for g, base in zip(opt.param_groups, base_lrs):
                g["lr"] = base * factor
            opt.step()
            step += 1
            history.append({"step": step, **tot, "seconds": time.perf_counter() - ts})
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.steps):
                recent = history[-cfg.log_every:]
                cfg.log(f"step {step}/{cfg.steps}: loss {sum(h['loss'] for h in recent) / len(recent):.4f} "
                        f"kl {sum(h['kl'] for h in recent) / len(recent):.4f} "
                        f"({(time.perf_counter() - t0) / max(len(recent), 1):.2f} s/step)")
                t0 = time.perf_counter()
            if eval_ex and cfg.eval_every and step % cfg.eval_every == 0:
                do_eval()
            if cfg.checkpoint_dir and (step % save_every == 0 or step == cfg.steps):
                _save(cfg.checkpoint_dir, model, mapper, opt, step, history, evals, saved_config)
    return {"history": history, "evals": evals, "model": model, "mapper": mapper, "step": step,
            "config": saved_config}
