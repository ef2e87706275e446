#!/usr/bin/env bash
# Runbook step 04: synthetic Qwen2-72B layers end to end on one GPU (synth -> calibrate -> decompose -> export),
# and the decomposition of each Qwen2-72B matrix type at the defaults (seconds, peak GPU memory).
#
#   bash runbook/04-scale-72b.sh [WORK] [OUT]        WORK: scratch folder (~35 GB for 2 layers), OUT: results
#
# Environment (defaults): SHAPE=qwen2-72b LAYERS=2 SAMPLES=64 SEQ=2048 BATCH=2 DEVICE=cuda (BATCH=4: 22.7 GB peak)
#   BENCH_SHAPES=8192x8192,1024x8192,29568x8192,8192x29568 (empty: no benchmark) EXPORT=1 (0: stop after decompose).
#   Every stage resumes.
set -euo pipefail
WORK=${1:-/tmp/caldera-72b}
OUT=${2:-runbook/results}
SHAPE=${SHAPE:-qwen2-72b} LAYERS=${LAYERS:-2} SAMPLES=${SAMPLES:-64} SEQ=${SEQ:-2048} BATCH=${BATCH:-2}
DEVICE=${DEVICE:-cuda} BENCH_SHAPES=${BENCH_SHAPES-8192x8192,1024x8192,29568x8192,8192x29568}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK" "$OUT"
LOG="$OUT/scale-72b.jsonl"
: >"$LOG"

PREFIX=scale-72b
source "$(dirname "$0")/lib.sh"
machine
df -h "$WORK" | tail -n 1

if [ -n "$BENCH_SHAPES" ]; then
  python3 -m caldera bench-decompose --device "$DEVICE" --shapes "$BENCH_SHAPES" --methods caldera-r256-b4 --iters 4 \
    --json | tee "$OUT/scale-72b-bench.jsonl"
fi
[ -d "$WORK/model" ] || stage synth synth --shape "$SHAPE" --layers "$LAYERS" --out "$WORK/model" --device "$DEVICE"
# calibration text: the repository's own sources (the synthetic folder's tokenizer maps each byte to a token)
find caldera docs -name '*.py' -o -name '*.md' | sort | xargs cat >"$WORK/calib.txt"
stage calibrate calibrate --model "$WORK/model" --run "$WORK/run" --data "$WORK/calib.txt" --samples "$SAMPLES" \
  --seq-len "$SEQ" --batch-size "$BATCH" --device "$DEVICE"
stage decompose decompose --model "$WORK/model" --run "$WORK/run" --device "$DEVICE"
[ "${EXPORT:-1}" = 1 ] || exit 0
rm -rf "$WORK/export"
stage export export --run "$WORK/run" --out "$WORK/export"
du -sh "$WORK"/* | tee -a "$OUT/scale-72b-disk.txt"
