"""Issue 14's GPU figure: one decode step of N workers sharing a P-token prefix (bf16, Llama-8B geometry), all
layers, with the prefix read once (cascade) against the same step on a prefix repeated per row (every row reads
its own copy). For each backend and path: the step's time as launched from Python, the device time of its
kernels alone (profiler), the bytes each path must read, the bandwidth and its fraction of a device-to-device
copy measured in the same run, and the first host synchronisation inside a run (which also blocks CUDA-graph
capture). Three ways to call: ``call`` (``multi_branch_attention`` per layer, a plan each time), ``plan`` (one
plan per step, ``run`` per layer: what ``patch_model`` does) and ``run`` (the plan made once before the step,
only ``run`` per layer inside it: the way a step can be captured in a CUDA graph). The Triton shared-prefix step
is also broken down by kernel (cascade pass, own segments, combine), timed with the cascade's key splits
forced to each of ``--splits`` (the launcher's own choice is the row without a split count), and with the
cascade's states merged by the own-segment launch instead of the combine kernel
(``PSKERNELS_TRITON_CASCADE_MERGE=1``, alternating with the default). Needs CUDA.
Usage: python bench/gpu_cascade.py [--json FILE] [--backends cuda,triton] [--splits 4,8,16,32,64]
"""
import argparse
import contextlib
import json
import os

import torch
from triton.testing import do_bench, do_bench_cudagraph

import pskernels


def _copy_bandwidth():
    """Bytes read + written per second by a 2 GiB device-to-device copy (the practical HBM ceiling)."""
    src = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=5, rep=50)
    return 2 * src.numel() / (ms * 1e-3)


def _time(fn):
    """Milliseconds of ``fn``: graph replay when the step can be captured (no launch gaps), else streamed."""
    try:
        return do_bench_cudagraph(fn, rep=50), "cudagraph"
    except Exception as e:  # noqa: BLE001 - a host sync in the op makes capture fail; fall back and say why
        torch.cuda.synchronize()
        return do_bench(fn, warmup=10, rep=50), f"streamed (capture failed: {type(e).__name__}: {str(e)[:160]})"


def _kernels(fn):
    """Device milliseconds of one call of ``fn`` per kernel or copy name (torch.profiler), largest first."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    evs = prof.key_averages()
    attr = "self_device_time_total" if evs and hasattr(evs[0], "self_device_time_total") else "self_cuda_time_total"
    rows = [(e.key[:60], getattr(e, attr) / 1e3, e.count) for e in evs]
    return sorted([r for r in rows if r[1] > 0], key=lambda r: -r[1])


def _device_ms(fn):
    """Sum of the device time of every kernel and copy of one call of ``fn`` (torch.profiler)."""
    rows = _kernels(fn)
    return sum(ms for _, ms, _ in rows) if rows else float("nan")


def _planned_step(qs, tensors, backend):
    """One decode step over the layers' ``qs`` / ``tensors``: a plan made (and run once) now, ``run`` per layer."""
    made = pskernels.plan_multi_branch_attention(qs[0], *tensors[0], backend=backend)
    made.run(qs[0], *tensors[0])

    def step():
        for q, ts in zip(qs, tensors):
            made.run(q, *ts)

    return step


@contextlib.contextmanager
def _forced_splits(n):
    """The Triton launcher plans every cascade launch with ``n`` key splits inside this context."""
    import pskernels.triton.multi_branch_attention as mba

    planned = mba.plan_launches

    def plan_launches(*args, **kwargs):
        return [lc._replace(nsplit=n) if lc.cascade else lc for lc in planned(*args, **kwargs)]

    mba.plan_launches = plan_launches
    try:
        yield
    finally:
        mba.plan_launches = planned


def _first_sync(fn):
    """The first host synchronisation inside ``fn`` (torch's sync debug mode), or None."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        return None
    except RuntimeError as e:
        return str(e)[:200]
    finally:
        torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefix", type=int, default=8192)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--own", type=int, default=64, help="tokens each worker row has decoded so far")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--backends", default="cuda,triton")
    ap.add_argument("--splits", default="4,8,16,32,64", help="cascade key splits to force (Triton, shared prefix)")
    ap.add_argument("--json")
    a = ap.parse_args()
    Hq, Hkv, D, dt = 32, 8, 128, torch.bfloat16
    P, B, own, L = a.prefix, a.rows, a.own, a.layers
    torch.manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dt)

    qs = [randn(B, Hq, 1, D) for _ in range(L)]
    shared = [([randn(1, Hkv, P, D).expand(B, -1, -1, -1), randn(B, Hkv, own, D)],
               [randn(1, Hkv, P, D).expand(B, -1, -1, -1), randn(B, Hkv, own, D)]) for _ in range(L)]
    # the prefix repeated per row, as stock HF stores it: one layer's copies, read by every layer (B x 32 layers
    # of copies would not fit); each is far larger than the L2, so every layer still streams it from HBM
    rk, rv = (t[0].contiguous() for t in shared[0])
    repeated = [([rk, ks[1]], [rv, vs[1]]) for ks, vs in shared]
    e, tail = dt.itemsize, 2 * B * Hkv * own * D + 2 * B * Hq * D
    nbytes = {"shared": L * (2 * Hkv * P * D + tail) * e, "repeated": L * (2 * B * Hkv * P * D + tail) * e}
    ceiling = _copy_bandwidth()
    res = {"P": P, "N": B, "own": own, "layers": L, "Hq": Hq, "Hkv": Hkv, "D": D, "dtype": "bf16",
           "copy_bandwidth_GBps": ceiling / 1e9, "bytes": nbytes, "rows": []}
    print(f"device-to-device copy: {ceiling / 1e9:.0f} GB/s (read + write)")
    for backend in a.backends.split(","):
        if backend not in pskernels.available_backends("multi_branch_attention"):
            print(f"{backend}: not available")
            continue
        ref = pskernels.multi_branch_attention(qs[0].float(), *([t.float() for t in ts] for ts in shared[0]),
                                               backend="torch")[0]
        err = (pskernels.multi_branch_attention(qs[0], *shared[0], backend=backend)[0].float() - ref).abs().max()
        for layout, tensors in (("shared", shared), ("repeated", repeated)):
            def call(tensors=tensors, backend=backend):
                for l in range(L):
                    pskernels.multi_branch_attention(qs[l], *tensors[l], backend=backend)

            def plan(tensors=tensors, backend=backend):
                p = pskernels.plan_multi_branch_attention(qs[0], *tensors[0], backend=backend)
                for l in range(L):
                    p.run(qs[l], *tensors[l])

            for how, fn in (("call", call), ("plan", plan), ("run", _planned_step(qs, tensors, backend))):
                ms, timing = _time(fn)
                dev_ms = _device_ms(fn)
                row = dict(backend=backend, layout=layout, how=how, ms=ms, timing=timing, device_ms=dev_ms,
                           GBps=nbytes[layout] / (ms * 1e-3) / 1e9,
                           device_GBps=nbytes[layout] / (dev_ms * 1e-3) / 1e9,
                           device_fraction_of_copy=nbytes[layout] / (dev_ms * 1e-3) / ceiling,
                           first_sync=_first_sync(fn), max_abs_err_vs_torch_fp32=err.item())
                res["rows"].append(row)
                print(f"{backend} {layout} {how}: {ms:.3f} ms/step ({row['GBps']:.0f} GB/s; {timing}); kernels "
                      f"{dev_ms:.3f} ms ({row['device_GBps']:.0f} GB/s, {row['device_fraction_of_copy']:.2f} of "
                      f"copy); first sync: {row['first_sync']}")
    if any(r["backend"] == "triton" for r in res["rows"]):
        splits = [int(n) for n in a.splits.split(",") if n]
        _triton_shared_breakdown(res, qs, shared, nbytes["shared"], ceiling, splits)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


def _triton_shared_breakdown(res, qs, shared, nbytes, ceiling, splits):
    """The Triton shared-prefix step (plan made before it) by kernel, then with the cascade's key splits forced,
    then with the cascade's states merged in the own launch against the combine kernel."""
    import pskernels.triton.multi_branch_attention as mba

    made = pskernels.plan_multi_branch_attention(qs[0], *shared[0], backend="triton")
    chosen = [(lc.cascade, lc.nsplit) for lc in mba._setup(qs[0], *shared[0], made.params, None).launches]
    res["triton_shared_launches"] = chosen
    res["triton_shared_kernels"] = _kernels(_planned_step(qs, shared, "triton"))
    print(f"triton shared launches (cascade, splits): {chosen}")
    for name, ms, n in res["triton_shared_kernels"]:
        print(f"  {ms:8.3f} ms  x{n:<4d} {name}")
    res["triton_shared_splits"] = []
    for n in splits:
        with _forced_splits(n):
            step = _planned_step(qs, shared, "triton")
            ms, timing = _time(step)
            dev_ms = _device_ms(step)
        row = dict(splits=n, ms=ms, timing=timing, device_ms=dev_ms,
                   device_fraction_of_copy=nbytes / (dev_ms * 1e-3) / ceiling)
        res["triton_shared_splits"].append(row)
        print(f"triton shared run, cascade splits {n}: {ms:.3f} ms/step ({timing[:9]}); kernels {dev_ms:.3f} ms "
              f"({row['device_fraction_of_copy']:.2f} of copy)")
    res["triton_shared_merge"] = []
    before = os.environ.get("PSKERNELS_TRITON_CASCADE_MERGE")
    try:
        for merge in ("0", "1") * 3:  # alternating: the default (combine kernel), then the merge in the own launch
            os.environ["PSKERNELS_TRITON_CASCADE_MERGE"] = merge
            step = _planned_step(qs, shared, "triton")
            ms, timing = _time(step)
            res["triton_shared_merge"].append(dict(merge=merge == "1", ms=ms, timing=timing,
                                                   device_ms=_device_ms(step)))
            print(f"triton shared run, merge in the own launch {merge}: {ms:.3f} ms/step ({timing[:9]})")
        res["triton_shared_merge_kernels"] = _kernels(step)
    finally:
        if before is None:
            os.environ.pop("PSKERNELS_TRITON_CASCADE_MERGE", None)
        else:
            os.environ["PSKERNELS_TRITON_CASCADE_MERGE"] = before


if __name__ == "__main__":
    main()
