"""patch_model / unpatch_model: exactness without a ParallelCache, restoration, misuse."""
import copy

import pytest
import torch

import pskernels

from hf_oracle import branch_caches, make_case
from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.hf


def _run(model, ids, mask):
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
        gen = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
        cache = model(ids[:, :3], use_cache=True).past_key_values
        step = model(ids[:, 3:], past_key_values=copy.deepcopy(cache)).logits
    return logits, gen, step


@pytest.mark.parametrize("arch, impl", [
    ("llama", "eager"), ("llama", "sdpa"), ("gemma2", "eager"), ("mistral_sliding", "eager"),
    ("mistral_sliding", "sdpa"), ("gemma3", "eager"), ("gemma3", "sdpa"), ("qwen2", "sdpa"),
])
def test_patched_without_parallel_cache_is_bit_identical_and_remove_restores(arch, impl):
    model = make_model(arch, attn_implementation=impl)
    model.generation_config.eos_token_id = None
    ids = torch.randint(3, VOCAB, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    before = _run(model, ids, mask)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    handle = pskernels.patch_model(model)
    assert model.config._attn_implementation == "pskernels"
    patched = _run(model, ids, mask)
    handle.remove()
    after = _run(model, ids, mask)
    assert model.config._attn_implementation == impl
    dec = pskernels.rope.find_decoder(model)
    assert not dec._forward_pre_hooks and not dec._forward_hooks
    for a, b, c in zip(before, patched, after):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_parallel_cache_on_unpatched_model_raises():
    model = make_model("llama")
    case = make_case(1, 3, [[4]], [2], VOCAB)
    prefix, branches = branch_caches(model, case)
    with pytest.raises(RuntimeError, match="not patched"):
        with torch.no_grad():
            model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches))


def test_double_patch_and_double_unpatch_raise():
    model = make_model("llama")
    handle = pskernels.patch_model(model)
    with pytest.raises(RuntimeError, match="already patched"):
        pskernels.patch_model(model)
    pskernels.unpatch_model(model)
    with pytest.raises(RuntimeError, match="not patched"):
        pskernels.unpatch_model(model)
    handle.remove()  # idempotent


def test_two_models_patched_independently():
    a, b = make_model("llama", seed=0), make_model("qwen2", seed=1)
    ids = torch.randint(3, VOCAB, (1, 6))
    with torch.no_grad():
        ref_a, ref_b = a(ids).logits, b(ids).logits
        ha = pskernels.patch_model(a)
        hb = pskernels.patch_model(b)
        ha.remove()
        assert torch.equal(a(ids).logits, ref_a) and torch.equal(b(ids).logits, ref_b)
        hb.remove()
    assert b.config._attn_implementation == "eager"


def test_cache_from_other_model_is_rejected():
    small = make_model("llama")  # 3 layers
    other = make_model("gemma3")  # 4 layers
    case = make_case(1, 3, [[4]], [2], VOCAB)
    prefix, branches = branch_caches(small, case)
    handle = pskernels.patch_model(other)
    try:
        with pytest.raises(ValueError, match="different model"):
            with torch.no_grad():
                other(case.query, past_key_values=pskernels.ParallelCache(prefix, branches))
    finally:
        handle.remove()


@pytest.mark.parametrize("kwargs, match", [
    ({"scheme": "diagonal"}, "scheme"),
    ({"scheme": "custom"}, "branch_starts"),
    ({"branch_starts": [3]}, "branch_starts"),
    ({"branch_lengths": [9]}, "branch_lengths"),
    ({"branch_lengths": [[1, 2]]}, "branch_lengths"),
    ({"query_start": -1}, "query_start"),
    ({"branch_lengths": [2.5]}, "branch_lengths: expected integers, got torch.float32"),  # was truncated to 2
    ({"branch_lengths": torch.tensor([True])}, "branch_lengths: expected integers, got torch.bool"),
    ({"branch_starts": [3.0], "scheme": "custom"}, "branch_starts: expected integers"),
])
def test_parallel_cache_argument_errors(kwargs, match):
    model = make_model("llama")
    case = make_case(1, 3, [[4]], [2], VOCAB)
    prefix, branches = branch_caches(model, case)
    with pytest.raises((ValueError, TypeError), match=match):
        pskernels.ParallelCache(prefix, branches, **kwargs)


def test_branches_and_model_of_the_wrong_kind_are_named():
    model = make_model("llama")
    case = make_case(1, 3, [[4]], [2], VOCAB)
    prefix, branches = branch_caches(model, case)
    with pytest.raises(TypeError, match="branches: expected a sequence of caches .*got ParallelCache"):
        pskernels.ParallelCache(prefix, pskernels.ParallelCache(prefix, []))  # one cache, not a list of one
    with pytest.raises(TypeError, match="model: expected a Hugging Face decoder .* got NoneType"):
        pskernels.patch_model(None)


def test_right_padded_query_mask_is_rejected():
    model = make_model("llama")
    case = make_case(1, 3, [[4]], [3], VOCAB)
    prefix, branches = branch_caches(model, case)
    handle = pskernels.patch_model(model)
    try:
        with pytest.raises(ValueError, match="left padding"):
            model(case.query, attention_mask=torch.tensor([[1, 1, 0]]),
                  past_key_values=pskernels.ParallelCache(prefix, branches))
    finally:
        handle.remove()


def test_branch_shorter_than_prefix_is_rejected():
    model = make_model("llama")
    long_case = make_case(1, 6, [[2]], [2], VOCAB)
    short_case = make_case(1, 3, [[1]], [2], VOCAB)
    prefix, _ = branch_caches(model, long_case)
    _, short_branches = branch_caches(model, short_case)
    with pytest.raises(ValueError, match="fewer than the prefix"):
        pskernels.ParallelCache(prefix, short_branches)
