"""CacheMapper: identity at init, applied through ParallelCache, trainable, persistent."""
import re

import pytest
import torch

import pskernels
from pskernels.synthesis import CacheMapper, CacheMapperConfig

from hf_oracle import branch_caches, make_case
from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.hf


def _logits(model, case, prefix, branches, mapper, **kw):
    handle = pskernels.patch_model(model)
    try:
        cache = pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths, mapper=mapper, **kw)
        return model(case.query, attention_mask=case.query_mask, past_key_values=cache).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "gemma3", "phi3_partial"])
@pytest.mark.parametrize("scheme", ["parallel", "sequential"])
def test_fresh_mapper_is_identity(arch, scheme):
    model = make_model(arch)
    case = make_case(2, 4, [[5, 5], [2, 3]], [3, 2], VOCAB, seed=11)
    prefix, branches = branch_caches(model, case)
    mapper = CacheMapper.for_model(model, rank=4)
    assert mapper.is_identity()
    with torch.no_grad():
        ref = _logits(model, case, prefix, branches, None, scheme=scheme)
        out = _logits(model, case, prefix, branches, mapper, scheme=scheme)
    real = case.query_mask.bool()
    assert (out[real] - ref[real]).abs().max().item() < 1e-4


def test_trained_mapper_changes_outputs_and_gradients_reach_every_parameter():
    model = make_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    case = make_case(1, 4, [[5], [4]], [3], VOCAB, seed=12)
    prefix, branches = branch_caches(model, case)
    mapper = CacheMapper.for_model(model, rank=4)
    with torch.no_grad():  # move off the identity so every parameter receives gradient
        mapper.k_up.normal_(0, 0.1)
        mapper.v_up.normal_(0, 0.1)
        mapper.log_temperature.fill_(-0.1)
    out = _logits(model, case, prefix, branches, mapper, scheme="sequential")
    out.logsumexp(-1).sum().backward()
    for name, p in mapper.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        ref = _logits(model, case, prefix, branches, None, scheme="sequential")
    assert (out.detach() - ref).abs().max().item() > 1e-3


def test_mapper_loss_decreases():
    model = make_model("llama")
    for p in model.parameters():
        p.requires_grad_(False)
    case = make_case(1, 4, [[5], [4]], [3], VOCAB, seed=13)
    prefix, branches = branch_caches(model, case)
    target = torch.randint(3, VOCAB, (1, 3))
    mapper = CacheMapper.for_model(model, rank=4)
    opt = torch.optim.Adam(mapper.parameters(), lr=3e-2)
    losses = []
    for _ in range(8):
        logits = _logits(model, case, prefix, branches, mapper)
        loss = torch.nn.functional.cross_entropy(logits[0], target[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_save_load_round_trip(tmp_path):
    m = CacheMapper(CacheMapperConfig(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, rank=3))
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    m.save_pretrained(tmp_path / "mapper")
    m2 = CacheMapper.from_pretrained(tmp_path / "mapper")
    assert m2.config == m.config
    for (n, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="mapper_config.json"):
        CacheMapper.from_pretrained(tmp_path / "missing")


def test_from_pretrained_refuses_non_finite_weights(tmp_path):
    m = CacheMapper(CacheMapperConfig(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16, rank=3))
    name = next(n for n, p in m.named_parameters() if p.ndim > 1)
    with torch.no_grad():
        dict(m.named_parameters())[name][0].fill_(float("nan"))
    m.save_pretrained(tmp_path / "diverged")
    with pytest.raises(ValueError, match=rf"parameter '{re.escape(name)}'.*non-finite"):
        CacheMapper.from_pretrained(tmp_path / "diverged")


@pytest.mark.parametrize("field, value", [("rank", -1), ("num_layers", 0), ("init_temperature", 0.0),
                                          ("init_temperature", float("nan")), ("init_lse_scale", -1.0)])
def test_config_values_without_a_mapper_are_named(field, value):
    """A negative rank made a tensor of negative size; a temperature of 0 died in math.log, and NaN built a mapper
    whose every output was NaN."""
    kw = dict(num_layers=2, num_kv_heads=2, num_heads=4, head_dim=16)
    kw[field] = value
    with pytest.raises(ValueError, match=f"^{field}: expected"):
        CacheMapper(CacheMapperConfig(**kw))
