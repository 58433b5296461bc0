"""Smoke tests of the command line and the demo (small sizes)."""
import subprocess
import sys

import pytest

from pskernels.cli import info
from pskernels.demo import run_demo


def test_info_lists_versions_and_backends():
    d = info()
    assert "torch" in d["available_backends"]
    assert d["torch"] and d["transformers"]


@pytest.mark.hf
def test_demo_is_exact_and_reports_timings():
    r = run_demo(branches=2, branch_len=24, prefix_len=8, query_len=4, new_tokens=3, repeats=1)
    assert r["max_logit_error_vs_oracle"] < 1e-4
    assert r["text_concat_ttft_ms"] > 0 and r["parallel_ttft_ms"] > 0
    assert len(r["greedy_tokens"]) == 3


def test_cli_info_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "pskernels.cli", "info"], capture_output=True, text=True, check=True)
    assert "available_backends" in out.stdout
