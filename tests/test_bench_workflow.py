"""``pskernels bench workflow`` on the tiny random Llama: report structure, token agreement between the paths,
measured KV bytes against the caches' exact sizes, ``--json`` / ``--plot`` and the CLI wiring (no timing asserts)."""
import json

import pytest
import torch
from transformers import DynamicCache

from pskernels.apps.bench_workflow import (
    PATHS,
    PHASES,
    kv_storage_bytes,
    make_inputs,
    plot_phases,
    run_path,
    summarize,
    worker_prompt_lengths,
    workflow_benchmark,
)
from pskernels.apps.cli import main as cli_main
from pskernels.hf import ParallelCache
from pskernels.synthesis.models import load_model

pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("one_thread_module")]

SIZES = dict(prefix=24, workers=3, tokens=4, worker_prompt=6, prompt=5, answer=3)


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")[0]


@pytest.fixture(scope="module")
def report(tiny):
    return workflow_benchmark(tiny, **SIZES, repeats=2)


def _bytes_per_token(model) -> int:
    """K + V bytes of one token in every layer (fp32)."""
    cfg = model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 4


def test_report_has_every_phase_of_both_paths(report):
    c = report["config"]
    assert c["worker_prompt_lengths"] == [6, 5, 3] == worker_prompt_lengths(3, 6)
    assert (c["prefix"], c["workers"], c["tokens"], c["prompt"], c["answer"], c["repeats"]) == (24, 3, 4, 5, 3, 2)
    for path in PATHS:
        t = report["times_s"][path]
        assert len(t["rounds"]) == 2
        for how in ("best", "median"):
            assert all(t[how][k] > 0 for k in PHASES)
            assert t[how]["total"] > 0
        for rnd in t["rounds"]:
            assert rnd["total"] == pytest.approx(sum(rnd[k] for k in PHASES), abs=1e-3)
        assert len(report["answer_tokens"][path]) == SIZES["answer"]
    for how in ("best", "median"):
        assert set(report["ratios"][how]) == {*PHASES, "total"}
        assert all(v > 0 for v in report["ratios"][how].values())
    assert report["backend"] and report["dtype"] == "float32"


def test_worker_tokens_agree_between_the_paths(report):
    assert report["worker_tokens_identical"] is True
    assert report["worker_token_mismatch"] == {"rows": 0, "first_step": None}


def test_summary_reports_a_worker_token_mismatch(tiny):
    inp = make_inputs(tiny, **SIZES)
    runs = {name: [run_path(name, tiny, inp)] for name in PATHS}
    runs["pskernels"][0].worker_tokens[1, 2] += 1
    r = summarize(tiny, inp, runs)
    assert r["worker_tokens_identical"] is False
    assert r["worker_token_mismatch"] == {"rows": 1, "first_step": 2}


def test_cascade_baseline_is_a_third_alternating_path(tiny):
    """--cascade-baseline: the pskernels path again with the CPU cascade off; same tokens, its own times, the
    without/with ratios; the environment switch is restored afterwards."""
    import os

    from pskernels.apps.bench_workflow import NO_CASCADE, round_order

    before = os.environ.get("PSKERNELS_CPU_CASCADE")
    r = workflow_benchmark(tiny, **SIZES, repeats=2, warmup=False, cascade_baseline=True)
    assert os.environ.get("PSKERNELS_CPU_CASCADE") == before
    assert set(r["times_s"]) == {*PATHS, NO_CASCADE} and r["worker_tokens_identical"] is True
    assert r["answer_tokens"][NO_CASCADE] == r["answer_tokens"]["pskernels"]
    assert r["kv_bytes"][NO_CASCADE] == r["kv_bytes"]["pskernels"]
    for how in ("best", "median"):
        ratios = r["cascade_ratios"][how]
        assert set(ratios) == {*PHASES, "total"} and all(v > 0 for v in ratios.values())
    assert round_order(1, (*PATHS, NO_CASCADE)) == (NO_CASCADE, "pskernels", "stock")
    assert "cascade_ratios" not in workflow_benchmark(tiny, **SIZES, repeats=1, warmup=False)


def test_kv_bytes_are_prefix_once_for_pskernels_and_per_row_for_stock(report, tiny):
    """Measured storages against the exact sizes: pskernels' workers hold the prefix once + N padded rows of own
    tokens; stock's hold N rows of prefix + own tokens; each synthesizer adds what it prefills and decodes."""
    b = _bytes_per_token(tiny)
    P, N, T, Q, A = (SIZES[k] for k in ("prefix", "workers", "tokens", "prompt", "answer"))
    L = max(report["config"]["worker_prompt_lengths"])
    branch = N * (L + T - 1)  # own slots of the N worker rows (left padding included)
    kv = report["kv_bytes"]
    assert all(v > 0 for path in PATHS for v in kv[path].values())
    assert kv["pskernels"]["workers"] == b * (P + branch)
    assert kv["stock"]["workers"] == b * (N * P + branch)
    assert kv["pskernels"]["handover"] == kv["pskernels"]["workers"]  # the synthesizer reads the rows in place
    assert kv["stock"]["handover"] == kv["stock"]["workers"] + b * P  # + its copy of the prefix from row 0
    assert kv["pskernels"]["synthesis"] == b * (P + branch + Q + A - 1)
    assert kv["stock"]["synthesis"] == b * (P + report["config"]["text_prefill_tokens"] + A - 1)
    for path in PATHS:
        assert kv[path]["peak"] == max(kv[path][k] for k in ("workers", "handover", "synthesis"))
    assert report["kv_peak_ratio"] == pytest.approx(kv["stock"]["peak"] / kv["pskernels"]["peak"], rel=1e-3)


def test_kv_storage_bytes_counts_shared_storage_once_and_views_whole():
    k = torch.zeros(1, 2, 10, 4)
    prefix = DynamicCache()
    prefix.update(k, k.clone(), 0)
    whole = 2 * k.numel() * 4
    assert kv_storage_bytes(prefix) == whole
    assert kv_storage_bytes(prefix, ParallelCache(prefix, []), ParallelCache(prefix, [])) == whole
    view = DynamicCache()
    view.layers = [type(prefix.layers[0])()]
    view.layers[0].keys, view.layers[0].values = prefix.layers[0].keys[:, :, :3], prefix.layers[0].values[:, :, :3]
    assert kv_storage_bytes(view) == whole


def test_bad_sizes_name_the_argument(tiny):
    with pytest.raises(ValueError, match="workers: expected >= 1, got 0"):
        make_inputs(tiny, **dict(SIZES, workers=0))
    with pytest.raises(ValueError, match="repeats: expected >= 1, got 0"):
        workflow_benchmark(tiny, **SIZES, repeats=0)


def test_cli_bench_workflow_prints_and_writes_json(tmp_path, capsys):
    out = tmp_path / "wf.json"
    argv = ["bench", "workflow", "--model", "tiny", "--prefix", "16", "--workers", "2", "--tokens", "3",
            "--worker-prompt", "4", "--prompt", "4", "--answer", "2", "--repeats", "1", "--threads", "1",
            "--json", str(out)]
    assert cli_main(argv) == 0
    text = capsys.readouterr().out
    assert "worker tokens identical between the paths: yes" in text
    assert "synthesis TTFT" in text and "peak (max of the above)" in text
    r = json.loads(out.read_text())
    assert r["config"]["workers"] == 2 and r["config"]["tokens"] == 3 and r["config"]["prefix"] == 16
    assert r["threads"] == 1 and r["load_s"] >= 0
    assert set(r["times_s"]) == set(PATHS) and r["worker_tokens_identical"] is True


def test_plot_writes_stacked_bars(report, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "wf.png"
    plot_phases(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
