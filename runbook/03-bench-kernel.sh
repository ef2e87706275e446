#!/usr/bin/env bash
# Runbook step 03, on the GPU host with MAX installed (../shared/gpu/README.md):
# the kernels' GPU parity tests, then `caldera bench` at seq 1 and 128 on the default shapes (Qwen2-72B).
# Results go to $OUT (the device tool's folder) or runbook/results. Each step is time-boxed so that a hung
# launch cannot eat the whole lease.
set -uo pipefail
out="${OUT:-runbook/results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee "$out/gpu.txt"
timeout "${TEST_SECONDS:-200}" python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_max_gpu.py 2>&1 \
  | tee "$out/gpu-parity.log" | tail -15
for seq in 1 128; do
  timeout "${BENCH_SECONDS:-170}" python3 -m caldera bench --seq "$seq" --device gpu --out "$out" --json \
    > "$out/bench-seq$seq-gpu.jsonl" && cat "$out/bench-seq$seq-gpu.md"
done
