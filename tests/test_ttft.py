"""Smoke test of the TTFT benchmark (tiny random Llama, tiny sizes; no timing asserts: shared machine)."""
import math

import pytest

from pskernels.apps.ttft import ttft_benchmark
from pskernels.synthesis.models import tiny_llama


@pytest.mark.hf
def test_ttft_benchmark_reports_all_paths_and_restores_the_model():
    model = tiny_llama(hidden=64, layers=2)
    impl = model.config._attn_implementation
    r = ttft_benchmark(model, branches=2, branch_len=8, prefix_len=4, query_len=3, repeats=2, warmup=1)
    for key in ("text_concat_ms", "parallel_ms", "floor_ms", "speedup", "parallel_over_floor", "config",
                "threads", "torch", "transformers", "dtype", "samples_ms", "backend"):
        assert key in r, key
    for key in ("text_concat_ms", "parallel_ms", "floor_ms"):
        assert r[key] > 0
    assert math.isfinite(r["speedup"]) and r["speedup"] > 0
    assert math.isfinite(r["parallel_over_floor"]) and r["parallel_over_floor"] > 0
    assert r["config"]["context_tokens"] == 4 + 2 * 8
    assert r["config"]["text_prefill_tokens"] == 2 * 8 + 3
    assert all(len(v) == 2 for v in r["samples_ms"].values())
    assert "recompute_ms" not in r and "recompute" not in r["samples_ms"]
    assert r["dtype"] == "float32"
    # the patch is removed afterwards
    assert model.config._attn_implementation == impl
    assert getattr(model, "_pskernels_patch", None) is None


@pytest.mark.hf
def test_ttft_benchmark_times_the_recompute_path_when_asked():
    model = tiny_llama(hidden=64, layers=2)
    r = ttft_benchmark(model, branches=2, branch_len=8, prefix_len=4, query_len=3, repeats=2, warmup=1,
                       recompute_head=3)
    assert r["recompute_head"] == 3 and r["recompute_ms"] > 0 and len(r["samples_ms"]["recompute"]) == 2
    assert math.isfinite(r["recompute_speedup"]) and r["recompute_speedup"] > 0
    r = ttft_benchmark(model, branches=2, branch_len=8, prefix_len=4, query_len=3, repeats=1, warmup=0,
                       recompute_head=3, recompute_together=True)
    assert r["recompute_together"] and r["recompute_ms"] > 0
    with pytest.raises(ValueError, match="recompute_head: expected >= 0, got -1"):
        ttft_benchmark(model, branches=2, branch_len=8, prefix_len=4, query_len=3, recompute_head=-1)


def test_ttft_benchmark_rejects_empty_sizes():
    model = tiny_llama(hidden=64, layers=2)
    with pytest.raises(ValueError, match=">= 1"):
        ttft_benchmark(model, branches=0, branch_len=8, prefix_len=4, query_len=3)


@pytest.mark.hf
def test_sweep_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from pskernels.apps.ttft import sweep_plot

    model = tiny_llama(hidden=64, layers=2)
    path = tmp_path / "ttft.png"
    results = sweep_plot(model, (1, 2), (4,), prefix_len=4, query_len=2, repeats=1, path=str(path))
    assert [r["config"]["branches"] for r in results] == [1, 2]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
