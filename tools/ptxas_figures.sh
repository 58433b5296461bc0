#!/usr/bin/env bash
# ptxas register/spill/shared-memory figures of the CUDA kernels, cut from an extension build log
# (`setup.py build_ext` with ninja, which prints each compile's output right after its command line).
# An incremental build recompiles only the changed sources, so the figures are kept per .cu file in
# build/ptxas/<file>.log, replaced when that file is recompiled; build/cuda-ptxas.log joins those of the current
# csrc/cuda/*.cu (read by tests/test_extension.py). Usage: tools/ptxas_figures.sh BUILD_LOG
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p build/ptxas
awk '/^\[[0-9]+\/[0-9]+\] / { out = ""; if (match($0, /[^ ]+\.cu /)) { n = split(substr($0, RSTART, RLENGTH - 1), path, "/"); out = "build/ptxas/" path[n] ".log" } }
  out != "" && (/ptxas/ || /bytes stack frame/) { print > out }' "$1"
if ls build/ptxas/*.log > /dev/null 2>&1; then
  for f in csrc/cuda/*.cu; do
    if [ -f "build/ptxas/${f##*/}.log" ]; then cat "build/ptxas/${f##*/}.log"; fi
  done > build/cuda-ptxas.log
fi
