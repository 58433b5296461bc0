"""The wire format of one cache message: an int64 header and ONE contiguous byte payload.

No processes: :func:`encode` / :func:`decode` turn a :class:`Header` into bytes and back (every
size and range checked before anything is allocated), :func:`pack` copies the layers' keys and values into one
payload, :func:`unpack` returns per-layer views into a received payload (no copy).

Header (int64, little endian as torch stores it; ``F = 9`` fields per layer)::

    [0] MAGIC  [1] VERSION  [2] header length (int64 count)  [3] kind (0 prefix, 1 branch)  [4] dtype code
    [5] layers L  [6] rows B  [7] tokens T (slots per row after the prefix; P for a prefix)
    [8] prefix length P  [9] payload bytes  [10] layout (0 layer-major, 1 token-major)
    [11] message bytes M (0: one message per K/V piece or row; else each cut into messages of at most M bytes)
    [12 + F*l ...] layer l: kv heads, head dim, sliding window, rotary dim, rope type, rope theta (f64 bits),
                   rope crc, stored slots S_l, cache window (0: the layer stores every slot)
    [12 + F*L ...] B left pads, then B real lengths

Payload, in the header's dtype:

- layer-major: for l in 0..L-1: K_l then V_l, each ``[B, kv_heads_l, S_l, head_dim_l]`` contiguous. A layer
  stores the LAST ``S_l`` of its ``T`` slots (a sliding layer of an ordinary cache drops the oldest). Its pieces
  are the ``2 L`` K and V, each straight from its cache tensor.
- token-major: ``[B, T, L, 2, kv_heads, head_dim]``, every layer alike and storing all ``T`` slots: how a
  ``ParallelCache`` stores its own tokens (:mod:`pskernels.hf.slab`), so a row is ONE piece straight from the
  worker's buffer, cut into messages of any size. Layer ``l``'s keys are the strided view
  ``[:, :, l, 0].transpose(1, 2)``.
"""
from __future__ import annotations

from array import array
from dataclasses import dataclass

import torch

from ..hf.slab import layer_views
from .fingerprint import DTYPES, LAYER_FIELDS, Fingerprint, dtype_of

MAGIC = 0x5053_4B56  # "PSKV"
VERSION = 2
PREFIX, BRANCH = 0, 1
KINDS = {PREFIX: "prefix", BRANCH: "branch"}
LAYER_MAJOR, TOKEN_MAJOR = 0, 1
LAYOUTS = {LAYER_MAJOR: "layer-major", TOKEN_MAJOR: "token-major"}
_FIXED = 12
_ELEMENT_SIZE = tuple(torch.empty(0, dtype=d).element_size() for d in DTYPES)
_F = len(LAYER_FIELDS) + 2
MAX_LAYERS, MAX_ROWS, MAX_TOKENS, MAX_DIM = 1 << 12, 1 << 16, 1 << 31, 1 << 16


@dataclass(frozen=True)
class Header:
    kind: int
    fingerprint: Fingerprint
    rows: int
    tokens: int
    prefix_len: int
    stored: tuple  # [L] slots each layer stores (the last S_l of T)
    cache_windows: tuple  # [L] 0, or the window of a sliding cache layer
    pad: tuple  # [B] leading masked slots per row
    lengths: tuple  # [B] real tokens per row
    layout: int = LAYER_MAJOR
    message_bytes: int = 0
    version: int = VERSION  # decoded: the sender's; encode() always writes this module's VERSION

    @property
    def dtype(self) -> torch.dtype:
        return dtype_of(self.fingerprint.dtype)

    def layer_shape(self, l: int) -> tuple:
        kv, hd = self.fingerprint.layers[l][:2]
        return (self.rows, kv, self.stored[l], hd)

    @property
    def element_size(self) -> int:
        return _ELEMENT_SIZE[self.fingerprint.dtype]

    @property
    def payload_bytes(self) -> int:
        if self.layout == TOKEN_MAJOR:  # every layer alike, storing all T slots
            kv, hd = self.fingerprint.layers[0][:2]
            return self.element_size * self.rows * self.tokens * len(self.stored) * 2 * kv * hd
        return self.layer_offsets()[-1][2] if self.stored else 0

    def layer_offsets(self) -> tuple:
        """Byte offsets ``(k0, v0, end)`` of each layer's K and V in the payload (computed once per header)."""
        cached = self.__dict__.get("_offsets")
        if cached is None:
            el, off, out = self.element_size, 0, []
            for (kv, hd, *_), s in zip(self.fingerprint.layers, self.stored):
                n = el * self.rows * kv * s * hd
                out.append((off, off + n, off + 2 * n))
                off += 2 * n
            cached = tuple(out)
            object.__setattr__(self, "_offsets", cached)  # frozen dataclass: a memo, not a field
        return cached

    def pieces(self) -> list:
        """``[(start, end), ...]``: the payload's contiguous pieces in the sender's cache, back to back: every
        non-empty K and V of a layer-major payload, every non-empty row of a token-major one."""
        if self.layout == TOKEN_MAJOR:
            row = self.payload_bytes // self.rows
            return [(b * row, (b + 1) * row) for b in range(self.rows)] if row else []
        return [r for k0, v0, end in self.layer_offsets() if v0 > k0 for r in ((k0, v0), (v0, end))]

    def ranges(self) -> list:
        """``[(start, end), ...]``: the payload's messages, back to back: each piece, cut into parts of at most
        ``message_bytes``. The transport moves each straight from the sender's cache into its place in the
        receiver's one buffer (see :mod:`.transport`); :func:`split` cuts the sender's pieces alike."""
        m = self.message_bytes
        if not m:
            return self.pieces()
        return [(a, min(a + m, b)) for a0, b in self.pieces() for a in range(a0, b, m)]


def encode(h: Header) -> bytes:
    vals = [MAGIC, VERSION, 0, h.kind, h.fingerprint.dtype, h.fingerprint.n_layers, h.rows, h.tokens,
            h.prefix_len, h.payload_bytes, h.layout, h.message_bytes]
    for layer, s, w in zip(h.fingerprint.layers, h.stored, h.cache_windows):
        vals += [*layer, s, w]
    vals += [*h.pad, *h.lengths]
    vals[2] = len(vals)
    return array("q", vals).tobytes()


def _fail(msg: str):
    raise ValueError(f"wire header: {msg}")


def decode(data: bytes) -> Header:
    """Parse and check a header; raises ValueError naming what is wrong (nothing is allocated from it here)."""
    if not (len(data) % 8 == 0 and len(data) >= 8 * _FIXED):
        _fail(f"expected a multiple of 8 bytes >= {8 * _FIXED}, got {len(data)}")
    v = array("q", data).tolist()
    if v[0] != MAGIC:
        _fail(f"bad magic {v[0]:#x} (expected {MAGIC:#x}): not a pskernels cache message")
    if v[1] != VERSION:
        raise ValueError(f"format version: sender {v[1]}, receiver {VERSION}")
    hlen, kind, dtype, L, B, T, P, nbytes, layout, message_bytes = v[2:_FIXED]
    # each message is formatted only on failure: decode is on every branch's critical path
    if kind not in KINDS:
        _fail(f"kind {kind} is not one of {sorted(KINDS)}")
    if layout not in LAYOUTS:
        _fail(f"layout {layout} is not one of {sorted(LAYOUTS)}")
    if not (message_bytes == 0 or 1 << 12 <= message_bytes <= 1 << 40):
        _fail(f"message bytes {message_bytes} outside 0 or [4096, 2^40]")
    if dtype_of(dtype) is dtype:
        _fail(f"unknown dtype code {dtype}")
    if not 1 <= L <= MAX_LAYERS:
        _fail(f"layer count {L} outside [1, {MAX_LAYERS}]")
    if not 1 <= B <= MAX_ROWS:
        _fail(f"rows {B} outside [1, {MAX_ROWS}]")
    if not (0 <= T <= MAX_TOKENS and 0 <= P <= MAX_TOKENS):
        _fail(f"tokens {T} / prefix length {P} out of range")
    if not (kind == BRANCH or T == P):
        _fail(f"a prefix message must have tokens == prefix length, got {T} and {P}")
    if not hlen == _FIXED + _F * L + 2 * B == len(v):
        _fail(f"length {len(v)} int64, field says {hlen}, layout needs {_FIXED + _F * L + 2 * B} for {L} layers and "
              f"{B} rows")
    fields = [tuple(v[i:i + _F]) for i in range(_FIXED, _FIXED + _F * L, _F)]
    first = {}  # each distinct layer once, named by the first layer that has it
    for l, f in enumerate(fields):
        first.setdefault(f, l)
    for f, l in first.items():
        _check_layer(l, f, T)
    layers = tuple(f[:-2] for f in fields)
    stored, windows = tuple(f[-2] for f in fields), tuple(f[-1] for f in fields)
    rows = v[_FIXED + _F * L:]
    pad, lengths = tuple(rows[:B]), tuple(rows[B:])
    for b, (p, n) in enumerate(zip(pad, lengths)):
        if not (0 <= p and 0 <= n and p + n <= T):
            _fail(f"row {b}: left pad {p} + length {n} outside [0, tokens {T}]")
    if layout == TOKEN_MAJOR and not (len({f[:2] for f in layers}) == 1 and all(s == T for s in stored)):
        _fail("a token-major payload needs every layer alike (kv heads, head dim) and storing all its slots")
    h = Header(kind, Fingerprint(dtype, layers), B, T, P, stored, windows, pad, lengths, layout, message_bytes, v[1])
    if nbytes != h.payload_bytes:
        _fail(f"payload bytes {nbytes} do not match the layout's {h.payload_bytes}")
    return h


def _check_layer(l: int, f: tuple, T: int) -> None:
    kv, hd, s, w = f[0], f[1], f[-2], f[-1]
    if not (1 <= kv <= MAX_DIM and 1 <= hd <= MAX_DIM):
        _fail(f"layer {l}: kv heads {kv} / head dim {hd} out of range")
    if not 0 <= s <= T:
        _fail(f"layer {l}: stored slots {s} outside [0, tokens {T}]")
    if not (w >= 0 and (s == T or w > 0)):
        _fail(f"layer {l}: stores {s} of {T} slots without a sliding cache window")


def check_layers(h: Header, layers) -> None:
    """Raise ValueError unless ``[(k, v), ...]`` has the shapes and dtype ``h`` describes (before anything is sent)."""
    if len(layers) != len(h.stored):
        raise ValueError(f"pack: {len(layers)} layers given, the header describes {len(h.stored)}")
    dtype = h.dtype
    for l, (k, v) in enumerate(layers):
        shape = h.layer_shape(l)
        if k.shape == shape and v.shape == shape and k.dtype == dtype and v.dtype == dtype:
            continue
        for name, t in (("keys", k), ("values", v)):
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"pack: layer {l} {name}: expected {shape} {h.dtype}, got {tuple(t.shape)} {t.dtype}")


def pack(h: Header, layers, device=None) -> torch.Tensor:
    """Copy ``[(k, v), ...]`` (each ``[B, kv_heads, S_l, head_dim]``, as ``h`` describes) into one uint8 payload
    laid out as ``h.layout``."""
    check_layers(h, layers)
    buf = torch.empty(h.payload_bytes, dtype=torch.uint8, device=device if device is not None else layers[0][0].device)
    with torch.no_grad():  # a data move; unpack's views of one unbind may only be written without autograd
        for (k, v), (k0, v0) in zip(unpack(h, buf), layers):
            k.copy_(k0)
            v.copy_(v0)
    return buf


def _check_payload(h: Header, payload) -> None:
    """Before any view is built: a truncated or oversized payload builds nothing."""
    if not isinstance(payload, torch.Tensor) or payload.dtype != torch.uint8 or payload.ndim != 1:
        raise ValueError(f"payload: expected a 1-D uint8 tensor, got "
                         f"{getattr(payload, 'dtype', type(payload).__name__)} {tuple(getattr(payload, 'shape', ()))}")
    if payload.numel() != h.payload_bytes:
        what = "truncated" if payload.numel() < h.payload_bytes else "oversized"
        raise ValueError(f"payload: {what}: expected {h.payload_bytes} bytes, got {payload.numel()}")
    if not payload.is_contiguous():
        raise ValueError("payload: expected a contiguous tensor")


def unpack(h: Header, payload: torch.Tensor) -> list:
    """Per-layer ``(k, v)`` views into ``payload`` (uint8, 1-D, exactly ``h.payload_bytes``): no copy.

    The size is checked before any view is built, so a truncated or oversized payload builds nothing."""
    if h.layout == TOKEN_MAJOR:
        return layer_views(token_rows(h, payload))
    _check_payload(h, payload)
    flat = payload.view(h.dtype)
    shapes = {h.layer_shape(l) for l in range(len(h.stored))}
    if len(shapes) == 1:  # every layer alike (the common case): all 2 L views from one C++ call
        kv = flat.view(2 * len(h.stored), *shapes.pop()).unbind(0)
        return list(zip(kv[0::2], kv[1::2]))
    el, out = h.element_size, []
    for l, (k0, v0, end) in enumerate(h.layer_offsets()):
        shape = h.layer_shape(l)
        out.append((flat[k0 // el:v0 // el].view(shape), flat[v0 // el:end // el].view(shape)))
    return out


def split(pieces, message_bytes: int) -> list:
    """The sender's pieces (1-D uint8 tensors, one per ``Header.pieces()`` entry) cut as ``Header.ranges()``
    cuts the payload: views, no copy."""
    if not message_bytes:
        return list(pieces)
    return [m for p in pieces for m in p.split(message_bytes)]  # one op per piece, not one slice per message


def token_rows(h: Header, payload: torch.Tensor) -> torch.Tensor:
    """A token-major payload as ``[B, T, L, 2, kv_heads, head_dim]`` (a view; ``payload`` checked as by
    :func:`unpack`)."""
    if h.layout != TOKEN_MAJOR:
        raise ValueError(f"layout: expected a token-major payload, the header says {LAYOUTS[h.layout]}")
    _check_payload(h, payload)
    kv_heads, head_dim = h.fingerprint.layers[0][:2]
    return payload.view(h.dtype).view(h.rows, h.tokens, len(h.stored), 2, kv_heads, head_dim)
