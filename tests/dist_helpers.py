"""Multi-process scenarios for tests/test_distributed.py: gloo over 127.0.0.1, one spawned process per rank.

``spawn(fn, world, timeout)`` runs ``fn(rank, world)`` in ``world`` fresh processes and returns each rank's
result; a rank that raises, hangs past ``timeout`` or dies without a result fails the run with its traceback.
Every scenario is deterministic: a rank recomputes locally what another rank computed (same seed, one thread),
so bit-exact comparisons across processes are meaningful.
"""
from __future__ import annotations

import copy
import datetime
import multiprocessing as mp
import os
import queue
import socket
import tempfile
import time
import traceback

import torch

STEP_TIMEOUT = 30.0  # seconds any single receive may wait in the happy paths


# ---- the runner -------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world, init, results):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=60))
        out = fn(rank, world)
        results.put((rank, "ok", out))
    except BaseException:  # noqa: B036 - report everything to the parent
        results.put((rank, "error", traceback.format_exc()))
        results.close()
        results.join_thread()
        raise SystemExit(1) from None
    results.close()
    results.join_thread()  # flush the result before os._exit below
    _finish(rank, world)


def _finish(rank, world):
    """Rank 0 hosts the store: it leaves last, once every live rank has said so."""
    import torch.distributed as dist

    store = dist.distributed_c10d._get_default_store()
    store.add("test/done", 1)
    if rank == 0:
        deadline = time.monotonic() + 30
        while int(store.add("test/done", 0)) < world and time.monotonic() < deadline:
            time.sleep(0.05)
    os._exit(0)  # skip interpreter teardown of gloo threads (a dead peer may make it slow)


def spawn(fn, world: int, timeout: float = 90.0, store: str = "tcp") -> dict:
    """``store``: "tcp" (``tcp://`` init: a TCPStore, libuv backend) or "file" (``file://``: a FileStore)."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    if store == "tcp":
        init = f"tcp://127.0.0.1:{_free_port()}"
    else:
        fd, path = tempfile.mkstemp(prefix="pskernels-store-")
        os.close(fd)
        os.unlink(path)  # FileStore creates it
        init = f"file://{path}"
    procs = [ctx.Process(target=_entry, args=(fn, r, world, init, results), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out, errors = {}, []
    deadline = time.monotonic() + timeout
    while len(out) + len(errors) < world and time.monotonic() < deadline:
        try:
            rank, status, value = results.get(timeout=0.5)
        except queue.Empty:
            if all(not p.is_alive() for p in procs) and results.empty():
                break
            continue
        if status == "ok":
            out[rank] = value
        else:
            errors.append(f"--- rank {rank} ---\n{value}")
    for p in procs:
        p.join(max(0.0, min(10.0, deadline - time.monotonic())))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in hung:
        procs[r].kill()
        procs[r].join(5)
    if store == "file" and os.path.exists(path):
        os.unlink(path)
    missing = sorted(set(range(world)) - set(out))
    if errors or missing:
        raise AssertionError(f"spawned run failed (no result from ranks {missing}; still running after {timeout:g} s: "
                             f"{hung})\n" + "\n".join(errors))
    return out


# ---- shared helpers -----------------------------------------------------------------------------------------
def setup(arch="llama", dtype=torch.float32):
    import pskernels

    from tiny_models import make_model

    model = make_model(arch, dtype=dtype)
    model.generation_config.eos_token_id = None
    pskernels.patch_model(model)
    return model


def ids(n, seed, rows=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 90, (rows, n), generator=g)


def layers_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


def storages(cache):
    return {t.untyped_storage().data_ptr() for layer in cache.layers for t in (layer.keys, layer.values)}


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ---- scenario A: round trip, exactness, broadcast -------------------------------------------------------------
P = 8  # prefix tokens (> the tiny models' window 6: sliding layers of the prefix drop slots)
CONFIGS = [("llama", torch.float32), ("gemma3", torch.float32), ("mistral_sliding", torch.float32),
           ("llama", torch.bfloat16)]
ROW_INSTR = (5, 3)  # rank 1: a batched worker of two left-padded rows
ROW_NEW = 4
ROW_LEN = (5 + 1, 3 + ROW_NEW - 1)  # real tokens sent per row (row 0 "stopped early": trailing slots not sent)
SOLO = 7  # rank 2: one zero-copy worker
FULL = 9  # rank 3: an ordinary [prefix | branch] cache (sliding layers drop slots)
QUERY = 3


@torch.no_grad()
def worker_caches(model, prefix, rank, seed):
    """What worker ``rank`` computes on ``prefix``: (cache to send, send kwargs, local branch, branch length)."""
    import pskernels

    if rank == 1:
        L = max(ROW_INSTR)
        x = torch.zeros(2, L, dtype=torch.long)
        mask = torch.zeros(2, L, dtype=torch.long)
        for i, n in enumerate(ROW_INSTR):
            x[i, L - n:] = ids(n, seed + 10 + i)[0]
            mask[i, L - n:] = 1
        w = pskernels.ParallelCache(prefix, [])
        model.generate(x, attention_mask=mask, cache=w, max_new_tokens=ROW_NEW, do_sample=False,
                       pad_token_id=0)
        return [(pskernels.CacheRow(w, i), {"length": ROW_LEN[i]}, pskernels.CacheRow(w, i), ROW_LEN[i])
                for i in range(2)]
    if rank == 2:
        w = pskernels.ParallelCache(prefix, [])
        model(ids(SOLO, seed + 20), cache=w)
        return [(w, {}, w, SOLO)]
    c = copy.deepcopy(prefix)
    model(ids(FULL, seed + 30), cache=c)
    return [(c, {"prefix_len": P}, c, FULL)]


def _same_synthesis(model, q, ref, rcv, scheme, tag):
    """Logits and greedy tokens of ParallelCache(*ref) and ParallelCache(*rcv) are identical."""
    import pskernels

    def cache(args):
        prefix, branches, kw = args
        return pskernels.ParallelCache(prefix, branches, scheme=scheme, **kw)

    a, b = model(q, cache=cache(ref)).logits, model(q, cache=cache(rcv)).logits
    assert torch.equal(a, b), f"{tag}/{scheme}: logits differ by {(a - b).abs().max().item():.3e}"
    ga = model.generate(q, cache=cache(ref), max_new_tokens=4, do_sample=False, pad_token_id=0)
    gb = model.generate(q, cache=cache(rcv), max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(ga, gb), f"{tag}/{scheme}: greedy tokens {ga.tolist()} vs {gb.tolist()}"


def _same_recomputation(model, q, ref, rcv, lens, seed, tag):
    """``recompute_branches`` (growing heads, a tail; exact and in one forward) over received branches gives the
    logits it gives over the workers' own caches, bit for bit. Returns the settings checked."""
    from pskernels.synthesis.recompute import recompute_branches

    branch_ids = [ids(n, seed + 60 + i)[0] for i, n in enumerate(lens)]
    done = []
    for together in (False, True):
        kw = dict(head=1, tail=1, head_share=0.5, together=together)
        a = model(q, cache=recompute_branches(model, *ref, branch_ids, **kw)).logits
        b = model(q, cache=recompute_branches(model, *rcv, branch_ids, **kw)).logits
        assert torch.equal(a, b), f"{tag}/recompute together={together}: logits differ by {(a - b).abs().max():.3e}"
        done.append(together)
    return done


def _schemes(n, lens):
    starts = [P + 3 * i + 1 for i in range(n)]
    return [("parallel", {}), ("sequential", {}), ("right_aligned", {}),
            ("custom", {"branch_starts": starts, "query_start": max(s + n for s, n in zip(starts, lens)) + 2})]


@torch.no_grad()
def round_trip(rank, world):
    import pskernels
    from pskernels import distributed as psd
    from pskernels.distributed import transport

    report = {"queues": transport._has_queues(_store(), None)}  # a tcp:// store has queues
    if rank == 2:  # this worker's payloads travel as 4 KiB messages (the receiver follows the header)
        transport.message_bytes = lambda device, nbytes: 4096
    for c, (arch, dtype) in enumerate(CONFIGS):
        tag = f"{arch}/{str(dtype).removeprefix('torch.')}"
        model = setup(arch, dtype)
        seed = 100 * c
        local_prefix = model(ids(P, seed), use_cache=True).past_key_values
        prefix = psd.broadcast_prefix(local_prefix if rank == 0 else None, 0, model=model, timeout=STEP_TIMEOUT)
        if rank != 0:
            assert prefix is not local_prefix
            assert [type(a) for a in prefix.layers] == [type(b) for b in local_prefix.layers], tag
            assert prefix.get_seq_length() == local_prefix.get_seq_length() == P, tag
            assert layers_equal([x.keys for x in prefix.layers], [x.keys for x in local_prefix.layers]), tag
            assert layers_equal([x.values for x in prefix.layers], [x.values for x in local_prefix.layers]), tag
            assert len(storages(prefix)) == 1, f"{tag}: the received prefix is not one buffer"
            sent = []
            for cache, kw, _, n in worker_caches(model, prefix, rank, seed):
                sent.append((psd.send_branch(cache, 0, model=model, timeout=STEP_TIMEOUT, **kw), n))
            report[tag] = {"sent": sent, "bytes_per_token": psd.branch_bytes_per_token(model),
                           "prefix_dropped": min(x.keys.shape[2] for x in prefix.layers) < P}
            continue
        # rank 0: take the branches in the order they come, then compare with the same work done locally
        want = {1: 2, 2: 1, 3: 1}
        got = {r: [] for r in want}
        order = []
        while any(want.values()):
            src, br = psd.recv_any([r for r, k in want.items() if k], model=model, prefix=prefix, timeout=STEP_TIMEOUT)
            want[src] -= 1
            got[src].append(br)
            order.append(src)
        received = got[1] + got[2] + got[3]
        local = [x for r in (1, 2, 3) for x in worker_caches(model, local_prefix, r, seed)]
        stats = {"order": order, "kinds": [type(b).__name__ for b in received],
                 "layers": [type(b.layers[0]).__name__ for b in received]}
        for i, (br, (_, _, ref, n)) in enumerate(zip(received, local)):
            assert len(storages(br)) == 1, f"{tag} branch {i}: K/V are not views of one received buffer"
            row = ref.row if isinstance(ref, pskernels.CacheRow) else None
            ref_cache = ref.cache if row is not None else ref
            for l, (a, b) in enumerate(zip(br.layers, ref_cache.layers)):
                for name, x, y in (("keys", a.keys, b.keys), ("values", a.values, b.values)):
                    if row is not None:
                        y = y[row:row + 1]
                    y = y[:, :, :x.shape[2]] if row is not None else y[:, :, y.shape[2] - x.shape[2]:]
                    assert x.dtype == y.dtype and torch.equal(x, y), f"{tag} branch {i} layer {l} {name} differ"
            assert int(br.lengths.sum()) == n, f"{tag} branch {i}: lengths {br.lengths.tolist()}, expected {n}"
        ptrs = [next(iter(storages(b))) for b in received]
        assert len(set(ptrs)) == len(ptrs), f"{tag}: two branches share a buffer"
        stats["stored_full"] = [x.keys.shape[2] for x in received[3].layers]
        lens = [n for *_, n in local]
        q = ids(QUERY, seed + 40)
        mine = [x[2] for x in local]
        for scheme, kw in _schemes(len(local), lens):
            _same_synthesis(model, q, (local_prefix, mine, dict(kw, branch_lengths=lens)), (prefix, received, kw),
                            scheme, tag)
            stats.setdefault("schemes", []).append(scheme)
        if arch == "llama":  # the fidelity synthesizer's reading: heads recomputed over received branches
            stats["recomputed"] = _same_recomputation(model, q, (local_prefix, mine[:3]), (prefix, received[:3]),
                                                      lens[:3], seed, tag)
        # the comparison is not vacuous: dropping a branch changes the logits
        fewer = model(q, cache=pskernels.ParallelCache(prefix, received[:-1])).logits
        stats["sensitivity"] = (fewer - model(q, cache=pskernels.ParallelCache(prefix, received)).logits
                                ).abs().max().item()
        report[tag] = stats
    # a process group other than the world: ranks 0 and 2 (every rank creates it)
    import torch.distributed as dist

    from pskernels import distributed as psd

    sub = dist.new_group([0, 2])
    if rank in (0, 2):
        sub_prefix = psd.broadcast_prefix(local_prefix if rank == 0 else None, 0, model=model, group=sub,
                                          timeout=STEP_TIMEOUT)
        if rank == 2:
            psd.send_branch(_solo(model, sub_prefix, 51), 0, model=model, group=sub, timeout=STEP_TIMEOUT)
        else:
            br = psd.recv_branch(2, model=model, prefix=sub_prefix, group=sub, timeout=STEP_TIMEOUT)
            _same_branch(br, _solo(model, local_prefix, 51), "a branch over a subgroup")
            report["subgroup"] = True
    return report


# ---- scenario B: faults ---------------------------------------------------------------------------------------
# rank 0 synthesizes; rank 1 dies after the prefix; rank 2 is slow, then withdraws a branch, then sends 100
# rounds; rank 3 sends branches the synthesizer must refuse, then a good one.
ROUNDS, RSS_TOKENS = 100, 512


def _store():
    import torch.distributed as dist

    return dist.distributed_c10d._get_default_store()


def _raises(exc, fn, *args, **kw):
    """(message, seconds, peer rank(s)) of the ``exc`` that ``fn`` raises; fails if it returns or raises something
    else."""
    t0 = time.monotonic()
    try:
        fn(*args, **kw)
    except exc as e:
        return str(e), time.monotonic() - t0, getattr(e, "rank", getattr(e, "ranks", None))
    raise AssertionError(f"{getattr(fn, '__name__', fn)} did not raise {exc.__name__}")


@torch.no_grad()
def _solo(model, prefix, seed, n=SOLO):
    import pskernels

    w = pskernels.ParallelCache(prefix, [])
    model(ids(n, seed), cache=w)
    return w


def _same_branch(received, local, what):
    assert layers_equal([x.keys for x in received.layers], [x.keys for x in local.layers]), what
    assert layers_equal([x.values for x in received.layers], [x.values for x in local.layers]), what


@torch.no_grad()
def faults(rank, world):
    import gc

    from pskernels import distributed as psd
    from pskernels.distributed import wire

    store = _store()
    model = setup("llama")
    out = {}
    local_prefix = model(ids(P, 1), use_cache=True).past_key_values
    # a broadcast one rank refuses: every rank raises, no payload moves; the next broadcast works
    other = setup("llama_yarn") if rank == 3 else model
    out["bcast_refused"] = _raises(ValueError, psd.broadcast_prefix, local_prefix if rank == 0 else None, 0,
                                   model=other, timeout=STEP_TIMEOUT)[0]
    prefix = psd.broadcast_prefix(local_prefix if rank == 0 else None, 0, model=model, timeout=STEP_TIMEOUT)
    if rank == 1:  # dies without sending anything
        store.set("t/1-exiting", "1")
        return out
    if rank == 2:
        store.wait(["t/go2"])  # slow: sends only once the synthesizer has timed out on it
        psd.send_branch(_solo(model, prefix, 21), 0, model=model, timeout=STEP_TIMEOUT)
        out["withdrawn"] = _raises(psd.BranchTimeout, psd.send_branch, _solo(model, prefix, 22), 0, model=model,
                                   timeout=0.5)
        store.set("t/withdrawn", "1")
        psd.send_branch(_solo(model, prefix, 23), 0, model=model, timeout=STEP_TIMEOUT)
        w = _solo(model, prefix, 24, RSS_TOKENS)
        for i in range(ROUNDS):
            psd.send_branch(w, 0, model=model, timeout=STEP_TIMEOUT)
            if i + 1 in (10, ROUNDS):
                gc.collect()
                out[f"rss_{i + 1}"] = rss_kib()
        store.wait(["t/gather"])  # after rank 0 counted the store's keys
        psd.send_branch(_solo(model, prefix, 25), 0, model=model, timeout=STEP_TIMEOUT)  # for gather_branches
        return out
    if rank == 3:
        sent = []
        yarn = setup("llama_yarn")
        bf16 = setup("llama", torch.bfloat16)
        bad = [(yarn, _solo(yarn, yarn(ids(P, 1), use_cache=True).past_key_values, 31)),
               (bf16, _solo(bf16, bf16(ids(P, 1), use_cache=True).past_key_values, 32)),
               (model, _solo(model, prefix, 33)),  # sent as the next format version
               (model, _solo(model, model(ids(P + 1, 1), use_cache=True).past_key_values, 34))]
        for i, (m, w) in enumerate(bad):
            version = wire.VERSION
            if i == 2:
                wire.VERSION = version + 1
            sent.append(_raises(psd.BranchRefused, psd.send_branch, w, 0, model=m, timeout=STEP_TIMEOUT))
            wire.VERSION = version
        psd.send_branch(_solo(model, prefix, 35), 0, model=model, timeout=STEP_TIMEOUT)
        out["refused"] = sent
        store.wait(["t/gather"])
        out["gather_refused"] = _raises(psd.BranchRefused, psd.send_branch, bad[0][1], 0, model=yarn,
                                        timeout=STEP_TIMEOUT)
        return out
    # rank 0 -------------------------------------------------------------------------------------------------
    store.wait(["t/1-exiting"])
    time.sleep(0.5)  # let rank 1 exit
    out["dead"] = _raises(psd.BranchTimeout, psd.recv_branch, 1, model=model, prefix=prefix, timeout=1.0)
    out["slow"] = _raises(TimeoutError, psd.recv_branch, 2, model=model, prefix=prefix, timeout=0.5)
    store.set("t/go2", "1")
    src, br = psd.recv_any([1, 2], model=model, prefix=prefix, timeout=STEP_TIMEOUT)
    assert src == 2
    _same_branch(br, _solo(model, local_prefix, 21), "late branch of rank 2")
    _same_synthesis(model, ids(QUERY, 5), (local_prefix, [_solo(model, local_prefix, 21)], {}), (prefix, [br], {}),
                    "parallel", "late branch")
    store.wait(["t/withdrawn"])
    br = psd.recv_branch(2, model=model, prefix=prefix, timeout=STEP_TIMEOUT)
    _same_branch(br, _solo(model, local_prefix, 23), "the branch after a withdrawn one")
    out["refusals"] = [_raises(psd.BranchRefused, psd.recv_branch, 3, model=model, prefix=prefix,
                               timeout=STEP_TIMEOUT) for _ in range(4)]
    br = psd.recv_branch(3, model=model, prefix=prefix, timeout=STEP_TIMEOUT)
    _same_branch(br, _solo(model, local_prefix, 35), "rank 3's good branch after four refused ones")
    local = _solo(model, local_prefix, 24, RSS_TOKENS)
    for i in range(ROUNDS):
        br = psd.recv_branch(2, model=model, prefix=prefix, timeout=STEP_TIMEOUT)
        if i == 0:
            _same_branch(br, local, "round 0")
        del br
        if i + 1 in (10, ROUNDS):
            gc.collect()
            out[f"rss_{i + 1}"] = rss_kib()
            out[f"keys_{i + 1}"] = store.num_keys()
    out["payload_kib"] = RSS_TOKENS * psd.branch_bytes_per_token(model) // 1024
    # one branch from each of ranks 1-3 within 2.5 s: rank 2's arrives, rank 3's is refused, rank 1 is dead
    store.set("t/gather", "1")
    t0 = time.monotonic()
    got, missing = psd.gather_branches([1, 2, 3], model=model, prefix=prefix, timeout=2.5)
    out["gather"] = {"got": list(got), "missing": missing, "seconds": time.monotonic() - t0}
    _same_branch(got[2], _solo(model, local_prefix, 25), "gathered branch of rank 2")
    return out


def all_scenarios(rank, world):
    """Both scenarios in one spawned run (process start-up is the larger cost): round trip, then faults."""
    t0 = time.monotonic()
    a = round_trip(rank, world)
    t1 = time.monotonic()
    b = faults(rank, world)
    return {"round_trip": a, "faults": b, "seconds": (t1 - t0, time.monotonic() - t1)}


# ---- scenario C: a store without queues -------------------------------------------------------------------------
@torch.no_grad()
def numbered_keys(rank, world):
    """A ``file://`` group (FileStore: no queues, so announcements take numbered keys): rank 0 broadcasts the prefix;
    ranks 1 and 2 each send one branch, rank 2 then one it withdraws (its timeout), and both two more once rank 0 has
    timed out on the silent rank 1; rank 0 takes them in arrival order, skipping the withdrawn one, and the store
    holds as many keys after the second round as after the first (counted with the senders waiting)."""
    from pskernels import distributed as psd
    from pskernels.distributed import transport

    store = _store()
    model = setup("llama")
    local_prefix = model(ids(P, 1), use_cache=True).past_key_values
    out = {"queues": transport._has_queues(store, None)}
    prefix = psd.broadcast_prefix(local_prefix if rank == 0 else None, 0, model=model, timeout=STEP_TIMEOUT)
    if rank:
        for i in range(3):
            if i == 1:
                store.set(f"t/first/{rank}", "1")
                if rank == 2:  # nobody takes it within 0.5 s: withdrawn
                    store.wait(["t/counted"])
                    out["withdrawn"] = _raises(psd.BranchTimeout, psd.send_branch, _solo(model, prefix, 99), 0,
                                               model=model, timeout=0.5)
                    store.set("t/withdrawn", "1")
                store.wait(["t/go"])
            psd.send_branch(_solo(model, prefix, 40 + 10 * rank + i), 0, model=model, timeout=STEP_TIMEOUT)
        store.set(f"t/done/{rank}", "1")
        return out
    got, missing = psd.gather_branches([1, 2], model=model, prefix=prefix, timeout=STEP_TIMEOUT)
    assert not missing and sorted(got) == [1, 2], (list(got), missing)
    for r, br in got.items():  # the broadcast prefix is the local prefill, so the branches are the local workers'
        _same_branch(br, _solo(model, local_prefix, 40 + 10 * r), f"rank {r}'s first branch")
    store.wait(["t/first/1", "t/first/2"])
    out["keys_before"] = store.num_keys()
    store.set("t/counted", "1")
    out["timeout"] = _raises(psd.BranchTimeout, psd.recv_branch, 1, model=model, prefix=prefix, timeout=0.5)
    store.wait(["t/withdrawn"])
    store.set("t/go", "1")
    taken = {1: 1, 2: 1}
    for _ in range(4):
        src, br = psd.recv_any([r for r in (1, 2) if taken[r] < 3], model=model, prefix=prefix,
                               timeout=STEP_TIMEOUT)
        _same_branch(br, _solo(model, local_prefix, 40 + 10 * src + taken[src]), f"rank {src}'s branch {taken[src]}")
        taken[src] += 1
    store.wait(["t/done/1", "t/done/2"])
    # less t/counted, t/withdrawn, t/go, t/done/1, t/done/2 and the runner's test/done (once a sender has finished)
    out["keys_after"] = store.num_keys() - 5 - store.check(["test/done"])
    return out


# ---- scenario D: a group made anew in the same processes ----------------------------------------------------------
@torch.no_grad()
def regroup(rank, world):
    """``destroy_process_group`` then ``init_process_group`` in the same two processes (as when a dead worker is
    replaced): rank 1's send withdrawn in the old group left the ranks' sequence numbers apart (1 sent, 0 taken);
    the new group starts them from 0 on both, so its first branch arrives."""
    import torch.distributed as dist

    from pskernels import distributed as psd

    model = setup("llama")
    prefix = model(ids(P, 1), use_cache=True).past_key_values
    out = {}
    if rank == 1:
        out["withdrawn"] = _raises(psd.BranchTimeout, psd.send_branch, _solo(model, prefix, 60), 0, model=model,
                                   timeout=0.5)
    if rank == 0:
        _store().set("t/port", str(_free_port()))
    port = int(_store().get("t/port"))
    dist.barrier()
    dist.destroy_process_group()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    if rank == 1:
        psd.send_branch(_solo(model, prefix, 61), 0, model=model, timeout=STEP_TIMEOUT)
    else:
        br = psd.recv_branch(1, model=model, prefix=prefix, timeout=STEP_TIMEOUT)
        _same_branch(br, _solo(model, prefix, 61), "the first branch of a group made anew")
        out["received"] = True
    return out
