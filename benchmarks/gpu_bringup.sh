#!/usr/bin/env bash
# GPU bring-up of the TensorRT backend's CUDA side (see benchmarks/gpu_bringup.py): one
# command for a lent GPU machine with torch, cupy, cuda-bindings and CPU onnxruntime, no
# TensorRT. Writes $OUT/gpu_bringup.json (or ./gpu_bringup.json) and stops within 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUTDIR="${OUT:-.}"
mkdir -p "$OUTDIR"
# the runtime needs only numpy (+ the compiled rANS module, not used here): run from the tree
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi || echo "nvidia-smi failed"
timeout 470 python3 benchmarks/gpu_bringup.py --out "$OUTDIR/gpu_bringup.json" "$@"
rc=$?
[ $rc -eq 124 ] && echo "gpu_bringup: stopped at the 470 s limit; the report holds what ran"
exit $rc
