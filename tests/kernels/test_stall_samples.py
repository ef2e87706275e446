"""benchmarks/stall_samples.py on a small Nsight Compute source-page CSV: shares by reason, top instructions, phases."""

import csv
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "stall_samples.py"
HEAD = [
    "Address",
    "Source",
    "Warp Stall Sampling (All Samples)",
    "stall_long_sb",
    "stall_barrier",
    "stall_long_sb (Not Issued)",
]
ROWS = [
    ["0x10", "LDG.E.128 R4, desc[UR4][R2.64]", "10", "2", "0", "9"],
    ["0x20", "PRMT R6, R4, 0x5410, RZ", "60", "60", "0", "9"],
    ["0x30", "BAR.SYNC.DEFER_BLOCKING 0x0", "20", "0", "20", "9"],
    ["0x40", "HGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR40], R24", "1,010", "0", "0", "9"],
]


def test_shares_top_instructions_and_phases(tmp_path):
    path = tmp_path / "src.csv"
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerows([["Kernel Name", "k"], HEAD, *ROWS])
    text = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "2"], capture_output=True, text=True, check=True
    ).stdout
    lines = text.splitlines()
    assert lines[0] == "1100 samples; long_sb 5.6%, barrier 1.8%"  # (2 + 60) / 1100, 20 / 1100; "Not Issued" ignored
    top = lines[lines.index("top 2 instructions:") + 1 :][:2]
    assert "HGMMA" in top[0] and "91.8%" in top[0] and "PRMT" in top[1] and "{'long_sb': 60}" in top[1]
    phases = lines[lines.index("running share at the phase marks:") + 1 :]
    assert [p.split()[1] for p in phases] == ["8.2%", "100.0%"]  # after the barrier (10+60+20), after the HGMMA


def test_executed_instructions_by_count_and_opcode(tmp_path):
    path = tmp_path / "src.csv"
    counts = ["8", "64", "64", "64"]  # the load runs once for 8 warps, the loop body 8 times each
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerows([["Kernel Name", "k"], [*HEAD, "Instructions Executed"]])
        out.writerows([row + [n] for row, n in zip(ROWS, counts, strict=True)])
        out.writerow(["0x50", "@P0 PRMT R7, R4, 0x5410, RZ", "10", "0", "0", "0", "64"])
    text = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), "2"], capture_output=True, text=True, check=True
    ).stdout
    lines = text.splitlines()
    start = lines.index("264 warp instructions executed; by how many times an instruction ran:")
    assert lines[start + 1].split() == ["64x", "4", "instructions", "97.0%", "executed", "99.1%", "samples"]
    assert lines[start + 2].split() == ["8x", "1", "instructions", "3.0%", "executed", "0.9%", "samples"]
    # per mma (64 HGMMA): PRMT 128/64, BAR 1, HGMMA 1, LDG 8/64
    assert lines[start + 3] == "opcodes per mma (64 mma): PRMT 2.00, BAR 1.00, HGMMA 1.00, LDG 0.12"
