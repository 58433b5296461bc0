"""Workflow data built by the model (pskernels.synthesis.workflows), per-family evaluation and the APE calibration,
on the tiny model."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from pskernels.synthesis import distill
from pskernels.synthesis import evaluate as evaluation
from pskernels.synthesis.calibration import DEFAULT_GRID, ape_grid, calibrate_ape
from pskernels.synthesis.data import TokenizedExample, encode, load_jsonl, save_jsonl, validate_example
from pskernels.synthesis.distill import (
    TargetCache,
    branch_caches,
    eos_ids,
    patched,
    stored_teacher_ids,
    teacher_logits,
    teacher_pass,
    tokenize_examples,
)
from pskernels.synthesis.families import FAMILIES, HELD_OUT_FAMILIES, TRAIN_FAMILIES, draw_workflows
from pskernels.synthesis.models import load_model
from pskernels.synthesis.workflows import (
    PLAIN,
    OwnTokensRepetitionPenalty,
    build_workflows,
    recompute_counts,
    role_format,
    split_of,
    worker_turn_tokens,
)

WORKER_TOKENS = 3


# two shared cores: one intra-op thread avoids OpenMP oversubscription stalls (20x on a busy machine)
pytestmark = pytest.mark.usefixtures("one_thread_module")


@pytest.fixture(scope="module")
def tiny():
    return load_model("tiny")


@pytest.fixture(scope="module")
def suite(tiny):
    model, tok = tiny
    return build_workflows(model, tok, None, 1, seed=5, worker_tokens=WORKER_TOKENS, n_workers=(2, 3))


# ---- roles ------------------------------------------------------------------------------------------
class ChatMLTokenizer:
    chat_template = "chatml"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class OddTemplateTokenizer(ChatMLTokenizer):
    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        out = super().apply_chat_template(messages, tokenize, add_generation_prompt)
        return out if len(messages) > 1 else "[alone]" + out


def test_role_format_cut_from_a_chat_template():
    f = role_format(ChatMLTokenizer())
    assert f.chat
    assert f.prefix("SYS", "TASK") == "<|im_start|>system\nSYS\n\nTASK<|im_end|>\n"
    assert f.worker_turn("do X") == "<|im_start|>user\ndo X<|im_end|>\n<|im_start|>assistant\n"
    assert f.assistant_close == "<|im_end|>\n"
    assert f.prompt("combine") == "<|im_start|>user\ncombine<|im_end|>\n<|im_start|>assistant\n"
    assert role_format(ChatMLTokenizer(), chat=False) is PLAIN
    with pytest.raises(ValueError, match="chat template"):
        role_format(OddTemplateTokenizer())
    with pytest.raises(ValueError, match="no chat template"):
        role_format(object(), chat=True)


# ---- building with the model ------------------------------------------------------------------------
def test_built_examples_are_valid_and_round_trip(suite, tmp_path):
    assert [ex["kind"] for ex in suite] == [f"workflow:{f}" for f in FAMILIES]
    assert len({ex["id"] for ex in suite}) == len(suite)
    for ex in suite:
        validate_example(ex)
        fam = FAMILIES[ex["kind"].split(":")[1]]
        assert ex["split"] == fam.split == split_of(ex) == split_of({**ex, "split": None})
        assert "target" not in ex
        m = ex["meta"]
        assert 2 <= len(ex["branches"]) == len(m["subtasks"]) <= 3
        assert ex["prefix"] == PLAIN.prefix(m["system"], m["task"])
        assert ex["prompt"] == PLAIN.prompt(m["synthesis"])
        for b, sub in zip(ex["branches"], m["subtasks"]):
            assert b.startswith(PLAIN.worker_turn(sub)) and b.endswith(PLAIN.assistant_close)
        assert all(0 <= n <= WORKER_TOKENS for n in m["worker_answer_tokens"])
    save_jsonl(suite, tmp_path / "suite.jsonl")
    assert load_jsonl(tmp_path / "suite.jsonl") == suite
    with pytest.raises(ValueError, match="split"):
        validate_example({**suite[0], "split": "test"})


def test_building_is_deterministic(tiny, suite):
    model, tok = tiny
    again = build_workflows(model, tok, ["rank", "code_review"], 1, seed=5, worker_tokens=WORKER_TOKENS,
                            n_workers=(2, 3))
    assert again == [ex for ex in suite if ex["kind"] in ("workflow:rank", "workflow:code_review")]


@pytest.mark.parametrize("penalty", [None, 1.3])
def test_branches_are_the_models_own_greedy_continuation(tiny, penalty):
    """Each worker's text = a direct greedy ``generate`` of ``prefix + its turn`` (no ParallelCache, no batch)."""
    model, tok = tiny
    n = 6
    (ex,) = build_workflows(model, tok, ["vote"], 1, seed=2, worker_tokens=n, n_workers=(3, 3),
                            repetition_penalty=penalty)
    prefix = encode(tok, ex["prefix"])
    for b, sub in zip(ex["branches"], ex["meta"]["subtasks"]):
        turn = PLAIN.worker_turn(sub)
        ids = torch.tensor([prefix + encode(tok, turn)])
        kw = {} if penalty is None else {"logits_processor": [OwnTokensRepetitionPenalty(penalty, [len(prefix)])]}
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)[0, ids.shape[1]:]
        assert b == turn + tok.decode(out.tolist()) + PLAIN.assistant_close


# ---- per-family evaluation --------------------------------------------------------------------------
@pytest.mark.parametrize("answer, text, found", [
    ("2", "The phone is sold out in 12 shops", False),  # a substring test counted this one right
    ("2", "sold out in 2 shops.", True), ("2", "2.5 km", False), ("2", "1.2 km", False), ("2", "at 2:30", False),
    ("10", "100 people", False), ("1978", "(in 1978),", True), ("20:30", "opens at 20:30.", True),
    ("18:30", "118:30", False), ("reject", "Reject.", True), ("reject", "the committee rejected it", True),
    ("accept", "that is unacceptable", False), ("in favour", "voted In Favour", True), ("Alice", "Malice", False),
    ("names.py", "the file `names.py` needs", True), ("Ines", "Agnes", False), ("", "anything", False),
])
def test_answer_found_matches_whole_numbers_and_word_starts(answer, text, found):
    assert evaluation.answer_found(answer, text) is found


def _row(kind, split, kl, agree, tokens, exact, answered, correct):
    s = {"kl": kl, "agree": agree, "tokens": tokens, "exact": exact, "answered": answered, "correct": correct}
    return {"id": kind, "kind": kind, "split": split, "scores": {"parallel": s}}


def test_per_family_aggregation_math():
    rows = [_row("workflow:sum", "train", 1.0, 3, 4, 1, 1, 1),
            _row("workflow:sum", "train", 3.0, 2, 6, 0, 1, 0),
            _row("workflow:plan", "train", 0.5, 5, 5, 1, 0, 0),
            _row("workflow:conflict", "held_out", 2.0, 1, 5, 0, 1, 1)]
    bf = evaluation.by_family({"parallel": {}, "examples": rows})
    s = bf["families"]["workflow:sum"]["parallel"]
    assert s["kl"] == pytest.approx(4.0 / 10) and s["top1"] == pytest.approx(5 / 10)
    assert (s["exact"], s["accuracy"], s["tokens"], s["n"]) == (0.5, 0.5, 10, 2)
    assert bf["families"]["workflow:plan"]["parallel"]["accuracy"] is None
    tr = bf["splits"]["train"]["parallel"]
    assert tr["kl"] == pytest.approx(4.5 / 15) and tr["top1"] == pytest.approx(10 / 15)
    assert tr["exact"] == pytest.approx(2 / 3) and tr["accuracy"] == pytest.approx(1 / 2)
    ho = bf["splits"]["held_out"]["parallel"]
    assert (ho["kl"], ho["top1"], ho["exact"], ho["accuracy"], ho["n"]) == (0.4, 0.2, 0.0, 1.0, 1)
    al = bf["all"]["parallel"]
    assert al["kl"] == pytest.approx(6.5 / 20) and al["top1"] == pytest.approx(11 / 20)
    assert al["exact"] == 0.5 and al["accuracy"] == pytest.approx(2 / 3) and al["n"] == 4
    assert list(bf["splits"]) == ["train", "held_out"]
    assert evaluation.aggregate([], ["parallel"])["parallel"]["n"] == 0


def test_family_table_labels_each_family_with_the_split_its_rows_are_grouped_in():
    from pskernels.apps.eval_tables import format_family_table

    rows = [_row("exposure", None, 1.0, 3, 4, 1, 0, 0), _row("workflow:sum", "train", 1.0, 3, 4, 1, 1, 0),
            _row("distill:workflow:conflict", "held_out", 1.0, 3, 4, 1, 1, 1)]
    table = format_family_table(evaluation.by_family({"parallel": {}, "examples": rows}), ["parallel"])
    assert [line.split()[:2] for line in table.splitlines()[2:5]] == [
        ["sum", "train"], ["distill:workflow:conflict", "held_out"], ["exposure", "-"]]


def test_evaluate_rows_carry_the_family_and_sum_to_the_overall(tiny, suite):
    model, tok = tiny
    exs = [suite[0], suite[1], suite[-1]]  # two training families, one held-out family
    r = evaluation.evaluate(model, tok, exs, trained=False, settings=("text_concat", "parallel", "ape"),
                            gen_tokens=1, target_tokens=2)
    assert [row["kind"] for row in r["examples"]] == [ex["kind"] for ex in exs]
    assert [row["split"] for row in r["examples"]] == ["train", "train", "held_out"]
    bf = evaluation.by_family(r)
    for s in ("text_concat", "parallel", "ape"):
        assert bf["all"][s] == r[s]
    assert set(bf["splits"]) == {"train", "held_out"} and bf["splits"]["held_out"]["parallel"]["n"] == 1
    assert bf["families"][exs[-1]["kind"]]["parallel"]["kl"] > 0


def test_packaged_suite_is_the_documented_draw_of_every_family():
    from pskernels.synthesis.checkpoints import DEFAULT_SUITE

    suite = load_jsonl(DEFAULT_SUITE)
    for ex in suite:
        validate_example(ex)
    # docs/FIDELITY.md: 3 per training family and 6 per held-out family, seed 1000, SmolLM2 playing the workers
    want = {s.id: s for s in draw_workflows("train", 3, seed=1000) + draw_workflows("held_out", 6, seed=1000)}
    assert sorted(ex["id"] for ex in suite) == sorted(want)
    for ex in suite:
        spec = want[ex["id"]]
        assert ex["kind"] == f"workflow:{spec.family}" and ex["split"] == spec.split == split_of(ex)
        assert ex["meta"]["task"] == spec.task.task and ex["meta"]["subtasks"] == spec.task.subtasks
        assert ex.get("answer") == spec.task.answer and ex["meta"]["system"] == spec.system
        assert len(ex["branches"]) == len(spec.task.subtasks) and "<|im_start|>assistant" in ex["prompt"]
    assert {f for f in HELD_OUT_FAMILIES} == {ex["meta"]["family"] for ex in suite if ex["split"] == "held_out"}


def test_packaged_long_suite_is_the_documented_draw_with_long_worker_outputs():
    from pskernels.synthesis.checkpoints import LONG_SUITE

    suite = load_jsonl(LONG_SUITE)
    for ex in suite:
        validate_example(ex)
    # docs/FIDELITY-LOG.md "Long worker outputs": seed 7100, 3 per held-out family, 2 per family the shipped
    # synthesizers trained on, 192 generated tokens per worker
    trained_on = "sum,rank,retrieve,vote,merge_lists,summary,plan,freeform,attribution,timeline"
    want = {s.id: s for s in draw_workflows("held_out", 3, seed=7100) + draw_workflows(trained_on, 2, seed=7100)}
    assert [ex["id"] for ex in suite] == list(want)
    for ex in suite:
        spec = want[ex["id"]]
        assert ex["split"] == spec.split and ex["meta"]["subtasks"] == spec.task.subtasks
        assert ex["meta"]["worker_tokens"] == 192 and len(ex["branches"]) == len(spec.task.subtasks)
    assert sum(ex["split"] == "held_out" for ex in suite) == 12 and len(suite) == 32


def test_packaged_held_out_suite_is_the_documented_draw_of_the_held_out_families():
    from pskernels.synthesis.checkpoints import HELD_OUT_SUITE

    suite = load_jsonl(HELD_OUT_SUITE)
    for ex in suite:
        validate_example(ex)
    # docs/FIDELITY-LOG.md "A larger held-out sample": seed 9000, 12 per held-out family, 48 generated tokens per worker
    want = {s.id: s for s in draw_workflows("held_out", 12, seed=9000)}
    assert [ex["id"] for ex in suite] == list(want)
    for ex in suite:
        spec = want[ex["id"]]
        assert ex["split"] == spec.split == "held_out" and ex["meta"]["subtasks"] == spec.task.subtasks
        assert ex["meta"]["worker_tokens"] == 48 and len(ex["branches"]) == len(spec.task.subtasks)
    assert {ex["meta"]["family"] for ex in suite} == set(HELD_OUT_FAMILIES) and len(suite) == 48


# ---- APE calibration --------------------------------------------------------------------------------
def test_calibrate_ape_picks_the_grid_point_with_the_lowest_kl(tiny, suite):
    model, tok = tiny
    exs = suite[:2]
    grid = [(1.0, 1.0), (0.8, 0.9), (0.5, 0.6)]
    mapper, rep = calibrate_ape(model, tok, exs, grid=grid, target_tokens=3)
    assert [(g["temperature"], g["lse_scale"]) for g in rep["grid"]] == grid
    kls = []
    for t, s in grid:  # the same KL as the evaluation's APE setting at that point
        ape = evaluation.ape_mapper(model, init_temperature=t, init_lse_scale=s)
        kls.append(evaluation.evaluate(model, tok, exs, trained=False, settings=("text_concat", "ape"), ape=ape,
                                       gen_tokens=1, target_tokens=3)["ape"]["kl"])
    assert [g["kl"] for g in rep["grid"]] == pytest.approx(kls, rel=1e-4, abs=1e-7)
    best = min(range(len(grid)), key=kls.__getitem__)
    assert (rep["temperature"], rep["lse_scale"]) == grid[best]
    assert rep["kl"] == min(g["kl"] for g in rep["grid"]) and rep["examples"] == 2
    assert torch.allclose(mapper.log_temperature.exp(), torch.tensor(grid[best][0]))
    assert torch.allclose(mapper.log_lse_scale.exp(), torch.tensor(grid[best][1]))
    assert math.isclose(float(mapper.log_weight.detach().abs().max()), 0.0)


def test_calibrate_ape_refuses_an_empty_grid_or_no_examples(tiny, suite):
    model, tok = tiny
    with pytest.raises(ValueError, match="grid: expected at least one"):
        calibrate_ape(model, tok, suite[:1], grid=[])
    with pytest.raises(ValueError, match="grid: temperature and lse_scale must be > 0"):
        calibrate_ape(model, tok, suite[:1], grid=[(0.0, 1.0)])
    with pytest.raises(ValueError, match="examples: expected at least one"):
        calibrate_ape(model, tok, [], grid=DEFAULT_GRID)
    assert len(DEFAULT_GRID) == 16 and (1.0, 1.0) in DEFAULT_GRID
    assert ape_grid([0.9], [0.8, 1.0]) == [(0.9, 0.8), (0.9, 1.0)]


def test_calibrate_ape_without_examples_builds_training_family_workflows(tiny):
    model, tok = tiny
    grid = [(1.0, 1.0), (0.8, 0.9)]
    _, rep = calibrate_ape(model, tok, grid=grid, target_tokens=2, max_examples=3, seed=4, worker_tokens=2)
    built = build_workflows(model, tok, "train", 1, seed=4, worker_tokens=2)[:3]
    assert [ex["meta"]["family"] for ex in built] == list(TRAIN_FAMILIES[:3])
    _, want = calibrate_ape(model, tok, built, grid=grid, target_tokens=2)
    assert rep["examples"] == 3 and rep["grid"] == want["grid"]


# ---- command line -----------------------------------------------------------------------------------
def test_cli_make_suite_jobs_write_the_file_of_one_process(tmp_path, capsys):
    from pskernels.apps import evaluate as ev

    args = ["--model", "tiny", "--threads", "1", "--worker-tokens", "2", "--families", "sum,conflict,vote",
            "--per-family", "1", "--store-teacher", "2"]
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert ev.main(["--make-suite", str(one), *args]) == 0
    assert ev.main(["--make-suite", str(two), "--jobs", "2", *args]) == 0  # spawned processes: shards 0,2 and 1
    assert two.read_bytes() == one.read_bytes()
    assert [ex["kind"] for ex in load_jsonl(two)] == ["workflow:sum", "workflow:conflict", "workflow:vote"]
    with pytest.raises(SystemExit) as e:  # argparse names it (exit status 2)
        ev.main(["--make-suite", str(two), "--jobs", "0", *args])
    assert e.value.code == 2 and "argument --jobs: expected an int >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown family 'nope'"):
        ev.main(["--make-suite", str(two), "--jobs", "2", *args[:6], "--families", "nope"])


def _children(pid: int) -> list[int]:
    """The live processes whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[-1].split()  # after the command name, which may hold spaces
        if entry.isdigit() and int(fields[1]) == pid and fields[0] != "Z":
            kids.append(int(entry))
    return kids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads the process tree from Linux /proc")
def test_cli_make_suite_jobs_workers_exit_with_a_killed_parent(tmp_path):
    """SIGTERM to a ``--make-suite --jobs 2`` parent (no chance to stop its pool): its spawned workers notice and
    exit instead of generating on."""
    argv = [sys.executable, "-m", "pskernels.apps.cli", "eval", "--model", "tiny", "--threads", "1", "--jobs", "2",
            "--make-suite", str(tmp_path / "never.jsonl"), "--families", "all", "--per-family", "400",
            "--worker-tokens", "32"]
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    workers = []
    try:
        deadline = time.monotonic() + 120
        while "[job " not in p.stderr.readline():  # a worker has built an example: both are running
            assert p.poll() is None and time.monotonic() < deadline, "no worker reported progress"
        workers = _children(p.pid)
        assert len(workers) >= 2
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == -signal.SIGTERM
        deadline = time.monotonic() + 30
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [w for w in workers if _alive(w)], "workers outlived their parent"
        assert not (tmp_path / "never.jsonl").exists()
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
        for w in workers:
            if _alive(w):
                os.kill(w, signal.SIGKILL)


def test_cli_make_suite_and_evaluate_it(tmp_path, capsys):
    from pskernels.apps import evaluate as ev

    out, cal = tmp_path / "suite.jsonl", tmp_path / "cal.jsonl"
    common = ["--model", "tiny", "--threads", "1", "--worker-tokens", "2", "--workers", "2,2"]
    assert ev.main(["--make-suite", str(out), "--families", "sum,conflict", "--per-family", "1", *common]) == 0
    assert ev.main(["--make-suite", str(cal), "--families", "train", "--per-family", "1", "--seed", "1",
                    *common[:-1], "3,3"]) == 0  # odd_one_out needs 3 workers
    made = load_jsonl(out)
    assert [ex["kind"] for ex in made] == ["workflow:sum", "workflow:conflict"]
    assert all(ex["teacher"]["tokens"] == 16 and ex["teacher"]["ids"] for ex in made)  # --store-teacher 16
    assert [ex["kind"] for ex in load_jsonl(cal)] == [f"workflow:{f}" for f in TRAIN_FAMILIES]
    capsys.readouterr()
    assert ev.main(["--model", "tiny", "--threads", "1", "--suite", str(out), "--gen-tokens", "1",
                    "--target-tokens", "2", "--settings", "parallel,ape", "--calibrate-ape", str(cal),
                    "--calibrate-n", "2", "--ape-grid", "0.9,1/1", "--json", str(tmp_path / "r.json")]) == 0
    text = capsys.readouterr().out
    assert "(iii) APE calibrated (T=" in text and "APE calibrated on 2 examples" in text
    assert ev.main(["--model", "tiny", "--threads", "1", "--suite", str(out), "--gen-tokens", "1",
                    "--target-tokens", "2", "--settings", "ape", "--calibrate-ape", "--calibrate-n", "2",
                    "--ape-grid", "1/1"]) == 0
    assert "APE calibrated on 2 examples of the training families (seed 1, built by tiny)" in capsys.readouterr().out
    for label in ("family", "sum", "conflict", "training families", "held-out families", "all"):
        assert label in text
    with pytest.raises(SystemExit, match="also evaluated"):
        ev.main(["--model", "tiny", "--suite", str(out), "--calibrate-ape", str(out)])
    with pytest.raises(SystemExit, match="no example of 'plan'"):
        ev.main(["--model", "tiny", "--suite", str(out), "--families", "plan"])
    with pytest.raises(SystemExit, match="no example of 'nope'"):
        ev.main(["--model", "tiny", "--suite", str(out), "--families", "held_out,nope"])
    capsys.readouterr()
    assert ev.main(["--model", "tiny", "--threads", "1", "--suite", str(out), "--gen-tokens", "1", "--target-tokens",
                    "2", "--settings", "parallel", "--families", "sum,held_out"]) == 0  # a split and a name together
    table = capsys.readouterr().out
    assert "\nsum " in table and "\nconflict " in table and "(2 held-out examples" in table


def test_cli_eval_in_bfloat16_decodes_its_own_teacher_and_pairs_with_float32(tmp_path, capsys):
    from pskernels.apps import evaluate as ev

    suite, tampered = tmp_path / "suite.jsonl", tmp_path / "tampered.jsonl"
    assert ev.main(["--make-suite", str(suite), "--families", "retrieve,conflict", "--per-family", "1", "--model",
                    "tiny", "--threads", "1", "--worker-tokens", "2", "--workers", "2,2"]) == 0
    made = load_jsonl(suite)
    assert {ex["teacher"]["dtype"] for ex in made} == {"float32"}
    save_jsonl([{**ex, "teacher": {**ex["teacher"], "ids": [(i + 1) % 512 for i in ex["teacher"]["ids"]]}}
                for ex in made], tampered)
    common = ["--model", "tiny", "--threads", "1", "--gen-tokens", "2", "--target-tokens", "3", "--untrained",
              "--settings", "text_concat,parallel"]
    with pytest.raises(ValueError, match="stored 'teacher' ids are not this model's greedy continuation"):
        ev.main([*common, "--suite", str(tampered)])  # float32 reads the stored teachers, and checks them
    capsys.readouterr()
    bf16, fp32 = tmp_path / "bf16.json", tmp_path / "fp32.json"
    assert ev.main([*common, "--suite", str(tampered), "--dtype", "bfloat16", "--json", str(bf16)]) == 0
    text = capsys.readouterr().out
    assert "--dtype bfloat16: 2 stored teacher continuation(s) not used (decoded in another dtype)" in text
    assert "model tiny (bfloat16)" in text
    assert ev.main([*common, "--suite", str(suite), "--json", str(fp32)]) == 0
    low, full = json.loads(bf16.read_text()), json.loads(fp32.read_text())
    assert (low["dtype"], full["dtype"]) == ("bfloat16", "float32")
    assert low["parallel"]["kl"] > 0 and low["parallel"]["kl"] != pytest.approx(full["parallel"]["kl"], rel=1e-4)
    capsys.readouterr()
    assert ev.main(["--results", str(bf16), "--against", str(fp32)]) == 0
    text = capsys.readouterr().out
    assert "1 stored result(s), bfloat16:" in text and "paired against 1 stored result(s), float32:" in text
    assert "text_concat" in text.split("paired against")[1]  # another dtype's teacher: compared too
    assert "KL and top-1 of each against its own dtype's teacher" in text
    assert ev.main(["--results", str(fp32), "--against", str(fp32)]) == 0
    text = capsys.readouterr().out
    assert "text_concat" not in text.split("paired against")[1] and "own dtype's teacher" not in text  # the same
    with pytest.raises(SystemExit, match=r"expected the dtype of .*bf16.json, bfloat16, got float32"):
        ev.main(["--results", str(bf16), str(fp32)])
    # a suite built in bfloat16 stores bfloat16 teachers: bfloat16 uses them (the same figures as decoding them),
    # float32 decodes its own
    low_suite, low_plain = tmp_path / "bf16-suite.jsonl", tmp_path / "bf16-plain.jsonl"
    assert ev.main(["--make-suite", str(low_suite), "--families", "retrieve,conflict", "--per-family", "1", "--model",
                    "tiny", "--threads", "1", "--worker-tokens", "2", "--workers", "2,2", "--dtype", "bfloat16"]) == 0
    assert "model tiny (bfloat16)" in capsys.readouterr().out
    low_made = load_jsonl(low_suite)
    assert {ex["teacher"]["dtype"] for ex in low_made} == {"bfloat16"}
    save_jsonl([{k: v for k, v in ex.items() if k != "teacher"} for ex in low_made], low_plain)
    stored, decoded = tmp_path / "stored.json", tmp_path / "decoded.json"
    assert ev.main([*common, "--suite", str(low_suite), "--dtype", "bfloat16", "--json", str(stored)]) == 0
    assert "not used" not in capsys.readouterr().out
    assert ev.main([*common, "--suite", str(low_plain), "--dtype", "bfloat16", "--json", str(decoded)]) == 0
    assert json.loads(stored.read_text())["examples"] == json.loads(decoded.read_text())["examples"]
    capsys.readouterr()
    assert ev.main([*common, "--suite", str(low_suite)]) == 0
    assert "--dtype float32: 2 stored teacher continuation(s) not used" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        ev.main([*common, "--suite", str(suite), "--dtype", "float64"])
    assert "argument --dtype: invalid choice: 'float64'" in capsys.readouterr().err


# ---- the teacher's continuation stored with the examples --------------------------------------------
def _online_targets(model, tok, examples, n):
    """The teacher's greedy continuation of each example, decoded now (nothing stored)."""
    exs = tokenize_examples(tok, [{k: v for k, v in ex.items() if k != "teacher"} for ex in examples], "cpu")
    targets = TargetCache(n, eos_ids(tok))
    with patched(model):
        return [teacher_pass(model, ex, targets, j).target_ids.tolist() for j, ex in enumerate(exs)]


def test_stored_teacher_is_the_online_continuation_and_is_used_without_decoding(tiny, monkeypatch):
    model, tok = tiny
    built = build_workflows(model, tok, ["sum", "conflict"], 1, seed=5, worker_tokens=WORKER_TOKENS,
                            n_workers=(2, 3), teacher_tokens=6)
    assert [ex["teacher"]["tokens"] for ex in built] == [6, 6]
    assert [ex["teacher"]["ids"] for ex in built] == _online_targets(model, tok, built, 6)
    # the same examples otherwise: storing the teacher changes nothing else
    plain = build_workflows(model, tok, ["sum", "conflict"], 1, seed=5, worker_tokens=WORKER_TOKENS, n_workers=(2, 3))
    assert [{k: v for k, v in ex.items() if k != "teacher"} for ex in built] == plain
    want = evaluation.evaluate(model, tok, plain, trained=False, settings=("text_concat", "parallel"),
                               gen_tokens=3, target_tokens=4)

    def no_decoding(*a, **k):
        raise AssertionError("the teacher's continuation was decoded again")

    monkeypatch.setattr(distill, "teacher_greedy", no_decoding)
    monkeypatch.setattr(evaluation, "teacher_greedy", no_decoding)
    got = evaluation.evaluate(model, tok, built, trained=False, settings=("text_concat", "parallel"),
                              gen_tokens=3, target_tokens=4)
    assert got == want  # stored ids cut to 4 (targets) and 3 (greedy exact match): identical figures


def test_stored_teacher_cut_rules():
    def ex(ids, tokens, **dtype):
        return TokenizedExample(None, [], None, None, example={"teacher": {"ids": ids, "tokens": tokens, **dtype}})

    assert stored_teacher_ids(ex([5, 6, 7, 8], 4), 2).tolist() == [5, 6]
    assert stored_teacher_ids(ex([5, 6, 7, 8], 4), 4).tolist() == [5, 6, 7, 8]
    assert stored_teacher_ids(ex([5, 6, 7, 8], 4), 6) is None  # stored with fewer tokens than asked for
    assert stored_teacher_ids(ex([5, 2], 4), 6, eos=2).tolist() == [5, 2]  # greedy ended at eos: any budget
    assert stored_teacher_ids(ex([5, 2], 4), 1, eos=2).tolist() == [5]
    assert stored_teacher_ids(ex([5, 6, 2], 4), 6, eos=[9, 2]).tolist() == [5, 6, 2]
    assert stored_teacher_ids(TokenizedExample(None, [], None, None, example={}), 4) is None
    # a greedy continuation is its dtype's own; a file without the field was decoded in float32
    assert stored_teacher_ids(ex([5, 6], 2, dtype="bfloat16"), 2) is None
    assert stored_teacher_ids(ex([5, 6], 2, dtype="bfloat16"), 2, dtype=torch.bfloat16).tolist() == [5, 6]
    assert stored_teacher_ids(ex([5, 6], 2), 2, dtype=torch.bfloat16) is None


def test_stored_teacher_of_another_model_is_refused(tiny):
    model, tok = tiny
    (ex,) = build_workflows(model, tok, ["vote"], 1, seed=3, worker_tokens=WORKER_TOKENS, n_workers=(2, 2),
                            teacher_tokens=4)
    ids = ex["teacher"]["ids"]
    # the least likely token of the teacher at the first position: no float noise makes it the greedy choice
    tex = tokenize_examples(tok, [ex], "cpu")[0]
    with patched(model):
        prefix, _ = branch_caches(model, tex)
        worst = int(teacher_logits(model, tex, prefix, torch.tensor(ids))[0].argmin())
    bad = {**ex, "id": "forged", "teacher": {"ids": [worst] + ids[1:], "tokens": 4}}
    with patched(model), pytest.raises(ValueError, match=r"'forged'.*stored 'teacher' ids are not this model's"):
        teacher_pass(model, tokenize_examples(tok, [bad], "cpu")[0], TargetCache(4, eos_ids(tok)), 0)


@pytest.mark.parametrize("teacher,match", [
    ({"ids": [1, 2]}, "must be"), ({"ids": [1, "a"], "tokens": 2}, "must be"), ({"ids": [-1], "tokens": 2}, "must be"),
    ([1, 2], "must be"), ({"ids": [], "tokens": 2}, "must hold 1 to"),
    ({"ids": [1, 2, 3], "tokens": 2}, "must hold 1 to"), ({"ids": [1], "tokens": 2, "dtype": 16}, "must be"),
    ({"ids": [1], "tokens": 2, "model": "x"}, "must be"),
])
def test_malformed_teacher_field_is_refused(teacher, match):
    ex = {"prefix": "p", "branches": ["b"], "prompt": "q", "teacher": teacher, "id": "x"}
    with pytest.raises(ValueError, match=f"field 'teacher' {match}"):
        validate_example(ex, "examples[3]")


def test_worker_turn_tokens_are_where_each_branch_starts(tiny, suite):
    model, tok = tiny
    ex = suite[0]
    heads = worker_turn_tokens(tok, ex)
    fmt = role_format(tok)
    for h, subtask, branch in zip(heads, ex["meta"]["subtasks"], ex["branches"]):
        ids = encode(tok, branch)
        assert 0 < h < len(ids) and ids[:h] == encode(tok, fmt.worker_turn(subtask))
    with pytest.raises(ValueError, match=r"example 'x': no worker instruction per branch \(meta.subtasks\)"):
        worker_turn_tokens(tok, {"id": "x", "branches": ex["branches"]})
    forged = dict(ex, branches=["Z" + ex["branches"][0]] + ex["branches"][1:])
    with pytest.raises(ValueError, match=f"example {ex['id']!r}: branch 0 does not start with its worker's turn"):
        worker_turn_tokens(tok, forged)


def test_recompute_counts_are_each_workers_turn_where_there_is_one(tiny, suite):
    _, tok = tiny
    ex = suite[0]
    assert recompute_counts(tok, ex, ("prompt", 2, True)) == (worker_turn_tokens(tok, ex), 2, True)
    assert recompute_counts(tok, ex, (5, 0, False)) == (5, 0, False)
    natural = {"prefix": "a", "branches": ["b", "c"], "prompt": "d", "meta": {}}
    assert recompute_counts(tok, natural, ("prompt", 1, False)) == (0, 1, False)  # no worker turn: nothing


def test_training_with_each_workers_turn_recomputed(tiny, suite):
    from pskernels.synthesis.train import TrainConfig, train

    model, tok = tiny
    exs = [suite[0], suite[-1]]
    cfg = TrainConfig(steps=2, lr=1e-2, log_every=0, recompute=("prompt", 0, False))
    r = train(copy.deepcopy(model), tok, exs, cfg)
    assert r["config"]["recompute"] == ["prompt", 0, False] and all(h["kl"] > 0 for h in r["history"])
    out = evaluation.evaluate(r["model"], tok, exs, mapper=r["mapper"], settings=("text_concat", "trained"),
                              gen_tokens=1, target_tokens=2, trained_recompute=("prompt", 0, False))
    plain = evaluation.evaluate(r["model"], tok, exs, mapper=r["mapper"], settings=("text_concat", "trained"),
                                gen_tokens=1, target_tokens=2)
    assert out["trained"]["kl"] != pytest.approx(plain["trained"]["kl"], rel=1e-3)


def test_evaluate_recomputes_each_workers_turn(tiny, suite):
    model, tok = tiny
    exs = [suite[0], suite[-1]]
    r = evaluation.evaluate(model, tok, exs, trained=False, settings=("text_concat", "parallel", "recompute"),
                            gen_tokens=1, target_tokens=2)
    assert r["recompute"]["n"] == 2 and r["recompute"]["kl"] != pytest.approx(r["parallel"]["kl"])
    full = evaluation.evaluate(model, tok, exs, trained=False, settings=("text_concat", "recompute"), gen_tokens=1,
                               target_tokens=2, recompute=(10_000, 0))
    assert full["recompute"]["kl"] < 1e-6  # every token recomputed: the text concatenation
