# Shared by the runbook's GPU scripts (source it after setting OUT, PREFIX and LOG).
#   stage NAME COMMAND...   runs `python3 -m caldera COMMAND... --json` into OUT/PREFIX-NAME.jsonl and appends
#                           {"stage": NAME, "wall_s": ..., "result": <its last JSON line>} to LOG
#   machine                 appends {"stage": "machine", torch, gpu, gpus, cpus, python} to LOG

stage() {
  local name=$1 start
  shift
  start=$EPOCHREALTIME
  python3 -m caldera "$@" --json >"$OUT/$PREFIX-$name.jsonl"
  awk -v s="$start" -v e="$EPOCHREALTIME" -v n="$name" -v r="$(tail -n 1 "$OUT/$PREFIX-$name.jsonl")" \
    'BEGIN { printf "{\"stage\": \"%s\", \"wall_s\": %.1f, \"result\": %s}\n", n, e - s, r }' | tee -a "$LOG"
}

machine() {
  python3 - <<'PY' | tee -a "$LOG"
import json, os, platform, torch
cuda = torch.cuda.is_available()
print(json.dumps({"stage": "machine", "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if cuda else None,
                  "gpus": torch.cuda.device_count() if cuda else 0, "cpus": os.cpu_count(),
                  "python": platform.python_version()}))
PY
}
