"""ParallelCache through patched HF models vs a full-sequence oracle, for every claimed architecture."""

import pytest
import torch

import pskernels
from pskernels.ref import rotate

from hf_oracle import branch_caches, make_case, mask_arg, oracle_greedy, oracle_logits, oracle_rows
from tiny_models import ARCHS, VOCAB, make_model

pytestmark = pytest.mark.hf
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(ARCHS))
def patched(request):
    model = make_model(request.param)
    model.generation_config.eos_token_id = None
    handle = pskernels.patch_model(model)
    yield request.param, model
    handle.remove()


def _real_rows(logits, case, b):
    return logits[b][case.query_mask[b].bool()]


@pytest.mark.parametrize("zero_copy", [False, True], ids=["deepcopy", "zero_copy"])
@pytest.mark.parametrize("batch", [1, 2])
def test_forward_matches_oracle(patched, batch, zero_copy):
    arch, model = patched
    if batch == 1:
        case = make_case(1, 5, [[4], [7], [3]], [3], VOCAB, seed=1)
    else:  # ragged: row 1 lacks branch 1, branch lengths differ, query left padded
        case = make_case(2, 5, [[4, 2], [7, 0], [3, 5]], [4, 2], VOCAB, seed=2)
    prefix, branches = branch_caches(model, case, zero_copy=zero_copy)
    cache = pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths)
    with torch.no_grad():
        logits = model(case.query, attention_mask=case.query_mask, past_key_values=cache).logits
    for b in range(batch):
        ref = oracle_logits(model, case, b)
        err = (_real_rows(logits, case, b) - ref).abs().max().item()
        assert err < TOL, f"{arch} row {b}: max logit error {err:.2e}"


@pytest.mark.parametrize("batch", [1, 2])
def test_generate_matches_oracle_greedy(patched, batch):
    arch, model = patched
    if batch == 1:
        case = make_case(1, 4, [[5], [3]], [3], VOCAB, seed=3)
    else:
        case = make_case(2, 4, [[5, 2], [0, 6]], [3, 1], VOCAB, seed=4)
    prefix, branches = branch_caches(model, case)
    cache = pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths)
    steps = 4
    with torch.no_grad():
        out = model.generate(case.query, attention_mask=case.query_mask, past_key_values=cache,
                             max_new_tokens=steps, do_sample=False, pad_token_id=0)
    for b in range(batch):
        assert out[b, case.query.shape[1]:].tolist() == oracle_greedy(model, case, b, steps), arch


def test_cache_kwarg_name(patched):
    arch, model = patched
    case = make_case(1, 3, [[4]], [2], VOCAB, seed=5)
    prefix, branches = branch_caches(model, case)
    with torch.no_grad():
        a = model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches)).logits
        b = model(case.query, cache=pskernels.ParallelCache(prefix, branches)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def _concat_rotated_reference(model, prefix, branches, deltas, query, query_start):
    """Independent reference: a DynamicCache of [prefix | R(delta_i) branch_i ...] + stock attention."""
    from transformers import DynamicCache

    P = prefix.get_seq_length()
    ref_cache = DynamicCache()
    for l in range(len(prefix.layers)):
        spec = pskernels.RopeSpec.from_model(model, l)
        ks, vs = [prefix.layers[l].keys], [prefix.layers[l].values]
        for c, d in zip(branches, deltas):
            k = c.layers[l].keys[:, :, P:]
            ks.append(rotate(k, torch.full(k.shape[:1] + (1, k.shape[2]), d), spec).to(k.dtype))
            vs.append(c.layers[l].values[:, :, P:])
        ref_cache.update(torch.cat(ks, 2), torch.cat(vs, 2), l)
    pos = torch.arange(query.shape[1])[None] + query_start
    return model(query, past_key_values=ref_cache, position_ids=pos).logits


@pytest.mark.parametrize("arch", ["llama", "llama3_rope", "llama_yarn", "qwen3", "phi3_partial", "gemma"])
@pytest.mark.parametrize("scheme", ["sequential", "right_aligned", "custom"])
def test_reindexing_schemes_match_concat_rotate_reference(arch, scheme):
    model = make_model(arch)
    case = make_case(1, 4, [[6], [3], [5]], [3], VOCAB, seed=6)
    with torch.no_grad():
        prefix, branches = branch_caches(model, case)
        lens = [6, 3, 5]
        if scheme == "sequential":
            firsts = [4, 10, 13]
        elif scheme == "right_aligned":
            firsts = [4, 7, 5]
        else:
            firsts = [20, 9, 40]
        qs = max(f + n for f, n in zip(firsts, lens)) + (2 if scheme == "custom" else 0)
        ref = _concat_rotated_reference(model, prefix, branches, [f - 4 for f in firsts], case.query, qs)
        handle = pskernels.patch_model(model)
        try:
            kw = {"branch_starts": firsts, "query_start": qs} if scheme == "custom" else {}
            cache = pskernels.ParallelCache(prefix, branches, scheme=scheme, **kw)
            assert cache.query_start.tolist() == [qs]
            out = model(case.query, past_key_values=cache).logits
        finally:
            handle.remove()
    err = (out - ref).abs().max().item()
    assert err < TOL, f"{arch}/{scheme}: max logit error {err:.2e}"


def test_single_branch_any_scheme_equals_plain_prefill():
    """One natively positioned branch: every scheme is plain sequential prefill of [prefix | branch | query]."""
    model = make_model("llama")
    case = make_case(1, 4, [[6]], [3], VOCAB, seed=7)
    with torch.no_grad():
        full = model(torch.cat([case.prefix, case.branches[0], case.query], 1)).logits[:, -3:]
        prefix, branches = branch_caches(model, case)
        with_patch = pskernels.patch_model(model)
        try:
            for scheme in ("parallel", "sequential", "right_aligned"):
                out = model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches, scheme=scheme)).logits
                assert (out - full).abs().max().item() < TOL, scheme
        finally:
            with_patch.remove()


def test_dynamic_rope_refuses_reindexing():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2,
                      rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    model = LlamaForCausalLM(cfg).eval()
    case = make_case(1, 3, [[4], [2]], [2], VOCAB, seed=8)
    prefix, branches = branch_caches(model, case)
    handle = pskernels.patch_model(model)
    try:
        with torch.no_grad():
            model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches))  # parallel: no re-indexing
            with pytest.raises(ValueError, match="dynamic"):
                model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches, scheme="sequential"))
    finally:
        handle.remove()


@pytest.mark.parametrize("arch", ["llama", "mistral_sliding", "gemma2"])
def test_oracle_is_sensitive_to_branches_and_windows_are_exercised(arch):
    """Guards the oracle tests against passing vacuously: dropping the branches changes the logits, and the
    sliding-window layers of the branch caches really did drop tokens."""
    model = make_model(arch)
    case = make_case(1, 5, [[7], [6]], [3], VOCAB, seed=9)
    prefix, branches = branch_caches(model, case)
    handle = pskernels.patch_model(model)
    try:
        with torch.no_grad():
            no_branches = model(case.query, past_key_values=pskernels.ParallelCache(prefix, [], query_start=12)).logits
    finally:
        handle.remove()
    assert (no_branches[0] - oracle_logits(model, case, 0)).abs().max().item() > 0.1
    if arch != "llama":
        stored = [layer.keys.shape[2] for layer in branches[0].layers]
        assert min(stored) < 12 == max(layer.get_seq_length() for layer in branches[0].layers)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3_partial"])
def test_batched_workers_as_cache_rows_match_oracle(arch):
    """N workers run as one left-padded batch on a batch-1 prefix (zero-copy); each row becomes a branch."""
    model = make_model(arch)
    model.generation_config.eos_token_id = None
    case = make_case(1, 5, [[6], [3], [5]], [3], VOCAB, seed=10)
    lens = [6, 3, 5]
    with torch.no_grad():
        prefix = model(case.prefix, use_cache=True).past_key_values
        handle = pskernels.patch_model(model)
        try:
            L = max(lens)
            ids = torch.zeros(3, L, dtype=torch.long)
            mask = torch.zeros(3, L, dtype=torch.long)
            for i, n in enumerate(lens):  # left-pad each worker's tokens
                ids[i, L - n:] = case.branches[i][0, :n]
                mask[i, L - n:] = 1
            workers = pskernels.ParallelCache(prefix, [])
            model(ids, attention_mask=mask, past_key_values=workers)
            branches = [pskernels.CacheRow(workers, i) for i in range(3)]
            cache = pskernels.ParallelCache(prefix, branches)
            assert cache.query_start.tolist() == [5 + L]
            logits = model(case.query, past_key_values=cache).logits
        finally:
            handle.remove()
    err = (logits[0] - oracle_logits(model, case, 0)).abs().max().item()
    assert err < TOL, f"{arch}: max logit error {err:.2e}"


def test_sliding_window_tokens_dropped_by_right_padding_raise():
    """Row 0's short branch was right-padded in a batched worker run: the sliding layers pushed its real tokens
    out of the window, and its query would need them. That must raise, not silently attend to less."""
    model = make_model("gemma3")
    case = make_case(2, 4, [[5, 3], [2, 6]], [3, 2], VOCAB, seed=11)
    prefix, branches = branch_caches(model, case)
    handle = pskernels.patch_model(model)
    try:
        with pytest.raises(ValueError, match="dropped tokens"):
            with torch.no_grad():
                model(case.query, attention_mask=case.query_mask,
                      past_key_values=pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths))
    finally:
        handle.remove()


@pytest.mark.parametrize("zero_copy", [False, True], ids=["deepcopy", "zero_copy"])
@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "cpu"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_forced_kernel_backends_through_hf(arch, backend, zero_copy):
    """The HF path with a forced kernel backend (Triton runs in its interpreter here) matches the oracle; zero-copy
    workers' branches are strided views of their token-major own-token buffers."""
    if backend not in pskernels.available_backends("multi_branch_attention"):
        pytest.skip(f"{backend} backend not available on this machine")
    model = make_model(arch)
    case = make_case(2, 5, [[4, 2], [7, 0], [3, 5]], [4, 2], VOCAB, seed=2)
    handle = pskernels.patch_model(model, backend=backend)
    try:
        with torch.no_grad():
            prefix, branches = branch_caches(model, case, zero_copy=zero_copy)
            if zero_copy:
                assert all(b.layers[0].slab.rows(b.get_seq_length()) is not None for b in branches)
            cache = pskernels.ParallelCache(prefix, branches, branch_lengths=case.lengths)
            logits = model(case.query, attention_mask=case.query_mask, past_key_values=cache).logits
    finally:
        handle.remove()
    for b in range(2):
        err = (_real_rows(logits, case, b) - oracle_logits(model, case, b)).abs().max().item()
        assert err < TOL, f"{arch}/{backend} row {b}: max logit error {err:.2e}"


def test_one_plan_per_layout_and_forward(patched, monkeypatch):
    """The segment layout is validated once per forward and layer kind, not once per layer."""
    arch, model = patched
    case = make_case(1, 5, [[4], [7], [3]], [3], VOCAB, seed=1)
    prefix, branches = branch_caches(model, case, zero_copy=True)
    calls = []
    real = pskernels.hf.attention.plan_multi_branch_attention
    monkeypatch.setattr(pskernels.hf.attention, "plan_multi_branch_attention",
                        lambda *a, **kw: calls.append(kw.get("sliding_window")) or real(*a, **kw))
    with torch.no_grad():
        model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches))
    layer_kinds = {getattr(m, "sliding_window", None) for m in model.modules() if hasattr(m, "layer_idx")}
    assert 1 <= len(calls) <= len(layer_kinds) < model.config.num_hidden_layers + 1
    assert len(set(calls)) == len(calls)


def _skip_oracle(model, case, skip):
    """Full-sequence oracle where the first ``skip[i]`` tokens of branch i are seen by their branch only."""
    toks, pos, seg = oracle_rows(case, 0)
    hidden, at = [], case.prefix.shape[1]
    for i, n in enumerate(case.lengths[:, 0].tolist()):
        hidden += range(at, at + skip[i])
        at += n
    T = len(toks)
    masks = mask_arg(model, pos, seg)
    is_query = torch.tensor(seg)[:, None] == -1
    key_hidden = torch.zeros(1, T, dtype=torch.bool)
    key_hidden[0, hidden] = True
    for m in (masks.values() if isinstance(masks, dict) else [masks]):
        m[0, 0][is_query & key_hidden] = float("-inf")
    out = model(torch.tensor([toks]), attention_mask=masks, position_ids=torch.tensor([pos]))
    return out.logits[0, -seg.count(-1):]


@pytest.mark.parametrize("zero_copy", [False, True], ids=["deepcopy", "zero_copy"])
@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral_sliding", "phi3_partial", "gemma"])
def test_branch_skip_hides_leading_tokens_at_unchanged_positions(arch, zero_copy):
    model = make_model(arch)
    case = make_case(1, 4, [[6], [3], [5]], [3], VOCAB, seed=11)
    skip = [2, 0, 5]
    with torch.no_grad():
        handle = pskernels.patch_model(model)
        try:
            prefix, branches = branch_caches(model, case, zero_copy=zero_copy)
            cache = pskernels.ParallelCache(prefix, branches, branch_skip=skip)
            assert cache.query_start.tolist() == [4 + 6]  # the skipped tokens keep their positions
            out = model(case.query, past_key_values=cache).logits[0]
            plain = model(case.query, past_key_values=pskernels.ParallelCache(prefix, branches)).logits[0]
        finally:
            handle.remove()
        ref = _skip_oracle(model, case, skip)
    err = (out - ref).abs().max().item()
    assert err < TOL, f"{arch}: max logit error {err:.2e}"
    assert (out - plain).abs().max().item() > 100 * TOL  # the skip is not a no-op


def test_branch_skip_out_of_range_is_named():
    model = make_model("llama")
    case = make_case(1, 4, [[6], [3]], [3], VOCAB, seed=12)
    with torch.no_grad():
        prefix, branches = branch_caches(model, case)
    with pytest.raises(ValueError, match=r"branch_skip\[1\]: expected values in \[0, branch length \[3\]\], got \[4\]"):
        pskernels.ParallelCache(prefix, branches, branch_skip=[0, 4])
    with pytest.raises(ValueError, match=r"branch_skip\[0\]: expected values in \[0, branch length \[2\]\], got \[3\]"):
        pskernels.ParallelCache(prefix, branches, branch_lengths=[2, 3], branch_skip=[3, 0])


def test_a_cache_without_branches_places_its_queries_after_the_prefix():
    """A worker's ``ParallelCache(prefix, [])`` skips the branch placement (no tensor op for branches it does not
    have) and holds the same empty tables; a custom scheme's starts are still checked."""
    model = make_model("llama")
    case = make_case(2, 4, [[3, 3]], [2, 2], VOCAB, seed=13)
    with torch.no_grad():
        prefix, _ = branch_caches(model, case)
    for scheme in ("parallel", "sequential", "right_aligned"):
        c = pskernels.ParallelCache(prefix, [], scheme=scheme)
        assert c.branch_first.shape == c.deltas.shape == (0, 2) and c.query_start.tolist() == [4, 4]
    c = pskernels.ParallelCache(prefix, [], scheme="custom", branch_starts=torch.zeros(0, 2, dtype=torch.int64))
    assert c.branch_first.shape == (0, 2) and c.query_start.tolist() == [4, 4]
    with pytest.raises(ValueError, match="branch_starts"):
        pskernels.ParallelCache(prefix, [], scheme="custom", branch_starts=[[1, 2]])
