#!/usr/bin/env bash
# One short GPU measurement, run through the device tool from the repository root:
#   bash bench/gpu.sh          (results under $OUT, or bench/results/gpu without it)
# 1. installs this checkout (no dependencies: the GPU image has torch, onnxruntime, numpy, typer);
# 2. torch CUDA latency (plain and CUDA graphs) of every bundle shipped in the package, at batch 1 and 64;
# 3. the paper-style double-masking network's certified-frame latency (bench/gpu_paper.py).
# Copy the results into bench/results/ with the device named (device.txt holds nvidia-smi's line).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu}"
mkdir -p "$out"
python3 -m pip install -q --no-deps --no-build-isolation . >"$out/install.log" 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
for manifest in certinfer/data/default_bundle/manifest.json certinfer/data/bundles/*/manifest.json; do
  bundle="$(dirname "$manifest")"
  name="$(basename "$bundle")"
  timeout 180 python3 -c "from certinfer.cli import main; main()" bench latency "$bundle" -b torch-cuda -b torch-cuda-graphs \
    --batches 1,64 --frames 200 --seconds 1 --reference-frames 1 --vectorized-frames 50 \
    --note "torch CUDA on $(head -1 "$out/device.txt")" --out "$out/latency-$name-gpu.json" \
    || echo "latency of $name failed or timed out" | tee -a "$out/failures.txt"
done
timeout 120 python3 -m certinfer.bench.gpu_paper "$out/doublemask-paper-gpu.json" \
  || echo "paper network timing failed or timed out" | tee -a "$out/failures.txt"
