"""bench/selection_oracle.py on the tiny model: every token given the text's K/V is the text concatenation."""
import importlib.util
import json
from pathlib import Path

import pytest

from pskernels.synthesis import checkpoints
from pskernels.synthesis.data import load_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _oracle():
    spec = importlib.util.spec_from_file_location("selection_oracle", ROOT / "bench" / "selection_oracle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def suite(tmp_path):
    # one training and one held-out workflow, without SmolLM2's stored continuation (the tiny model has its own)
    rows = load_jsonl(checkpoints.DEFAULT_SUITE)
    picked = [rows[0], next(r for r in rows if r["split"] == "held_out")]
    path = tmp_path / "suite.jsonl"
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "teacher"}) + "\n" for r in picked))
    return path


def test_every_token_repaired_is_the_text_and_one_layer_is_not(suite, tmp_path):
    out = tmp_path / "oracle.json"
    assert _oracle().main(["--model", "tiny", "--suite", str(suite), "--budgets", "3,100000", "--layers", "all,0:1",
                           "--target-tokens", "6", "--json", str(out)]) == 0
    table = json.loads(out.read_text())["table"]
    assert set(table) == {"train", "held_out", "all"}
    rows = table["all"]
    assert rows["none"]["ratio"] == 1.0 and rows["none"]["kl"] > 0
    for s in ("head", "deviation", "attention", "attention_cached"):
        whole = rows[f"{s} 100000"]
        assert whole["kl"] < 1e-6 and whole["top1"] == 1.0, (s, whole)
        assert rows[f"{s} 100000 layers 0:1"]["kl"] > 1e-4, s  # layer 1 still the workers'
        assert 0 <= rows[f"{s} 3"]["kl"]


def test_bad_layers_and_strategies_are_refused(suite, capsys):
    with pytest.raises(SystemExit):
        _oracle().main(["--model", "tiny", "--suite", str(suite), "--layers", "0:9"])
    assert "--layers: expected 'all' or START:END within the model's 2 layers, got '0:9'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _oracle().main(["--model", "tiny", "--suite", str(suite), "--strategies", "head,tail"])
    assert "got tail" in capsys.readouterr().err


def test_from_the_last_layer_a_workers_state_changes_nothing(suite, tmp_path):
    # layer 1's K/V are projections of its input, here each worker's own hidden state: the workers' K/V again
    out = tmp_path / "oracle.json"
    assert _oracle().main(["--model", "tiny", "--suite", str(suite), "--budgets", "100000", "--strategies", "head",
                           "--start-layer", "1", "--target-tokens", "6", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["table"]["all"]
    assert rows["head 100000"]["kl"] == pytest.approx(rows["none"]["kl"], rel=1e-4)
    assert rows["head 100000"]["top1"] == rows["none"]["top1"]


def test_a_workflow_of_no_split_is_reported_as_such(suite, tmp_path):
    rows = [json.loads(line) for line in suite.read_text().splitlines()]
    own = tmp_path / "own.jsonl"  # a user's workflow: no split field, a kind of no packaged family
    own.write_text(json.dumps({**{k: v for k, v in rows[0].items() if k != "split"}, "kind": "mine"}) + "\n")
    out = tmp_path / "oracle.json"
    assert _oracle().main(["--model", "tiny", "--suite", str(own), "--budgets", "3", "--strategies", "head",
                           "--target-tokens", "6", "--json", str(out)]) == 0
    assert set(json.loads(out.read_text())["table"]) == {"(no split)", "all"}
