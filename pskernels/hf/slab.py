"""Own tokens of a ``ParallelCache`` in one token-major buffer shared by every layer.

The buffer is ``[B, capacity, L, 2, kv_heads, head_dim]``: the first ``n`` slots of a row, every layer's keys and
values, are one contiguous byte range. A worker's branch therefore leaves its process as one piece per row
(:func:`pskernels.distributed.send_branch`), with no packing copy, cut into messages of whatever size the
transport moves best, where a per-layer cache takes ``2 L`` pieces (gloo pays ~30 us per message: 60 of them
cost a 256-token SmolLM2 branch ~1 ms). Layer ``l``'s keys and values are strided views
``[B, kv_heads, n, head_dim]`` with ``stride(-1) == 1``, which every kernel reads as they are.

The first write allocates ``max(reserve, tokens)`` slots; growing adds half the capacity (one copy of the slots
written), so a decode step writes its token in place where a ``DynamicLayer`` concatenates the layer's whole
cache. A caller that knows its budget (prompt + ``max_new_tokens - 1``) reserves it: no copy, no spare slots.

A layer whose shape, dtype or device differs from the buffer's (a model whose layers differ), or whose tokens
carry gradients (training, or a forward outside ``torch.no_grad()``), leaves it and stores its tokens as a
``DynamicLayer`` does; such a cache is sent layer-major.
"""
from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import DynamicLayer


class TokenSlab:
    """The buffer behind the :class:`SlabLayer` s of one cache (allocated by the first layer that stores tokens)."""

    def __init__(self, n_layers: int, reserve: int = 0):
        self.n_layers, self.reserve_slots = n_layers, reserve
        self.buf: torch.Tensor | None = None  # [B, capacity, L, 2, kv_heads, head_dim]
        # weak: a layer -> slab -> layer cycle would keep a dropped cache's buffer (e.g. a received payload that
        # the payload pool waits to reuse) alive until the garbage collector runs
        self._layers: list[weakref.ref] = []

    @property
    def layers(self) -> list:
        return [layer for layer in (r() for r in self._layers) if layer is not None]

    def __getstate__(self):  # copy / pickle: the layers register themselves again (SlabLayer.__setstate__)
        return {k: v for k, v in self.__dict__.items() if k != "_layers"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._layers = []

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[1]

    def fits(self, k: torch.Tensor, v: torch.Tensor) -> bool:
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            return False  # in-place writes into a shared buffer would invalidate the views autograd saved
        if k.ndim != 4 or v.shape != k.shape or v.dtype != k.dtype or v.device != k.device:
            return False
        if self.buf is None:
            return True
        B, _, _, _, H, D = self.buf.shape
        return (k.shape[0], k.shape[1], k.shape[3]) == (B, H, D) and k.dtype == self.buf.dtype \
            and k.device == self.buf.device

    def reserve(self, n: int, like: torch.Tensor) -> None:
        """Room for ``n`` slots per row; a larger buffer takes the written slots and every layer's views move to it."""
        if n <= self.capacity:
            return
        B, H, _, D = like.shape
        cap = max(n, self.reserve_slots if self.buf is None else self.capacity + self.capacity // 2)
        new = torch.empty(B, cap, self.n_layers, 2, H, D, dtype=like.dtype, device=like.device)
        layers = self.layers
        written = max((layer.length for layer in layers if layer.slab is self), default=0)
        if written:
            new[:, :written].copy_(self.buf[:, :written])
        self.buf = new
        self.point([layer for layer in layers if layer.slab is self])

    def views(self, l: int, n: int) -> tuple:
        kv = self.buf[:, :n, l]  # [B, n, 2, H, D]
        return kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)

    def point(self, layers) -> None:
        """Set ``layers``' keys/values to their slots in the buffer (all layers of the same length at once)."""
        by_len = {}
        for layer in layers:
            by_len.setdefault(layer.length, []).append(layer)
        for n, group in by_len.items():
            if n and len(group) > 1:
                kv = layer_views(self.buf[:, :n])
                for layer in group:
                    layer.keys, layer.values = kv[layer.index]
            elif n:
                group[0].keys, group[0].values = self.views(group[0].index, n)

    def rows(self, n: int):
        """The buffer's first ``n`` slots of every row, ``[B, n, L, 2, H, D]``, if every layer stores exactly ``n``
        there (else None: a layer left the buffer, or the layers hold different lengths)."""
        if self.buf is None or n > self.capacity:
            return None
        layers = self.layers
        if len(layers) != self.n_layers or any(layer.slab is not self or layer.length != n for layer in layers):
            return None
        return self.buf[:, :n]


class SlabLayer(DynamicLayer):
    """One layer's own tokens: a view of its slots in the cache's :class:`TokenSlab`."""

    def __init__(self, slab: TokenSlab, index: int):
        super().__init__()
        self.slab: TokenSlab | None = slab
        self.index, self.length = index, 0
        slab._layers.append(weakref.ref(self))

    def __setstate__(self, state):
        self.__dict__.update(state)
        if self.slab is not None:
            self.slab._layers.append(weakref.ref(self))

    def lazy_initialization(self, key_states, value_states) -> None:
        if self.slab is None:
            return super().lazy_initialization(key_states, value_states)
        self.device, self.is_initialized = key_states.device, True

    def _leave(self) -> None:
        """Store this layer's tokens on their own from now on (a copy of the slots written)."""
        if self.length:
            self.keys, self.values = self.keys.contiguous(), self.values.contiguous()
        elif self.is_initialized:
            self.keys = self.values = None
            self.is_initialized = False
        self.slab = None

    def update(self, key_states, value_states, *args, **kwargs):
        if self.slab is not None and not self.slab.fits(key_states, value_states):
            self._leave()
        if self.slab is None:
            return super().update(key_states, value_states, *args, **kwargs)
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n0, n = self.length, self.length + key_states.shape[2]
        self.slab.reserve(n, key_states)
        dst = self.slab.buf[:, n0:n, self.index]  # [B, q, 2, H, D]
        dst[:, :, 0].copy_(key_states.transpose(1, 2))
        dst[:, :, 1].copy_(value_states.transpose(1, 2))
        self.length = n
        self.keys, self.values = self.slab.views(self.index, n)
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        if self.slab is None:
            return super().crop(tokens_to_remove)
        if tokens_to_remove > 0:
            raise ValueError(f"crop: expected a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.length:
            return
        self.length = max(0, self.length + tokens_to_remove)
        self.keys, self.values = self.slab.views(self.index, self.length)

    def reset(self) -> None:
        self.length = 0
        super().reset()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.slab is not None:
            self._leave()
        super().batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices) -> None:
        if self.slab is not None:
            self._leave()
        super().batch_select_indices(indices)


def adopt_rows(rows: torch.Tensor, layers=None) -> list:
    """:class:`SlabLayer` s over an existing token-major buffer ``[B, n, L, 2, kv_heads, head_dim]`` (e.g. a received
    branch), each holding its ``n`` slots in place; a later write beyond ``n`` moves them to a larger buffer.
    ``layers``: the ``L`` empty layers of one slab to hold them (e.g. a fresh ``ParallelCache``'s), else new ones."""
    if rows.ndim != 6 or rows.shape[3] != 2 or (rows.shape[-1] > 1 and rows.stride(-1) != 1):
        raise ValueError(f"rows: expected a [B, n, L, 2, kv_heads, head_dim] buffer with stride(-1) == 1, got shape "
                         f"{tuple(rows.shape)} strides {rows.stride()}")
    slab = layers[0].slab if layers else None
    if not (slab is not None and slab.buf is None and len(layers) == slab.n_layers == rows.shape[2]
            and all(isinstance(layer, SlabLayer) and layer.slab is slab and layer.index == l
                    for l, layer in enumerate(layers))):
        slab = TokenSlab(rows.shape[2])
        layers = [SlabLayer(slab, l) for l in range(rows.shape[2])]
    slab.buf = rows
    for layer in layers:
        layer.device, layer.is_initialized, layer.length = rows.device, True, rows.shape[1]
    slab.point(layers)
    return layers


def layer_views(rows: torch.Tensor) -> list:
    """``[(keys, values)]`` of every layer of a token-major ``[B, n, L, 2, H, D]`` buffer, each ``[B, H, n, D]``
    (strided views; one ``unbind`` for all of them)."""
    x = rows.permute(2, 3, 0, 4, 1, 5)  # [L, 2, B, H, n, D]
    if rows.stride(2) == 2 * rows.stride(3):  # (L, 2) merge into one dim of views, as in every buffer made here
        kv = x.flatten(0, 1).unbind(0)
        return list(zip(kv[0::2], kv[1::2]))
    return [tuple(layer.unbind(0)) for layer in x.unbind(0)]


def slab_layers(n_layers: int, reserve: int = 0) -> list:
    """``n_layers`` :class:`SlabLayer` s sharing one fresh :class:`TokenSlab` (``reserve`` slots at its first write)."""
    slab = TokenSlab(n_layers, reserve)
    return [SlabLayer(slab, l) for l in range(n_layers)]
