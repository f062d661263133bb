#!/usr/bin/env bash
# The GPU report in one command, for a bare GPU machine with its own torch, triton and Python and
# no package registry:
#
#     bash benchmarks/gpu_report.sh [--out DIR] [other options of benchmarks/gpu_report.py]
#
# 1. builds the package in place against the installed torch (no downloads: --no-build-isolation
#    --no-deps); if the C++ extension cannot be built there, retries without it
#    (YOLO_KERNELS_NO_EXT=1: the report needs only triton and the reference);
# 2. runs benchmarks/gpu_report.py, which writes gpu-<card>.json and .md and exits non-zero on a
#    parity, host-sync or CUDA-graph failure.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LOG="$(mktemp -t yk-install.XXXXXX.log)"
install() { MAX_JOBS="${MAX_JOBS:-$(nproc)}" "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOG" 2>&1; }
start=$(date +%s)
if install; then
  YK_INSTALL="pip install --no-build-isolation --no-deps -e . (with the C++ extension)"
elif YOLO_KERNELS_NO_EXT=1 install; then
  YK_INSTALL="pip install -e . with YOLO_KERNELS_NO_EXT=1 (the C++ extension did not build; see $LOG)"
else
  tail -n 30 "$LOG"
  YK_INSTALL="FAILED: pip install -e . (see $LOG); the report runs from the source tree"
fi
export YK_INSTALL="$YK_INSTALL, $(( $(date +%s) - start )) s"
echo "gpu_report.sh: $YK_INSTALL"
exec "$PY" benchmarks/gpu_report.py "$@"
