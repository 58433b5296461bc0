"""Shipped synthesizer checkpoints (pskernels.synthesis.checkpoints): export from a real (2-step) training run of
the tiny model, load back, refusal of a checkpoint of another model, and the eval / demo defaults."""
import argparse
import doctest
import fnmatch
import json
import pathlib
import shutil

import pytest
import tomllib
import torch

pytest.importorskip("peft")

from tiny_checkpoint import export, recomputing_copy, short_examples, tiny, train_run  # noqa: E402

from pskernels.synthesis import checkpoints  # noqa: E402
from pskernels.synthesis.adapter import is_peft_model  # noqa: E402
from pskernels.synthesis.data import ByteTokenizer, save_jsonl  # noqa: E402
from pskernels.synthesis.models import tiny_llama  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("one_thread_module")]

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPORTED = {"checkpoint.json", "mapper/mapper_config.json", "mapper/mapper.safetensors", "adapter/adapter_config.json",
            "adapter/adapter_model.safetensors"}
EVAL = ["--model", "tiny", "--builder", "aggregation", "--n-examples", "2", "--gen-tokens", "2", "--target-tokens", "2",
        "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A real `pskernels train --out`-style folder: 2 steps of mapper + LoRA training of load_model('tiny')."""
    return train_run(tmp_path_factory.mktemp("run"))


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    return export(run["dir"], tmp_path_factory.mktemp("export") / "tiny-test")


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def _copy_run(run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run["dir"], dst)
    return dst


def _untouched(model):
    return not is_peft_model(model) and not any("lora_" in n for n, _ in model.named_modules())


# ---- export -----------------------------------------------------------------------------------------------------
def test_export_writes_only_the_loadable_files_and_the_manifest(run, exported):
    assert (run["dir"] / "trainer_state.pt").is_file()
    files = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()}
    assert files == EXPORTED
    manifest = json.loads((exported / "checkpoint.json").read_text())
    assert manifest["format"] == 1
    assert manifest["base_model"] == checkpoints.model_fingerprint(tiny())
    assert manifest["base_model"]["num_hidden_layers"] == 2 and manifest["base_model"]["hidden_size"] == 128
    assert manifest["base_model"]["rope_theta"] == 10000.0 and manifest["base_model"]["model_type"] == "llama"
    assert manifest["train_config"] == json.loads((run["dir"] / "train_config.json").read_text())
    assert manifest["command"] == "train --steps 2" and manifest["seed"] == 0
    adapter_base = json.loads((exported / "adapter" / "adapter_config.json").read_text()).get("base_model_name_or_path")
    assert adapter_base is None or "/" not in adapter_base  # no local path of the training machine ships
    # every exported file is package data (pyproject.toml), so an installed package carries the checkpoint
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["pskernels"]
    for f in files:
        rel = f"checkpoints/{exported.name}/{f}"
        assert any(fnmatch.fnmatch(rel, g) and rel.count("/") == g.count("/") for g in globs), rel


def test_load_checkpoint_restores_the_runs_mapper_and_adapter(run, exported):
    model, mapper = checkpoints.load_checkpoint(tiny(), exported)
    assert is_peft_model(model)
    want, got = run["mapper"].state_dict(), mapper.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    a, b = _lora(run["model"]), _lora(model)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert any("lora_B" in k and a[k].abs().max() > 0 for k in a), "training moved no LoRA B matrix"
    assert not mapper.is_identity()


def test_loading_a_checkpoint_shows_no_warning_of_peft_internals(exported):
    """PEFT reads transformers' deprecated is_gradient_checkpointing while wrapping: not the user's to act on."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        model, _ = checkpoints.load_checkpoint(tiny(), exported)
    assert is_peft_model(model)


@pytest.mark.parametrize("other, field", [
    (dict(hidden=128, layers=3, heads=4, kv_heads=2, vocab=259), "num_hidden_layers"),
    (dict(hidden=64, layers=2, heads=4, kv_heads=2, vocab=259), "hidden_size"),
    (dict(hidden=128, layers=2, heads=4, kv_heads=2, vocab=300), "vocab_size"),  # same attention shapes
])
def test_a_checkpoint_of_another_model_is_refused_before_the_model_is_touched(exported, other, field):
    model = tiny_llama(**other)
    mine = checkpoints.model_fingerprint(model)
    with pytest.raises(ValueError, match="another model") as e:
        checkpoints.load_checkpoint(model, exported)
    msg = str(e.value)
    assert f"checkpoint {exported}" in msg and "trained for llama" in msg
    assert f"{field}={json.loads((exported / 'checkpoint.json').read_text())['base_model'][field]}" in msg
    assert f"{field}={mine[field]}" in msg
    assert _untouched(model)


def test_a_train_out_folder_is_loaded_with_the_shape_check(run):
    model, mapper = checkpoints.load_checkpoint(tiny(), run["dir"])
    assert is_peft_model(model) and mapper is not None
    other = tiny_llama(hidden=128, layers=3, heads=4, kv_heads=2, vocab=259)
    with pytest.raises(ValueError, match=r"num_layers = 2, but the model has 3 \(a mapper trained for another model"):
        checkpoints.load_checkpoint(other, run["dir"])
    assert _untouched(other)
    with pytest.raises(FileNotFoundError, match="expected a folder"):
        checkpoints.load_checkpoint(tiny(), run["dir"] / "mapper")


@pytest.mark.parametrize("missing", ["mapper", "adapter"])
def test_export_refuses_a_run_without_mapper_or_adapter(run, tmp_path, missing):
    src = _copy_run(run, tmp_path)
    shutil.rmtree(src / missing)
    with pytest.raises(ValueError, match=f"run_dir: .* has no {missing}/"):
        checkpoints.export_checkpoint(src, tmp_path / "out", tiny(), extra={})
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("weights", ["mapper/mapper.safetensors", "adapter/adapter_model.safetensors"])
def test_export_refuses_non_finite_weights(run, tmp_path, weights):
    from safetensors.torch import load_file, save_file

    src = _copy_run(run, tmp_path)
    state = load_file(str(src / weights))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name].clone()
    state[name].view(-1)[0] = float("nan")
    save_file(state, str(src / weights))
    with pytest.raises(ValueError, match=f"run_dir: tensor '{name}' .*non-finite"):
        checkpoints.export_checkpoint(src, tmp_path / "out", tiny(), extra={})
    assert not (tmp_path / "out").exists()


def test_export_argument_errors(run, exported, tmp_path):
    with pytest.raises(ValueError, match=r"extra: may not redefine \['base_model'\]"):
        checkpoints.export_checkpoint(run["dir"], tmp_path / "o", tiny(), extra={"base_model": {}})
    with pytest.raises(ValueError, match="extra: not JSON"):
        checkpoints.export_checkpoint(run["dir"], tmp_path / "o", tiny(), extra={"x": object()})
    with pytest.raises(ValueError, match="out_dir: .* exists"):
        checkpoints.export_checkpoint(run["dir"], exported, tiny(), extra={})
    with pytest.raises(ValueError, match="run_dir: .*num_layers = 2, but the model has 3"):
        checkpoints.export_checkpoint(run["dir"], tmp_path / "o", tiny_llama(hidden=128, layers=3, heads=4,
                                                                             kv_heads=2, vocab=259), extra={})
    assert not (tmp_path / "o").exists()
    again = checkpoints.export_checkpoint(run["dir"], tmp_path / "o", tiny(), extra={"v": 2})
    assert checkpoints.export_checkpoint(run["dir"], again, tiny(), extra={"v": 3}, overwrite=True) == again
    assert json.loads((again / "checkpoint.json").read_text())["v"] == 3


# ---- shipped checkpoints ------------------------------------------------------------------------------------------
def test_shipped_checkpoint_lookup(exported, tmp_path, monkeypatch):
    assert checkpoints.CHECKPOINT_ROOT == ROOT / "pskernels" / "checkpoints"
    assert checkpoints.SHIPPED["smollm2"] == "smollm2-135m-instruct"
    assert checkpoints.shipped_checkpoint("tiny") is None
    assert checkpoints.shipped_checkpoint(str(tmp_path)) is None  # an HF folder
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", tmp_path)
    assert checkpoints.shipped_checkpoint("smollm2") is None  # not on disk
    (tmp_path / "smollm2-135m-instruct").mkdir()
    assert checkpoints.shipped_checkpoint("smollm2") is None  # no checkpoint.json
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", exported.parent)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", exported.name)
    assert checkpoints.shipped_checkpoint("tiny") == exported
    assert checkpoints.SHIPPED_RECOMPUTE["smollm2"] == "smollm2-135m-instruct-recompute"
    assert checkpoints.shipped_checkpoint("tiny", recompute=True) is None
    monkeypatch.setitem(checkpoints.SHIPPED_RECOMPUTE, "tiny", exported.name)
    assert checkpoints.shipped_checkpoint("tiny", recompute=True) == exported


def test_trained_head_share_is_the_manifests_for_a_synthesizer_trained_on_recomputed_branches(shipped_tiny,
                                                                                                 tmp_path):
    recomputing = recomputing_copy(shipped_tiny, tmp_path / "recomputing")
    assert checkpoints.trained_head_share(recomputing) == 0.0 and checkpoints.trained_head_share(None) == 0.0
    manifest = json.loads((recomputing / checkpoints.MANIFEST_NAME).read_text())
    for share in (0.4, 1):
        (recomputing / checkpoints.MANIFEST_NAME).write_text(json.dumps({**manifest, "head_share": share}))
        assert checkpoints.trained_head_share(recomputing) == share
    plain = tmp_path / "plain"  # a synthesizer that reads its branches as cached has no head to grow
    shutil.copytree(shipped_tiny, plain)
    (plain / checkpoints.MANIFEST_NAME).write_text(json.dumps({**json.loads(
        (plain / checkpoints.MANIFEST_NAME).read_text()), "head_share": 0.4}))
    assert checkpoints.trained_head_share(plain) == 0.0
    for bad in (1.5, -0.1, "0.4", True):
        (recomputing / checkpoints.MANIFEST_NAME).write_text(json.dumps({**manifest, "head_share": bad}))
        with pytest.raises(ValueError, match=r"checkpoint .*recomputing: checkpoint.json has head_share .*, expected a "
                                             r"number in \[0, 1\]"):
            checkpoints.trained_head_share(recomputing)


def test_docstring_examples():
    result = doctest.testmod(checkpoints, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ---- pskernels eval -----------------------------------------------------------------------------------------------
def _eval(argv, tmp_path, capsys):
    from pskernels.apps import evaluate as ev

    out = tmp_path / "r.json"
    assert ev.main([*EVAL, *argv, "--json", str(out)]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


@pytest.fixture
def shipped_tiny(exported, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", exported.parent)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", exported.name)
    return exported


def test_eval_uses_the_shipped_checkpoint_unless_untrained_or_another_is_named(run, shipped_tiny, tmp_path, capsys):
    r, text = _eval(["--settings", "parallel,trained"], tmp_path, capsys)
    assert r["checkpoint"] == str(shipped_tiny) and "trained" in r
    assert f"trained row: checkpoint {shipped_tiny} (shipped for --model tiny" in text
    assert "(iv) trained mapper + adapter" in text
    assert r["trained"]["kl"] != pytest.approx(r["parallel"]["kl"])  # the trained weights were used

    r2, text = _eval(["--settings", "parallel,trained", "--checkpoint", str(run["dir"])], tmp_path, capsys)
    assert r2["checkpoint"] == str(run["dir"]) and f"{run['dir']} (--checkpoint)" in text
    assert r2["trained"]["kl"] == pytest.approx(r["trained"]["kl"], rel=1e-5)  # the same weights, exported

    r3, text = _eval(["--untrained"], tmp_path, capsys)
    assert r3["checkpoint"] is None and "trained" not in r3 and {"text_concat", "parallel", "ape"} <= set(r3)
    assert "trained row: checkpoint none (--untrained)" in text and "(iv) trained" not in text

    r4, text = _eval(["--settings", "parallel"], tmp_path, capsys)
    assert "trained" not in r4 and f"{shipped_tiny} (shipped" in text and "not evaluated (--settings" in text

    from pskernels.apps import evaluate as ev

    with pytest.raises(SystemExit):  # argparse: not allowed with --checkpoint
        ev.main([*EVAL, "--untrained", "--checkpoint", str(run["dir"])])
    assert "not allowed with argument" in capsys.readouterr().err


def test_eval_recompute_synthesizer_is_the_shipped_one_trained_on_recomputed_turns(shipped_tiny, tmp_path, capsys,
                                                                                   monkeypatch):
    from pskernels.apps import evaluate as ev

    with pytest.raises(SystemExit, match="--recompute-synthesizer: no synthesizer trained on recomputed branches is "
                                         "shipped for --model tiny"):
        ev.main([*EVAL, "--recompute-synthesizer"])
    recomputing = recomputing_copy(shipped_tiny, tmp_path / "recomputing")
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", tmp_path)
    monkeypatch.setitem(checkpoints.SHIPPED_RECOMPUTE, "tiny", recomputing.name)
    r, text = _eval(["--settings", "trained", "--recompute-synthesizer"], tmp_path, capsys)
    assert r["checkpoint"] == str(recomputing) and f"{recomputing} (--recompute-synthesizer)" in text
    assert "(iv) trained + recomputed 2,1" in text and "over workers' K/V" not in text  # trained in exact order
    plain, _ = _eval(["--settings", "trained", "--checkpoint", str(shipped_tiny)], tmp_path, capsys)
    assert r["trained"]["kl"] != pytest.approx(plain["trained"]["kl"], rel=1e-5)  # the same weights, read recomputed
    with pytest.raises(SystemExit):  # argparse: not allowed with --untrained
        ev.main([*EVAL, "--untrained", "--recompute-synthesizer"])
    grown, text = _eval(["--settings", "trained", "--recompute-synthesizer", "--head-share", "1"], tmp_path, capsys)
    assert "(iv) trained + recomputed 2,1, head share 1" in text  # every branch token recomputed, then mapped
    assert grown["trained"]["kl"] != pytest.approx(r["trained"]["kl"], rel=1e-5)
    assert grown["head_share"] == {"recompute": 1.0, "trained": 1.0} and r["head_share"]["trained"] == 0.0
    tailed, text = _eval(["--settings", "trained", "--recompute-synthesizer", "--trained-tail", "3"], tmp_path, capsys)
    assert "(iv) trained + recomputed 2,3" in text and tailed["recomputation"]["trained"] == [2, 3, False]
    assert tailed["trained"]["kl"] != pytest.approx(r["trained"]["kl"], rel=1e-5)  # more of each branch recomputed
    with pytest.raises(SystemExit, match=r"--trained-tail 3: expected a trained setting whose synthesizer recomputes "
                                         r"its branches .* got checkpoint None trained with recompute None"):
        ev.main([*EVAL, "--untrained", "--trained-tail", "3"])
    with pytest.raises(SystemExit, match="recompute None and settings parallel"):
        ev.main([*EVAL, "--settings", "parallel", "--checkpoint", str(shipped_tiny), "--trained-tail", "3"])
    manifest = json.loads((recomputing / checkpoints.MANIFEST_NAME).read_text())
    (recomputing / checkpoints.MANIFEST_NAME).write_text(json.dumps({**manifest, "head_share": 1.0}))
    own, text = _eval(["--settings", "trained", "--recompute-synthesizer"], tmp_path, capsys)
    assert "(iv) trained + recomputed 2,1, head share 1" in text and own["trained"] == grown["trained"]


def test_eval_refuses_a_shipped_checkpoint_of_another_model(shipped_tiny, tmp_path, monkeypatch):
    from pskernels.apps import evaluate as ev

    other = tmp_path / "other"
    shutil.copytree(shipped_tiny, other)
    manifest = json.loads((other / "checkpoint.json").read_text())
    manifest["base_model"].update(num_hidden_layers=30, hidden_size=576)
    (other / "checkpoint.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", tmp_path)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", "other")
    with pytest.raises(SystemExit, match=r"trained for llama with num_hidden_layers=30, hidden_size=576, but the model "
                       r"\(llama\) has num_hidden_layers=2, hidden_size=128 \(a checkpoint of another model\)"):
        ev.main(EVAL)


def test_eval_without_a_shipped_checkpoint_has_no_trained_row(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", tmp_path)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", "absent")
    from pskernels.apps import evaluate as ev

    args = ev.add_eval_args(argparse.ArgumentParser()).parse_args(["--model", "tiny"])
    assert ev.resolve_checkpoint(args) == (None, "none (no checkpoint shipped for --model tiny; --checkpoint DIR)")
    assert args.suite is None


def test_eval_suite_without_a_file_is_the_packaged_suite(tmp_path, capsys, monkeypatch):
    from pskernels.apps import evaluate as ev

    assert checkpoints.DEFAULT_SUITE == ROOT / "pskernels" / "synthesis" / "suites" / "workflows-smollm2.jsonl"
    suite = tmp_path / "suites" / "workflows-smollm2.jsonl"
    monkeypatch.setattr(checkpoints, "DEFAULT_SUITE", suite)
    with pytest.raises(SystemExit, match=f"--suite: the packaged suite {suite} is missing"):
        ev.main(["--model", "tiny", "--suite", "--untrained"])
    with pytest.raises(SystemExit, match="--suite: no such file"):
        ev.main(["--model", "tiny", "--suite", str(tmp_path / "nope.jsonl")])
    suite.parent.mkdir()
    save_jsonl(short_examples(2, seed=1), suite)
    assert ev.main(["--model", "tiny", "--threads", "1", "--suite", "--untrained", "--settings", "parallel",
                    "--gen-tokens", "1", "--target-tokens", "1"]) == 0
    text = capsys.readouterr().out
    assert "(2 held-out examples" in text and "training families" not in text and "\nall" in text
    # --suite long / held-out: the other packaged suites, by name (a file of that name would win)
    named = {"long": ("workflows-long-smollm2.jsonl", checkpoints.LONG_SUITE, 3),
             "held-out": ("workflows-held-out-smollm2.jsonl", checkpoints.HELD_OUT_SUITE, 4)}
    assert checkpoints.NAMED_SUITES == {name: shipped for name, (_, shipped, _) in named.items()}
    for name, (file, shipped, n) in named.items():
        assert shipped == ROOT / "pskernels" / "synthesis" / "suites" / file
        stand_in = tmp_path / "suites" / file
        monkeypatch.setitem(checkpoints.NAMED_SUITES, name, stand_in)
        with pytest.raises(SystemExit, match=f"--suite: the packaged suite {stand_in} is missing"):
            ev.main(["--model", "tiny", "--suite", name, "--untrained"])
        save_jsonl(short_examples(n, seed=n), stand_in)
        assert ev.main(["--model", "tiny", "--threads", "1", "--suite", name, "--untrained", "--settings", "parallel",
                        "--gen-tokens", "1", "--target-tokens", "1"]) == 0
        assert f"({n} held-out examples" in capsys.readouterr().out


# ---- pskernels demo -----------------------------------------------------------------------------------------------
def test_demo_uses_the_shipped_checkpoint_unless_untrained(exported, tmp_path, monkeypatch, capsys):
    """`pskernels demo` (SmolLM2 path, the model and the agent run stubbed): without --mapper the synthesizer is the
    shipped checkpoint, with --untrained the base model; --mapper and --untrained exclude each other."""
    from pskernels.apps import demo
    from pskernels.apps.cli import main as cli

    root = tmp_path / "root"
    shutil.copytree(exported, root / checkpoints.SHIPPED["smollm2"])
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", root)
    monkeypatch.setattr(demo, "load_model", lambda name: (tiny(), ByteTokenizer()))
    seen = []

    def fake_agent_demo(model, tokenizer, worker_tokens=64, answer_tokens=80, repeats=3, mapper=None,
                        recomputed_synthesis=False, synthesizer_recompute=None, recompute_synthesizer=None,
                        head_share=0.0, synthesizer_head_share=0.0):
        seen.append((model, mapper))
        lengths.append((worker_tokens, answer_tokens, head_share, synthesizer_head_share))
        recomputes.append(synthesizer_recompute)
        synthesizers_c.append(recompute_synthesizer)
        return {"synthesizer": "trained" if mapper is not None else "base model"}

    recomputes, synthesizers_c, lengths = [], [], []
    monkeypatch.setattr(demo, "run_agent_demo", fake_agent_demo)
    assert cli(["demo", "--json", "--repeats", "1"]) == 0
    assert lengths[-1] == (64, 80, 0.0, 0.0)
    model, mapper = seen[-1]
    assert is_peft_model(model) and mapper is not None and not mapper.is_identity()
    r = json.loads(capsys.readouterr().out)
    assert r["mapper_path"] == str(root / checkpoints.SHIPPED["smollm2"]) and r["shipped"] and not r["untrained"]

    assert cli(["demo", "--json", "--repeats", "1", "--untrained", "--worker-tokens", "160",
                "--answer-tokens", "5"]) == 0
    assert lengths[-1] == (160, 5, 0.0, 0.0)
    model, mapper = seen[-1]
    assert mapper is None and _untouched(model)
    r = json.loads(capsys.readouterr().out)
    assert r["mapper_path"] is None and r["untrained"] and not r["shipped"]

    with pytest.raises(SystemExit):
        cli(["demo", "--untrained", "--mapper", str(exported)])
    assert "not allowed with argument" in capsys.readouterr().err
    assert recomputes == [None, None]
    # a synthesizer trained on recomputed branches (train --recompute) reads its branches so in the demo
    recomputing = tmp_path / "recomputing"
    shutil.copytree(exported, recomputing)
    manifest = json.loads((recomputing / checkpoints.MANIFEST_NAME).read_text())
    manifest["train_config"]["recompute"] = ["prompt", 0, True]
    (recomputing / checkpoints.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert checkpoints.trained_recompute(recomputing) == ("prompt", 0, True)
    assert checkpoints.trained_recompute(exported) is None and checkpoints.trained_recompute(None) is None
    assert cli(["demo", "--json", "--repeats", "1", "--mapper", str(recomputing), "--head-share", "0.3"]) == 0
    assert recomputes[-1] == ("prompt", 0, True) and lengths[-1][2:] == (0.3, 0.3)  # (b) reads recomputed
    capsys.readouterr()
    # --recompute-synthesizer: (c) is the synthesizer shipped for recomputed branches, on its own copy of the weights
    assert synthesizers_c == [None] * 3
    monkeypatch.setitem(checkpoints.SHIPPED_RECOMPUTE, "smollm2", recomputing.name)
    shutil.copytree(recomputing, root / recomputing.name)
    assert cli(["demo", "--json", "--repeats", "1", "--recompute-synthesizer"]) == 0
    (model, _), (model_c, mapper_c, how_c) = seen[-1], synthesizers_c[-1]
    assert is_peft_model(model_c) and model_c is not model and mapper_c is not None
    assert how_c == ("prompt", 0, True)  # (c) reads the branches as its synthesizer was trained
    assert json.loads(capsys.readouterr().out)["recompute_path"] == str(root / recomputing.name)
    assert lengths[-1][2:] == (0.0, 0.0)  # no head share in its manifest: a fixed head
    # a head share in the shipped manifest is (c)'s default reading; --head-share overrides it
    manifest = json.loads((root / recomputing.name / checkpoints.MANIFEST_NAME).read_text())
    (root / recomputing.name / checkpoints.MANIFEST_NAME).write_text(json.dumps({**manifest, "head_share": 0.4}))
    assert cli(["demo", "--json", "--repeats", "1", "--recompute-synthesizer"]) == 0
    assert lengths[-1][2:] == (0.4, 0.0)  # (b), run D's kind, recomputes nothing
    assert cli(["demo", "--json", "--repeats", "1", "--recompute-synthesizer", "--head-share", "0"]) == 0
    assert lengths[-1][2:] == (0.0, 0.0)
    capsys.readouterr()
    assert cli(["demo", "--json", "--repeats", "1", "--recompute-synthesizer", "--untrained"]) == 0
    assert synthesizers_c[-1] is None and lengths[-1][2] == 0.0  # (c) is the base model: nothing of its own


def test_eval_recompute_setting(tmp_path, capsys):
    r, text = _eval(["--untrained", "--settings", "parallel,recompute", "--recompute", "2"], tmp_path, capsys)
    assert set(r) >= {"text_concat", "parallel", "recompute"} and "ape" not in r
    assert "(v) recomputed head 2, tail 0" in text
    assert r["recompute"]["kl"] != pytest.approx(r["parallel"]["kl"])  # the heads were recomputed
    full, _ = _eval(["--untrained", "--settings", "recompute", "--recompute", "1000"], tmp_path, capsys)
    assert full["recompute"]["kl"] < 1e-6 and full["recompute"]["top1"] == 1  # all recomputed: the text
    one, text = _eval(["--untrained", "--settings", "recompute", "--recompute", "2", "--recompute-together"],
                      tmp_path, capsys)
    assert "(v) recomputed head 2, tail 0 (over workers' K/V)" in text and one["recompute"]["n"] == 2
    assert one["recomputation"] == {"recompute": [2, 0, True], "trained": None}
    assert r["recomputation"] == {"recompute": [2, 0, False], "trained": None}

    from pskernels.apps import evaluate as ev

    for bad in ("0", "a,b", "1,2,3", "-1,2", "prompt,-1"):
        with pytest.raises(SystemExit, match="--recompute: expected HEAD or HEAD,TAIL"):
            ev.main([*EVAL, "--untrained", "--settings", "recompute", f"--recompute={bad}"])
    whole, text = _eval(["--untrained", "--settings", "recompute", "--recompute", "1", "--head-share", "1"], tmp_path,
                        capsys)
    assert "(v) recomputed head 1, tail 0, head share 1" in text and whole["recompute"]["kl"] < 1e-6  # the text
    with pytest.raises(SystemExit, match=r"--head-share: expected a share in \[0, 1\], got 1.5"):
        ev.main([*EVAL, "--untrained", "--settings", "recompute", "--head-share", "1.5"])
    with pytest.raises(SystemExit, match="--head-share 0.5: nothing recomputes here"):
        ev.main([*EVAL, "--untrained", "--settings", "parallel", "--head-share", "0.5"])


def test_agent_demo_recomputed_synthesis_adds_a_third_synthesis(capsys, monkeypatch):
    from pskernels.apps import demo
    from pskernels.synthesis.recompute import recompute_branches

    subtasks = ["Count the red ones.", "Count the blue ones and say so."]
    r = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=3, repeats=1,
                            recomputed_synthesis=True)
    tok = ByteTokenizer()
    assert r["recompute_tokens"] == sum(len(x) for x in demo.agent_prompts(tok, subtasks=subtasks)[1])
    assert r["recompute_ttft_ms"] > 0 and r["recompute_speedup"] > 0 and isinstance(r["recompute_answer"], str)
    demo.print_agent_report(r, "tiny")
    assert r["recompute"] == ["prompt", 0, True]
    assert "(c) Parallel-Synthesis with each worker's instruction recomputed in text order" in capsys.readouterr().out
    plain = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=3,
                                repeats=1)
    assert "recompute_answer" not in plain and plain["synthesizer_recompute"] is None
    # a synthesizer trained on recomputed instructions: (b) reads them so (here the base model, hence (c)'s answer)
    both = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=6,
                               repeats=1, recomputed_synthesis=True, synthesizer_recompute=("prompt", 0, True))
    assert both["parallel_answer"] == both["recompute_answer"] and both["synthesizer_recompute"] == ["prompt", 0, True]
    once = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=6,
                               repeats=1, recomputed_synthesis=True)
    assert once["parallel_answer"] != once["recompute_answer"] == both["recompute_answer"]  # not the plain read
    assert once["recompute_synthesizer"] == "base model"
    other = tiny()  # (c)'s synthesizer: other weights of the same shapes
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    by_other = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=6,
                                   repeats=1, recomputed_synthesis=True,
                                   recompute_synthesizer=(other, None, ("prompt", 0, True)))
    assert by_other["recompute_synthesizer"] == "trained on recomputed branches"
    assert by_other["parallel_answer"] == once["parallel_answer"]
    assert by_other["recompute_answer"] != once["recompute_answer"]
    # (c)'s synthesizer trained with another recomputation reads the branches so: the first 3 tokens and the last 1
    calls = []

    def recording(*args, **kwargs):
        calls.append((kwargs["head"], kwargs["tail"], kwargs["together"]))
        return recompute_branches(*args, **kwargs)

    from pskernels.synthesis import synthesize

    monkeypatch.setattr(synthesize, "recompute_branches", recording)  # the demo recomputes through Synthesizer
    heads = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=6,
                                repeats=1, recomputed_synthesis=True,
                                recompute_synthesizer=(tiny(), None, (3, 1, False)))
    assert heads["recompute"] == [3, 1, False] and heads["recompute_tokens"] == 4 * len(subtasks)
    assert calls and set(calls) == {(3, 1, False)}  # (b) reads its branches plainly: only (c) recomputes
    demo.print_agent_report(heads, "tiny")
    assert "with the first 3 tokens of each branch and its last 1 recomputed in text order (8 tokens by the base " \
        "model; synthesizer: trained on recomputed branches)" in capsys.readouterr().out
    # a head that grows with its branch: a share of 1 recomputes every branch token
    whole = demo.run_agent_demo(tiny(), ByteTokenizer(), subtasks=subtasks, worker_tokens=4, answer_tokens=6,
                                repeats=1, recomputed_synthesis=True, head_share=1.0,
                                recompute_synthesizer=(tiny(), None, (3, 1, False)))
    assert whole["head_share"] == 1.0 and whole["recompute_tokens"] == sum(whole["branch_tokens"]) > 8
    demo.print_agent_report(whole, "tiny")
    assert "the first 3 tokens of each branch (at least 100% of it) and its last 1" in capsys.readouterr().out
