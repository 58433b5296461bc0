"""Shared benchmark plumbing (docs/KERNELS.md §6), imported by the ``bench_*.py`` files and ``conftest.py``.

* ``perf`` (a fixture through ``conftest.py``): times a function with pytest-benchmark (host time; synchronises
  inside the timed function on CUDA), measures device time on CUDA (``triton.testing.do_bench``: cold L2,
  p50/p20/p80; CUDA events otherwise) and writes bytes moved, GB/s, TFLOP/s and % of H200 peak into
  ``benchmark.extra_info``.

Environment:
    PSKERNELS_BENCH_FULL=1        the big GPU sweep (one axis at a time around a base point);
                                  PSKERNELS_BENCH_FULL=grid for the full Cartesian product
    PSKERNELS_BENCH_DEVICE=cpu    force a device (default: cuda if available)
    PSKERNELS_BENCH_IMPLS=a,b     only these implementations (e.g. "pskernels-torch,cat_sdpa")
    PSKERNELS_BENCH_ROUNDS=N      pytest-benchmark rounds (default 5 on CPU, 20 on CUDA)
    PSKERNELS_BENCH_FLEX=0        skip FlexAttention (compiles once per shape)
    PSKERNELS_BENCH_INTERPRETER=1 also time Triton through its CPU interpreter (off: meaningless timings)
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

H200_BW = 4.8e12  # bytes/s, HBM3e
H200_FLOPS = 989e12  # dense bf16 tensor-core FLOP/s

DEVICE = torch.device(os.environ.get("PSKERNELS_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
ON_CUDA = DEVICE.type == "cuda"
FULL = os.environ.get("PSKERNELS_BENCH_FULL", "").strip().lower()
ROUNDS = int(os.environ.get("PSKERNELS_BENCH_ROUNDS") or (20 if ON_CUDA else 5))

if not ON_CUDA:
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def impl_selected(name: str) -> bool:
    sel = os.environ.get("PSKERNELS_BENCH_IMPLS", "").strip()
    return not sel or name in {s.strip() for s in sel.split(",")}


def skip_backend(backend: str):
    """Skip backends whose timings would be meaningless on this device."""
    if backend == "triton" and not ON_CUDA and os.environ.get("PSKERNELS_BENCH_INTERPRETER") != "1":
        pytest.skip("triton on CPU runs through the interpreter (set PSKERNELS_BENCH_INTERPRETER=1 to time it)")


def _sync():
    if ON_CUDA:
        torch.cuda.synchronize()


def cuda_device_time(fn):
    """(p50, p20, p80) device milliseconds with a cold L2."""
    try:
        from triton.testing import do_bench

        r = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
        return tuple(float(x) for x in r)
    except ImportError:
        pass
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.int8, device="cuda")
    for _ in range(3):
        fn()
    times = []
    for _ in range(50):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    q = statistics.quantiles(times, n=10)
    return statistics.median(times), q[1], q[7]


class Perf:
    device = DEVICE
    on_cuda = ON_CUDA
    full = FULL

    def run(self, benchmark, fn, *, bytes_moved: float, flops: float, group: str | None = None, **info):
        """Time ``fn`` (warmed up first) and record throughput figures in ``benchmark.extra_info``."""
        if group is not None:
            benchmark.group = group
        for _ in range(2 if ON_CUDA else 1):  # warm up (JIT, autotune, torch.compile) outside the timed region
            fn()
        _sync()

        def timed():
            r = fn()
            _sync()
            return r

        benchmark.pedantic(timed, rounds=ROUNDS, warmup_rounds=1 if ON_CUDA else 0, iterations=1)
        host_s = benchmark.stats.stats.median
        ex = benchmark.extra_info
        ex.update(info)
        ex["device"] = str(DEVICE) if not ON_CUDA else torch.cuda.get_device_name()
        ex["bytes_moved"] = int(bytes_moved)
        ex["flops"] = int(flops)
        ex["host_ms_p50"] = host_s * 1e3
        if ON_CUDA:
            p50, p20, p80 = cuda_device_time(fn)
            ex.update(device_ms_p50=p50, device_ms_p20=p20, device_ms_p80=p80)
            secs = p50 * 1e-3
        else:
            secs = host_s
        ex["GB/s"] = bytes_moved / secs / 1e9
        ex["TFLOP/s"] = flops / secs / 1e12
        if ON_CUDA:
            ex["pct_peak_bw_H200"] = 100 * bytes_moved / secs / H200_BW
            ex["pct_peak_flops_H200"] = 100 * flops / secs / H200_FLOPS
        return ex

    def ratio(self, benchmark, fa, fb, *, pairs: int = 7, group: str | None = None, **info):
        """Alternate A and B ``pairs`` times (noisy shared CPUs: only ratios within one run mean anything)."""
        if group is not None:
            benchmark.group = group
        for f in (fa, fb):
            f()
        _sync()
        ta, tb = [], []

        def one_pair():
            for f, acc in ((fa, ta), (fb, tb)):
                t0 = time.perf_counter()
                f()
                _sync()
                acc.append(time.perf_counter() - t0)

        benchmark.pedantic(one_pair, rounds=pairs, warmup_rounds=0, iterations=1)
        ex = benchmark.extra_info
        ex.update(info)
        ex["a_ms_p50"] = statistics.median(ta) * 1e3
        ex["b_ms_p50"] = statistics.median(tb) * 1e3
        ex["a_over_b"] = statistics.median(ta) / statistics.median(tb)
        return ex


def perf():
    """A fresh :class:`Perf` per benchmark (``conftest.py`` wraps it as a fixture)."""
    return Perf()
