"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU (KERNELS.md §4).

``pskernels.kernel_report.triton_kernel_report`` compiles each kernel x autotune config x dtype x head dim
for ``GPUTarget("cuda", 80|90, 32)`` in one clean subprocess (no TRITON_INTERPRET; two worker processes)
and reads registers / spill bytes from Triton's bundled ``ptxas -v``, shared memory from
``metadata.shared`` and ``wgmma`` from the PTX. Results are cached by kernel source hash
(``PSKERNELS_KERNEL_REPORT_CACHE``, default ``build/kernel_report_cache.json``), so only the first run
after a kernel change pays the compile time.

``PSKERNELS_AOT_LEVEL=full`` checks the whole matrix (docs/KERNEL_REPORT.md); the default ``ci`` level
compiles every config at the worst case plus every dtype x head dim at the launcher's first config.
"""
from __future__ import annotations

import importlib
import json
import os

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

from pskernels.kernel_report import SMEM_LIMIT, format_table, ptxas_path, triton_kernel_report  # noqa: E402

LEVEL = os.environ.get("PSKERNELS_AOT_LEVEL", "ci")
ARCHS = (80, 90)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Spills measured at the launcher's own tile (the only tile for the fixed-tile kernels; _GPU_CONFIGS[0] for
# multi_branch_attention), bytes of spill stores, by (kernel, variant, dtype): a ceiling for each, so that a
# new spill or a growing one fails here. Everything not listed must not spill at its default tile.
# The fixed-tile kernels (combine, rotate_keys, map_kv) are spill-free everywhere since their loops carry
# scalar bases instead of pointer tensors and RoPE uses an in-kernel sincos (no libdevice large-argument
# path). Remaining: fp32 `ieee` dots lowered to FMA with the rotated-q path live (mba fp32), and ptxas
# trading a few bytes of spill for occupancy at the 16x64 tile (mba "all" half precision).
KNOWN_DEFAULT_SPILLS = {
    ("_mba_fwd_kernel", "all", "fp32"): 1024,
    ("_mba_fwd_kernel", "all", "bf16"): 16,
    ("_mba_fwd_kernel", "all", "fp16"): 16,
    ("_mba_fwd_kernel", "decode", "fp32"): 2560,
    ("_mba_fwd_kernel", "shift", "fp32"): 768,
}
# the ParallelCache paths must never spill at the launcher's first tile (half precision, as served)
MUST_NOT_SPILL = {("_mba_fwd_kernel", "shift"), ("_mba_fwd_kernel", "decode"), ("_map_kv_kernel", "rotate"),
                  ("_map_kv_kernel", "transform"), ("_combine_kernel", "plain"), ("_combine_kernel", "knobs"),
                  ("_rotate_keys_kernel", "neox"), ("_rotate_keys_kernel", "gptj")}


@pytest.fixture(scope="module")
def rows():
    if not os.path.exists(ptxas_path(90)):
        pytest.skip("Triton's bundled ptxas is missing")
    cache = os.environ.get("PSKERNELS_KERNEL_REPORT_CACHE") or os.path.join(_ROOT, "build", "kernel_report_cache.json")
    return triton_kernel_report(archs=ARCHS, level=LEVEL, cache_path=cache)


def _label(r):
    c = r["config"]
    return f"{r['kernel']}/{r['variant']} {c} {r['dtype']} D={r['D']} sm_{r['arch']}"


def test_every_kernel_and_config_compiles(rows):
    errors = [f"{_label(r)}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors[:5])
    # every launched kernel of pskernels.triton is in the report, every autotune config on every arch
    launched, tuned = set(), []
    for m in ("map_kv_caches", "merge_states", "multi_branch_attention", "rotate_keys"):
        mod = importlib.import_module(f"pskernels.triton.{m}")
        for name, v in vars(mod).items():
            if name.endswith("_kernel") and type(v).__name__ in ("JITFunction", "InterpretedFunction"):
                launched.add(name)
            if type(v).__name__ == "Autotuner":
                tuned.extend((c.kwargs, c.num_warps, c.num_stages) for c in v.configs)
    assert launched == {r["kernel"] for r in rows}
    for arch in ARCHS:
        got = {(json.dumps({k: v for k, v in r["config"].items() if k not in ("num_warps", "num_stages")},
                           sort_keys=True), r["config"]["num_warps"], r["config"]["num_stages"])
               for r in rows if r["kernel"] == "_mba_fwd_kernel" and r["arch"] == arch}
        want = {(json.dumps(kw, sort_keys=True), w, s) for kw, w, s in tuned}
        assert want <= got, f"sm_{arch}: autotune configs not compiled: {want - got}"
    assert {r["dtype"] for r in rows} == {"fp16", "bf16", "fp32"}
    assert {r["D"] for r in rows} == {64, 80, 128}


def test_shared_memory_within_target_limit(rows):
    over = [f"{_label(r)}: {r['shared']} B > {SMEM_LIMIT[r['arch']]} B" for r in rows
            if not r["error"] and r["shared"] > SMEM_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_hopper_uses_wgmma_where_eligible(rows):
    """sm_90 half-precision attention tiles of >= 64 rows lower tl.dot to wgmma. Not eligible (asserted so
    a change shows): tiles of 16/32 rows (wgmma's M is 64 per warpgroup; Triton uses mma.sync, MMAv2),
    fp32 attention (input_precision="ieee" is an FMA loop, no tensor cores), map_kv's fp32 "ieee" rank-r
    dots, and the kernels without tl.dot (combine, rotate_keys)."""
    bad = []
    for r in rows:
        if r["error"]:
            continue
        half = r["dtype"] in ("fp16", "bf16")
        if r["kernel"] == "_mba_fwd_kernel" and half:
            want_wgmma = r["arch"] >= 90 and r["config"]["BLOCK_M"] >= 64
            if r["wgmma"] != want_wgmma or (not want_wgmma and not r["mma_sync"]):
                bad.append(f"{_label(r)}: wgmma={r['wgmma']} mma.sync={r['mma_sync']} (expected wgmma={want_wgmma})")
        elif r["wgmma"]:
            bad.append(f"{_label(r)}: unexpected wgmma")
    assert not bad, "\n".join(bad)


def test_no_spills_at_launcher_default_tiles(rows):
    bad = []
    for r in rows:
        if r["error"] or not r["default"]:
            continue
        key = (r["kernel"], r["variant"], r["dtype"])
        strict = (r["kernel"], r["variant"]) in MUST_NOT_SPILL and r["dtype"] != "fp32"
        limit = 0 if strict else KNOWN_DEFAULT_SPILLS.get(key, 0)
        if r["spill_stores"] > limit:
            bad.append(f"{_label(r)}: {r['spill_stores']} B spill stores (allowed {limit}), {r['registers']} registers")
    assert not bad, "\n".join(bad)


def test_record_spills_of_other_configs(rows):
    """Not asserted: spills of autotune configs the autotuner may reject on a GPU. Printed and written to
    build/kernel_report_<level>.json (the table in docs/KERNEL_REPORT.md comes from the same rows)."""
    spills = [r for r in rows if not r["error"] and r["spill_stores"] and not r["default"]]
    print(f"\n{len(rows)} compiled, {len(spills)} non-default configs with spills:")
    print(format_table(spills))
    path = os.path.join(_ROOT, "build", f"kernel_report_{LEVEL}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=0)
    except OSError:
        pass
