#!/usr/bin/env bash
# One short GPU measurement, run from the repository root on a machine with a CUDA GPU and torch:
#   bash bench/gpu.sh [RESULTS_DIR]        (default bench/results/gpu)
# Stages, most wanted first, each skipped once the time budget ($GPU_BUDGET_S seconds, default 420) runs out:
# 1. install this checkout (no dependencies: the GPU image has torch, onnxruntime, numpy, typer);
# 2. double masking's speed levers on torch CUDA (per-copy loop, batching, early exit, feature space, copies built on
#    the GPU) on real GTSRB test frames from $CERTINFER_DATA (random frames without it);
# 3. the paper-style double-masking network's certified-frame latency (bench/gpu_paper.py);
# 4. torch CUDA latency (plain and CUDA graphs) of every packaged bundle at batch 1 and 64;
# 5. the receptive-field and batch-independence probe of every packaged bundle on the CUDA backends;
# 6. the engine and probe tests (their CUDA cases run only on a GPU).
# With $OUT set (the device tool), the results folder is packed into $OUT/gpu-results.tgz after every stage, so
# what finished comes back even if a later stage is cut off. Copy the results into bench/results/ with the device
# named (device.txt holds nvidia-smi's line).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench/results/gpu}"
budget="${GPU_BUDGET_S:-420}"
mkdir -p "$out"
log="$out/gpu.log"

pack() { [ -n "${OUT:-}" ] && tar czf "$OUT/gpu-results.tgz" -C "$out" . ; true; }

# stage NAME MAX_SECONDS COMMAND...: run with a timeout of MAX_SECONDS or what is left of the budget
stage() {
  local name="$1" max="$2"; shift 2
  local left=$(( budget - SECONDS ))
  if (( left < 15 )); then echo "== $name: skipped, budget spent" | tee -a "$log"; return; fi
  local limit=$(( max < left ? max : left ))
  echo "== $name (limit ${limit}s, ${SECONDS}s in)" | tee -a "$log"
  timeout "$limit" "$@" >>"$log" 2>&1 || echo "== $name: failed or timed out (rc $?)" | tee -a "$log"
  pack
}

export PYTHONSAFEPATH=1  # import the installed package, not the checkout's partial certinfer/ folder
certinfer=(python3 -c "from certinfer.cli import main; main()")

python3 -m pip install -q --no-deps --no-build-isolation . >"$out/install.log" 2>&1 \
  || { cat "$out/install.log"; exit 1; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
gpu="$(head -1 "$out/device.txt")"
data=(); [ -n "${CERTINFER_DATA:-}" ] && data=(--data gtsrb:test)
bundles=(certinfer/data/default_bundle certinfer/data/bundles/*)

stage "double-masking speed levers" 150 "${certinfer[@]}" bench doublemask-speed \
  certinfer/data/bundles/doublemask-gtsrb --feature certinfer/data/bundles/doublemask-gtsrb-feature "${data[@]}" \
  --backend torch-cuda --frames 128 --loop-frames 4 --batch 64 --out "$out"
stage "paper network" 90 python3 -m certinfer.bench.gpu_paper "$out/doublemask-paper-gpu.json"
for bundle in "${bundles[@]}"; do
  name="$(basename "$bundle")"
  stage "latency $name" 75 "${certinfer[@]}" bench latency "$bundle" -b torch-cuda -b torch-cuda-graphs \
    --batches 1,64 --frames 100 --seconds 0.5 --reference-frames 1 --vectorized-frames 20 \
    --note "torch CUDA on $gpu" --out "$out/latency-$name-gpu.json"
done
for bundle in "${bundles[@]}"; do
  stage "probe $(basename "$bundle")" 40 "${certinfer[@]}" inspect "$bundle" --probe --trials 16
done
stage "engine and probe tests" 120 python3 -m pytest -q -p no:cacheprovider -rs \
  tests/runtime/test_engines.py tests/export/test_probe_backends.py
echo "== done in ${SECONDS}s" | tee -a "$log"
pack
