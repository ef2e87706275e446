#!/usr/bin/env bash
# Per-instruction stall samples of one MAX kernel (GPU host, MAX installed): Nsight Compute's source counters for the
# first launch whose name matches REGEX after SKIP such launches, in the case that `profile_kernel.py` runs; writes
# $OUT/src-REGEX.ncu-rep and .csv and prints `stall_samples.py`'s summary. The hashes in kernel names differ between
# `benchmarks/sass.sh` here and the host, so pick our kernels by launch order: every one is named mojo_pkg_…, and at
# s > 8 the fused op launches the permute kernel, then the one-launch kernel (SKIP=1):
#   SKIP=1 bash benchmarks/gpu_sources.sh mojo_pkg "8192 8192 128 fused"
set -uo pipefail
regex=$1 out="${OUT:-/tmp}/src-$1"
timeout "${NCU_SECONDS:-200}" ncu --clock-control none --section SourceCounters --section WarpStateStats \
  -k "regex:$regex" --launch-skip "${SKIP:-0}" -c 1 -f -o "$out" \
  python3 benchmarks/profile_kernel.py ${2:-8192 8192 128 fused} > "$out.log" 2>&1
ncu -i "$out.ncu-rep" --page source --csv --print-source sass > "$out.csv" || { tail -n 5 "$out.log"; exit 1; }
python3 benchmarks/stall_samples.py "$out.csv" "${TOP:-25}"
