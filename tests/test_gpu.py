"""The CUDA and Triton backends on a real GPU against the PyTorch reference (skipped without CUDA)."""
import pytest
import torch

import pskernels

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
GPU_BACKENDS = ["cuda", "triton"]
TOL = {torch.float32: 2e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# LSE, absolute. The Triton kernel counter-rotates the query (position shifts) and rounds it to the input dtype
# for the tensor-core dot: in bf16 that is 2^-9 relative per element, measured on an H200 as LSE errors up to
# 2.1e-3 at Lq=130 (fp32 reference on the same bf16 inputs); the CUDA kernel keeps the rotated query in fp32.
LSE_TOL = {torch.float32: 1e-3, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _backend(name):
    if name not in pskernels.available_backends("multi_branch_attention"):
        pytest.skip(f"{name} backend not available")
    return name


def _case(dtype, B=2, G=4, Hkv=2, D=128, Dv=128, Lq=5, lens=(64, 0, 300, 37, 9)):
    dev = "cuda"
    q = torch.randn(B, Hkv * G, Lq, D, device=dev, dtype=dtype)
    ks = [torch.randn(B, Hkv, n, D, device=dev, dtype=dtype) for n in lens]
    vs = [torch.randn(B, Hkv, n, Dv, device=dev, dtype=dtype) for n in lens]
    return q, ks, vs


def _close(a, b, dtype):
    (oa, la), (ob, lb) = a, b
    assert not torch.isnan(oa).any()
    assert (oa.float() - ob.float()).abs().max().item() < TOL[dtype] * max(1.0, ob.float().abs().max().item())
    assert torch.equal(torch.isinf(la), torch.isinf(lb))
    fin = torch.isfinite(lb)
    assert (la[fin] - lb[fin]).abs().max().item() < LSE_TOL[dtype]


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("Lq", [1, 5, 130])
@pytest.mark.parametrize("features", ["plain", "shift", "all"])
def test_multi_branch_attention(backend, dtype, Lq, features):
    backend = _backend(backend)
    torch.manual_seed(0)
    q, ks, vs = _case(dtype, Lq=Lq)
    kw = dict(seq_lens=torch.tensor([[64, 10], [0, 0], [300, 0], [37, 37], [9, 9]], device="cuda"),
              left_pad=torch.tensor([[0, 3], [0, 0], [0, 0], [0, 0], [2, 0]], device="cuda"))
    if features in ("shift", "all"):
        kw.update(position_shifts=torch.tensor([0, 5, -40, 1000, 0], device="cuda"),
                  rope=pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64), style="neox", rotary_dim=64))
    if features == "all":
        kw.update(softcap=20.0, sliding_window=200, segment_positions=torch.tensor([0, 64, 64, 64, 400], device="cuda"),
                  temperature=torch.tensor([1.0, 0.9], device="cuda"),
                  lse_scale=torch.tensor([1.0, 0.9], device="cuda"), log_weight=torch.tensor([0.0, 0.2], device="cuda"),
                  segment_groups=[0, 1, 1, 1, 0])
    ref = pskernels.multi_branch_attention(q.float(), [k.float() for k in ks], [v.float() for v in vs],
                                           backend="torch", **kw)
    out = pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)
    _close(out, ref, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_strided_views_and_gqa(backend):
    backend = _backend(backend)
    torch.manual_seed(1)
    base = torch.randn(1, 200, 8, 64, device="cuda", dtype=torch.bfloat16)  # HF [B, L, H, D] -> transposed view
    k = base.transpose(1, 2)[:, :, 7:150]
    q = torch.randn(1, 32, 3, 64, device="cuda", dtype=torch.bfloat16)
    ref = pskernels.multi_branch_attention(q.float(), [k.float(), k.float()], [k.float(), k.float()], backend="torch")
    _close(pskernels.multi_branch_attention(q, [k, k], [k, k], backend=backend), ref, torch.bfloat16)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_small_ops(backend):
    backend = _backend(backend)
    torch.manual_seed(2)
    spec = pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
    k = torch.randn(2, 4, 33, 64, device="cuda")
    torch.testing.assert_close(pskernels.rotate_keys(k, torch.tensor([3, -900], device="cuda"), spec, backend=backend),
                               pskernels.rotate_keys(k, torch.tensor([3, -900], device="cuda"), spec, backend="torch"),
                               atol=2e-4, rtol=1e-4)
    o, s = torch.randn(3, 2, 4, 7, 64, device="cuda"), torch.randn(3, 2, 4, 7, device="cuda")
    s[0, 0] = float("-inf")
    for a, b in zip(pskernels.merge_states(o, s, backend=backend), pskernels.merge_states(o, s, backend="torch")):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    keys = [[torch.randn(2, 4, n, 64, device="cuda") for n in (5, 0, 17)] for _ in range(3)]
    params = dict(k_down=torch.randn(3, 4, 64, 8, device="cuda") * 0.1,
                  k_up=torch.randn(3, 4, 8, 64, device="cuda") * 0.1, k_gate=torch.zeros(3, 4, device="cuda"),
                  v_down=torch.randn(3, 4, 64, 8, device="cuda") * 0.1,
                  v_up=torch.randn(3, 4, 8, 64, device="cuda") * 0.1)
    kw = dict(rope=spec, orig_positions=[10, 10, 10], new_positions=[10, 15, 22], **params)
    got = pskernels.map_kv_caches(keys, keys, backend=backend, **kw)
    ref = pskernels.map_kv_caches(keys, keys, backend="torch", **kw)
    for ga, ra in zip(got, ref):
        for gl, rl in zip(ga, ra):
            for g, r in zip(gl, rl):
                torch.testing.assert_close(g, r, atol=2e-4, rtol=1e-4)


def test_hf_parallel_cache_on_gpu():
    """A patched tiny Llama on CUDA (auto backend) matches the same model's CPU run."""
    from pskernels.synthesis.models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(hidden=128, layers=2).cuda()
    ids = torch.randint(0, 512, (1, 40), device="cuda")
    with torch.no_grad():
        prefix = model(ids[:, :8], use_cache=True).past_key_values
        handle = pskernels.patch_model(model)
        try:
            workers = []
            for i in range(2):
                w = pskernels.ParallelCache(prefix, [])
                model(ids[:, 8 + 12 * i: 20 + 12 * i], past_key_values=w)
                workers.append(w)
            gpu = model(ids[:, 32:], past_key_values=pskernels.ParallelCache(prefix, workers)).logits
            ref = model(ids[:, 32:], past_key_values=pskernels.ParallelCache(prefix, workers, backend="torch")).logits
        finally:
            handle.remove()
    assert (gpu - ref).abs().max().item() < 1e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("Lq", [1, 40])
def test_non_finite_inputs_reach_the_same_outputs_as_the_reference(backend, Lq):
    """GPU max instructions skip NaN: a NaN score must still poison its row (out and lse), not vanish."""
    backend = _backend(backend)
    q, ks, vs = _case(torch.float32, Lq=Lq, lens=(64, 300, 9))
    q[0, 1, Lq - 1] = float("nan")                  # one query row
    ks[1][1, 0, 7] = float("nan")                   # one key: every query head of kv head 0 in row 1
    got = pskernels.multi_branch_attention(q, ks, vs, backend=backend)
    want = pskernels.multi_branch_attention(q, ks, vs, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))
    s = torch.randn(3, 2, 4, 5, device="cuda")
    s[:, 0, 1, 2] = float("nan")                    # all states NaN in one row
    s[1, 1, 0, 0] = float("nan")                    # one state NaN in another
    o = torch.randn(3, 2, 4, 5, 16, device="cuda")
    got = pskernels.merge_states(o, s, backend=backend)
    want = pskernels.merge_states(o, s, backend="torch")
    for g, w in zip(got, want):
        assert torch.equal(torch.isnan(g), torch.isnan(w))


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_plan_runs_never_wait_for_the_device(backend, shared_prefix):
    """A planned layout runs without a host synchronisation (the layers of a step queue back to back), its
    first run (which builds the backend's tables) included, with lengths and padding given on the host."""
    backend = _backend(backend)
    torch.manual_seed(0)
    B, dtype = 4, torch.bfloat16
    q, ks, vs = _case(dtype, B=B, Lq=1, lens=(512, 37, 9))
    if shared_prefix:  # a batch-1 prefix broadcast over the rows: the cascade pass
        ks[0], vs[0] = ks[0][:1].expand(B, -1, -1, -1), vs[0][:1].expand(B, -1, -1, -1)
    kw = dict(seq_lens=torch.tensor([[512] * B, [37, 20, 0, 37], [9, 9, 9, 9]]),
              left_pad=torch.tensor([[0] * B, [0, 3, 0, 0], [0, 0, 2, 0]]))
    want = pskernels.multi_branch_attention(q.float(), [k.float() for k in ks], [v.float() for v in vs],
                                            backend="torch", **kw)
    pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw)  # compiles the kernels (a one-time cost)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend=backend, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        runs = [plan.run(q, ks, vs) for _ in range(3)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for got in runs:
        _close(got, want, dtype)


def test_broadcast_tables_reach_the_device():
    """1-D shifts and segment positions (broadcast over the rows, a stride-0 host view) are copied to the device
    through pinned memory: pinning such a view in place failed on an H200 ("more than one element of the
    written-to tensor refers to a single memory location")."""
    from pskernels._core.devices import host_to_device

    view = torch.tensor([3, 5])[:, None].expand(2, 4)
    got = host_to_device(view, torch.device("cuda"), "test")
    torch.cuda.synchronize()
    assert got.is_contiguous() and torch.equal(got.cpu(), view)
    q, ks, vs = _case(torch.float32, B=3, Lq=1, lens=(40, 9))
    rope = pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 128, 2) / 128))
    kw = dict(position_shifts=torch.tensor([0, 40]), rope=rope, sliding_window=20,
              segment_positions=torch.tensor([0, 40]))
    want = pskernels.multi_branch_attention(q, ks, vs, backend="torch", **kw)
    for backend in GPU_BACKENDS:
        if backend in pskernels.available_backends("multi_branch_attention"):
            _close(pskernels.multi_branch_attention(q, ks, vs, backend=backend, **kw), want, torch.float32)


def test_cuda_op_takes_lengths_on_the_host_or_the_device():
    """Direct calls of the compiled op: seq_lens / left_pad on the host (the adapter's way, no synchronisation)
    or on q's device give the same result, and on another device they are refused by name."""
    _backend("cuda")
    torch.manual_seed(0)
    q, ks, vs = _case(torch.float32, B=2, Lq=3, lens=(64, 20))
    lens, pads = torch.tensor([[64, 30], [20, 3]]), torch.tensor([[0, 5], [2, 0]])
    groups = torch.arange(2)

    def call(lens, pads):
        return torch.ops.pskernels.multi_branch_attention(
            q, ks, vs, lens, pads, None, None, None, None, True, True, 0.125, 0.0, 0, groups, None, None, None)

    on_host, on_device = call(lens, pads), call(lens.cuda(), pads.cuda())
    for a, b in zip(on_host, on_device):
        assert torch.equal(a, b)
    if torch.cuda.device_count() > 1:
        with pytest.raises(RuntimeError, match="seq_lens: expected device cpu or cuda:0"):
            call(lens.to("cuda:1"), pads)


def test_a_triton_plan_is_captured_in_a_cuda_graph_after_its_first_run():
    """Warmed on its tensors, a plan's run replays from a CUDA graph with the eager result on new inputs; a run
    that would copy tables (a fresh plan) and the CUDA op refuse capture by name instead of recording a copy
    from host memory."""
    _backend("triton")
    torch.manual_seed(0)
    B, dtype = 4, torch.bfloat16
    q, ks, vs = _case(dtype, B=B, Lq=1, lens=(512, 37, 9))
    ks[0], vs[0] = ks[0][:1].expand(B, -1, -1, -1), vs[0][:1].expand(B, -1, -1, -1)
    plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend="triton")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        plan.run(q, ks, vs)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = plan.run(q, ks, vs)
    q.copy_(torch.randn_like(q))
    ks[1].copy_(torch.randn_like(ks[1]))
    graph.replay()
    torch.cuda.synchronize()
    want = plan.run(q, ks, vs)
    assert torch.equal(out, want[0]) and torch.equal(lse, want[1])

    with pytest.raises(RuntimeError, match="make the plan before capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            pskernels.plan_multi_branch_attention(q, ks, vs, backend="triton")
    fresh = pskernels.plan_multi_branch_attention(q, ks, vs, backend="triton")
    with pytest.raises(RuntimeError, match="run the plan once on the same tensors before capture"):
        with torch.cuda.graph(torch.cuda.CUDAGraph()):
            fresh.run(q, ks, vs)
    if "cuda" in pskernels.available_backends("multi_branch_attention"):
        cuda_plan = pskernels.plan_multi_branch_attention(q, ks, vs, backend="cuda")
        cuda_plan.run(q, ks, vs)
        with pytest.raises(RuntimeError, match="cannot run inside CUDA-graph capture"):
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                cuda_plan.run(q, ks, vs)
