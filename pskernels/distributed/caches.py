"""Caches to wire headers + tensors and back: what a sender takes out of a cache, what a receiver builds.

Sent: a worker's zero-copy ``ParallelCache(prefix, [])`` (its own tokens), ``CacheRow`` of one (one row),
an ordinary ``[prefix | branch]`` cache (the tokens after ``prefix_len``; a sliding layer sends the slots it
still stores) or a prefix cache. Built: views into the received payload, no copy:

- a branch whose layers store every slot -> a zero-copy ``ParallelCache(prefix, [])`` holding the branch as
  its own tokens (left padding kept), exactly what the worker had;
- a branch whose sliding layers dropped slots -> an ordinary cache whose layers hold the branch's stored
  slots and report ``P + T`` tokens seen (read by ``ParallelCache`` as a ``[prefix | branch]`` cache);
- a prefix -> a ``DynamicCache`` with the sender's layer classes, an ordinary cache workers run on.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from .._core.integers import int_scalar, int_tensor
from ..hf import CacheRow, ParallelCache
from ..hf.cache import worker_cache
from ..hf.slab import SlabLayer
from . import wire
from .fingerprint import Fingerprint, dtype_code


def _ints(name, x, B):
    t = int_tensor(name, x).cpu().reshape(-1)
    if t.numel() == 1:
        t = t.expand(B)
    if t.numel() != B:
        raise ValueError(f"{name}: expected one int or {B} (one per row), got {t.numel()}")
    return t


def _layer_kv(cache: Cache, l: int):
    layer = cache.layers[l]
    if layer.keys is None or layer.keys.ndim != 4:
        raise ValueError(f"worker_cache: layer {l} holds no keys")
    return layer.keys, layer.values


def _own_rows(c: ParallelCache, n: int):
    """A worker's own tokens as its token-major buffer ``[B, n, L, 2, H, D]``, if every layer is in it."""
    slab = getattr(c.layers[0], "slab", None) if c.layers and isinstance(c.layers[0], SlabLayer) else None
    return slab.rows(n) if slab is not None else None


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def branch_parts(worker_cache, fp: Fingerprint, *, prefix_len=None, length=None, message_bytes=0, views=True):
    """``(header, [(k, v), ...], messages)`` of a branch: its layers' K/V (views of the cache, not copies; None for
    a token-major payload unless ``views``) and the 1-D uint8 tensors that make up its payload, one per
    ``header.ranges()`` entry (pieces cut into parts of at most ``message_bytes``; 0: whole). A worker whose own
    tokens are in one token-major buffer sends a token-major payload: one piece per row, straight from that
    buffer; any other cache a layer-major one (a piece per layer's K and V, copied only where not contiguous)."""
    row = None
    if isinstance(worker_cache, CacheRow):
        worker_cache, row = worker_cache.cache, worker_cache.row
    c = worker_cache
    if not isinstance(c, Cache):
        raise TypeError(f"worker_cache: expected a ParallelCache(prefix, []), a CacheRow or a transformers Cache, "
                        f"got {type(c).__name__}")
    if len(c.layers) != fp.n_layers:
        raise ValueError(f"worker_cache: {len(c.layers)} layers, the model has {fp.n_layers}")
    if isinstance(c, ParallelCache):
        if c.branches:
            raise ValueError("worker_cache: a ParallelCache with branches is a synthesizer's cache, not a worker's")
        if prefix_len is not None and prefix_len != c.prefix_len:
            raise ValueError(f"prefix_len: the worker cache was run on a prefix of {c.prefix_len} tokens, "
                             f"got prefix_len={prefix_len}")
        P, T = c.prefix_len, c.get_seq_length()
        token_rows = _own_rows(c, T)
        if token_rows is not None:
            h, pieces = _token_major(token_rows, c._own_pad, fp, P, T, row, length)
            kv = _token_views(c, h, row) if views else None
            h, messages = cut(h, pieces, message_bytes)
            return h, kv, messages
        kv = [_layer_kv(c, l) for l in range(fp.n_layers)]
        pad = _pads(c._own_pad, kv[0][0].shape[0])
        windows = [0] * fp.n_layers
    else:
        if prefix_len is None:
            raise ValueError("prefix_len: required for an ordinary [prefix | branch] cache (the prefix tokens are "
                             "not sent)")
        if length is not None:
            raise ValueError("length: only for a worker's ParallelCache (an ordinary cache has no padding)")
        P = int_scalar("prefix_len", prefix_len)
        cum = max(layer.get_seq_length() for layer in c.layers)
        T = cum - P
        if T < 0:
            raise ValueError(f"worker_cache: holds {cum} tokens, fewer than prefix_len={P}")
        kv, windows = [], []
        for l in range(fp.n_layers):
            k, v = _layer_kv(c, l)
            first = cum - k.shape[2]  # position of the first stored slot
            if first <= P:
                k, v = k[:, :, P - first:], v[:, :, P - first:]
            kv.append((k, v))
            windows.append(int(getattr(c.layers[l], "sliding_window", 0) or 0) if k.shape[2] < T else 0)
        pad = [0] * kv[0][0].shape[0]
    pad, lens, T = _select(pad, T, row, length)
    if row is not None:
        kv = [(k[row:row + 1], v[row:row + 1]) for k, v in kv]
    if length is not None:
        kv = [(k[:, :, :T], v[:, :, :T]) for k, v in kv]
    for l, (k, _) in enumerate(kv):
        if k.shape[1] != fp.layers[l][0] or k.shape[3] != fp.layers[l][1]:
            _layer_mismatch(l, tuple(k.shape), fp)
    h = wire.Header(wire.BRANCH, Fingerprint(dtype_code(kv[0][0].dtype), fp.layers), len(pad), T, P,
                    tuple(k.shape[2] for k, _ in kv), tuple(windows), tuple(pad), tuple(lens))
    pieces = [_bytes(t) for k, v in kv if k.shape[2] for t in (k, v)]
    h, messages = cut(h, pieces, message_bytes)
    return h, kv, messages


def _pads(own_pad, B: int) -> list:
    """A worker's left pads as ``B`` Python ints (``own_pad``: None, one for every row, or ``[B]``)."""
    pad = own_pad.tolist() if own_pad is not None else [0]
    if len(pad) not in (1, B):
        raise ValueError(f"worker_cache: {len(pad)} left pads for a batch of {B}")
    return pad * B if len(pad) == 1 else pad


def _select(pad: list, T: int, row, length) -> tuple:
    """``(pads, real lengths, slots)`` of the rows sent: row ``row`` alone (None: every row); with ``length``, the
    real tokens per row, and the slots up to the last real token of any row (trailing ones are not sent). Python
    ints, not tensors: this runs before every send, with the caches cold from the last transfer (a small tensor op
    then costs 10-20 us)."""
    if row is not None:
        if not 0 <= row < len(pad):
            raise ValueError(f"worker_cache: row {row} is outside the cache's batch of {len(pad)}")
        pad = pad[row:row + 1]
    lens = [T - p for p in pad]
    if length is not None:
        asked = _ints("length", length, len(pad)).tolist()
        if any(n < 0 or n > T - p for n, p in zip(asked, pad)):
            raise ValueError(f"length: expected per-row values in [0, tokens after the left pad {lens}], got {asked}")
        lens, T = asked, max(p + n for p, n in zip(pad, asked))
    return pad, lens, T


def _layer_mismatch(l: int, shape: tuple, fp: Fingerprint):
    raise ValueError(f"worker_cache: layer {l} keys {shape} do not match the model's {fp.layers[l][0]} kv heads x "
                     f"head dim {fp.layers[l][1]}")


def _token_major(rows: torch.Tensor, own_pad, fp: Fingerprint, P: int, T: int, row, length):
    """``(header, pieces)`` of a worker's token-major buffer ``rows`` ``[B, T, L, 2, H, D]``: one piece per row,
    a view of the buffer."""
    _, _, L, _, H, D = rows.shape
    pad, lens, T = _select(_pads(own_pad, rows.shape[0]), T, row, length)
    if row is not None:
        rows = rows[row:row + 1]
    if length is not None:
        rows = rows[:, :T]
    B = len(pad)
    for l, f in enumerate(fp.layers):  # one buffer: every layer has its shape
        if f[:2] != (H, D):
            _layer_mismatch(l, (B, H, T, D), fp)
    h = wire.Header(wire.BRANCH, Fingerprint(dtype_code(rows.dtype), fp.layers), B, T, P, (T,) * L, (0,) * L,
                    tuple(pad), tuple(lens), wire.TOKEN_MAJOR)
    # each row's slots are contiguous in the buffer (rows lie `capacity` slots apart): a byte view per row
    pieces = list(rows.reshape(B, -1).view(torch.uint8).unbind(0)) if T else []
    return h, pieces


def _token_views(c: ParallelCache, h: wire.Header, row) -> list:
    rows = slice(row, row + 1) if row is not None else slice(None)
    return [(layer.keys[rows, :, :h.tokens], layer.values[rows, :, :h.tokens]) for layer in c.layers]


def cut(h: wire.Header, pieces, message_bytes: int):
    """``(header, messages)``: the payload's pieces cut into parts of at most ``message_bytes`` (0: whole), and the
    header that says so (the receiver follows it)."""
    if not message_bytes:
        return h, list(pieces)
    return dataclasses.replace(h, message_bytes=message_bytes), wire.split(pieces, message_bytes)


def prefix_parts(prefix: Cache, fp: Fingerprint):
    """``(header, [(k, v), ...])`` of a prefix cache (an ordinary cache, e.g. a prefill's ``past_key_values``)."""
    if not isinstance(prefix, Cache) or isinstance(prefix, ParallelCache):
        raise TypeError(f"cache: expected an ordinary transformers Cache (e.g. DynamicCache), got "
                        f"{type(prefix).__name__}")
    if len(prefix.layers) != fp.n_layers:
        raise ValueError(f"cache: {len(prefix.layers)} layers, the model has {fp.n_layers}")
    kv = [_layer_kv(prefix, l) for l in range(fp.n_layers)]
    P = max(layer.get_seq_length() for layer in prefix.layers)
    B = kv[0][0].shape[0]
    windows = tuple(int(getattr(layer, "sliding_window", 0) or 0) if getattr(layer, "is_sliding", False) else 0
                    for layer in prefix.layers)
    h = wire.Header(wire.PREFIX, Fingerprint(dtype_code(kv[0][0].dtype), fp.layers), B, P, P,
                    tuple(k.shape[2] for k, _ in kv), windows, (0,) * B, (P,) * B)
    return h, kv


def _fill(layer, k, v, seen=None):
    if isinstance(layer, DynamicSlidingWindowLayer):
        layer.lazy_initialization(k, v)
    else:  # what lazy_initialization sets, without its two throw-away tensors (30+ layers per received branch)
        layer.device, layer.is_initialized = k.device, True
    layer.keys, layer.values = k, v
    if seen is not None:
        layer.cumulative_length = seen
    return layer


def _layers(h: wire.Header, kv, seen: int):
    return [_fill(DynamicSlidingWindowLayer(w), k, v, seen) if w else _fill(DynamicLayer(), k, v)
            for (k, v), w in zip(kv, h.cache_windows)]


def _ordinary(layers) -> DynamicCache:
    c = DynamicCache()
    c.layers = layers
    return c


def build_branch(h: wire.Header, payload: torch.Tensor, prefix: Cache | None) -> Cache:
    """The received branch as a cache ``ParallelCache(prefix, [branch])`` reads in place (see the module doc): views
    of ``payload`` (a token-major one becomes the worker's own-token buffer as it is)."""
    if h.layout == wire.TOKEN_MAJOR:
        pc = worker_cache(prefix, pad=h.pad, rows=wire.token_rows(h, payload))
    elif all(s == h.tokens for s in h.stored):
        pc = worker_cache(prefix, wire.unpack(h, payload), h.pad)
    else:
        pc = _ordinary(_layers(h, wire.unpack(h, payload), h.prefix_len + h.tokens))
    pc.lengths = torch.tensor(h.lengths, dtype=torch.int64)
    return pc


def build_prefix(h: wire.Header, kv) -> DynamicCache:
    return _ordinary(_layers(h, kv, h.prefix_len))
