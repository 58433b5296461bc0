"""Long-running stability: resident memory stays flat over many calls, and patching is reversible and
thread-safe.

RSS is read from /proc/self/status (VmRSS). Each test warms up first (allocator pools, first-use
caches), then measures growth over the measured calls; a leak of even a few hundred bytes per call
shows as several MB. Growth numbers are printed (``pytest -s``) and recorded in docs/KERNEL_REPORT.md.
"""
from __future__ import annotations

import gc
import threading

import pytest
import torch

import pskernels

from op_helpers import make_rope

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def rss_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import resource  # fallback: peak RSS (only grows), still catches leaks

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _settle() -> float:
    gc.collect()
    return rss_mb()


def _op_calls(backend):
    g = torch.Generator().manual_seed(0)
    B, Hq, Hkv, Lq, D = 2, 4, 2, 3, 32
    q = torch.randn(B, Hq, Lq, D, generator=g)
    ks = [torch.randn(B, Hkv, n, D, generator=g) for n in (9, 0, 5, Lq + 1)]
    vs = [torch.randn(B, Hkv, n, D, generator=g) for n in (9, 0, 5, Lq + 1)]
    spec = make_rope(D)
    shifts = torch.tensor([0, 9, 9, 14])
    o, s = torch.randn(3, B, Hq, Lq, D, generator=g), torch.randn(3, B, Hq, Lq, generator=g)
    k = torch.randn(B, Hkv, 11, D, generator=g)
    mk = [[torch.randn(B, Hkv, n, D, generator=g) for n in (4, 6)] for _ in range(2)]
    down, up = torch.randn(2, Hkv, D, 4, generator=g) * 0.1, torch.randn(2, Hkv, 4, D, generator=g) * 0.1

    return [
        lambda: pskernels.multi_branch_attention(q, ks, vs, position_shifts=shifts, rope=spec, softcap=20.0,
                                                 backend=backend),
        lambda: pskernels.merge_states(o, s, backend=backend),
        lambda: pskernels.rotate_keys(k, torch.tensor([3, -7]), spec, backend=backend),
        lambda: pskernels.map_kv_caches(mk, mk, rope=spec, orig_positions=[0, 4], new_positions=[10, 2],
                                        k_down=down, k_up=up, backend=backend),
    ]


@pytest.mark.parametrize("backend", ["cpu"])
def test_op_calls_keep_rss_flat(backend):
    if backend not in pskernels.available_backends():
        pytest.skip(f"backend {backend!r} unavailable (pskernels._C not built)")
    calls = _op_calls(backend)
    n_calls, warm = 2000, 300
    with torch.no_grad():
        for _ in range(warm):
            for fn in calls:
                fn()
        base = _settle()
        mid = None
        for i in range(n_calls):
            for fn in calls:  # alternate the four ops
                fn()
            if i == n_calls // 2:
                mid = _settle()
    end = _settle()
    growth, late = end - base, end - mid
    print(f"\n[rss] ops/{backend}: {n_calls} x 4 calls: base {base:.1f} MB, mid {mid:.1f} MB, end {end:.1f} MB, "
          f"growth {growth:+.2f} MB (second half {late:+.2f} MB)")
    assert growth < 4.0, f"RSS grew {growth:.2f} MB over {n_calls * 4} calls"


def test_generate_with_fresh_parallel_caches_keeps_rss_flat():
    pytest.importorskip("transformers")
    from hf_oracle import branch_caches, make_case
    from tiny_models import VOCAB, make_model

    model = make_model("llama")
    model.generation_config.eos_token_id = None
    case = make_case(2, 4, [[5, 2], [0, 6], [3, 3]], [3, 1], VOCAB, seed=4)
    prefix, branches = branch_caches(model, case)
    handle = pskernels.patch_model(model)
    n_calls, warm = 200, 20
    first = None

    def gen():
        cache = pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths)
        return model.generate(case.query, attention_mask=case.query_mask, past_key_values=cache, max_new_tokens=3,
                              do_sample=False, pad_token_id=0)

    try:
        with torch.no_grad():
            for _ in range(warm):
                out = gen()
                first = out if first is None else first
                assert torch.equal(out, first)  # fresh caches: no state leaks between calls
            base = _settle()
            for i in range(n_calls):
                out = gen()
                assert torch.equal(out, first)
                if i == n_calls // 2:
                    mid = _settle()
        end = _settle()
    finally:
        handle.remove()
    growth, late = end - base, end - mid
    print(f"\n[rss] generate: {n_calls} calls: base {base:.1f} MB, mid {mid:.1f} MB, end {end:.1f} MB, "
          f"growth {growth:+.2f} MB (second half {late:+.2f} MB)")
    assert growth < 6.0, f"RSS grew {growth:.2f} MB over {n_calls} patched generate calls"


ARCHS = ("llama", "qwen2", "gemma2", "mistral_sliding", "gemma3", "phi3_partial")


def _models():
    pytest.importorskip("transformers")
    from tiny_models import VOCAB, make_model

    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    models = {a: make_model(a, attn_implementation="sdpa" if a in ("llama", "gemma3") else "eager", seed=i)
              for i, a in enumerate(ARCHS)}
    with torch.no_grad():
        ref = {a: m(ids).logits for a, m in models.items()}
    return models, ids, ref


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_patch_unpatch_many_models_one_process():
    models, ids, ref = _models()
    impls = {a: m.config._attn_implementation for a, m in models.items()}
    for _ in range(3):
        handles = {a: pskernels.patch_model(m) for a, m in models.items()}  # all patched at once
        for a, m in models.items():
            assert torch.equal(_logits(m, ids), ref[a]), f"{a}: patched (no ParallelCache) differs"
        for i, a in enumerate(ARCHS):  # unpatch in an interleaved order, mixing the two APIs
            if i % 2:
                handles[a].remove()
            else:
                pskernels.unpatch_model(models[a])
            assert torch.equal(_logits(models[a], ids), ref[a]), f"{a}: unpatched differs"
            for b in ARCHS[i + 1:]:  # the others are still patched and unaffected
                assert torch.equal(_logits(models[b], ids), ref[b]), f"{b}: affected by unpatching {a}"
    for a, m in models.items():
        assert m.config._attn_implementation == impls[a]
        assert not hasattr(m, "_pskernels_handle") or m._pskernels_handle is None


def test_patch_unpatch_from_two_threads():
    models, ids, ref = _models()
    impls = {a: m.config._attn_implementation for a, m in models.items()}
    names = list(models)
    errors = []
    barrier = threading.Barrier(2)

    def worker(mine):
        try:
            barrier.wait(timeout=30)
            for _ in range(8):
                hs = [pskernels.patch_model(models[a]) for a in mine]
                for a in mine:
                    if not torch.equal(_logits(models[a], ids), ref[a]):
                        errors.append(f"{a}: patched logits differ (thread {threading.get_ident()})")
                for h in reversed(hs):
                    h.remove()
                for a in mine:
                    if not torch.equal(_logits(models[a], ids), ref[a]):
                        errors.append(f"{a}: unpatched logits differ")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=worker, args=(names[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a worker thread hung"
    assert not errors, errors[:5]
    for a, m in models.items():
        assert m.config._attn_implementation == impls[a], a
        assert torch.equal(_logits(m, ids), ref[a]), f"{a}: not bit-identical after the threads"
    from pskernels.hf import attention

    assert not any(id(m.config) in attention._ORIGINAL for m in models.values()), "stale _ORIGINAL entries"
