"""linked_cache: a mapper's link tokens run after every branch, against stock Hugging Face over the whole sequence
with the attention pattern written out as a mask."""
import copy

import pytest
import torch
from branch_workflows import V, small_llama, zero_copy_workflow

import pskernels
from pskernels.synthesis import CacheMapper
from pskernels.synthesis.links import linked_cache


def _stock_reference(model, prefix, workers, lens, links, query):
    """Stock HF over ordinary caches built by hand at text positions (branch ``i`` at ``P + sum(lens[:i]) + i K``):
    the workers' K/V re-rotated there; the links of branch ``i`` run over the prefix and branches ``0 .. i``; the
    query over the prefix and every branch followed by its links."""
    pskernels.unpatch_model(model)
    spec = [pskernels.RopeSpec.from_model(model, l) for l in range(len(prefix.layers))]
    K, P = links.shape[0], prefix.get_seq_length()
    starts = [P + sum(lens[:i]) + i * K for i in range(len(lens))]

    def cache_over(parts):  # parts: per layer, a list of (keys, values) appended after the prefix
        c = copy.deepcopy(prefix)
        for l, layer in enumerate(c.layers):
            layer.keys = torch.cat([layer.keys] + [k for k, _ in parts[l]], 2)
            layer.values = torch.cat([layer.values] + [v for _, v in parts[l]], 2)
        return c

    branch_kv = [[(pskernels.rotate_keys(w.layers[l].keys[:, :, :n], s - P, spec[l]), w.layers[l].values[:, :, :n])
                  for l in range(len(spec))] for w, n, s in zip(workers, lens, starts)]
    full = [[] for _ in spec]
    with torch.no_grad():
        for i, (n, s) in enumerate(zip(lens, starts)):
            own = cache_over([[branch_kv[j][l] for j in range(i + 1)] for l in range(len(spec))])
            model(inputs_embeds=links[None], position_ids=torch.arange(s + n, s + n + K)[None], past_key_values=own,
                  use_cache=True)
            for l, layer in enumerate(own.layers):
                full[l] += [branch_kv[i][l], (layer.keys[:, :, -K:], layer.values[:, :, -K:])]
        q0 = P + sum(lens) + len(lens) * K
        return model(query, position_ids=torch.arange(q0, q0 + query.shape[1])[None],
                     past_key_values=cache_over(full)).logits[0]


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("K", [1, 3])
def test_matches_stock_hf_with_the_links_in_the_sequence(kv_heads, K):
    model = small_llama(kv_heads)
    prefix, workers, ids = zero_copy_workflow(model, (6, 7, 3, 9, 1))
    mapper = CacheMapper.for_model(model, link_tokens=K)
    query = torch.randint(0, V, (1, 5))
    lens = [7, 3, 9, 1]
    with torch.no_grad():
        cache = linked_cache(model, prefix, workers, lens, mapper)
        got = model(query, past_key_values=cache).logits[0]
    assert cache.num_branches == 8 and int(cache.query_start[0]) == 6 + sum(lens) + 4 * K
    want = _stock_reference(model, prefix, workers, lens, mapper.link_embeddings.detach(), query)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_rows_of_a_batched_left_padded_worker_shorter_lengths_and_an_empty_branch():
    """Rows of a batched worker (left padding; tokens after a row's end are not read) and a branch of 0 tokens."""
    model = small_llama()
    prefix, workers, ids = zero_copy_workflow(model, (5, 6, 3, 4))
    L = max(t.numel() for t in ids[1:])
    batch = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, t in enumerate(ids[1:]):
        batch[i, L - t.numel():], mask[i, L - t.numel():] = t, 1
    mapper = CacheMapper.for_model(model, link_tokens=2)
    query = torch.randint(0, V, (1, 3))
    lens = [4, 0, 4]
    with torch.no_grad():
        batched = pskernels.ParallelCache(prefix, [])
        model(batch, attention_mask=mask, past_key_values=batched)
        rows = [pskernels.CacheRow(batched, i) for i in range(3)]
        got = model(query, past_key_values=linked_cache(model, prefix, rows, lens, mapper)).logits[0]
    want = _stock_reference(model, prefix, workers, lens, mapper.link_embeddings.detach(), query)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # the batched workers' K/V differ by rounding


def test_greedy_generation_and_no_branches():
    model = small_llama()
    prefix, workers, ids = zero_copy_workflow(model, (5, 6, 4))
    mapper = CacheMapper.for_model(model, link_tokens=2)
    with torch.no_grad():
        cache = linked_cache(model, prefix, workers, [6, 4], mapper)
        out = model.generate(torch.tensor([[3, 4]]), past_key_values=cache, max_new_tokens=4, do_sample=False)
        empty = linked_cache(model, prefix, [], [], mapper)
        alone = model(torch.tensor([[3, 4]]), past_key_values=empty).logits
        plain = model(torch.tensor([[3, 4]]), past_key_values=pskernels.ParallelCache(prefix, [])).logits
    assert out.shape == (1, 6)
    assert empty.num_branches == 0
    torch.testing.assert_close(alone, plain)


def test_gradients_reach_the_link_embeddings_and_the_mapper():
    model = small_llama()
    prefix, workers, ids = zero_copy_workflow(model, (5, 6, 4))
    mapper = CacheMapper.for_model(model, link_tokens=3)
    cache = linked_cache(model, prefix, workers, [6, 4], mapper)
    logits = model(torch.tensor([[3, 4, 5]]), past_key_values=cache).logits
    logits.logsumexp(-1).sum().backward()
    assert mapper.link_embeddings.grad is not None and mapper.link_embeddings.grad.abs().sum() > 0
    assert mapper.k_up.grad.abs().sum() > 0 and mapper.log_temperature.grad.abs().sum() > 0


def test_a_mapper_with_links_refuses_a_bare_parallel_cache_and_bad_arguments_are_named():
    model = small_llama()
    prefix, workers, ids = zero_copy_workflow(model, (5, 6, 4))
    mapper = CacheMapper.for_model(model, link_tokens=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"mapper: trained with 2 link tokens after each branch; "
                                                          r"build the synthesizer's cache with .*linked_cache"):
        model(torch.tensor([[1]]), past_key_values=pskernels.ParallelCache(prefix, workers, mapper=mapper))
    with pytest.raises(ValueError, match=r"mapper: expected a CacheMapper with link_tokens > 0"):
        linked_cache(model, prefix, workers, [6, 4], CacheMapper.for_model(model))
    with pytest.raises(ValueError, match=r"lengths: expected one per branch \(2\), got 1"):
        linked_cache(model, prefix, workers, [6], mapper)
    with pytest.raises(ValueError, match=r"lengths\[1\]: expected an int in \[0, 4\] \(the branch's stored tokens\), "
                                         r"got 5"):
        linked_cache(model, prefix, workers, [6, 5], mapper)
    with pytest.raises(ValueError, match=r"link_tokens: expected 0, or > 0 with the model's hidden_size"):
        CacheMapper(pskernels.synthesis.CacheMapperConfig(num_layers=3, num_kv_heads=2, num_heads=4, head_dim=16,
                                                          link_tokens=2))


def test_link_embeddings_are_saved_and_look_like_the_vocabulary(tmp_path):
    model = small_llama()
    mapper = CacheMapper.for_model(model, link_tokens=4)
    vocab = model.get_input_embeddings().weight.detach()
    assert mapper.link_embeddings.shape == (4, 64) and not mapper.is_identity()
    assert abs(float(mapper.link_embeddings.detach().std()) - float(vocab.std())) < 0.5 * float(vocab.std())
    mapper.save_pretrained(tmp_path)
    again = CacheMapper.from_pretrained(tmp_path)
    assert again.link_tokens == 4
    torch.testing.assert_close(again.link_embeddings, mapper.link_embeddings)
