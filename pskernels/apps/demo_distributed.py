"""``pskernels demo --processes N`` and ``torchrun``: the agent demo with workers in other processes.

Rank 0 prefills the shared prefix (system + task) and broadcasts its cache (:func:`pskernels.distributed.
broadcast_prefix`); ranks 1..N-1 are workers: each answers one sub-task on the received prefix (a zero-copy
``ParallelCache(prefix, [])``), sends its branch cache (:func:`~pskernels.distributed.send_branch`), then its
branch's token ids (``dist.send``). Rank 0 takes the branches in the order the workers finish
(:func:`~pskernels.distributed.recv_any`, bounded by ``--timeout``: a dead or silent worker is listed as missing
and the demo goes on with the branches it has), then synthesizes twice: (b) Parallel-Synthesis from the received
caches, (a) text concatenation from the received token ids (re-prefilled after the cached prefix). It reports
per-worker bytes and transfer times, the time from the last branch (last token ids) received to the first
token of each path, and both answers. With ``--model tiny`` rank 0 also recomputes every received worker in
its own process and checks that the received branches give exactly the single-process ``ParallelCache``
logits and greedy tokens.

Two ways to start it:

* ``pskernels demo --processes N [--model tiny]``: N local processes (``torch.multiprocessing`` spawn), gloo over
  127.0.0.1 on a free port, CPU tensors;
* ``torchrun --nproc-per-node N -m pskernels.apps.demo_distributed [--model tiny]`` (or ``torchrun ... --no-python
  pskernels demo``): ``env://`` initialisation, NCCL with one GPU per rank (``LOCAL_RANK``) when CUDA is
  available, gloo on CPU otherwise.

Rank 0 only loads the synthesizer's trained checkpoint (the one shipped for ``--model`` unless ``--untrained``,
or ``--mapper PATH``); workers and path (a) run the base model, as in the single-process demo.
"""
from __future__ import annotations

import contextlib
import copy
import datetime
import ipaddress
import multiprocessing as mp
import os
import queue
import socket
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field

import torch

NS = "psdemo"  # store keys of the demo's own bookkeeping (the transport uses pskv/...)


@dataclass
class DemoConfig:
    model: str = "smollm2"
    worker_tokens: int = 64  # new tokens per worker
    answer_tokens: int = 80  # new tokens of each synthesized answer
    timeout: float = 300.0  # seconds rank 0 waits for the branches (from its own prefix broadcast)
    repeats: int = 3  # warm TTFT measurements per path (median)
    mapper: str | None = None
    untrained: bool = False
    check: bool | None = None  # recompute the workers on rank 0 and compare (None: with --model tiny)
    dead: tuple = ()  # worker ranks that exit right after the prefix broadcast (tests: a dead worker)
    dead_after_branch: tuple = ()  # worker ranks that exit after their cache, before their token ids (tests)
    threads: int | None = None  # torch threads per process (None: keep the process's setting)
    recompute_synthesizer: bool = False  # also (c): the branches read with some tokens recomputed on rank 0
    head_share: float | None = None  # (c)'s heads grow to this share of a branch (None: its synthesizer's own)
    task: str | None = None
    subtasks: list = field(default_factory=list)


def worker_index(rank: int, subtasks) -> int:
    """Worker ``rank`` (1..N-1) answers ``subtasks[(rank - 1) % len(subtasks)]``: that index (also of its
    instruction's token ids)."""
    return (rank - 1) % len(subtasks)


def worker_subtask(rank: int, subtasks) -> str:
    """The sub-task worker ``rank`` answers (:func:`worker_index`)."""
    return subtasks[worker_index(rank, subtasks)]


def _elapsed_ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3


@torch.no_grad()
def generate_branch(model, prefix, instruction_ids, *, max_new_tokens: int, eos, pad):
    """One worker on the (received) prefix: ``(worker cache, branch ids, answer ids)``.

    The worker generates on a zero-copy ``ParallelCache(prefix, [])``; ``branch ids`` are the tokens its cache
    holds (instruction + answer, without the last generated token, which is never fed back), as in
    :func:`pskernels.synthesis.workflow.run_workers` for one row."""
    from ..hf import ParallelCache
    from ..synthesis.workflow import cache_kwarg
    from .demo import REPETITION_PENALTY

    ids = instruction_ids[None]
    w = ParallelCache(prefix, [], reserve=ids.shape[1] + max_new_tokens - 1)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=pad, repetition_penalty=REPETITION_PENALTY,
                         **{cache_kwarg(model): w})
    gen = out[0, ids.shape[1]:].tolist()
    stop = next((t + 1 for t, tok in enumerate(gen) if tok == eos), len(gen))
    cached = min(stop, len(gen) - 1)
    branch_ids = torch.cat([instruction_ids.cpu(), torch.tensor(gen[:cached], dtype=torch.long)])
    return w, branch_ids, torch.tensor(gen[:stop], dtype=torch.long)


def _announced(store, key: str, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``key`` on the store (a timed-out store wait leaves the group usable)."""
    import torch.distributed as dist

    try:
        store.wait([key], datetime.timedelta(seconds=seconds))
        return True
    except dist.DistStoreError:
        return store.check([key])


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _load(cfg: DemoConfig, rank: int, device):
    """``(model, base, tokenizer, mapper, synthesizer label, mapper path, recompute)``; rank 0 loads first (a first
    SmolLM2 load converts the weights into a shared cache folder), the workers once it is done. ``recompute``
    (rank 0 with ``cfg.recompute_synthesizer``, else None): ``(synthesizer, mapper, (head, tail, together),
    head share, checkpoint path)`` of answer (c), the synthesizer None for the base model."""
    from ..hf import patch_model
    from ..synthesis.adapter import is_peft_model, unwrap
    from ..synthesis.models import load_model
    from .demo import load_default_synthesizer, load_synthesizer

    store = _store()
    if rank != 0:
        store.wait([f"{NS}/loaded"], datetime.timedelta(seconds=max(cfg.timeout, 600)))
    model, tokenizer = load_model(cfg.model)
    model = model.to(device)
    mapper, path, recompute = None, None, None
    if rank == 0:
        if cfg.recompute_synthesizer:  # its own copy of the base weights, loaded before (b)'s adapter wraps them
            recompute = _recompute_synthesizer(cfg, model, device)
        if cfg.mapper:
            model, mapper = load_synthesizer(model, cfg.mapper)
            path = cfg.mapper
        else:
            model, mapper, path = load_default_synthesizer(model, cfg.model, cfg.untrained)
        if mapper is not None:
            mapper = mapper.to(device)
        store.set(f"{NS}/loaded", "1")
    patch_model(model)
    trained = ["cache mapper"] * (mapper is not None) + ["LoRA adapter"] * is_peft_model(model)
    label = "trained " + " + ".join(trained) if trained else "base model"
    return model, unwrap(model), tokenizer, mapper, label, path, recompute


def _recompute_synthesizer(cfg: DemoConfig, base, device):
    """Answer (c)'s synthesizer as ``pskernels demo --recompute-synthesizer`` has it: the one shipped for
    recomputed branches, reading them as it was trained (its head share unless ``cfg.head_share``); without one
    (or ``--untrained``) the base model with each worker's instruction recomputed in one forward."""
    from ..hf import patch_model
    from .demo import RECOMPUTE_TURNS, load_recompute_synthesizer

    path, synthesizer, share = load_recompute_synthesizer(base, cfg.model, cfg.untrained)
    synth, mapper, how = synthesizer or (None, None, RECOMPUTE_TURNS)
    if synth is not None:
        synth, mapper = synth.to(device), mapper.to(device) if mapper is not None else None
        patch_model(synth)
    return synth, mapper, how, share if cfg.head_share is None else cfg.head_share, path


def _run_worker(rank: int, cfg: DemoConfig, model, base, instruction_ids, eos, pad, device) -> dict:
    """A worker rank: answers its instruction on the broadcast prefix, sends its branch cache to rank 0, then the
    branch's token ids (announced on the store first, so rank 0 never waits on a dead rank)."""
    import torch.distributed as dist

    from .. import distributed as psd

    prefix = psd.broadcast_prefix(None, 0, model=base, timeout=cfg.timeout)
    if rank in cfg.dead:
        return {"rank": rank, "dead": True}
    w, branch_ids, _ = generate_branch(model, prefix, instruction_ids, max_new_tokens=cfg.worker_tokens, eos=eos,
                                       pad=pad)
    t0 = time.perf_counter()
    sent = psd.send_branch(w, 0, model=base, length=len(branch_ids), timeout=cfg.timeout)
    send_ms = _elapsed_ms(t0)
    if rank in cfg.dead_after_branch:
        return {"rank": rank, "dead": True}
    store = _store()
    store.set(f"{NS}/ids/{rank}", str(len(branch_ids)))
    dist.send(branch_ids.to(device), 0)  # the same branch as text: its token ids
    store.add(f"{NS}/done", 1)
    return {"rank": rank, "sent_bytes": sent, "send_ms": send_ms, "branch_tokens": len(branch_ids)}


def _receive_token_ids(store, ranks: list, got: dict, missing: list, deadline: float, cfg: DemoConfig,
                       device) -> dict:
    """Rank 0: ``{rank: token ids}`` of the branches already received as caches, each once its worker announced
    it on the store (by ``deadline``). A worker that died after its cache is removed from ``ranks`` and listed in
    ``missing``: both paths drop it, so the answers compare like for like. Records ``got[rank]["ids_ms"]``."""
    import torch.distributed as dist

    ids = {}
    for s in list(ranks):
        t0 = time.perf_counter()
        if not _announced(store, f"{NS}/ids/{s}", max(1.0, deadline - time.perf_counter())):
            missing.append({"rank": s, "why": f"token ids not announced within --timeout {cfg.timeout:g} s"})
            ranks.remove(s)
            continue
        buf = torch.empty(int(store.get(f"{NS}/ids/{s}")), dtype=torch.long, device=device)
        dist.recv(buf, s)
        store.delete_key(f"{NS}/ids/{s}")
        got[s]["ids_ms"] = _elapsed_ms(t0)
        ids[s] = buf.cpu()
    return ids


@torch.no_grad()
def run_rank(rank: int, world: int, cfg: DemoConfig, device=None):
    """One rank of the demo (the process group is initialised). Rank 0 returns the report dict; a worker returns
    ``{"rank", "sent_bytes", "send_ms", "branch_tokens"}`` (or ``{"rank", "dead": True}``)."""
    import torch.distributed as dist

    from .. import distributed as psd
    from ..synthesis.adapter import base_model
    from ..synthesis.workflow import output_cache
    from .demo import DEFAULT_SUBTASKS, DEFAULT_TASK, agent_prompts

    device = torch.device(device or "cpu")
    task, subtasks = cfg.task or DEFAULT_TASK, list(cfg.subtasks or DEFAULT_SUBTASKS)
    model, base, tokenizer, mapper, label, path, recompute = _load(cfg, rank, device)
    prefix_ids, worker_ids, query_ids, eos, pad = agent_prompts(tokenizer, task, subtasks, device)
    store = _store()
    t_bcast = time.perf_counter()  # monotonic, and the clock of branch.received_at
    if rank != 0:
        return _run_worker(rank, cfg, model, base, worker_ids[worker_index(rank, subtasks)], eos, pad, device)

    # ------------------------------------------------------------------------------------------- rank 0
    from ..synthesis.synthesize import Synthesizer
    from ..synthesis.synthesizer import synthesizer_cache
    from ..synthesis.workflow import cache_kwarg, text_concat_cache

    kw = cache_kwarg(base)
    with base_model(model):
        prefix = output_cache(model(prefix_ids, use_cache=True))
    psd.broadcast_prefix(prefix, 0, model=base, timeout=cfg.timeout)
    deadline = t_bcast + cfg.timeout  # the branches are due --timeout seconds after the prefix broadcast began
    # warm up both paths while the workers generate (so the first measured token is not a cold start)
    with base_model(model):
        text_concat_cache(model, prefix, [worker_ids[0]], query_ids)
    model(query_ids, use_cache=True, logits_to_keep=1, **{kw: synthesizer_cache(model, prefix, [], mapper)})

    received, why = psd.gather_branches(range(1, world), model=base, prefix=prefix,
                                        timeout=max(0.0, deadline - time.perf_counter()))
    missing = [{"rank": r, "why": w if w.startswith("refused") else f"no branch within --timeout {cfg.timeout:g} s"}
               for r, w in why.items()]
    got = {s: {"branch": br, "arrival_s": round(br.received_at - t_bcast, 3)} for s, br in received.items()}
    t_last_branch = max((br.received_at for br in received.values()), default=None)
    order = list(got)
    ranks = sorted(got)
    r = {"model": cfg.model, "world": world, "backend": dist.get_backend(), "device": str(device),
         "threads": torch.get_num_threads(), "task": task, "prefix_tokens": prefix_ids.shape[1],
         "query_tokens": query_ids.shape[1], "bytes_per_token": psd.branch_bytes_per_token(base),
         "arrival_order": order, "missing": sorted(missing, key=lambda m: m["rank"]), "synthesizer": label,
         "mapper_path": path, "timeout_s": cfg.timeout, "receive_s": round(time.perf_counter() - t_bcast, 3)}
    from .demo import answer_generation, decode_text

    gen = answer_generation(query_ids, cfg.answer_tokens, eos, pad)
    branches = [got[s]["branch"] for s in ranks]
    if not branches:
        r.update(workers=[], parallel_answer=None, text_answer=None)
        return r

    def first_parallel():
        cache = synthesizer_cache(model, prefix, branches, mapper)
        return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1].argmax(-1)

    def first_text(branch_ids):
        with base_model(model):
            return text_concat_cache(model, prefix, branch_ids, query_ids)[1][:, -1].argmax(-1)

    first_parallel()
    parallel_after_last = _elapsed_ms(t_last_branch)  # last branch received -> first token of (b)
    ids = _receive_token_ids(store, ranks, got, missing, deadline, cfg, device)
    t_last_ids = time.perf_counter()
    if len(ranks) < len(branches):
        branches = [got[s]["branch"] for s in ranks]
        r["missing"] = sorted(missing, key=lambda m: m["rank"])
        if not branches:
            r.update(workers=[], parallel_answer=None, text_answer=None)
            return r
    branch_ids = [ids[s] for s in ranks]
    first_text(branch_ids)
    text_after_last = _elapsed_ms(t_last_ids)  # last token ids received -> first token of (a)
    turns = [len(worker_ids[worker_index(s, subtasks)]) for s in ranks]

    def recomputed_logits(brs, **generate):
        """(c): ``brs`` read with some of their tokens recomputed by the base model, then (c)'s synthesizer on the
        query (its logits; with ``generate`` kwargs its greedy answer)."""
        synth, mapper_c, how, share, _ = recompute
        cache = Synthesizer(model, mapper_c, recompute=how, head_share=share).cache(prefix, brs, branch_ids,
                                                                                   turns=turns)
        with base_model(model) if synth is None else contextlib.nullcontext():
            if generate:
                return (synth or model).generate(query_ids, **generate, **{kw: cache})
            return (synth or model)(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

    paths = {"parallel": first_parallel, "text": lambda: first_text(branch_ids)}
    if recompute is not None:
        recomputed_logits(branches)  # warm up
        paths["recompute"] = lambda: recomputed_logits(branches)[:, -1].argmax(-1)
    times = {name: [] for name in paths}
    for _ in range(cfg.repeats):  # alternate the paths on a noisy machine
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(_elapsed_ms(t0))
    t_par, t_text = times["parallel"], times["text"]

    par_out = model.generate(query_ids, **gen, **{kw: synthesizer_cache(model, prefix, branches, mapper)})
    par_out = par_out[0, query_ids.shape[1]:].cpu()
    full = torch.cat([prefix_ids[0].cpu()] + branch_ids + [query_ids[0].cpu()])[None].to(device)
    with base_model(model):
        text_out = model.generate(full, **answer_generation(full, cfg.answer_tokens, eos, pad),
                                  **{kw: copy.deepcopy(prefix)})[0, full.shape[1]:].cpu()
    dec = lambda t: decode_text(tokenizer, t)  # noqa: E731
    workers = []
    for s in ranks:
        instr = len(worker_ids[worker_index(s, subtasks)])
        br = got[s]["branch"]
        workers.append({
            "rank": s, "subtask": worker_subtask(s, subtasks), "answer": dec(ids[s][instr:]),
            "branch_tokens": len(ids[s]),
            "bytes": br.payload_bytes, "transfer_ms": round(br.recv_seconds * 1e3, 3),
            "MB_per_s": round(br.payload_bytes / max(br.recv_seconds, 1e-9) / 1e6, 1),
            "ids_bytes": ids[s].numel() * ids[s].element_size(), "ids_ms": round(got[s]["ids_ms"], 3),
            "arrival_s": got[s]["arrival_s"]})
    r.update(
        workers=workers, parallel_answer=dec(par_out), text_answer=dec(text_out),
        parallel_answer_ids=par_out.tolist(), text_answer_ids=text_out.tolist(),
        parallel_after_last_branch_ms=round(parallel_after_last, 2), text_after_last_ids_ms=round(text_after_last, 2),
        parallel_ttft_ms=round(statistics.median(t_par), 2) if t_par else None,
        text_concat_ttft_ms=round(statistics.median(t_text), 2) if t_text else None)
    if recompute is not None:
        synth, _, how, share, rpath = recompute
        rec_out = recomputed_logits(branches, **gen)[0, query_ids.shape[1]:].cpu()
        r.update(recompute_answer=dec(rec_out), recompute_answer_ids=rec_out.tolist(), recompute=list(how),
                 head_share=share, recompute_path=str(rpath) if rpath else None,
                 recompute_synthesizer="base model" if synth is None else "trained on recomputed branches",
                 recompute_ttft_ms=round(statistics.median(times["recompute"]), 2) if times["recompute"] else None)
    check = cfg.check if cfg.check is not None else cfg.model == "tiny"
    if check:
        r["exact"] = _check_exact(model, tokenizer, prefix, worker_ids, subtasks, query_ids, ranks, ids, branches,
                                  par_out, mapper, cfg, eos, pad, gen,
                                  recomputed_logits if recompute is not None else None)
    # let the workers that sent finish their bookkeeping on rank 0's store before rank 0 leaves
    t_end = time.monotonic() + 30
    while int(store.add(f"{NS}/done", 0)) < len(ranks) and time.monotonic() < t_end:
        time.sleep(0.05)
    return r


@torch.no_grad()
def _check_exact(model, tokenizer, prefix, worker_ids, subtasks, query_ids, ranks, ids, branches, par_out, mapper,
                 cfg, eos, pad, gen, recomputed_logits=None):
    """Recompute every received worker in this process on this process's prefix; compare with what came over
    the wire: the branch tokens, the query logits and the greedy answer of the synthesizer's cache (and, with
    ``recomputed_logits``, answer (c)'s logits over the local workers against the received branches)."""
    from ..synthesis.adapter import base_model
    from ..synthesis.synthesizer import synthesizer_cache
    from ..synthesis.workflow import cache_kwarg

    kw = cache_kwarg(model)
    local, same_ids = [], True
    with base_model(model):
        for s in ranks:
            w, b_ids, _ = generate_branch(model, prefix, worker_ids[worker_index(s, subtasks)],
                                          max_new_tokens=cfg.worker_tokens, eos=eos, pad=pad)
            same_ids &= torch.equal(b_ids, ids[s])
            local.append(w)
    a = model(query_ids, **{kw: synthesizer_cache(model, prefix, local, mapper)}).logits
    b = model(query_ids, **{kw: synthesizer_cache(model, prefix, branches, mapper)}).logits
    ref = model.generate(query_ids, **gen, **{kw: synthesizer_cache(model, prefix, local, mapper)})
    ref = ref[0, query_ids.shape[1]:].cpu()
    out = {"branch_tokens_equal": bool(same_ids), "logits_equal": bool(torch.equal(a, b)),
           "max_logit_diff": (a - b).abs().max().item(), "answer_equal": bool(torch.equal(ref, par_out))}
    if recomputed_logits is not None:
        out["recompute_logits_equal"] = bool(torch.equal(recomputed_logits(local), recomputed_logits(branches)))
    return out


# ---- reports -----------------------------------------------------------------------------------------------
def print_report(r: dict, worker_errors=()) -> None:
    import textwrap

    from ..synthesis.recompute import describe_recompute
    from .demo import print_answers

    print(f"pskernels demo, {r['world']} processes — {r['model']}, backend {r['backend']} on {r['device']}, "
          f"{r['threads']} threads on rank 0")
    print(f"Task: {r['task']}")
    print(f"rank 0: prefix {r['prefix_tokens']} tokens prefilled and broadcast; {r['world'] - 1} workers "
          f"(ranks 1..{r['world'] - 1}); branch cost {r['bytes_per_token']:,} B per token on the wire\n")
    for w in r["workers"]:
        print(f"[rank {w['rank']}] {w['subtask']}")
        print(textwrap.indent(textwrap.fill(w["answer"] or "(empty)", 100), "    "))
    if r["workers"]:
        print(f"\n{'rank':>4} {'tokens':>7} {'cache bytes':>13} {'transfer':>11} {'MB/s':>9} {'ids bytes':>10} "
              f"{'ids':>9} {'arrived':>8}")
        for w in r["workers"]:
            print(f"{w['rank']:>4} {w['branch_tokens']:>7} {w['bytes']:>13,} {w['transfer_ms']:>8.2f} ms "
                  f"{w['MB_per_s']:>9.1f} {w['ids_bytes']:>10,} {w['ids_ms']:>6.2f} ms {w['arrival_s']:>7.2f}s")
    for m in r["missing"]:
        print(f"missing: rank {m['rank']} ({m['why']}; rank 0 went on after {r['receive_s']:.1f} s)")
    for e in worker_errors:
        print(f"worker error: {e}")
    if not r["workers"]:
        print("no branch arrived: nothing to synthesize")
        return
    print(f"\n{'synthesis path':<44}{'after last arrival':>20}{'warm TTFT (median)':>20}")
    print(f"{'(a) text concatenation (token ids, re-prefill)':<44}{r['text_after_last_ids_ms']:>17.1f} ms"
          f"{r['text_concat_ttft_ms'] or float('nan'):>17.1f} ms")
    print(f"{'(b) Parallel-Synthesis (received KV caches)':<44}{r['parallel_after_last_branch_ms']:>17.1f} ms"
          f"{r['parallel_ttft_ms'] or float('nan'):>17.1f} ms")
    if "recompute_answer" in r:
        print(f"{'(c) the same, some branch tokens recomputed':<44}{'':>20}"
              f"{r['recompute_ttft_ms'] or float('nan'):>17.1f} ms")
    print_answers(r["text_answer"], r["parallel_answer"], f"(b) Parallel-Synthesis ({r['synthesizer']})")
    if "recompute_answer" in r:
        who = r["recompute_synthesizer"] + (f", {r['recompute_path']}" if r.get("recompute_path") else "")
        what = describe_recompute(r["recompute"], r["head_share"])
        print(f"\n(c) Parallel-Synthesis over the received caches with {what} recomputed in text order on rank 0 "
              f"(synthesizer: {who}):")
        print(textwrap.indent(textwrap.fill(r["recompute_answer"] or "(empty)", 100), "    "))
    ex = r.get("exact")
    if ex is not None:
        ok = ex["branch_tokens_equal"] and ex["logits_equal"] and ex["answer_equal"] and \
            ex.get("recompute_logits_equal", True)
        toks = "equal" if ex["branch_tokens_equal"] else "DIFFER"
        logits = "identical" if ex["logits_equal"] else f"differ by {ex['max_logit_diff']:.3e}"
        print(("exact: " if ok else "NOT exact: ") + "received branches vs the same workers recomputed in rank 0's "
              f"process (single-process synthesis): branch tokens {toks}, logits {logits}, greedy answer "
              f"{'identical' if ex['answer_equal'] else 'DIFFERS'}" + (
                  "" if "recompute_logits_equal" not in ex else
                  f"; (c) logits {'identical' if ex['recompute_logits_equal'] else 'DIFFER'}"))


# ---- process start-up ---------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawned(rank, world, port, cfg, results):
    import torch.distributed as dist

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=max(60.0, cfg.timeout + 60)))
        out = run_rank(rank, world, cfg)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: B036 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        os._exit(1)
    results.close()
    results.join_thread()
    os._exit(0)  # skip the teardown of gloo threads (a dead peer may make it slow)


def check_processes(processes: int) -> None:
    if processes < 2:
        raise ValueError(f"--processes: expected >= 2 (rank 0 synthesizes, ranks 1.. are workers), got {processes}")


def spawn_demo(cfg: DemoConfig, processes: int, limit: float | None = None):
    """Run the demo in ``processes`` local processes (gloo, 127.0.0.1). Returns ``(rank 0's report, worker
    errors)``; raises RuntimeError if rank 0 fails or gives no report within ``limit`` seconds (None: no limit:
    rank 0 bounds its own waits with ``cfg.timeout``)."""
    check_processes(processes)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_spawned, args=(r, processes, port, cfg, results), daemon=True)
             for r in range(processes)]
    for p in procs:
        p.start()
    report, errors, t_end = None, [], None if limit is None else time.monotonic() + limit
    try:
        while report is None:
            if t_end is not None and time.monotonic() > t_end:
                raise RuntimeError(f"rank 0 gave no report within {limit:g} s")
            try:
                rank, status, value = results.get(timeout=0.5)
            except queue.Empty:
                if not procs[0].is_alive() and results.empty():
                    raise RuntimeError(f"rank 0 exited (code {procs[0].exitcode}) without a report") from None
                continue
            if rank == 0:
                if status != "ok":
                    raise RuntimeError(f"rank 0 failed:\n{value}")
                report = value
            elif status != "ok":
                errors.append(f"rank {rank}: {value.strip().splitlines()[-1]}")
        for p in procs[1:]:
            p.join(5)
        while True:
            try:
                rank, status, value = results.get_nowait()
            except queue.Empty:
                break
            if status != "ok":
                errors.append(f"rank {rank}: {value.strip().splitlines()[-1]}")
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)
    return report, errors


def under_torchrun() -> bool:
    """True in a process started by torchrun (or any launcher that sets the env:// variables) for a world > 1."""
    env = os.environ
    return all(k in env for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")) and int(env["WORLD_SIZE"]) > 1


def gloo_interface_problem(env, resolve=socket.gethostbyname) -> str | None:
    """Why gloo ranks on other machines could not connect to this one, or None.

    Unless ``GLOO_SOCKET_IFNAME`` names an interface, gloo gives its peers the address this host's name resolves to;
    a name that resolves to a loopback address (the default ``/etc/hosts`` of many distributions, and of this VM)
    sends every other machine's connections back to itself. Measured in two network namespaces joined by a veth
    pair (``tools/two_hosts.sh``): node 1's ranks died in gloo's connect retries ("Connection refused" from
    127.0.0.1), node 0's waited on. A world on one machine (``LOCAL_WORLD_SIZE == WORLD_SIZE``) needs nothing."""
    try:
        world, local = int(env["WORLD_SIZE"]), int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"]))
    except (KeyError, ValueError):
        return None
    if local >= world or env.get("GLOO_SOCKET_IFNAME"):
        return None
    host = socket.gethostname()
    try:
        address = resolve(host)
    except OSError:
        address = "127.0.0.1"  # what torch falls back to
    if not ipaddress.ip_address(address).is_loopback:
        return None
    return (f"this job spans several machines (WORLD_SIZE {world}, LOCAL_WORLD_SIZE {local}) but this host's name "
            f"{host!r} resolves to {address}, a loopback address, which gloo would give the other machines to connect "
            "to: set GLOO_SOCKET_IFNAME to the network interface that reaches them (e.g. GLOO_SOCKET_IFNAME=eth0) "
            "or map the host name to that interface's address in /etc/hosts")


def torchrun_demo(cfg: DemoConfig):
    """This process's rank under torchrun: NCCL with one GPU per rank when CUDA is available, gloo otherwise."""
    import torch.distributed as dist

    cuda = torch.cuda.is_available()
    if not cuda:  # before the rendezvous: else the other machine's ranks fail and this one's wait
        problem = gloo_interface_problem(os.environ)
        if problem:
            raise SystemExit(f"pskernels demo, rank {os.environ.get('RANK')}: {problem}")
    device = None
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method="env://",
                            timeout=datetime.timedelta(seconds=max(60.0, cfg.timeout + 60)))
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return dist.get_rank(), run_rank(dist.get_rank(), dist.get_world_size(), cfg, device)
    finally:
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - a dead peer must not turn a finished demo into a failure
            pass


def config_from_args(args) -> DemoConfig:
    from .demo import demo_tokens

    return DemoConfig(model=args.model, worker_tokens=demo_tokens(args, "worker_tokens"),
                      answer_tokens=demo_tokens(args, "answer_tokens"),
                      recompute_synthesizer=bool(getattr(args, "recomputed_synthesis", False)),
                      head_share=getattr(args, "head_share", None),
                      timeout=args.timeout, repeats=args.repeats, mapper=getattr(args, "mapper", None),
                      untrained=bool(getattr(args, "untrained", False)))


def main(args) -> int:
    """``pskernels demo --processes N`` (spawn) or the current rank under torchrun."""
    import json

    from ..synthesis import checkpoints

    cfg = config_from_args(args)
    if cfg.mapper and cfg.untrained:
        raise ValueError("--mapper and --untrained: give one of them")
    trained_recompute = checkpoints.trained_recompute(cfg.mapper)
    if trained_recompute:
        raise ValueError(f"--mapper {cfg.mapper}: a synthesizer trained on recomputed branches (train --recompute "
                         f"{trained_recompute}); the multi-process demo's (b) reads the received branches as they "
                         "are: run it in `pskernels demo` (one process), or as (c) with --recompute-synthesizer")
    if cfg.head_share and not cfg.recompute_synthesizer:
        raise ValueError(f"--head-share {cfg.head_share:g}: nothing recomputes here; it applies to (c) "
                         "(--recompute-synthesizer)")
    if cfg.head_share is not None:
        from ..synthesis.recompute import check_head_share

        check_head_share(cfg.head_share)  # named before any process starts
    if under_torchrun():
        rank, r = torchrun_demo(cfg)
        if rank == 0:
            print(json.dumps(r, indent=2)) if args.json else print_report(r)
        return 0
    check_processes(args.processes)
    cfg.threads = max(1, (os.cpu_count() or 1) // args.processes)
    r, errors = spawn_demo(cfg, args.processes)
    if args.json:
        print(json.dumps(dict(r, worker_errors=errors), indent=2))
    else:
        print_report(r, errors)
    return 0


if __name__ == "__main__":  # torchrun --nproc-per-node N -m pskernels.apps.demo_distributed [demo flags]
    import importlib

    # the `pskernels demo` parser (cli imports this module: by name, not as an import cycle)
    sys.exit(importlib.import_module("pskernels.apps.cli").run(["demo", *sys.argv[1:]]))
