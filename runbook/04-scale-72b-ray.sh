#!/usr/bin/env bash
# Runbook step 04 (Ray): the same synthetic layers decomposed by a local Ray cluster, one GPU per layer task,
# against the one-GPU run that 04-scale-72b.sh made in WORK: speedup, and the layer files compared bit for bit.
#
#   EXPORT=0 BENCH_SHAPES= bash runbook/04-scale-72b.sh WORK OUT   # one GPU: synth, calibrate, decompose
#   bash runbook/04-scale-72b-ray.sh WORK OUT                       # every GPU of the host through Ray
#
# Needs the extra: pip install 'caldera[distributed]'. DEVICE=cuda by default.
set -euo pipefail
WORK=${1:-/tmp/caldera-72b}
OUT=${2:-runbook/results}
DEVICE=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1
LOG="$OUT/scale-72b-ray.jsonl"
: >"$LOG"
PREFIX=scale-72b-ray
source "$(dirname "$0")/lib.sh"
machine

[ -d "$WORK/run/layers" ] || { echo "no one-GPU run in $WORK/run: run 04-scale-72b.sh first" >&2; exit 1; }
rm -rf "$WORK/layers-one-gpu"
mv "$WORK/run/layers" "$WORK/layers-one-gpu"
stage decompose decompose --model "$WORK/model" --run "$WORK/run" --device "$DEVICE" --ray

python3 - "$WORK/layers-one-gpu" "$WORK/run/layers" <<'PY' | tee -a "$LOG"
import json, sys
from pathlib import Path
from safetensors.torch import load_file

one, ray = (Path(p) for p in sys.argv[1:])
files = sorted(p.name for p in one.glob("*.safetensors"))
same = []
for name in files:
    a, b = load_file(str(one / name)), load_file(str(ray / name))
    same.append(a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a))
print(json.dumps({"stage": "compare", "layer_files": files, "bit_identical": same}))
PY
