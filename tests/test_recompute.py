"""recompute_branches: branch heads and tails recomputed in text order, against stock Hugging Face over a hand-built
cache."""
import copy

import pytest
import torch
from branch_workflows import V, small_llama, zero_copy_workflow
from transformers import DynamicCache

import pskernels
from pskernels.synthesis import recompute
from pskernels.synthesis.recompute import grown_heads, recompute_branches, recomputed_segments

from tiny_models import VOCAB, make_model


def _stock_reference(model, prefix, workers, branch_ids, heads, tails, query):
    """The same recomputation with stock HF attention over an ordinary cache built in text order: each branch's
    head run over it, the worker's K/V in between appended (keys re-rotated at their text positions), its tail
    run over it."""
    pskernels.unpatch_model(model)
    spec = [pskernels.RopeSpec.from_model(model, l) for l in range(len(prefix.layers))]
    cache = copy.deepcopy(prefix)
    P = prefix.get_seq_length()
    with torch.no_grad():
        for w, ids, h, t in zip(workers, branch_ids, heads, tails):
            n = ids.numel()
            h = min(h, n)
            t = min(t, n - h)
            shift = cache.get_seq_length() - P  # the branch's text offset
            if h:
                model(ids[:h][None], past_key_values=cache, use_cache=True)
            for l, layer in enumerate(cache.layers):
                k = pskernels.rotate_keys(w.layers[l].keys[:, :, h:n - t], shift, spec[l])
                layer.keys = torch.cat([layer.keys, k], 2)
                layer.values = torch.cat([layer.values, w.layers[l].values[:, :, h:n - t]], 2)
            if t:
                model(ids[n - t:][None], past_key_values=cache, use_cache=True)
        return model(query, past_key_values=cache).logits[0]


def _per_branch(x, n):
    return list(x) if isinstance(x, (list, tuple)) else [x] * n


# the last case gives per-branch counts (a list and a tuple)
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
@pytest.mark.parametrize("head, tail", [(0, 1), (0, 3), (2, 0), (5, 0), (1, 2), (4, 4), (0, 8),
                                        ([2, 0, 5, 1], (1, 3, 0, 0))])
def test_matches_stock_hf_over_the_same_recomputation(kv_heads, head, tail):
    model = small_llama(kv_heads)
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (6, 7, 3, 9, 1))
    query = torch.randint(0, V, (1, 5))
    with torch.no_grad():
        cache = recompute_branches(model, prefix, workers, ids, head=head, tail=tail)
        got = model(query, past_key_values=cache).logits[0]
    n = len(ids)
    want = _stock_reference(model, prefix, workers, ids, _per_branch(head, n), _per_branch(tail, n), query)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_every_token_recomputed_is_the_text_concatenation():
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6, 2))
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        got = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=100)).logits[0]
        pskernels.unpatch_model(model)
        text = model(torch.cat([*ids, query[0]])[None], past_key_values=copy.deepcopy(prefix)).logits[0, -3:]
    torch.testing.assert_close(got, text, atol=2e-5, rtol=1e-5)


def test_grown_heads_keep_the_head_on_short_branches_and_a_share_of_long_ones():
    assert grown_heads(48, [80, 120, 121, 220, 30], share=0.4) == [48, 48, 49, 88, 30]
    assert grown_heads([2, 0, 9], [10, 10, 10], share=0.7) == [7, 7, 9]  # 0.7 x 10 is 7 tokens, not 8
    assert grown_heads(3, [5, 0], share=0.0) == [3, 0] and grown_heads(0, [5, 8], share=1.0) == [5, 8]
    for bad in (-0.1, 1.5, True, "0.4", float("nan")):
        with pytest.raises(ValueError, match=r"head_share: expected a number in \[0, 1\], got"):
            grown_heads(4, [8], share=bad)
    with pytest.raises(ValueError, match=r"head: expected an int >= 0 or one per branch \(2\), got \[1\]"):
        grown_heads([1], [8, 9], share=0.5)


@pytest.mark.parametrize("together", [False, True])
def test_head_share_is_the_grown_per_branch_head(together):
    """``head_share`` recomputes what the grown per-branch heads do (bit for bit), and a share of 1 the text."""
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (6, 3, 12, 5))
    query = torch.randint(0, V, (1, 4))
    lens = [t.numel() for t in ids]
    with torch.no_grad():
        grown = recompute_branches(model, prefix, workers, ids, head=2, tail=1, together=together, head_share=0.5)
        given = recompute_branches(model, prefix, workers, ids, head=grown_heads(2, lens, 0.5), tail=1,
                                   together=together)
        fixed = recompute_branches(model, prefix, workers, ids, head=2, tail=1, together=together)
        out = model(query, past_key_values=grown).logits
        torch.testing.assert_close(out, model(query, past_key_values=given).logits, atol=0, rtol=0)
        assert not torch.allclose(out, model(query, past_key_values=fixed).logits)  # heads 3, 2, 6, 3 against 2
        if not together:
            whole = model(query, past_key_values=recompute_branches(model, prefix, workers, ids,
                                                                    head_share=1.0)).logits[0]
            pskernels.unpatch_model(model)
            text = model(torch.cat([*ids, query[0]])[None], past_key_values=copy.deepcopy(prefix)).logits[0, -4:]
            torch.testing.assert_close(whole, text, atol=2e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"head_share: expected a number in \[0, 1\], got 2"):
        recompute_branches(model, prefix, workers, ids, head=2, head_share=2)


def test_nothing_recomputed_is_the_sequential_scheme_and_the_workers_stay_untouched():
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6))
    before = [[(l.keys.clone(), l.values.clone(), l.keys.data_ptr()) for l in w.layers] for w in workers]
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        seq = model(query, past_key_values=pskernels.ParallelCache(prefix, workers, scheme="sequential")).logits
        zero = model(query, past_key_values=recompute_branches(model, prefix, workers, ids)).logits
        some = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=2, tail=1)).logits
    assert torch.equal(zero, seq)
    assert not torch.allclose(some, seq)  # a recomputation that changes nothing would pass the tests above
    for w, b in zip(workers, before):
        for layer, (k, v, ptr) in zip(w.layers, b):
            assert layer.keys.data_ptr() == ptr and torch.equal(layer.keys, k) and torch.equal(layer.values, v)


def test_greedy_generation_over_a_recomputed_cache():
    model = small_llama()
    prefix, workers, (prefix_ids, *ids) = zero_copy_workflow(model, (5, 4, 6))
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        out = model.generate(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=100),
                             max_new_tokens=4, do_sample=False)
        pskernels.unpatch_model(model)
        # generate takes the cached prefix's ids too (and skips them)
        text = model.generate(torch.cat([prefix_ids, *ids, query[0]])[None], past_key_values=copy.deepcopy(prefix),
                              max_new_tokens=4, do_sample=False)
    assert out[0, 3:].tolist() == text[0, -4:].tolist()


def test_bad_arguments_are_named():
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6))
    with pytest.raises(ValueError, match=r"head: expected an int >= 0 or one per branch \(2\), got -1"):
        recompute_branches(model, prefix, workers, ids, head=-1)
    with pytest.raises(ValueError, match=r"tail: expected an int >= 0 or one per branch \(2\), got 1.5"):
        recompute_branches(model, prefix, workers, ids, tail=1.5)
    with pytest.raises(ValueError, match=r"head: expected an int >= 0 or one per branch \(2\), got \[1, 2, 3\]"):
        recompute_branches(model, prefix, workers, ids, head=[1, 2, 3])
    with pytest.raises(ValueError, match=r"branch_ids: expected one id tensor per branch \(2\), got 1"):
        recompute_branches(model, prefix, workers, ids[:1], head=2)
    with pytest.raises(ValueError, match=r"branch_ids\[1\]: expected a 1-D tensor of at most the branch's 6 stored "
                                         r"tokens, got shape \(7,\)"):
        recompute_branches(model, prefix, workers, [ids[0], torch.cat([ids[1], ids[1][:1]])], head=2)
    with pytest.raises(TypeError, match=r"branches\[0\]: expected a worker's zero-copy ParallelCache"):
        recompute_branches(model, prefix, [DynamicCache(), workers[1]], ids, head=2)


@pytest.mark.parametrize("together", [False, True])
def test_rows_of_a_batched_left_padded_worker_cache(together):
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 6, 3, 4))
    L = max(t.numel() for t in ids)
    batch = torch.zeros(len(ids), L, dtype=torch.long)
    mask = torch.zeros(len(ids), L, dtype=torch.long)
    for i, t in enumerate(ids):  # left-pad each worker's tokens
        batch[i, L - t.numel():], mask[i, L - t.numel():] = t, 1
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        batched = pskernels.ParallelCache(prefix, [])
        model(batch, attention_mask=mask, past_key_values=batched)
        rows = [pskernels.CacheRow(batched, i) for i in range(len(ids))]
        kw = dict(head=2, tail=1, together=together)
        got = model(query, past_key_values=recompute_branches(model, prefix, rows, ids, **kw)).logits
        want = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, **kw)).logits
        with pytest.raises(ValueError, match=r"branches\[0\]: expected a batch-1 worker cache, got 3 rows"):
            recompute_branches(model, prefix, [batched], ids[:1], head=1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_branch_ids_shorter_than_the_stored_tokens_cut_the_branch():
    """A batched worker stores tokens after its EOS: the ids say where its branch ends."""
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 6, 7))
    query = torch.randint(0, V, (1, 3))
    short = [ids[0][:4], ids[1]]
    with torch.no_grad():
        got = model(query, past_key_values=recompute_branches(model, prefix, workers, short, head=1, tail=1)).logits
    want = _stock_reference(model, prefix, workers, short, [1, 1], [1, 1], query)
    torch.testing.assert_close(got[0], want, atol=2e-5, rtol=1e-5)


def test_the_synthesizers_mapper_reads_every_segment():
    from pskernels.synthesis import CacheMapper

    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 6, 7))
    query = torch.randint(0, V, (1, 3))
    identity = CacheMapper.for_model(model)
    calibrated = CacheMapper.for_model(model, calibrate=True, init_temperature=0.5, init_lse_scale=0.5)
    with torch.no_grad():
        def logits(mapper):
            cache = recompute_branches(model, prefix, workers, ids, head=2, mapper=mapper)
            assert cache.mapper is mapper
            return model(query, past_key_values=cache).logits

        plain, same, other = logits(None), logits(identity), logits(calibrated)
    torch.testing.assert_close(same, plain, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(other, plain, atol=1e-3)


@pytest.mark.parametrize("together", [False, True])
def test_recomputed_segments_serve_many_caches(together):
    """The recomputation, done once, is read by several synthesizer caches (e.g. one per training step of a mapper):
    each is the cache recompute_branches returns, and reading one leaves the segments as they were."""
    from pskernels.synthesis import CacheMapper

    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 6, 7, 4))
    query = torch.randint(0, V, (1, 3))
    calibrated = CacheMapper.for_model(model, calibrate=True, init_temperature=0.5, init_lse_scale=0.5)
    with torch.no_grad():
        view = recomputed_segments(model, prefix, workers, ids, head=2, tail=1, together=together)
        want = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=2, tail=1,
                                                               together=together)).logits
        first = model(query, past_key_values=view.cache()).logits
        mapped = model(query, past_key_values=view.cache(mapper=calibrated)).logits
        again = model(query, past_key_values=view.cache()).logits
        want_mapped = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=2, tail=1,
                                                                      together=together, mapper=calibrated)).logits
    assert torch.equal(first, want) and torch.equal(again, want)
    assert torch.equal(mapped, want_mapped) and not torch.allclose(mapped, want, atol=1e-3)


def _stock_together_reference(model, prefix, workers, branch_ids, heads, tails, query):
    """``together=True`` with stock HF attention: each part run over an ordinary cache of the prefix and the
    workers' K/V before it (keys re-rotated at their text positions), then the synthesizer's cache assembled in
    text order from the parts and the workers' middles."""
    pskernels.unpatch_model(model)
    spec = [pskernels.RopeSpec.from_model(model, l) for l in range(len(prefix.layers))]
    P = prefix.get_seq_length()

    def append(cache, w, a, b, shift):
        for l, layer in enumerate(cache.layers):
            layer.keys = torch.cat([layer.keys, pskernels.rotate_keys(w.layers[l].keys[:, :, a:b], shift, spec[l])], 2)
            layer.values = torch.cat([layer.values, w.layers[l].values[:, :, a:b]], 2)

    def part(i, a, r):  # K/V of branch i's tokens a .. a + r, keys at their text positions
        cache, off = copy.deepcopy(prefix), 0
        for w, ids in zip(workers[:i], branch_ids[:i]):
            append(cache, w, 0, ids.numel(), off)
            off += ids.numel()
        append(cache, workers[i], 0, a, off)
        n0 = cache.get_seq_length()
        model(branch_ids[i][a:a + r][None], past_key_values=cache, use_cache=True)
        return [(layer.keys[:, :, n0:], layer.values[:, :, n0:]) for layer in cache.layers]

    with torch.no_grad():
        final = copy.deepcopy(prefix)
        for i, (ids, h, t) in enumerate(zip(branch_ids, heads, tails)):
            n = ids.numel()
            h = min(h, n)
            t = min(t, n - h)
            for a, r in ((0, h), (None, None), (n - t, t)):
                if a is None:
                    append(final, workers[i], h, n - t, final.get_seq_length() - P - h)
                elif r:
                    for layer, (k, v) in zip(final.layers, part(i, a, r)):
                        layer.keys, layer.values = torch.cat([layer.keys, k], 2), torch.cat([layer.values, v], 2)
        return model(query, past_key_values=final).logits[0]


@pytest.mark.parametrize("head, tail", [(2, 0), (0, 3), (3, 2), (100, 0)])
def test_together_matches_stock_hf_over_the_same_parts(head, tail):
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (6, 7, 3, 9, 1))
    query = torch.randint(0, V, (1, 4))
    with torch.no_grad():
        cache = recompute_branches(model, prefix, workers, ids, head=head, tail=tail, together=True)
        got = model(query, past_key_values=cache).logits[0]
    n = len(ids)
    want = _stock_together_reference(model, prefix, workers, ids, [head] * n, [tail] * n, query)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)


def test_together_with_one_part_is_the_exact_recomputation():
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6, 3))
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        one = [0, 0, 2]  # only the last branch's head: nothing recomputed before it
        a = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=one)).logits
        b = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=one,
                                                            together=True)).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("together", [False, True])
def test_a_peft_synthesizer_passes_the_cache_by_the_name_its_model_takes(together):
    """A PEFT model forwards keyword arguments unchanged: the recomputation passes the cache under the wrapped
    model's own name (no deprecated ``past_key_values`` warning) and, with the adapter disabled, computes the base
    model's recomputation."""
    import warnings

    pytest.importorskip("peft")
    from pskernels.synthesis.adapter import add_synthesizer_adapter, base_model

    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 6, 7, 4))
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        want = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=2, tail=1,
                                                               together=together)).logits
        peft_model = add_synthesizer_adapter(model, r=2)
        with base_model(peft_model), warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            cache = recompute_branches(peft_model, prefix, workers, ids, head=2, tail=1, together=together)
        got = model(query, past_key_values=cache).logits
    assert torch.equal(got, want)


def _in_order(monkeypatch):
    """Make recompute_branches(together=False) run one forward per part, as it does where a sliding window bites."""
    monkeypatch.setattr(recompute, "_packs_exactly", lambda model, text_len: False)


@pytest.mark.parametrize("arch, attn", [(a, "eager") for a in ("llama", "llama3_rope", "llama_yarn", "qwen2", "qwen3",
                                                                 "phi3_partial", "gemma")] + [("llama", "sdpa")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_exact_recomputation_is_the_one_forward_per_part_order(arch, attn, dtype, monkeypatch):
    model = make_model(arch, attn_implementation=attn, dtype=dtype)
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 7, 3, 9, 1, 4), vocab=VOCAB)
    query = torch.randint(0, VOCAB, (1, 4))
    kw = dict(head=[2, 0, 5, 1, 3], tail=(1, 3, 0, 0, 2))
    with torch.no_grad():
        packed = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, **kw)).logits
        _in_order(monkeypatch)
        in_order = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, **kw)).logits
    tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(packed, in_order, **tol)


@pytest.mark.parametrize("arch, attn", [("mistral_sliding", "eager"), ("gemma2", "eager"), ("gemma3", "eager"),
                                        ("llama", "flex_attention")])
def test_a_sliding_window_or_a_maskless_attention_recomputes_one_part_at_a_time(arch, attn, monkeypatch):
    """A window that bites, or an attention that takes no additive 4D mask, keeps the in-order forwards."""
    model = make_model(arch, attn_implementation=attn)
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (3, 4, 5, 2), vocab=VOCAB)  # windows of 6 tokens

    def packed(*args):
        raise AssertionError("packed recomputation under a sliding window")

    monkeypatch.setattr(recompute, "_recompute_packed", packed)
    query = torch.randint(0, VOCAB, (1, 3))
    with torch.no_grad():
        out = model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=2, tail=1)).logits
    assert torch.isfinite(out).all()


def _mapper(model, exact_recomputed, calibrate=True):
    """A mapper that has learned something: K/V residuals and, with ``calibrate``, knobs away from identity."""
    from pskernels.synthesis import CacheMapper

    torch.manual_seed(3)
    mapper = CacheMapper.for_model(model, rank=4, calibrate=calibrate, init_temperature=0.5, init_lse_scale=0.7,
                                   exact_recomputed=exact_recomputed)
    with torch.no_grad():
        mapper.k_up.normal_(0, 0.2)
        mapper.v_up.normal_(0, 0.2)
    return mapper


def test_a_mapper_that_steps_aside_reads_every_recomputed_token_as_the_text_has_it():
    """exact_recomputed: with every token recomputed the synthesizer reads the text concatenation whatever its mapper
    learned; a mapper that maps every segment does not."""
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6, 2))
    query = torch.randint(0, V, (1, 3))
    with torch.no_grad():
        def logits(mapper):
            return model(query, past_key_values=recompute_branches(model, prefix, workers, ids, head=100,
                                                                   mapper=mapper)).logits[0]

        aside, everywhere = logits(_mapper(model, True)), logits(_mapper(model, False))
        pskernels.unpatch_model(model)
        text = model(torch.cat([*ids, query[0]])[None], past_key_values=copy.deepcopy(prefix)).logits[0, -3:]
    torch.testing.assert_close(aside, text, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(everywhere, text, atol=1e-3)


def test_a_mapper_that_steps_aside_maps_the_workers_middles_only():
    """Heads recomputed, middles the workers': the mapper's K/V residual reaches the middles alone. Reference: the
    middles mapped by hand (map_kv_caches at their text positions, keys rotated back to the worker's slots) in a
    cache without a mapper."""
    from pskernels.hf.cache import worker_cache

    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6, 2, 7))
    query = torch.randint(0, V, (1, 3))
    mapper = _mapper(model, True, calibrate=False)
    rope = pskernels.RopeSpec.from_model(model, 0)
    P = prefix.get_seq_length()
    with torch.no_grad():
        view = recomputed_segments(model, prefix, workers, ids, head=2, tail=1)
        assert view.recomputed == [0, 2, 3, 5, 6, 7, 9]  # head, middle, tail of 4, 6 and 7 tokens; of 2: the head
        cache = view.cache(mapper=mapper)
        assert cache.exact_branches == frozenset(view.recomputed)
        got = model(query, past_key_values=cache).logits
        by_hand = list(view.segments)
        for i, (seg, start) in enumerate(zip(view.segments, view.starts)):
            if i in view.recomputed:
                continue
            keys = [[layer.keys] for layer in seg.layers]
            values = [[layer.values] for layer in seg.layers]
            at = torch.full((len(keys), 1, 1), P)
            mk, mv = mapper.map(keys, values, at, at + start - P, rope)
            by_hand[i] = worker_cache(prefix, [(pskernels.rotate_keys(k[0], P - start, rope), v[0])
                                               for k, v in zip(mk, mv)])
        want = model(query, past_key_values=view._replace(segments=by_hand).cache()).logits
        plain = model(query, past_key_values=view.cache()).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)


def test_a_calibrating_mapper_that_steps_aside_calibrates_the_middles_only():
    """The knobs weigh the mapped middles against the prefix, the recomputed parts and the own tokens: the result is
    neither the plain cache's nor the one where every segment is calibrated, and branches that are all exact (or a
    cache of no middle) are read as without a mapper."""
    model = small_llama()
    prefix, workers, (_, *ids) = zero_copy_workflow(model, (5, 4, 6, 7))
    query = torch.randint(0, V, (1, 3))
    aside, everywhere = _mapper(model, True), _mapper(model, False)
    with torch.no_grad():
        view = recomputed_segments(model, prefix, workers, ids, head=2)
        got, plain, mapped = (model(query, past_key_values=view.cache(mapper=m)).logits
                              for m in (aside, None, everywhere))
        heads_only = recomputed_segments(model, prefix, workers, [t[:2] for t in ids], head=2)
        exact, unmapped = (model(query, past_key_values=heads_only.cache(mapper=m)).logits for m in (aside, None))
    assert not torch.allclose(got, plain, atol=1e-3) and not torch.allclose(got, mapped, atol=1e-3)
    assert torch.equal(exact, unmapped)


def test_exact_branches_are_branch_indices():
    model = small_llama()
    prefix, workers, _ = zero_copy_workflow(model, (5, 4, 6))
    for bad in ([2], [-1], [True], ["0"], [0.0]):
        with pytest.raises(ValueError, match=r"exact_branches: expected branch indices in \[0, 2\), got"):
            pskernels.ParallelCache(prefix, workers, exact_branches=bad)
