"""pskernels.distributed: the wire format in-process, then real transfers between spawned processes (gloo, CPU).

The spawned runs group many checks each (process start-up dominates); every run is bounded by a join timeout
and fails with the ranks' tracebacks. Scenarios: tests/dist_helpers.py.
"""
import dist_helpers as dh
import pytest
import torch

import pskernels
from pskernels.distributed import caches, wire
from pskernels.distributed.fingerprint import Fingerprint, _f64_bits, compare, fingerprint

from tiny_models import make_model

pytestmark = pytest.mark.hf


@pytest.fixture(scope="module")
def llama():
    return dh.setup("llama")


@torch.no_grad()
def _worker(model, P=5, T=6, rows=1, seed=0):
    prefix = model(dh.ids(P, seed), use_cache=True).past_key_values
    w = pskernels.ParallelCache(prefix, [])
    model(dh.ids(T, seed + 1, rows), past_key_values=w)
    return prefix, w


def _message(model, cache, **kw):
    h, kv, _ = caches.branch_parts(cache, fingerprint(model), **kw)
    return wire.encode(h), wire.pack(h, kv), kv


# ---- wire format, in process ------------------------------------------------------------------------------
def test_header_round_trip_and_in_place_unpack(llama):
    prefix, w = _worker(llama)
    raw, payload, kv = _message(llama, w)
    h = wire.decode(raw)
    assert (h.rows, h.tokens, h.prefix_len, h.pad, h.lengths) == (1, 6, 5, (0,), (6,))
    assert h.payload_bytes == payload.numel() == 6 * pskernels.distributed.branch_bytes_per_token(llama)
    views = wire.unpack(h, payload)
    ptr = payload.untyped_storage().data_ptr()
    for (k, v), (k0, v0) in zip(views, kv):
        assert torch.equal(k, k0) and torch.equal(v, v0)
        assert k.untyped_storage().data_ptr() == ptr == v.untyped_storage().data_ptr()
    branch = caches.build_branch(h, payload, prefix)
    assert all(layer.keys.untyped_storage().data_ptr() == ptr for layer in branch.layers)


@pytest.mark.parametrize("delta", [-1, 1, -8], ids=["truncated-1", "oversized+1", "truncated-8"])
def test_payload_of_the_wrong_size_builds_nothing(llama, delta, monkeypatch):
    _, w = _worker(llama)
    raw, payload, _ = _message(llama, w)
    h = wire.decode(raw)
    bad = torch.zeros(payload.numel() + delta, dtype=torch.uint8)
    built = []
    monkeypatch.setattr(torch.Tensor, "view", lambda *a, **k: built.append(1) or pytest.fail("a view was built"))
    for build in (wire.unpack, wire.token_rows, lambda h, p: caches.build_branch(h, p, None)):
        with pytest.raises(ValueError, match="truncated" if delta < 0 else "oversized"):
            build(h, bad)
    assert not built


def _patch_header(raw: bytes, index: int, value: int) -> bytes:
    v = torch.frombuffer(bytearray(raw), dtype=torch.int64).clone()
    v[index] = value
    return v.numpy().tobytes()


def test_malformed_headers_are_refused_before_any_allocation(llama):
    _, w = _worker(llama)
    raw, _, _ = _message(llama, w)
    cases = [
        (raw[:-8], "length"),  # truncated header
        (raw + raw[-8:], "length"),  # one int64 too many
        (raw[:40], ">= 96"),
        (raw[:12], "multiple of 8"),
        (_patch_header(raw, 0, 1234), "magic"),
        (_patch_header(raw, 1, wire.VERSION + 1),
         rf"format version: sender {wire.VERSION + 1}, receiver {wire.VERSION}"),
        (_patch_header(raw, 9, 10**12), "payload bytes"),  # oversized declared payload
        (_patch_header(raw, 7, 1 << 40), "out of range"),
        (_patch_header(raw, 6, 0), "rows"),
        (_patch_header(raw, 4, 99), "dtype"),
        (_patch_header(raw, 10, 2), "layout 2"),
        (_patch_header(raw, 11, 100), "message bytes 100"),
        (_patch_header(raw, 12 + 7, 7), "stored slots"),  # layer 0 stores more than T
        # two bad layers: the first is named (layers alike are checked once)
        (_patch_header(_patch_header(raw, 12 + 2 * 9, 0), 12 + 9, 1 << 17), "layer 1: kv heads 131072"),
        (_patch_header(raw, len(raw) // 8 - 1, 7), "row 0"),  # length past the tokens
    ]
    for data, match in cases:
        with pytest.raises(ValueError, match=match):
            wire.decode(data)


def test_fingerprint_names_the_field_and_both_values(llama):
    mine = fingerprint(llama)
    assert compare(fingerprint(llama), mine) is None
    cases = [("gemma3", torch.float32, "layer count: sender 4, receiver 3"),
             ("llama_yarn", torch.float32, "layer 0 rope_type: sender yarn, receiver default"),
             ("phi3_partial", torch.float32, "layer 0 rotary_dim: sender 8, receiver 16"),
             ("llama", torch.bfloat16, "dtype: sender torch.bfloat16, receiver torch.float32")]
    for arch, dtype, msg in cases:
        assert compare(fingerprint(make_model(arch, dtype=dtype)), mine) == msg
    g3 = fingerprint(make_model("gemma3"))
    assert [layer[2] for layer in g3.layers] == [6, 0, 6, 0]  # sliding windows per layer
    full_first = Fingerprint(g3.dtype, (g3.layers[1],) + g3.layers[1:])
    assert compare(g3, full_first) == "layer 0 window: sender 6, receiver 0"
    l0 = mine.layers[0]
    other_theta = Fingerprint(mine.dtype, ((*l0[:5], _f64_bits(5e5), l0[6]),) + mine.layers[1:])
    assert compare(mine, other_theta) == "layer 0 rope_theta: sender 10000.0, receiver 500000.0"


@torch.no_grad()
def test_multi_row_branch_for_a_batched_synthesizer(llama):
    """A worker's whole 2-row ParallelCache (left padded) through the wire feeds a batch-2 synthesizer exactly."""
    prefix = llama(dh.ids(5, 0), use_cache=True).past_key_values
    w = pskernels.ParallelCache(prefix, [])
    x, mask = dh.ids(6, 1, rows=2), torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0
    llama(x, attention_mask=mask, cache=w)
    raw, payload, _ = _message(llama, w)
    h = wire.decode(raw)
    assert (h.rows, h.pad, h.lengths) == (2, (0, 2), (6, 4))
    br = caches.build_branch(h, payload, prefix)
    assert br.lengths.tolist() == [6, 4]
    q = dh.ids(3, 2, rows=2)
    a = llama(q, cache=pskernels.ParallelCache(prefix, [w, w])).logits
    b = llama(q, cache=pskernels.ParallelCache(prefix, [br, br])).logits
    assert torch.equal(a, b)


def test_sender_checks_its_own_cache(llama):
    prefix, w = _worker(llama, rows=2)
    fp = fingerprint(llama)
    with pytest.raises(ValueError, match="row 2 is outside"):
        caches.branch_parts(pskernels.CacheRow(w, 2), fp)
    with pytest.raises(ValueError, match="length"):
        caches.branch_parts(pskernels.CacheRow(w, 0), fp, length=7)
    with pytest.raises(TypeError, match="length: expected integers, got torch.float32"):  # not truncated to 2
        caches.branch_parts(w, fp, length=[2.5, 3])
    with pytest.raises(ValueError, match="prefix_len: required"):
        caches.branch_parts(prefix, fp)
    with pytest.raises(TypeError, match="prefix_len: expected an int, got float 4.7"):
        caches.branch_parts(prefix, fp, prefix_len=4.7)
    with pytest.raises(ValueError, match="synthesizer"):
        caches.branch_parts(pskernels.ParallelCache(prefix, [w]), fp)
    with pytest.raises(ValueError, match="layers"):
        caches.branch_parts(w, fingerprint(make_model("gemma3")))


def test_a_worker_sends_one_piece_per_row_straight_from_its_buffer(llama):
    """A zero-copy worker's own tokens live in one token-major buffer: its branch is token-major, one piece per row
    that IS the buffer's memory (no copy), and a CacheRow of a batched worker is one piece too."""
    _, w = _worker(llama, T=7, rows=3)
    h, kv, pieces = caches.branch_parts(w, fingerprint(llama))
    assert h.layout == wire.TOKEN_MAJOR and len(pieces) == len(h.ranges()) == 3
    buf = w.layers[0].slab.buf
    assert [p.data_ptr() for p in pieces] == [buf[b].data_ptr() for b in range(3)]
    assert [(a, b) for a, b in h.ranges()] == [(i * len(pieces[0]), (i + 1) * len(pieces[0])) for i in range(3)]
    assert torch.equal(torch.cat(pieces), wire.pack(h, kv))
    hm, _, msgs = caches.branch_parts(w, fingerprint(llama), message_bytes=4096)  # rows of 5376 B: 4096 + 1280
    assert wire.decode(wire.encode(hm)).ranges() == hm.ranges() == [(0, 4096), (4096, 5376), (5376, 9472),
                                                                     (9472, 10752), (10752, 14848), (14848, 16128)]
    assert [m.numel() for m in msgs] == [b - a for a, b in hm.ranges()]
    assert msgs[1].data_ptr() == buf[0].data_ptr() + 4096
    assert torch.equal(torch.cat(msgs), wire.pack(h, kv))
    h1, kv1, pieces1 = caches.branch_parts(pskernels.CacheRow(w, 1), fingerprint(llama), length=5)
    assert (h1.rows, h1.tokens, h1.layout, len(pieces1)) == (1, 5, wire.TOKEN_MAJOR, 1)
    assert pieces1[0].data_ptr() == buf[1].data_ptr() and pieces1[0].numel() == h1.payload_bytes
    views = wire.unpack(h1, torch.cat(pieces1))
    for (k, v), (k0, v0) in zip(views, kv1):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_ordinary_caches_send_layer_major_pieces_in_order(llama):
    """An ordinary [prefix | branch] cache (and a worker whose layer left the buffer) sends every non-empty K and V
    range, back to back: together exactly the payload."""
    prefix, w = _worker(llama, T=7)
    ordinary = llama(dh.ids(12, 3), use_cache=True).past_key_values
    for cache, kw in ((ordinary, {"prefix_len": 5}), (w, {})):
        if cache is w:
            w.layers[1]._leave()  # e.g. a layer whose shape differs from the buffer's
        h, kv, pieces = caches.branch_parts(cache, fingerprint(llama), **kw)
        assert h.layout == wire.LAYER_MAJOR
        ranges = h.ranges()
        assert [a for a, _ in ranges] == [0] + [b for _, b in ranges[:-1]] and ranges[-1][1] == h.payload_bytes
        assert len(ranges) == len(pieces) == 2 * len(h.stored)
        assert [p.numel() for p in pieces] == [b - a for a, b in ranges]
        assert torch.equal(torch.cat(pieces), wire.pack(h, kv))
        h2 = wire.decode(wire.encode(h))
        assert h2.layout == wire.LAYER_MAJOR and h2.ranges() == ranges
        hm, _, msgs = caches.branch_parts(cache, fingerprint(llama), message_bytes=4096, **kw)
        assert hm.ranges() == ranges and len(msgs) == len(pieces)  # every piece smaller than a message


def test_token_major_header_needs_uniform_layers(llama):
    _, w = _worker(llama)
    raw, payload, kv = _message(llama, w)
    h = wire.decode(raw)
    assert h.layout == wire.TOKEN_MAJOR
    with pytest.raises(ValueError, match="token-major payload needs every layer alike"):
        wire.decode(_patch_header(raw, 12 + 9, 7))  # layer 1 with 7 kv heads
    br = caches.build_branch(h, payload, None)
    assert br.layers[0].slab.buf.data_ptr() == payload.data_ptr()  # the payload adopted as the own-token buffer


def test_gather_branches_needs_distinct_ranks(llama):
    with pytest.raises(ValueError, match=r"srcs: expected distinct ranks, got \[1, 2, 1\]"):
        pskernels.distributed.gather_branches([1, 2, 1], model=llama, prefix=None, timeout=1)


def test_payload_pool_reuses_a_buffer_only_when_nothing_holds_it():
    from pskernels.distributed.transport import PayloadPool

    pool = PayloadPool(max_free_bytes=100)
    a = pool.take(64, "cpu")
    view = a[8:16].view(torch.float32)  # what a received branch keeps: views into the payload
    ptr = a.data_ptr()
    del a
    assert pool.take(64, "cpu").data_ptr() != ptr  # still held by the view: a new buffer
    del view
    assert pool.take(64, "cpu").data_ptr() == ptr  # free again: reused (no fresh pages to fault in)
    assert pool.take(32, "cpu").data_ptr() not in (ptr,)  # another size: its own buffer
    held = pool.take(200, "cpu")  # 64 + 64 + 32 free bytes > 100: the least recently used free ones go
    assert sorted(b.numel() for b, _ in pool.buffers) == [32, 64, 200] and held.numel() == 200
    pool.trim()
    assert [b.numel() for b, _ in pool.buffers] == [200]
    free = pool.take(200, "cpu")  # a second buffer of the size in use, then freed: it follows a held one
    del free
    assert [b.numel() for b, _ in pool.buffers] == [200, 200]
    pool.trim()
    assert [b.numel() for b, _ in pool.buffers] == [200] and pool.buffers[0][0].data_ptr() == held.data_ptr()


@pytest.fixture
def solo_group():
    """A one-process gloo group in this process (destroyed after the test)."""
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{dh._free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    yield
    dist.destroy_process_group()


def test_a_peer_outside_the_group_or_this_rank_is_refused_before_anything_moves(llama, solo_group):
    """A message to a rank outside the group, or to this one, would wait forever: refused at once, by name."""
    from pskernels import distributed as psd

    prefix, w = _worker(llama)
    keys = psd.transport._store().num_keys()
    for dst in (5, 0, 1.0, True, "1"):
        with pytest.raises(ValueError, match="^dst: expected (a global rank of the group \\[0\\]|another rank)"):
            psd.send_branch(w, dst, model=llama, timeout=1)
    with pytest.raises(ValueError, match=r"^src: expected a global rank of the group \[0\], got 3"):
        psd.recv_branch(3, model=llama, prefix=prefix, timeout=1)
    with pytest.raises(ValueError, match=r"^src: expected another rank than this one \(0\)"):
        psd.recv_branch(0, model=llama, prefix=prefix, timeout=1)
    with pytest.raises(ValueError, match=r"^srcs: expected a global rank of the group \[0\], got 2.5"):
        psd.recv_any([2.5], model=llama, prefix=prefix, timeout=1)
    with pytest.raises(ValueError, match=r"^srcs: expected another rank than this one"):
        psd.gather_branches([0], model=llama, prefix=prefix, timeout=1)
    assert psd.transport._store().num_keys() == keys  # nothing was announced


def test_timeouts_are_seconds_a_timedelta_or_none():
    import datetime

    from pskernels.distributed import transport

    assert transport._seconds(None) is None and transport._seconds(2) == 2.0
    assert transport._seconds(datetime.timedelta(milliseconds=1500)) == 1.5
    for bad in ("soon", float("nan"), -1, True, [1]):
        with pytest.raises(ValueError, match=r"^timeout: expected seconds >= 0, a timedelta or None, got "):
            transport._seconds(bad)


# ---- real transfers between processes ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def spawned():
    """One spawned run of 4 ranks for both scenarios (bounded: fails after 200 s with the ranks' tracebacks)."""
    return dh.spawn(dh.all_scenarios, world=4, timeout=200)


def test_round_trip_exact_in_place_every_scheme(spawned):
    """4 ranks, 4 model configs (GQA, sliding-window layers, fp32, bf16): broadcast prefix == local prefill;
    3 workers (a batched worker's CacheRows with left padding and trimmed lengths, a zero-copy worker, an ordinary
    cache whose sliding layers dropped slots) -> rank 0 in arrival order (the workers token-major, the ordinary
    cache layer-major, rank 2's payloads cut into 4 KiB messages); every layer bit-exact, one buffer per branch,
    and the synthesizer's logits and greedy tokens equal the single-process ParallelCache for every scheme; heads
    and tails recomputed over the received branches (recompute_branches) equal the same over the workers' own
    caches."""
    out = {r: v["round_trip"] for r, v in spawned.items()}
    for arch, dtype in dh.CONFIGS:
        tag = f"{arch}/{str(dtype).removeprefix('torch.')}"
        r0 = out[0][tag]
        assert sorted(r0["order"]) == [1, 1, 2, 3]
        assert r0["schemes"] == ["parallel", "sequential", "right_aligned", "custom"]
        assert r0["sensitivity"] > 1e-3, f"{tag}: dropping a branch does not change the logits"
        sliding = arch != "llama"
        assert r0["kinds"] == ["ParallelCache"] * 3 + (["DynamicCache"] if sliding else ["ParallelCache"])
        # the workers' branches came token-major (the payload is their own-token buffer), the ordinary cache
        # layer-major
        assert r0["layers"][:3] == ["SlabLayer"] * 3 and r0["layers"][3] != "SlabLayer", r0["layers"]
        assert (min(r0["stored_full"]) < dh.FULL) == sliding, r0["stored_full"]
        assert out[1][tag]["prefix_dropped"] == sliding
        assert r0.get("recomputed") == ([False, True] if arch == "llama" else None)
        bpt = out[2][tag]["bytes_per_token"]
        assert out[2][tag]["sent"] == [(dh.SOLO * bpt, dh.SOLO)]
        pads = [max(dh.ROW_INSTR) - n for n in dh.ROW_INSTR]
        assert out[1][tag]["sent"] == [((p + n) * bpt, n) for p, n in zip(pads, dh.ROW_LEN)]
    assert out[0]["subgroup"]
    assert all(out[r]["queues"] for r in range(4))  # announcements went through the store's queues


def test_stores_without_queues_take_numbered_keys():
    """A FileStore (``file://`` init) has no queues: the announcements take numbered keys, with the same
    guarantees (a broadcast prefix, arrival order, exact branches, a receive timeout and a withdrawn send that leave
    the group usable, a flat store)."""
    out = dh.spawn(dh.numbered_keys, world=3, timeout=120, store="file")
    assert not any(out[r]["queues"] for r in range(3))
    msg, secs, ranks = out[0]["timeout"]
    assert "rank 1" in msg and ranks == [1] and 0.4 <= secs < 3.5, (msg, secs)
    msg, secs, ranks = out[2]["withdrawn"]
    assert "rank 0" in msg and "withdrawn" in msg and ranks == [0] and secs < 3.5, (msg, secs)
    assert out[0]["keys_after"] <= out[0]["keys_before"], out[0]


def test_faults_leave_the_group_usable(spawned):
    """A refused broadcast, a dead worker and a slow one (TimeoutError naming the rank, then the live branches
    still arrive), a withdrawn send, four refused branches (other model, dtype, format version, prefix length: the
    field and both values named on both sides, the sender not hung), then 100 rounds with flat RSS and store, and
    gather_branches over a live, a refused and a dead worker."""
    out = {r: v["faults"] for r, v in spawned.items()}
    for r in range(4):
        assert "refused the prefix of rank 0" in out[r]["bcast_refused"] if r == 3 else \
            "rank 3: model fingerprint differs: layer 0 rope_type: sender default, receiver yarn" in \
            out[r]["bcast_refused"], out[r]["bcast_refused"]
    msg, secs, ranks = out[0]["dead"]
    assert "rank 1" in msg and ranks == [1] and 0.9 <= secs < 4.0, (msg, secs)
    msg, secs, ranks = out[0]["slow"]
    assert "rank 2" in msg and ranks == [2] and 0.4 <= secs < 3.5, (msg, secs)
    msg, secs, ranks = out[2]["withdrawn"]
    assert "rank 0" in msg and "withdrawn" in msg and ranks == [0] and secs < 3.5, (msg, secs)
    expected = ["layer 0 rope_type: sender yarn, receiver default", "dtype: sender torch.bfloat16, receiver "
                "torch.float32", f"format version: sender {wire.VERSION + 1}, receiver {wire.VERSION}",
                "prefix length: sender 9, receiver 8"]
    assert len(out[0]["refusals"]) == len(out[3]["refused"]) == len(expected)
    for want, (got, _, src), (sent, _, dst) in zip(expected, out[0]["refusals"], out[3]["refused"]):
        assert "rank 3" in got and want in got and src == 3, got
        assert "rank 0 refused" in sent and want in sent and dst == 0, sent
    g = out[0]["gather"]
    assert g["got"] == [2] and sorted(g["missing"]) == [1, 3] and 2.4 <= g["seconds"] < 6.0, g
    assert g["missing"][1] == "timeout: no branch within 2.5 s", g
    assert g["missing"][3].startswith("refused: ") and "rope_type: sender yarn, receiver default" in g["missing"][3]
    assert "rank 0 refused" in out[3]["gather_refused"][0], out[3]["gather_refused"]
    grow = {r: out[r]["rss_100"] - out[r]["rss_10"] for r in (0, 2)}
    # 90 more rounds of a payload_kib message: a leak of one buffer per round would be 90 x that
    assert all(g < 4 * out[0]["payload_kib"] for g in grow.values()), (grow, out[0]["payload_kib"])
    assert out[0]["keys_100"] <= out[0]["keys_10"], (out[0]["keys_10"], out[0]["keys_100"])  # store keys: flat


def test_a_group_made_anew_starts_its_sequence_numbers_again():
    """destroy_process_group + init_process_group in the same processes (replacing a dead worker means a new
    group): the protocol state belongs to the group object, so a send withdrawn in the old group does not leave
    the new group's first branch waiting for a sequence number nobody sends."""
    out = dh.spawn(dh.regroup, world=2, timeout=90)
    msg, secs, ranks = out[1]["withdrawn"]
    assert "withdrawn" in msg and ranks == [0], msg
    assert out[0]["received"]
