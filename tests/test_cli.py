"""Smoke tests of the command line and the demo (small sizes)."""
import argparse
import subprocess
import sys

import pytest
import torch

from pskernels.apps.cli import info
from pskernels.apps.demo import REPETITION_PENALTY, answer_generation, run_demo


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


@torch.no_grad()
def test_answer_repetition_penalty_reads_the_answer_not_the_prompt():
    """Answers (a) and (b) decode by one rule although (a)'s input holds the workers' text and (b)'s does not:
    the penalty applies to the answer's own tokens, never to the prompt's."""
    from pskernels.synthesis.models import load_model

    model, _ = load_model("tiny")
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    first = int(model(ids).logits[0, -1].argmax())
    prompt = torch.cat([torch.full((1, 6), first), ids], dim=1)  # the prompt holds the unpenalized first choice
    n = 10
    out = model.generate(prompt, **answer_generation(prompt, n, eos=None, pad=0), min_new_tokens=n)
    answer = out[0, prompt.shape[1]:].tolist()
    greedy, seq = [], prompt
    for _ in range(n):
        scores = model(seq).logits[0, -1]
        if greedy:
            own = torch.tensor(greedy)
            s = scores[own]
            scores[own] = torch.where(s < 0, s * REPETITION_PENALTY, s / REPETITION_PENALTY)
        greedy.append(int(scores.argmax()))
        seq = torch.cat([seq, torch.tensor([[greedy[-1]]])], dim=1)
    assert answer == greedy
    assert model(prompt).logits[0, -1].argmax() == answer[0]
    stock = model.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0, repetition_penalty=1e4)
    assert int(stock[0, -1]) != answer[0]  # transformers' own penalty would have steered away from the prompt


def test_cli_info_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "pskernels.apps.cli", "info"], capture_output=True, text=True,
                         check=True)
    assert "available_backends" in out.stdout


def test_output_into_a_closed_pipe_ends_quietly():
    """``pskernels ... | head`` stops reading early: the command ends with the SIGPIPE status, no traceback."""
    p = subprocess.Popen([sys.executable, "-m", "pskernels.apps.cli", "info"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()  # the reader is gone before the command writes
    err = p.stderr.read().decode()
    assert p.wait() == 141 and "Traceback" not in err, err


@pytest.mark.hf
def test_demo_mapper_argument_errors(tmp_path):
    """--mapper: a folder that is neither a mapper nor a training checkpoint, a mapper of another model, and the
    tiny (oracle-checked) demo each give a clear error naming --mapper."""
    import argparse

    from pskernels.apps.demo import load_synthesizer, main
    from pskernels.synthesis import CacheMapper, CacheMapperConfig

    from tiny_models import make_model

    model = make_model("llama")
    with pytest.raises(FileNotFoundError, match="--mapper"):
        load_synthesizer(model, str(tmp_path / "nothing"))
    CacheMapper(CacheMapperConfig(num_layers=5, num_kv_heads=2, num_heads=4, head_dim=16)).save_pretrained(
        tmp_path / "other")
    with pytest.raises(ValueError, match=r"--mapper .*num_layers = 5, but the model has 3"):
        load_synthesizer(model, str(tmp_path / "other"))
    CacheMapper.for_model(model).save_pretrained(tmp_path / "ok")
    same, mapper = load_synthesizer(model, str(tmp_path / "ok"))
    assert same is model and mapper.is_identity()
    args = argparse.Namespace(model="tiny", mapper=str(tmp_path / "ok"), branches=2, branch_len=8, prefix_len=4,
                              query_len=2, repeats=1, json=True)
    with pytest.raises(ValueError, match="--mapper"):
        main(args)


def test_demo_token_counts_are_checked_and_not_given_to_the_tiny_demo():
    """--worker-tokens / --answer-tokens drive the real demo; the single-process tiny demo (random branches of
    --branch-len tokens) refuses them instead of ignoring them, and a count below 1 is named."""
    from pskernels.apps.cli import main as cli
    from pskernels.apps.demo import demo_tokens

    for flag in ("--worker-tokens", "--answer-tokens"):
        with pytest.raises(ValueError, match=f"{flag}: the tiny demo's branches are random tokens"):
            cli(["demo", "--model", "tiny", flag, "8"])
    with pytest.raises(ValueError, match="--worker-tokens: expected at least 1 token, got 0"):
        demo_tokens(argparse.Namespace(worker_tokens=0), "worker_tokens")
    assert demo_tokens(argparse.Namespace(worker_tokens=None), "worker_tokens") == 64
    assert demo_tokens(argparse.Namespace(), "answer_tokens") == 80


def test_demo_head_share_needs_something_recomputed():
    """--head-share is refused, before any model loads, where nothing recomputes or the share is out of [0, 1]."""
    from pskernels.apps.cli import main as cli

    with pytest.raises(ValueError, match="--head-share 0.4: nothing recomputes here"):
        cli(["demo", "--untrained", "--head-share", "0.4"])
    with pytest.raises(ValueError, match=r"head_share: expected a number in \[0, 1\], got 1.5"):
        cli(["demo", "--recompute-synthesizer", "--head-share", "1.5"])
    with pytest.raises(ValueError, match="--head-share: the tiny demo has no workers' instructions"):
        cli(["demo", "--model", "tiny", "--head-share", "0.4"])
    with pytest.raises(ValueError, match=r"--head-share 0.4: nothing recomputes here; it applies to \(c\)"):
        cli(["demo", "--processes", "2", "--head-share", "0.4"])  # refused before any process starts
    with pytest.raises(ValueError, match=r"head_share: expected a number in \[0, 1\], got -1"):
        cli(["demo", "--processes", "2", "--recompute-synthesizer", "--head-share", "-1"])


def test_demo_recomputed_synthesis_needs_workers_instructions():
    from pskernels.apps.demo import main

    args = argparse.Namespace(model="tiny", mapper=None, branches=2, branch_len=8, prefix_len=4, query_len=2,
                              repeats=1, json=True, recomputed_synthesis=True)
    with pytest.raises(ValueError, match="--recompute-synthesizer: the tiny demo has no workers' instructions"):
        main(args)


@pytest.mark.parametrize("argv, flag, message", [
    (["demo", "--model", "tiny", "--repeats", "0"], "--repeats", "expected an int >= 1, got 0"),
    (["demo", "--model", "tiny", "--branch-len", "0"], "--branch-len", "expected an int >= 1, got 0"),
    (["demo", "--processes", "3", "--timeout", "0"], "--timeout", "expected seconds > 0, got 0"),
    (["demo", "--timeout", "nan"], "--timeout", "expected seconds > 0, got nan"),
    (["bench", "ttft", "--query-len", "-1"], "--query-len", "expected an int >= 1, got -1"),
    (["bench", "ttft", "--recompute", "-2"], "--recompute", "expected an int >= 0, got -2"),
    (["eval", "--model", "tiny", "--n-examples", "-3"], "--n-examples", "expected an int >= 1, got -3"),
    (["eval", "--model", "tiny", "--make-suite", "x.jsonl", "--per-family", "0"], "--per-family",
     "expected an int >= 1, got 0"),
    (["eval", "--model", "tiny", "--target-tokens", "0"], "--target-tokens", "expected an int >= 1, got 0"),
    (["eval", "--model", "tiny", "--gen-tokens", "two"], "--gen-tokens", "expected an int >= 1, got 'two'"),
    (["train", "--model", "tiny", "--steps", "-1", "--out", "x"], "--steps", "expected an int >= 1, got -1"),
    (["train", "--model", "tiny", "--grad-accum", "0", "--out", "x"], "--grad-accum", "expected an int >= 1, got 0"),
    (["train", "--model", "tiny", "--lora-r", "0", "--out", "x"], "--lora-r", "expected an int >= 1, got 0"),
    (["train", "--model", "tiny", "--eval-every", "-1", "--out", "x"], "--eval-every", "expected an int >= 0, got -1"),
])
def test_bad_counts_are_named_by_the_parser_before_anything_runs(argv, flag, message, capsys):
    """Counts and durations that used to crash deep inside (a median of no runs, an empty branch through the model,
    a timeout of 0 failing rank 0) or to run silently on nothing (no examples, no steps) stop at the parser."""
    from pskernels.apps.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_the_command_reports_a_bad_flag_combination_without_a_traceback():
    """`pskernels ...` (the console script is cli.run) prints a flag error as argparse does, exit status 2; main()
    itself still raises, for callers and tests."""
    from pathlib import Path

    from pskernels.apps.cli import main, run

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '\npskernels = "pskernels.apps.cli:run"\n' in pyproject  # [project.scripts]
    argv = ["demo", "--model", "tiny", "--mapper", "x"]
    with pytest.raises(ValueError, match="--mapper: the tiny demo checks exactness"):
        main(argv)
    r = subprocess.run([sys.executable, "-m", "pskernels.apps.cli", *argv], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "pskernels: error: --mapper: the tiny demo checks exactness" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert run(["demo", "--model", "tiny", "--processes", "0"]) == 2  # a ValueError naming --processes
