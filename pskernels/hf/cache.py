"""``ParallelCache``: a shared prefix + N branch caches, read in place by a patched model.

To Hugging Face it is an ordinary cache of the synthesizer's *own* tokens (``get_seq_length()`` is
0 at the start), so ``generate()`` slices inputs and builds masks as usual. The prefix and branch
tensors are read-only segments handed to :func:`pskernels.multi_branch_attention`; branches are
re-indexed by rotating queries (``position_shifts``), never by rewriting cached keys.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from .._core.devices import host_to_device
from .._core.integers import int_tensor
from .slab import adopt_rows, slab_layers

SCHEMES = ("parallel", "sequential", "right_aligned", "custom")


@dataclass(frozen=True)
class CacheRow:
    """One batch row of a cache, used as a batch-1 branch: e.g. worker ``i`` of a batched worker
    ``generate`` (``ParallelCache(prefix, [])`` run on N rows) becomes ``CacheRow(workers, i)``."""

    cache: Cache
    row: int


@dataclass
class _Branch:
    cache: Cache
    zero_copy: bool  # True: a worker's ParallelCache whose own tokens are the branch
    tokens: int  # branch slots stored per row (after the prefix)
    pad: torch.Tensor  # [B] leading masked slots
    length: torch.Tensor  # [B] real tokens
    row: int | None = None  # take only this batch row of the cache
    skip: torch.Tensor | None = None  # [B] leading real tokens not read (after the padding); None: 0


@dataclass
class _Source:
    """Where one read-only segment (the prefix or a branch) comes from; fixed for the life of a forward."""

    cache: Cache
    kind: str  # "prefix" | "zero_copy" (a worker's own tokens) | "full" (a [prefix | branch] cache)
    tokens: int  # slots per row after the prefix (branches)
    row: int | None  # take only this batch row of the cache
    batch: int | None  # rows the cache stores


@dataclass
class _SourceRows:
    """Per-row metadata of every source, stacked ``[S, B]`` (int64, cpu) so a layout is computed in a few ops."""

    pad: torch.Tensor  # leading masked slots
    length: torch.Tensor  # real tokens
    skip: torch.Tensor  # leading real tokens not read, after the padding
    slot0: torch.Tensor  # original position of the segment's slot 0
    delta: torch.Tensor  # re-indexing shift
    mappable: torch.Tensor  # [S, 1] bool: a branch that a mapper maps (not one of ``exact_branches``)


def _cum_len(cache: Cache) -> int:
    """Tokens the cache has seen (sliding layers may store fewer)."""
    return max((layer.get_seq_length() for layer in cache.layers), default=0)


def _batch(cache: Cache) -> int | None:
    for layer in cache.layers:
        if layer.keys is not None and layer.keys.ndim == 4:
            return layer.keys.shape[0]
    return None


def _rows(name, x, N, B):
    """Per-branch per-row ints: None, [N] ints, [N][B] nested or an [N, B] / [N] tensor -> int64 [N, B] (cpu)."""
    t = int_tensor(name, x).cpu()
    if t.ndim == 1 and t.shape[0] == N:
        t = t[:, None].expand(N, B)
    if t.ndim != 2 or tuple(t.shape) != (N, B):
        raise ValueError(f"{name}: expected [N] = [{N}] or [N, B] = [{N}, {B}] integers, got shape {tuple(t.shape)}")
    return t.clone()


class ParallelCache(Cache):
    """Cache for a synthesizer that reads a shared prefix and N branch caches directly.

    Parameters
    ----------
    prefix : transformers Cache, optional
        Cache of the shared prefix (``P`` tokens, identical for all rows; batch 1 broadcasts).
    branches : sequence of Cache or CacheRow
        Each either a ``DynamicCache`` holding ``[prefix | branch]`` (e.g. ``copy.deepcopy(prefix)``
        extended by the worker), or a zero-copy worker cache: a ``ParallelCache(prefix, [])`` the worker
        ran on, whose own tokens are the branch (the prefix is then stored once). ``CacheRow(cache, i)``
        takes row ``i`` of a batched worker cache as a batch-1 branch (left padding of the worker's
        prompt is honoured).
    scheme : {"parallel", "sequential", "right_aligned", "custom"}
        Virtual position of each branch's first token: ``parallel`` right after the prefix (the
        branches' native positions, exact); ``sequential`` as if concatenated in order;
        ``right_aligned`` all ending at the same position; ``custom`` from ``branch_starts``.
    branch_starts : ``[N]`` or ``[N, B]`` ints, optional
        Virtual first positions (``scheme="custom"`` only).
    query_start : int or ``[B]`` ints, optional
        Virtual position of the synthesizer's first own token; default: the end of the furthest branch.
    branch_lengths : ``[N]`` or ``[N, B]`` ints, optional
        Real tokens of branch ``i`` in row ``b`` (right padding beyond; 0 = row ``b`` has no branch ``i``).
    branch_skip : ``[N]`` or ``[N, B]`` ints, optional
        Leading real tokens of branch ``i`` in row ``b`` that are not read (e.g. replaced by another segment);
        positions are unchanged: the first read token keeps the position it has in the whole branch.
    backend : str
        Kernel backend for the attention (see :func:`pskernels.multi_branch_attention`).
    mapper : pskernels.synthesis.CacheMapper, optional
        Learned calibration of the branch caches: on the first forward every (layer, branch) cache is
        mapped in one :func:`pskernels.map_kv_caches` call (keys re-rotated at their virtual positions),
        and the mapper's per-layer knobs calibrate the branches against the prefix and own tokens.
    exact_branches : sequence of int, optional
        Indices of branches the mapper leaves alone: not mapped, and attended with the prefix and own tokens
        (uncalibrated), e.g. branch parts recomputed in text order, whose K/V are already the text's.
    reserve : int, optional
        Own-token slots (per row) to allocate at the first forward, e.g. a worker's prompt +
        ``max_new_tokens - 1``: no regrowth copy and no spare slots. The own tokens of every layer live in
        one token-major buffer (a row's branch is one contiguous byte range, sent as one message by
        :func:`pskernels.distributed.send_branch`); beyond ``reserve`` it grows by half its size.

    Examples
    --------
    A random two-layer Llama stands in for a real model:

    >>> import torch, pskernels
    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> _ = torch.manual_seed(0)
    >>> model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                                      num_attention_heads=4, num_key_value_heads=2)).eval()
    >>> handle = pskernels.patch_model(model)
    >>> ids = lambda n: torch.randint(0, 64, (1, n))
    >>> with torch.no_grad():
    ...     prefix = model(ids(5), use_cache=True).past_key_values            # shared prefix, computed once
    ...     workers = [pskernels.ParallelCache(prefix, []) for _ in range(3)]  # zero-copy worker caches
    ...     for w in workers:
    ...         _ = model(ids(7), past_key_values=w)                          # each worker's branch
    ...     cache = pskernels.ParallelCache(prefix, workers)
    ...     out = model.generate(ids(4), past_key_values=cache, max_new_tokens=3, do_sample=False)
    >>> out.shape, cache.num_branches
    (torch.Size([1, 7]), 3)
    >>> handle.remove()
    """

    def __init__(self, prefix: Cache | None = None, branches=(), scheme: str = "parallel", branch_starts=None,
                 query_start=None, branch_lengths=None, branch_skip=None, backend: str = "auto", mapper=None,
                 reserve: int | None = None, exact_branches=None):
        if scheme not in SCHEMES:
            raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
        if reserve is not None and (isinstance(reserve, bool) or not isinstance(reserve, int) or reserve < 0):
            raise ValueError(f"reserve: expected an int >= 0 (own-token slots), got {reserve!r}")
        if (branch_starts is not None) != (scheme == "custom"):
            raise ValueError("branch_starts: required with scheme='custom' and only allowed there")
        if prefix is not None and not isinstance(prefix, Cache):
            raise TypeError(f"prefix: expected a transformers Cache or None, got {type(prefix).__name__}")
        if isinstance(prefix, ParallelCache):
            raise TypeError("prefix: expected an ordinary cache (e.g. DynamicCache), got a ParallelCache")
        if isinstance(branches, Cache) or not hasattr(branches, "__iter__"):
            raise TypeError(f"branches: expected a sequence of caches (e.g. [worker_cache]), got "
                            f"{type(branches).__name__}")
        branches = list(branches)
        rows = [None] * len(branches)
        for i, c in enumerate(branches):
            if isinstance(c, CacheRow):
                rows[i], c = c.row, c.cache
                branches[i] = c
                B_c = _batch(c)
                if B_c is not None and not 0 <= rows[i] < B_c:
                    raise ValueError(f"branches[{i}]: row {rows[i]} is outside the cache's batch of {B_c}")
            if not isinstance(c, Cache):
                raise TypeError(f"branches[{i}]: expected a transformers Cache, got {type(c).__name__}")
            if isinstance(c, ParallelCache) and c.branches:
                raise ValueError(f"branches[{i}]: a ParallelCache used as a branch must have no branches of its own")
        sources = ([prefix] if prefix is not None else []) + branches
        n_layers = {len(c.layers) for c in sources if not isinstance(c, ParallelCache) or c.layers}
        if len(n_layers) > 1:
            raise ValueError(f"branches: caches come from models with different layer counts {sorted(n_layers)}")
        NL = n_layers.pop() if n_layers else 0
        batches = {b for b in (_batch(c) for c in sources[:len(sources) - len(branches)]) if b is not None}
        batches |= {1 if r is not None else b for r, b in zip(rows, (_batch(c) for c in branches)) if b is not None}
        if len(batches - {1}) > 1:
            raise ValueError(f"branches: batch sizes {sorted(batches)} differ (each cache must have B or 1 rows)")
        B = max(batches) if batches else 1
        self.batch = B
        self.backend = backend
        self.mapper = mapper
        self._mapped = None  # [layer] -> {branch: (k, v)} once the mapper ran (exact branches are not mapped)
        self.prefix = prefix
        self.prefix_len = P = _cum_len(prefix) if prefix is not None else 0
        self.scheme = scheme

        self.branches: list[_Branch] = []
        for i, c in enumerate(branches):
            if isinstance(c, ParallelCache):
                if c.prefix_len != P:
                    raise ValueError(f"branches[{i}]: worker cache was run on a prefix of {c.prefix_len} tokens, "
                                     f"expected {P}")
                tokens = c.get_seq_length()
                pad = c._own_pad if c._own_pad is not None else torch.zeros(1, dtype=torch.int64)
                if rows[i] is not None and pad.numel() > 1:
                    pad = pad[rows[i]]
                pad = pad.expand(B).clone()
                self.branches.append(_Branch(c, True, tokens, pad, tokens - pad, rows[i]))
            else:
                tokens = _cum_len(c) - P
                if tokens < 0:
                    raise ValueError(f"branches[{i}]: holds {_cum_len(c)} tokens, fewer than the prefix's {P}; "
                                     "expected [prefix | branch]")
                z = torch.zeros(B, dtype=torch.int64)
                self.branches.append(_Branch(c, False, tokens, z, z + tokens, rows[i]))
        N = len(self.branches)
        exact = list(exact_branches) if exact_branches is not None else []
        if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < N for i in exact):
            raise ValueError(f"exact_branches: expected branch indices in [0, {N}), got {exact_branches!r}")
        self.exact_branches = frozenset(exact)
        self._mapped_branches = [i for i in range(N) if i not in self.exact_branches]  # what a mapper maps
        if branch_lengths is not None:
            lens = _rows("branch_lengths", branch_lengths, N, B)
            for i, br in enumerate(self.branches):
                if (lens[i] < 0).any() or (lens[i] > br.tokens - br.pad).any():
                    raise ValueError(f"branch_lengths[{i}]: expected values in [0, {br.tokens}] (tokens stored after "
                                     f"the prefix), got {lens[i].tolist()}")
                br.length = lens[i]
        if branch_skip is not None:
            skips = _rows("branch_skip", branch_skip, N, B)
            for i, br in enumerate(self.branches):
                if (skips[i] < 0).any() or (skips[i] > br.length).any():
                    raise ValueError(f"branch_skip[{i}]: expected values in [0, branch length {br.length.tolist()}], "
                                     f"got {skips[i].tolist()}")
                br.skip = skips[i]
        lens = torch.stack([br.length for br in self.branches]) if N else torch.zeros(0, B, dtype=torch.int64)

        if not N and scheme != "custom":  # a worker's cache: no branch to place (a tensor op costs ~10 us here)
            first = lens
        elif scheme == "parallel":
            first = torch.full((N, B), P, dtype=torch.int64)
        elif scheme == "sequential":
            first = P + torch.cumsum(lens, 0) - lens
        elif scheme == "right_aligned":
            first = P + lens.amax(0, keepdim=True) - lens if N else lens
        else:
            first = _rows("branch_starts", branch_starts, N, B)
            if (first < 0).any():
                raise ValueError(f"branch_starts: expected non-negative positions, got {first.tolist()}")
        self.branch_first = first  # [N, B] virtual position of each branch's first real token
        self.deltas = first - P  # [N, B] re-indexing shift of each branch
        if query_start is None and not N:
            qs = torch.full((B,), P, dtype=torch.int64)
        elif query_start is None:
            qs = torch.where(lens > 0, first + lens, torch.full_like(first, P)).amax(0)
        else:
            qs = int_tensor("query_start", query_start).cpu().expand(B).clone()
            if (qs < 0).any():
                raise ValueError(f"query_start: expected non-negative positions, got {qs.tolist()}")
        self.query_start = qs  # [B]

        self._own_pad: torch.Tensor | None = None
        self._sources: list[_Source] | None = None  # built on the first forward, for the batch it runs with
        self._source_rows: _SourceRows | None = None
        self._reshaped: list[int] = []  # indices of the sources that need a view per layer (see _views)
        self._active = None  # per-forward state set by the patched model's pre-hook
        if NL:  # own tokens token-major in one buffer: a worker's branch is one contiguous range per row
            super().__init__(layers=slab_layers(NL, reserve or 0))
        else:
            super().__init__(layer_class_to_replicate=DynamicLayer)

    # ---- what HF sees: a cache of the synthesizer's own tokens --------------------------------------
    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self._active is None:
            raise RuntimeError(
                "ParallelCache was given to a model that is not patched (its branches would be silently ignored): "
                "call pskernels.patch_model(model) first"
            )
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("ParallelCache does not support beam search / num_return_sequences > 1 yet")

    def batch_select_indices(self, indices):
        raise NotImplementedError("ParallelCache does not support beam search yet")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("ParallelCache does not support beam search yet")

    @property
    def num_branches(self) -> int:
        return len(self.branches)

    # ---- per-forward state (called by the pre-hook of a patched model) --------------------------------
    def _broadcast(self, B: int) -> None:
        self.batch = B
        self.query_start = self.query_start.expand(B).clone()
        self.branch_first = self.branch_first.expand(-1, B).clone()
        self.deltas = self.deltas.expand(-1, B).clone()
        for br in self.branches:
            br.pad, br.length = br.pad.expand(B).clone(), br.length.expand(B).clone()
            if br.skip is not None:
                br.skip = br.skip.expand(B).clone()
        self._sources = None

    def begin_forward(self, batch: int, q_len: int, attention_mask, position_ids, device) -> torch.Tensor:
        """Record own-stream padding and return virtual ``position_ids [B, q_len]``."""
        own = self.get_seq_length()
        if batch != self.batch:
            if self.batch != 1 or own > 0:
                raise ValueError(f"input_ids: batch {batch} does not match the ParallelCache's batch {self.batch}")
            self._broadcast(batch)  # every source has one row: share it across the batch (zero-copy)
        B = self.batch
        if attention_mask is not None and attention_mask.ndim == 2:
            m = attention_mask.to("cpu").bool()
            if tuple(m.shape) != (B, own + q_len):
                raise ValueError(f"attention_mask: expected a 2-D mask [B, own tokens + new] = [{B}, {own + q_len}] "
                                 f"(the ParallelCache holds {own} own tokens), got {tuple(m.shape)}")
            pad = (~m).int().cumprod(1).sum(1).to(torch.int64)  # leading zeros per row
            if not bool((m == (torch.arange(m.shape[1])[None] >= pad[:, None])).all()):
                raise ValueError("attention_mask: with a ParallelCache only left padding is supported "
                                 "(each row must be 0...0 1...1)")
            if self._own_pad is not None and own > 0 and not torch.equal(pad, self._own_pad):
                raise ValueError(f"attention_mask: left padding changed between calls ({self._own_pad.tolist()} -> "
                                 f"{pad.tolist()})")
            self._own_pad = pad
        elif attention_mask is not None:
            raise ValueError("attention_mask: a ParallelCache builds its own masks; pass a 2-D padding mask or None, "
                             f"got shape {tuple(attention_mask.shape)}")
        elif self._own_pad is None:
            self._own_pad = torch.zeros(B, dtype=torch.int64)
        pad = self._own_pad
        if position_ids is None:
            rel = (torch.arange(own, own + q_len)[None, :] - pad[:, None]).clamp_min(0)
        else:
            rel = position_ids.to("cpu", torch.int64).expand(B, q_len)
        vpos = rel + self.query_start[:, None]
        if self._sources is None:
            self._build_sources()
        self._active = {"vpos": host_to_device(vpos, device, "ParallelCache.begin_forward"), "vpos_cpu": vpos,
                        "own_before": own, "q_len": q_len, "meta": {}, "plans": {}}
        return self._active["vpos"]

    def end_forward(self):
        self._active = None

    @property
    def plans(self) -> dict:
        """Per-forward store of attention plans, keyed by segment layout (see attention.py)."""
        return self._active["plans"]

    # ---- segments of one layer (called by the attention function) -------------------------------------
    def _build_sources(self) -> None:
        """Sources, their stacked per-row metadata and the indices of those that need a view per layer."""
        B, P = self.batch, self.prefix_len
        sources, pad, length, skip, delta = [], [], [], [], []
        if self.prefix is not None and P > 0:
            sources.append(_Source(self.prefix, "prefix", 0, None, _batch(self.prefix)))
            pad.append(torch.zeros(B, dtype=torch.int64))
            length.append(torch.full((B,), P, dtype=torch.int64))
            skip.append(torch.zeros(B, dtype=torch.int64))
            delta.append(torch.zeros(1, B, dtype=torch.int64))
        first = len(sources)
        for br in self.branches:
            sources.append(_Source(br.cache, "zero_copy" if br.zero_copy else "full", br.tokens, br.row,
                                   _batch(br.cache)))
            pad.append(br.pad)
            length.append(br.length)
            skip.append(br.skip if br.skip is not None else torch.zeros(B, dtype=torch.int64))
        pad_t = torch.stack(pad) if pad else torch.zeros(0, B, dtype=torch.int64)
        is_branch = torch.arange(len(sources))[:, None] >= first
        mappable = is_branch.clone()
        mappable[[first + i for i in self.exact_branches]] = False
        rows = _SourceRows(pad=pad_t, length=torch.stack(length) if length else pad_t,
                           skip=torch.stack(skip) if skip else pad_t,
                           slot0=torch.where(is_branch, P - pad_t, 0), delta=torch.cat([*delta, self.deltas]),
                           mappable=mappable)
        self._sources, self._source_rows = sources, rows
        # every source but a zero-copy branch stored with the synthesizer's batch needs a view per layer
        self._reshaped = [i for i, src in enumerate(sources)
                          if src.kind != "zero_copy" or src.row is not None or src.batch != B]

    def _views(self, layer_idx: int):
        """Keys, values, ``off`` (slots dropped from the front by a sliding layer) and stored length of the
        prefix and the branches at ``layer_idx``.

        Runs once per layer over every segment, so the common case (a zero-copy branch stored with the
        synthesizer's batch) costs two attribute reads; only the other sources get a slice, a row view or a
        broadcast.
        """
        B, P = self.batch, self.prefix_len
        layers = [src.cache.layers[layer_idx] for src in self._sources]
        keys, values = [layer.keys for layer in layers], [layer.values for layer in layers]
        offs = [0] * len(keys)
        try:
            stored = [k.shape[2] for k in keys]
        except (AttributeError, IndexError):  # a layer that holds no keys (None, or an empty placeholder)
            i = next(i for i, k in enumerate(keys) if k is None or k.ndim < 4)
            name = "prefix" if self._sources[i].kind == "prefix" else f"branches[{i + len(self.branches) - len(keys)}]"
            raise ValueError(f"{name}: layer {layer_idx} holds no keys") from None
        for i in self._reshaped:
            src, k, v = self._sources[i], keys[i], values[i]
            if src.kind == "prefix":
                offs[i] = P - stored[i]
            elif src.kind == "full":
                first_stored = P + src.tokens - stored[i]
                if first_stored <= P:
                    k, v = k[:, :, P - first_stored:], v[:, :, P - first_stored:]
                    stored[i] = k.shape[2]
                else:
                    offs[i] = first_stored - P
            if src.row is not None:
                k, v = k[src.row : src.row + 1], v[src.row : src.row + 1]
            if k.shape[0] != B:
                k, v = k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1)
            keys[i], values[i] = k, v
        return keys, values, offs, stored

    def _map_branches(self, rope_of) -> None:
        """Run the mapper once over all (layer, branch) caches but the exact branches; one map_kv_caches call per
        distinct RoPE."""
        NL = len(self.layers)
        first = len(self._sources) - len(self.branches)
        rows = self._source_rows
        mapped = self._mapped_branches
        at = [first + i for i in mapped]
        self._mapped = [{} for _ in range(NL)]
        if not mapped:
            return
        by_rope = {}
        for l in range(NL):
            spec = rope_of(l)
            key = (spec.style, spec.rotary_dim, tuple(spec.inv_freq.tolist()))
            by_rope.setdefault(key, (spec, []))[1].append(l)
        for spec, layers in by_rope.values():
            views = [self._views(l) for l in layers]
            keys = [[ks[s] for s in at] for ks, _, _, _ in views]
            values = [[vs[s] for s in at] for _, vs, _, _ in views]
            # [nl, n, B] original and new position of each mapped branch's slot 0
            orig = torch.stack([rows.slot0[at] + torch.tensor(offs)[at][:, None] for _, _, offs, _ in views])
            new = orig + rows.delta[at]
            ko, vo = self.mapper.map(keys, values, orig, new, spec, layers=layers)
            for j, l in enumerate(layers):
                self._mapped[l] = dict(zip(mapped, zip(ko[j], vo[j])))

    def segments(self, layer_idx: int, own_k: torch.Tensor, own_v: torch.Tensor, sliding_window: int | None,
                 rope_of=None):
        """Keys, values and keyword arguments of :func:`multi_branch_attention` for this layer's
        [prefix, branches, own], plus a layout key shared by the layers whose arguments are identical but for a
        mapper's per-layer calibration knobs (``temperature``, ``lse_scale``, ``log_weight``, given per run)."""
        st = self._active
        keys, values, offs, stored = self._views(layer_idx)
        first = len(keys) - len(self.branches)
        if self.mapper is not None and self.branches:
            if self._mapped is None:
                self._map_branches(rope_of)
            for i, (k, v) in self._mapped[layer_idx].items():
                keys[first + i], values[first + i] = k, v
        sig = (tuple(stored), tuple(offs), own_k.shape[2], sliding_window)
        meta = st["meta"].get(sig)
        if meta is None:
            meta = self._segment_meta(stored, offs, own_k.shape[2], sliding_window, layer_idx)
            st["meta"][sig] = meta
        keys.append(own_k)
        values.append(own_v)
        if self.mapper is not None:
            knobs = self.mapper.knobs(layer_idx, own_k.device)
            if knobs and self._mapped_branches:
                groups = [0] * first + [int(i not in self.exact_branches) for i in range(len(self.branches))] + [0]
                # the knobs differ per layer, the layout does not: one plan, calibrated per run
                return keys, values, dict(meta, segment_groups=groups, **knobs), (sig, "calibrated")
        return keys, values, meta, sig

    def _segment_meta(self, stored, offs, own_len, window, layer_idx):
        """seq_lens, left_pad, shifts (and window positions) of one layout, all sources at once ([S, B] ops)."""
        B = self.batch
        rows = self._source_rows
        L = torch.tensor(stored, dtype=torch.int64)[:, None]
        off = torch.tensor(offs, dtype=torch.int64)[:, None]
        end = (rows.pad + rows.length - off).clamp(min=0).minimum(L)
        pads = (rows.pad + rows.skip - off).clamp(min=0).minimum(end)
        pos0 = rows.slot0 + off + rows.delta
        mapped = rows.mappable if self._mapped is not None else torch.zeros_like(rows.mappable)
        shifts = torch.where(mapped, 0, rows.delta)  # mapped keys were already re-rotated at their new positions
        if window is not None and any(offs):
            qmin = self._active["vpos_cpu"].amin(1)  # [B]
            dropped = (off > 0) & (off > rows.pad + rows.skip) & (rows.length > rows.skip) & (pos0 - 1 > qmin - window)
            if bool(dropped.any()):
                raise ValueError(
                    f"ParallelCache: layer {layer_idx} is a sliding-window layer whose cache already dropped "
                    f"tokens that the re-indexed queries would need (window {window}); use scheme='parallel' or "
                    "caches that keep the full window"
                )
        pad_own = self._own_pad
        shifts_t = torch.cat([shifts, torch.zeros(1, B, dtype=torch.int64)])
        # The tables stay on the host: the plan checks them there and copies them to the device without waiting
        # for it (on the device, its checks would each cost a device-to-host copy).
        meta = {
            "seq_lens": torch.cat([end, torch.full((1, B), own_len, dtype=torch.int64)]),
            "left_pad": torch.cat([pads, pad_own[None]]),
            "position_shifts": shifts_t if bool((shifts_t != 0).any()) else None,
        }
        if window is not None:
            meta["sliding_window"] = window
            meta["segment_positions"] = torch.cat([pos0, (self.query_start - pad_own)[None]])
            meta["query_positions"] = self._active["vpos_cpu"]
        return meta


def worker_cache(prefix: Cache | None, kv=None, pad=None, rows=None) -> ParallelCache:
    """A worker's zero-copy cache ``ParallelCache(prefix, [])`` whose own tokens are the given per-layer
    ``kv`` (``[(keys, values)]``, each ``[B, kv_heads, S, head_dim]``, keys rotated at positions ``P + slot``),
    held in place (no copy), as if the worker had run them. ``pad``: ``[B]`` leading masked slots (default 0).
    ``rows``: instead of ``kv``, one token-major buffer ``[B, S, L, 2, kv_heads, head_dim]`` (how a
    ``ParallelCache`` stores its own tokens), adopted as it is."""
    if (kv is None) == (rows is None):
        raise ValueError("worker_cache: expected either kv or rows")
    pc = ParallelCache(prefix, [])
    if rows is not None:
        layers = adopt_rows(rows, pc.layers)
    else:
        layers = []
        for k, v in kv:
            layer = DynamicLayer()
            # what lazy_initialization sets, without its two throw-away tensors
            layer.device, layer.is_initialized, layer.keys, layer.values = k.device, True, k, v
            layers.append(layer)
    pc.layers = layers
    pc.batch = layers[0].keys.shape[0] if layers else 1
    pc._own_pad = (torch.zeros(pc.batch, dtype=torch.int64) if pad is None
                   else torch.as_tensor(pad, dtype=torch.int64).clone())
    return pc
