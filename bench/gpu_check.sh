#!/usr/bin/env bash
# One prepared GPU check for a lent device (one H200, < 8 min): build the extension for sm_90, run the GPU
# tests (the Triton kernels compiled, never interpreted), the shared-prefix cascade tests and its decode-step
# bandwidth (bench/gpu_cascade.py), compute-sanitizer on one small case of every CUDA kernel, a short benchmark
# sweep, and every autotune tile of the Triton attention kernel.
# Results (logs + JSON) go to $OUT/results.tgz (re-packed after every section, so a run stopped at its limit
# still returns what it finished). Every section's timeout is cut to the time left before DEADLINE seconds.
# SECTIONS picks sections and their order (default: all, in the order below); without "build" the CUDA
# extension is absent and its cases skip (a Triton-only recheck).
# Usage (device tool): DEADLINE=450 bash bench/gpu_check.sh
#                      DEADLINE=200 SECTIONS="bandwidth tests tiles cascade" bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
FINAL_OUT=$OUT
OUT=$(mktemp -d)
START=$(date +%s)
DEADLINE=${DEADLINE:-450}
left() {  # min(wanted, seconds left before the deadline), at least 5
  local l=$((DEADLINE - ($(date +%s) - START))); [ "$1" -lt "$l" ] && l=$1; [ "$l" -lt 5 ] && l=5; echo $l
}
pack() { tar czf "$FINAL_OUT/results.tgz" -C "$OUT" . ; echo "[t=$(( $(date +%s) - START ))s]"; }
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# The device image lacks some packages: carried wheels (.whl/, see the device README) are installed first.
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, triton, transformers; print(torch.__version__, triton.__version__, transformers.__version__)" \
  | tee "$OUT/versions.txt"

build() {
echo "== build (sm_90 only) =="
TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 timeout $(left 240) $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
echo "build rc=$?"; tail -5 "$OUT/build.log"
tools/ptxas_figures.sh "$OUT/build.log"  # build/cuda-ptxas.log, read by test_cuda_kernels_do_not_spill
}

tests() {
echo "== GPU tests =="
timeout $(left 150) $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_extension.py \
  tests/test_triton_backend.py --junitxml="$OUT/gpu_tests.xml" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
}

cascade() {
echo "== shared-prefix cascade (CUDA and Triton) =="
timeout $(left 90) $PY -m pytest -q -p no:cacheprovider tests/test_triton_cascade.py tests/test_multi_branch_attention.py \
  -k "cascade" --junitxml="$OUT/cascade_tests.xml" 2>&1 | tail -15 | tee "$OUT/cascade_tests.txt"
}

bandwidth() {
echo "== cascade decode step: P=8192, N=32, bf16, 32 layers (issue 14) =="
timeout $(left 210) $PY bench/gpu_cascade.py --json "$OUT/gpu_cascade.json" 2>&1 | tail -40 | tee "$OUT/gpu_cascade.txt"
}

sanitizer() {
echo "== compute-sanitizer =="
cat > /tmp/psk_sanitize.py <<'PYEOF'
import torch, pskernels
spec = pskernels.RopeSpec(1.0 / 10000 ** (torch.arange(0, 64, 2) / 64))
q = torch.randn(1, 8, 3, 64, device="cuda", dtype=torch.bfloat16)
ks = [torch.randn(1, 2, n, 64, device="cuda", dtype=torch.bfloat16) for n in (17, 0, 40)]
pskernels.multi_branch_attention(q, ks, ks, position_shifts=torch.tensor([0, 3, 9]), rope=spec, backend="cuda")
# the cascade pass: a prefix shared by 5 rows (batch stride 0), per-row shifts, decode
pk = torch.randn(1, 2, 70, 64, device="cuda", dtype=torch.bfloat16).expand(5, -1, -1, -1)
own = torch.randn(5, 2, 4, 64, device="cuda", dtype=torch.bfloat16)
pskernels.multi_branch_attention(torch.randn(5, 8, 1, 64, device="cuda", dtype=torch.bfloat16), [pk, own], [pk, own],
                                 position_shifts=torch.tensor([[0, 1, 2, 3, 4], [70, 71, 72, 73, 74]]), rope=spec,
                                 backend="cuda")
pskernels.merge_states(torch.randn(2, 1, 2, 3, 8, device="cuda"), torch.randn(2, 1, 2, 3, device="cuda"),
                       backend="cuda")
pskernels.rotate_keys(ks[0], 5, spec, backend="cuda")
pskernels.map_kv_caches([[ks[0], ks[2]]], [[ks[0], ks[2]]], rope=spec, orig_positions=[4, 4], new_positions=[4, 30],
                        backend="cuda")
torch.cuda.synchronize()
print("sanitizer case ok")
PYEOF
for tool in memcheck racecheck; do
  timeout $(left 45) compute-sanitizer --tool $tool --error-exitcode 7 $PY /tmp/psk_sanitize.py \
    > "$OUT/sanitizer_$tool.txt" 2>&1
  echo "$tool rc=$?" | tee -a "$OUT/sanitizer_summary.txt"; tail -3 "$OUT/sanitizer_$tool.txt"
done
}

bench() {
echo "== benchmark sweep (default cases, short rounds) =="
PSKERNELS_BENCH_FLEX=0 timeout $(left 90) $PY -m pytest -q -p no:cacheprovider \
  bench/bench_multi_branch_attention.py bench/bench_map_kv_caches.py --benchmark-only --benchmark-max-time=0.2 \
  --benchmark-json="$OUT/bench.json" 2>&1 | tail -40 | tee "$OUT/bench.txt"
}

tiles() {
echo "== Triton attention tiles =="
# each autotune tile forced through the launcher (about 35 compiles); last, on the time that is left
timeout $(left 240) $PY -m pytest -q -p no:cacheprovider tests/test_triton_tiles.py --junitxml="$OUT/tile_tests.xml" 2>&1 \
  | tail -15 | tee "$OUT/tile_tests.txt"
}

# On a GPU the triton backend must run its compiled kernels: stop if TRITON_INTERPRET (set by hand) put it in
# the interpreter, which would run every "GPU" test on the CPU.
$PY -c "import torch, pskernels.triton.utils as u; assert torch.cuda.is_available() and u.MODE == 'compiled', u.MODE" \
  || { echo "triton backend not compiled on CUDA (TRITON_INTERPRET set?)" | tee "$OUT/gpu_tests.txt"; pack; exit 1; }
for section in ${SECTIONS:-build tests cascade bandwidth sanitizer bench tiles}; do
  "$section"
  pack
done
echo "results in $FINAL_OUT/results.tgz"
