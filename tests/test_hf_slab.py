"""A ParallelCache's own tokens in one token-major buffer (pskernels.hf.slab) against per-layer DynamicLayers."""
import copy
import gc
import weakref

import pytest
import torch
from transformers.cache_utils import DynamicLayer

import pskernels
from pskernels.hf.slab import SlabLayer, TokenSlab, adopt_rows, slab_layers

from tiny_models import VOCAB, make_model

pytestmark = pytest.mark.hf


def _ids(n, seed, rows=1):
    return torch.randint(3, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "gemma3", "qwen3"])
def patched(request):
    model = make_model(request.param)
    model.generation_config.eos_token_id = None
    handle = pskernels.patch_model(model)
    yield model
    handle.remove()


def _dynamic(cache):
    """The same cache storing its own tokens as transformers does (one tensor per layer, concatenated)."""
    cache.layers = [DynamicLayer() for _ in cache.layers]
    return cache


@torch.no_grad()
@pytest.mark.parametrize("reserve", [None, 3, 40])
def test_generation_is_bit_identical_to_per_layer_storage(patched, reserve):
    """A left-padded batched worker generates through regrowths (none or 3 reserved: 6 slots at the prompt, then
    9, 13, 19) or none (40 reserved); its own K/V, the tokens and a synthesizer reading it equal the DynamicLayer
    cache exactly."""
    model = patched
    prefix = model(_ids(5, 0), use_cache=True).past_key_values
    x, mask = _ids(6, 1, rows=2), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    slab = pskernels.ParallelCache(prefix, [], reserve=reserve)
    plain = _dynamic(pskernels.ParallelCache(prefix, []))
    outs = [model.generate(x, attention_mask=mask, past_key_values=c, max_new_tokens=9, do_sample=False)
            for c in (slab, plain)]
    assert torch.equal(outs[0], outs[1])
    buf = slab.layers[0].slab.buf
    assert buf.shape[1] == {None: 19, 3: 19, 40: 40}[reserve] and slab.get_seq_length() == 6 + 9 - 1
    for a, b in zip(slab.layers, plain.layers):
        assert isinstance(a, SlabLayer) and a.keys.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        assert a.keys.stride(-1) == 1 and torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    q = _ids(4, 2, rows=2)
    logits = [model(q, past_key_values=pskernels.ParallelCache(prefix, [w, pskernels.CacheRow(w, 1)])).logits
              for w in (slab, plain)]
    assert torch.equal(logits[0], logits[1])


@torch.no_grad()
def test_a_row_of_every_layer_is_one_contiguous_range(patched):
    model = patched
    prefix = model(_ids(5, 0), use_cache=True).past_key_values
    w = pskernels.ParallelCache(prefix, [], reserve=20)
    model(_ids(7, 1, rows=3), past_key_values=w)
    slab = w.layers[0].slab
    rows = slab.rows(7)
    L, (_, H, _, D) = len(w.layers), w.layers[0].keys.shape
    assert rows.shape == (3, 7, L, 2, H, D) and all(rows[b].is_contiguous() for b in range(3))
    for l, layer in enumerate(w.layers):
        assert torch.equal(rows[:, :, l, 0].transpose(1, 2), layer.keys)
        assert torch.equal(rows[:, :, l, 1].transpose(1, 2), layer.values)
    assert slab.rows(6) is None  # the layers hold 7 slots
    w.layers[0].crop(-2)  # one layer shorter: no uniform range any more
    assert w.layers[0].get_seq_length() == 5 and slab.rows(7) is None and slab.rows(5) is None


def test_a_layer_that_does_not_fit_leaves_the_buffer():
    slab = TokenSlab(2)
    a, b = SlabLayer(slab, 0), SlabLayer(slab, 1)
    k = torch.randn(1, 2, 3, 4)
    a.update(k, k + 1)
    k8 = torch.randn(1, 2, 3, 8)  # another head dim: this layer stores its tokens on its own
    b.update(k8, k8 + 1)
    b.update(k8[:, :, :1], k8[:, :, :1])
    assert b.slab is None and b.keys.shape == (1, 2, 4, 8) and torch.equal(b.keys[:, :, :3], k8)
    assert a.slab is slab and torch.equal(a.keys, k) and slab.rows(3) is None
    a.update(k[:, :, :2].double(), k[:, :, :2].double())  # another dtype after tokens were written: copied out
    assert a.slab is None and a.keys.is_contiguous() and a.keys.shape[2] == 5 and torch.equal(a.keys[:, :, :3],
                                                                                                k.double())


def test_tokens_with_gradients_are_stored_per_layer():
    """In-place writes into a shared buffer would invalidate what autograd saved: training leaves the buffer."""
    layer = SlabLayer(TokenSlab(1), 0)
    k = torch.randn(1, 2, 3, 4, requires_grad=True)
    out_k, _ = layer.update(k, k * 2)
    out_k2, _ = layer.update(k[:, :, :1] * 3, k[:, :, :1])
    assert layer.slab is None
    out_k2.sum().backward()
    assert torch.equal(k.grad[:, :, :1], torch.full((1, 2, 1, 4), 4.0))
    with torch.no_grad():
        fresh = SlabLayer(TokenSlab(1), 0)
        fresh.update(k, k)
        assert fresh.slab is not None


def test_copy_is_independent_and_dropping_a_cache_frees_its_buffer_without_gc():
    slab = TokenSlab(1, reserve=4)
    layer = SlabLayer(slab, 0)
    k = torch.randn(1, 2, 3, 4)
    layer.update(k, k)
    twin = copy.deepcopy(layer)
    assert twin.slab is not slab and twin.slab.layers == [twin]
    twin.update(k, k)  # grows the copy's buffer (3 + 3 > 4) and moves only the copy's views
    assert twin.keys.shape[2] == 6 and layer.keys.shape[2] == 3 and torch.equal(layer.keys, k)
    assert layer.slab.buf.shape[1] == 4 and twin.slab.buf.shape[1] == 6
    gc.disable()
    try:
        gone = weakref.ref(slab)
        del layer, slab
        assert gone() is None  # no layer <-> slab cycle: a received payload is free for the pool at once
    finally:
        gc.enable()


def test_reset_and_crop_keep_the_buffer():
    layer = SlabLayer(TokenSlab(1), 0)
    k = torch.randn(2, 2, 5, 4)
    layer.update(k, -k)
    layer.crop(-2)
    assert torch.equal(layer.keys, k[:, :, :3]) and torch.equal(layer.values, -k[:, :, :3])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(1)
    layer.reset()
    assert layer.get_seq_length() == 0
    layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.keys.shape == (2, 2, 1, 4) and layer.slab.buf.shape[1] == 5


def test_adopted_rows_are_read_in_place_and_grow_on_write():
    rows = torch.randn(2, 3, 2, 2, 4, 8)  # [B, n, L, 2, H, D]
    layers = adopt_rows(rows)
    assert [layer.get_seq_length() for layer in layers] == [3, 3]
    assert torch.equal(layers[1].values, rows[:, :, 1, 1].transpose(1, 2))
    assert layers[0].keys.data_ptr() == rows.data_ptr()
    k = torch.randn(2, 4, 1, 8)
    layers[0].update(k, k)
    assert layers[0].slab.buf.data_ptr() != rows.data_ptr() and torch.equal(layers[1].keys,
                                                                            rows[:, :, 1, 0].transpose(1, 2))
    with pytest.raises(ValueError, match="rows: expected"):
        adopt_rows(torch.zeros(2, 3, 4))
    fresh = slab_layers(2)  # the empty layers of one slab (a fresh ParallelCache's) take the rows themselves
    assert adopt_rows(rows, fresh) == fresh and fresh[1].keys.data_ptr() == rows[:, :, 1].data_ptr()
    again = adopt_rows(rows, fresh)  # layers already holding tokens are left alone: new ones
    assert all(a is not b for a, b in zip(again, fresh)) and fresh[0].slab.buf is rows


def test_reserve_is_checked():
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="reserve: expected an int >= 0"):
            pskernels.ParallelCache(None, [], reserve=bad)


def test_layer_views_are_views_whatever_the_strides():
    from pskernels.hf.slab import layer_views

    base = torch.randn(2, 5, 3, 2, 4, 8)
    odd = torch.randn(2, 5, 2, 3, 4, 8).transpose(2, 3)  # (L, 2) not mergeable into one dim
    for rows in (base, odd):
        kv = layer_views(rows)
        for l, (k, v) in enumerate(kv):
            assert k.data_ptr() == rows[:, :, l, 0].data_ptr() and v.data_ptr() == rows[:, :, l, 1].data_ptr()
            assert torch.equal(k, rows[:, :, l, 0].transpose(1, 2)) and torch.equal(v, rows[:, :, l, 1].transpose(1, 2))
