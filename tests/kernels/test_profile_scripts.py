"""benchmarks/gpu_profile.sh and gpu_sources.sh build the Nsight Compute command lines they should (a stand-in ncu
on PATH records its arguments; no GPU needed)."""

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAKE_NCU = """#!/usr/bin/env bash
if [ "$1" = "--query-metrics" ]; then
  [ -n "${FAKE_GMMA:-}" ] && echo "sm__pipe_tensor_op_gmma_cycles_active    Counter  cycle  # of cycles"
  echo "sm__pipe_tensor_op_hmma_cycles_active    Counter  cycle  # of cycles"
  # the real list goes on for thousands of lines, past a pipe's buffer after the match
  for i in $(seq 3000); do echo "smsp__filler_metric_$i    Counter  cycle  # of cycles"; done
  exit 0
fi
echo "$*" >> "$FAKE_ARGS"
"""


def run_with_fake_ncu(tmp_path: Path, script: str, args: list[str], **env: str) -> list[str]:
    """Run benchmarks/`script` with the stand-in ncu first on PATH; its recorded command lines."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "ncu").write_text(FAKE_NCU)
    (bin_dir / "ncu").chmod(0o755)
    calls = tmp_path / f"calls-{len(list(tmp_path.glob('calls-*')))}.txt"
    calls.touch()
    path = f"{bin_dir}:{os.environ['PATH']}"
    subprocess.run(
        ["bash", f"benchmarks/{script}", *args],
        cwd=ROOT,
        env={**os.environ, **env, "PATH": path, "OUT": str(tmp_path), "FAKE_ARGS": str(calls)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return calls.read_text().splitlines()


def test_profile_asks_for_the_wgmma_pipe_only_where_ncu_has_it(tmp_path):
    gmma = "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active"
    with_it = run_with_fake_ncu(tmp_path, "gpu_profile.sh", ["8192 8192 128 fused"], FAKE_GMMA="1")
    without = run_with_fake_ncu(tmp_path, "gpu_profile.sh", ["8192 8192 128 fused"])
    assert len(with_it) == len(without) == 1
    assert gmma in with_it[0] and "sm__pipe_tensor_op_hmma_cycles_active" in with_it[0]
    assert gmma not in without[0] and "profile_kernel.py 8192 8192 128 fused" in without[0]


def test_sources_skip_the_first_launches(tmp_path):
    calls = run_with_fake_ncu(tmp_path, "gpu_sources.sh", ["mojo_pkg", "8192 8192 128 fused"], SKIP="1")
    assert "-k regex:mojo_pkg --launch-skip 1 -c 1" in calls[0]
    assert calls[1].startswith(f"-i {tmp_path}/src-mojo_pkg.ncu-rep --page source")
