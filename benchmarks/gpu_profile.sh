#!/usr/bin/env bash
# Nsight Compute readings of the MAX kernels and cuBLAS at the Qwen2-72B shapes (GPU host, MAX installed):
# per kernel launch its duration, DRAM bytes, registers, grid and achieved occupancy. Writes $OUT/ncu-*.csv and
# prints one line per kernel launch of the last call of each case, with tensor-pipe and issue utilization and the
# warp stall reasons (warps stalled per issued instruction).
set -uo pipefail
out="${OUT:-/tmp}"
metrics=gpu__time_duration.sum,dram__bytes_read.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,launch__registers_per_thread,launch__grid_size,launch__block_size,sm__warps_active.avg.pct_of_peak_sustained_active
metrics+=,launch__occupancy_limit_registers,smsp__inst_executed.sum
metrics+=,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
# wgmma (HGMMA) counts in its own pipe on Hopper; ask for it where this ncu knows it (grep reads the whole list:
# with -q it stops at the match, ncu dies of SIGPIPE and pipefail fails the test at random)
ncu --query-metrics 2>/dev/null | grep '^sm__pipe_tensor_op_gmma_cycles_active' > /dev/null \
  && metrics+=,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active
metrics+=,smsp__issue_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum
for stall in long_scoreboard short_scoreboard barrier mio_throttle math_pipe_throttle wait not_selected lg_throttle \
  dispatch_stall no_instruction selected; do
  metrics+=,smsp__average_warps_issue_stalled_${stall}_per_issue_active.ratio
done
for case in "${@:-8192 8192 1 fused}"; do
  set -- $case
  name="ncu-$1x$2-s$3-$4"
  timeout "${NCU_SECONDS:-150}" ncu --clock-control none --csv --metrics "$metrics" \
    python3 benchmarks/profile_kernel.py "$@" > "$out/$name.csv" 2> "$out/$name.err"
  echo "== $case (rc $?)"
  python3 - "$out/$name.csv" <<'PY'
import csv, sys
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head, body = rows[0], rows[1:]
col = {k: head.index(k) for k in ("ID", "Kernel Name", "Metric Name", "Metric Value")}
kern = {}
for r in body:
    kern.setdefault(r[col["ID"]], {"name": r[col["Kernel Name"]][:60]})[r[col["Metric Name"]]] = r[col["Metric Value"]]
ids = sorted(kern, key=int)
for i in ids[-4:]:
    k = kern[i]
    short = lambda m: m.split("__")[1].replace("average_warps_issue_stalled_", "stall_").split("_per_issue")[0][:32]
    print(i, k["name"], {short(m): v for m, v in k.items() if m != "name"})
PY
done
