"""Ahead-of-time compilation report of the Triton kernels for real GPUs, without a GPU.

Every ``@triton.jit`` kernel of ``pskernels.triton`` is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for each dtype (fp16, bf16, fp32) and
head dim (64, 128, and 80, which runs masked in a 128-wide tile). What is compiled comes from the kernel modules
themselves: each one's ``compile_specs(dtype, D, arch)`` gives its kernel's specialisations, each with a signature
checked against the kernel's parameter list and with the launch tiles the launcher can use (for
multi_branch_attention, every autotune tile the launcher's prune keeps on that arch; the other kernels have one
launcher-fixed tile). Triton's bundled ``ptxas`` (``ptxas -v``, the same binary and flags Triton uses to build the
cubin) gives registers and spill bytes; ``metadata.shared`` gives shared memory; the PTX shows whether Hopper
``wgmma`` is used.

The compilation must not run under ``TRITON_INTERPRET=1`` (the interpreter replaces ``@triton.jit`` when
kernels are defined), so :func:`triton_kernel_report` compiles in a subprocess with a clean environment
when needed, and in parallel worker processes there. Results are cached in a JSON file keyed by the
kernels' source hash, the job, its compile spec and the Triton version (``PSKERNELS_KERNEL_REPORT_CACHE``;
``""`` disables).

``python -m pskernels.apps.kernel_report [--level full|ci] [--archs 80,90] [--markdown|--json|--out FILE]``
prints the table (``pskernels info --kernels`` calls :func:`main`).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time
from typing import Iterable

# Shared memory a block may use (opt-in maximum): A100 163 KB, H100/H200 227 KB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
DTYPES = ("fp16", "bf16", "fp32")
HEAD_DIMS = (64, 128, 80)
# The kernel modules of pskernels.triton in report order, with their head dims at the quick "ci" level: the
# autotuned attention kernel at the worst cases measured, the fixed-tile kernels at D = 128.
KERNEL_MODULES = {"multi_branch_attention": (128, 80), "combine": (128,), "rotate_keys": (128,),
                  "map_kv_caches": (128,)}
_ROW_KEYS = ("kernel", "variant", "config", "dtype", "D", "arch", "registers", "spill_stores", "spill_loads",
             "shared", "smem_limit", "wgmma", "mma_sync", "default", "compile_s", "error")


# ------------------------------------------------------------------------------------------------ jobs


@functools.lru_cache(maxsize=None)
def compile_specs(module: str, dtype: str, D: int, arch: int) -> tuple:
    """The ``CompileSpec`` list of kernel module ``pskernels.triton.<module>`` for ``dtype``, head dim ``D`` and
    compute capability ``arch``."""
    return tuple(importlib.import_module(f"pskernels.triton.{module}").compile_specs(dtype, D, arch))


def jobs(level: str = "full", archs: Iterable[int] = (80, 90)) -> list[dict]:
    """Compile jobs: one per (kernel specialisation, launch tile, dtype, head dim, arch).

    ``level="full"`` (the default test): every kernel module's specs for every dtype x head dim x arch.
    ``level="ci"`` (quicker, for local iteration): bf16 and fp32 only, multi_branch_attention at D=128 and
    D=80 (the worst cases measured), the fixed-tile kernels at D=128.
    """
    if level not in ("full", "ci"):
        raise ValueError(f"level: expected 'full' or 'ci', got {level!r}")
    out = []
    dtypes, dims = (DTYPES, HEAD_DIMS) if level == "full" else (("bf16", "fp32"), (128, 80))
    for arch in tuple(archs):
        for dt in dtypes:
            for D in dims:
                for module, ci_dims in KERNEL_MODULES.items():
                    if level == "ci" and D not in ci_dims:
                        continue
                    for spec in compile_specs(module, dt, D, arch):
                        for i, tile in enumerate(spec.tiles):
                            job = dict(kernel=spec.kernel.__name__, variant=spec.variant, config=dict(tile.blocks),
                                       num_warps=tile.num_warps, num_stages=tile.num_stages)
                            if spec.maxnreg:
                                job["maxnreg"] = spec.maxnreg
                            out.append(dict(job, dtype=dt, D=D, arch=arch, default=i == 0))
    return out


def _spec(job: dict):
    """The job's ``CompileSpec`` and ``TileConfig``."""
    from pskernels.triton.utils import TileConfig

    for module in KERNEL_MODULES:
        for spec in compile_specs(module, job["dtype"], job["D"], job["arch"]):
            if (spec.kernel.__name__, spec.variant) == (job["kernel"], job["variant"]):
                return spec, TileConfig(job["config"], job["num_warps"], job["num_stages"])
    raise KeyError(f"no compile spec {job['kernel']}/{job['variant']}")


# ------------------------------------------------------------------------------------------- compiling

_REG = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def parse_ptxas(log: str) -> tuple[int, int, int]:
    """(registers, spill store bytes, spill load bytes) from a ``ptxas -v`` log."""
    regs = [int(x) for x in _REG.findall(log)]
    spills = [(int(a), int(b)) for a, b in _SPILL.findall(log)]
    if not regs:
        raise ValueError(f"no register count in ptxas output:\n{log[-2000:]}")
    return max(regs), max((s for s, _ in spills), default=0), max((l for _, l in spills), default=0)


def ptxas_path(arch: int) -> str:
    """Triton's bundled ptxas for ``arch`` (``ptxas-blackwell`` from sm_100 on, as Triton picks)."""
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(arch).path


def _run_ptxas(ptx: str, arch: int) -> str:
    import tempfile

    name = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        r = subprocess.run([ptxas_path(arch), "-v", "-lineinfo", "--regAllocOptLevel=2", f"-arch={name}", src, "-o",
                            os.path.join(d, "k.cubin")], capture_output=True, text=True, check=True)
        return r.stdout + r.stderr


def compile_job(job: dict) -> dict:
    """Compile one job for its GPU target (call only where TRITON_INTERPRET is unset) and measure it."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    row = {k: job.get(k) for k in ("kernel", "variant", "dtype", "D", "arch", "default")}
    row["config"] = dict(job["config"], num_warps=job["num_warps"], num_stages=job["num_stages"])
    if job.get("maxnreg"):
        row["config"]["maxnreg"] = job["maxnreg"]
    row["smem_limit"] = SMEM_LIMIT[job["arch"]]
    t0 = time.perf_counter()
    try:
        spec, tile = _spec(job)
        knobs.nvidia.dump_ptxas_log = True  # Triton prints its own `ptxas -v` output when it builds the cubin
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            k = triton.compile(spec.source(tile), target=GPUTarget("cuda", job["arch"], 32),
                               options=dict(num_warps=job["num_warps"], num_stages=job["num_stages"],
                                            maxnreg=job.get("maxnreg")))
        log = buf.getvalue()
        if "registers" not in log:  # cubin came from Triton's cache: run the bundled ptxas ourselves
            log = _run_ptxas(k.asm["ptx"], job["arch"])
        row["registers"], row["spill_stores"], row["spill_loads"] = parse_ptxas(log)
        ptx = k.asm["ptx"]
        row["shared"] = int(k.metadata.shared)
        row["wgmma"] = "wgmma.mma_async" in ptx
        row["mma_sync"] = "mma.sync" in ptx
        row["error"] = None
    except Exception as e:  # noqa: BLE001 - a failed compile is a result (the test asserts on it)
        row.update(registers=None, spill_stores=None, spill_loads=None, shared=None, wgmma=None, mma_sync=None,
                   error=f"{type(e).__name__}: {str(e)[-1500:]}")
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return {k: row.get(k) for k in _ROW_KEYS}


def _job_key(job: dict, src_hash: str) -> str:
    import triton

    spec, _ = _spec(job)
    blob = (json.dumps(job, sort_keys=True) + repr((spec.signature, spec.constexprs, spec.attrs)) + src_hash
            + triton.__version__)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _source_hash() -> str:
    # cache_key covers each kernel's source and the @triton.jit functions it calls
    kernels = {spec.kernel.__name__: spec.kernel
               for m in KERNEL_MODULES for spec in compile_specs(m, DTYPES[0], HEAD_DIMS[0], 90)}
    return hashlib.sha256("".join(kernels[n].cache_key for n in sorted(kernels)).encode()).hexdigest()


def _default_cache() -> str:
    return os.environ.get("PSKERNELS_KERNEL_REPORT_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "pskernels", "kernel_report.json"))


def _compile_all(job_list: list[dict], workers: int, cache_path: str | None, progress: bool) -> list[dict]:
    cache = {}
    if cache_path and os.path.exists(cache_path):
        try:
            with open(cache_path) as f:
                cache = json.load(f)
        except (OSError, ValueError):
            cache = {}
    src = _source_hash()
    keys = [_job_key(j, src) for j in job_list]
    todo = [i for i, k in enumerate(keys) if k not in cache or cache[k].get("error")]
    if todo:
        if workers > 1 and len(todo) > 1:
            import multiprocessing as mp

            # mba jobs first (the long ones) so the pool's tail is short
            todo.sort(key=lambda i: job_list[i]["kernel"] != "_mba_fwd_kernel")
            with mp.get_context("fork").Pool(workers) as pool:
                for n, (i, row) in enumerate(zip(todo, pool.imap(compile_job, [job_list[i] for i in todo]))):
                    cache[keys[i]] = row
                    if cache_path and n % 8 == 7:
                        _save(cache, cache_path)
                    if progress:
                        print(f"[{n + 1}/{len(todo)}] {row['kernel']} {row['variant']} {row['dtype']} D={row['D']} "
                              f"sm_{row['arch']}: {row['compile_s']} s", file=sys.stderr, flush=True)
        else:
            for i in todo:
                cache[keys[i]] = compile_job(job_list[i])
        if cache_path:
            _save(cache, cache_path)
    return [cache[k] for k in keys]


def _save(cache: dict, path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(cache, f)
    os.replace(tmp, path)


def _interpreted() -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    try:
        from pskernels.triton.utils import MODE
    except ImportError:
        return False
    return MODE == "interpreter"


def triton_kernel_report(archs=(80, 90), level: str = "full", workers: int | None = None,
                         cache_path: str | None = "default", progress: bool = False) -> list[dict]:
    """Rows ``{kernel, variant, config, dtype, D, arch, registers, spill_stores, spill_loads, shared,
    smem_limit, wgmma, mma_sync, default, compile_s, error}`` for every compile job (see :func:`jobs`).

    ``default`` marks the first tile of a specialisation's autotune list (the only tile of the other
    kernels). Runs in a clean subprocess when this process uses the Triton interpreter."""
    archs = tuple(int(a) for a in archs)
    if cache_path == "default":
        cache_path = _default_cache()
    workers = workers or max(1, min(2, os.cpu_count() or 1))
    if _interpreted():
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PSKERNELS_KERNEL_REPORT_CACHE"] = cache_path or ""
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            out = os.path.join(d, "rows.json")
            cmd = [sys.executable, "-m", "pskernels.apps.kernel_report", "--out", out, "--level", level, "--workers",
                   str(workers), "--archs", ",".join(map(str, archs))]
            run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
            if run.returncode != 0 or not os.path.exists(out):
                raise RuntimeError(f"kernel report subprocess failed ({run.returncode}):\n{run.stderr[-4000:]}")
            with open(out) as f:
                return json.load(f)
    return _compile_all(jobs(level, archs), workers, cache_path or None, progress)


# ---------------------------------------------------------------------------------------------- output


def _cfg_str(c: dict) -> str:
    tile = "x".join(str(c[k]) for k in ("BLOCK_M", "BLOCK_N") if k in c) or f"L{c.get('BLOCK_L', '?')}"
    return f"{tile} w{c['num_warps']} s{c['num_stages']}"


def format_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["kernel", "variant", "config", "dtype", "D", "arch", "regs", "spill st/ld B", "smem KB", "limit KB",
            "wgmma", "default"]
    lines = []
    for r in rows:
        if r.get("error"):
            cells = [r["kernel"], r["variant"], _cfg_str(r["config"]), r["dtype"], str(r["D"]), f"sm_{r['arch']}",
                     "ERROR", r["error"].splitlines()[0][:60], "", "", "", ""]
        else:
            cells = [r["kernel"], r["variant"], _cfg_str(r["config"]), r["dtype"], str(r["D"]), f"sm_{r['arch']}",
                     str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", f"{r['shared'] / 1024:.1f}",
                     str(r["smem_limit"] // 1024), "yes" if r["wgmma"] else ("mma" if r["mma_sync"] else "no"),
                     "*" if r["default"] else ""]
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c) + " |" for c in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths))] + [fmt.format(*c) for c in lines])


def main(argv=None) -> int:
    """Print the report table. ``argv`` defaults to no arguments (full level, sm_80 and sm_90), so a CLI can
    call ``main()`` directly; ``python -m pskernels.apps.kernel_report`` passes its command line."""
    ap = argparse.ArgumentParser(prog="python -m pskernels.apps.kernel_report", description=__doc__.splitlines()[0])
    ap.add_argument("--archs", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--level", choices=("full", "ci"), default="full")
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    ap.add_argument("--out", help="write the rows as JSON to this file (nothing printed)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-cache", action="store_true")
    a = ap.parse_args([] if argv is None else argv)
    rows = triton_kernel_report(archs=[int(x) for x in a.archs.split(",") if x], level=a.level,
                                workers=a.workers or None, cache_path=None if a.no_cache else "default",
                                progress=not (a.json or a.out))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f)
    elif a.json:
        print(json.dumps(rows))
    else:
        print(format_table(rows, markdown=a.markdown))
        bad = [r for r in rows if r.get("error")]
        spills = [r for r in rows if not r.get("error") and r["spill_stores"]]
        print(f"\n{len(rows)} kernels compiled, {len(bad)} errors, {len(spills)} with spills")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
