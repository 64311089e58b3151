#!/usr/bin/env bash
# The GPU measurement still open, as one script for a machine with a CUDA device (about
# 5 minutes on one H100 with 16 cores): the Merlin encode stage (model only, naive loop,
# reading only, streaming with preprocessing on the device) reading level 0, then reading its
# input from a pyramid level, on the same volumes in the same session.
#
#   bash benchmarks/gpu_check.sh OUTDIR
#
# Expects torch with CUDA and medflow's requirements installed; on a machine without a package
# index, MEDFLOW_WHEELS may name a folder of wheels to install first.
set -euo pipefail
out="${1:-${OUT:-/tmp/medflow-gpu}}"
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PREFECT_HOME="$out/prefect-home" PREFECT_SERVER_ANALYTICS_ENABLED=false
if [ -n "${MEDFLOW_WHEELS:-}" ]; then
    pip install -q --no-deps "$MEDFLOW_WHEELS"/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # medflow from the tree; the benchmarks run as modules
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/gpu.txt"
data="$out/volumes"
for level in full pyramid; do
    timeout 240 python -m benchmarks.encode --device cuda --input-level "$level" \
        --spacing 2.5,0.7,0.7 --modes device --data-dir "$data" \
        --out "$out/encode_$level.md" 2>&1 | tail -n 40 | tee "$out/encode_$level.log"
done
