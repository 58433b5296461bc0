"""Ahead-of-time compilation of every Triton kernel for sm_80 and sm_90, without a GPU (KERNELS.md §4).

``pskernels.apps.kernel_report.triton_kernel_report`` compiles each kernel x dtype x head dim (and, for the
attention kernel, each constexpr specialisation with every autotune tile the launcher's prune keeps for it; the
kernel modules' ``compile_specs`` give the specialisations and their signatures)
for ``GPUTarget("cuda", 80|90, 32)`` in one clean subprocess (no TRITON_INTERPRET; two worker processes)
and reads registers / spill bytes from Triton's bundled ``ptxas -v``, shared memory from
``metadata.shared`` and ``wgmma`` from the PTX. Results are cached by kernel source hash
(``PSKERNELS_KERNEL_REPORT_CACHE``, default ``build/kernel_report_cache.json``), so only the first run
after a kernel change pays the compile time.

The default level ``full`` checks the whole matrix (docs/KERNEL_REPORT.md; 641 compiles);
``PSKERNELS_AOT_LEVEL=ci`` is a quicker subset for local iteration (bf16 and fp32 at D=128 and D=80).
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil

import pytest

pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")

import pskernels.triton  # noqa: E402
from pskernels.apps.kernel_report import SMEM_LIMIT, compile_specs, ptxas_path, triton_kernel_report  # noqa: E402
from pskernels.triton.multi_branch_attention import AOT_VARIANTS, tile_class, tiles_for  # noqa: E402

LEVEL = os.environ.get("PSKERNELS_AOT_LEVEL", "full")
ARCHS = (80, 90)
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def rows():
    if not os.path.exists(ptxas_path(90)):
        pytest.skip("Triton's bundled ptxas is missing")
    cache = os.environ.get("PSKERNELS_KERNEL_REPORT_CACHE") or os.path.join(_ROOT, "build", "kernel_report_cache.json")
    rows = triton_kernel_report(archs=ARCHS, level=LEVEL, cache_path=cache)
    # the table in docs/KERNEL_REPORT.md comes from the same rows
    path = os.path.join(_ROOT, "build", f"kernel_report_{LEVEL}.json")
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rows, f, indent=0)
    except OSError:
        pass
    return rows


def _label(r):
    c = r["config"]
    return f"{r['kernel']}/{r['variant']} {c} {r['dtype']} D={r['D']} sm_{r['arch']}"


def test_every_kernel_and_config_compiles(rows):
    errors = [f"{_label(r)}: {r['error']}" for r in rows if r["error"]]
    assert not errors, "\n".join(errors[:5])
    # every launched kernel of every module of pskernels.triton is in the report
    launched, tuned = set(), set()
    for m in pkgutil.iter_modules(pskernels.triton.__path__):
        mod = importlib.import_module(f"pskernels.triton.{m.name}")
        for name, v in vars(mod).items():
            if name.endswith("_kernel") and type(v).__name__ in ("JITFunction", "InterpretedFunction"):
                launched.add(name)
            if type(v).__name__ == "Autotuner":
                tuned |= {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in v.configs}
    assert launched == {r["kernel"] for r in rows}
    # each specialisation is compiled with exactly the tiles the autotune prune keeps for it, and every
    # autotune config is kept somewhere
    got = {}
    for r in rows:
        if r["kernel"] == "_mba_fwd_kernel":
            c = r["config"]
            got.setdefault((r["variant"], r["dtype"], r["D"], r["arch"]), []).append(
                (c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], c["num_stages"]))
    for (var, dt, D, arch), tiles in got.items():
        spec = {s.variant: s for s in compile_specs("multi_branch_attention", dt, D, arch)}[var]
        assert tiles == tiles_for(tile_class(**spec.constexprs), dt != "fp32", arch), (var, dt, D, arch)
    assert {v for v, *_ in got} == set(AOT_VARIANTS)
    if LEVEL == "full":
        assert {t for ts in got.values() for t in ts} == tuned
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


def test_no_register_spills(rows):
    """Zero spill bytes for every kernel: each fixed-tile kernel and every (specialisation, autotune tile) the
    launcher can pick for multi_branch_attention."""
    bad = [f"{_label(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B loads, {r['registers']} registers"
           for r in rows if not r["error"] and (r["spill_stores"] or r["spill_loads"])]
    assert not bad, f"{len(bad)} of {len(rows)} compiled kernels spill:\n" + "\n".join(bad)
