"""Where a kernel's warps wait, per SASS instruction, from Nsight Compute's source page (`gpu_sources.sh` writes it).

    python3 benchmarks/stall_samples.py src.csv [top]

Prints the share of stall samples per reason, the `top` instructions by samples (with their leading reasons), and
the running share at each barrier, wgmma, copy commit and exit, which splits the kernel into its phases. Where the
page has executed-instruction counts: the instructions grouped by how many times each ran (a loop body's
instructions share a count, code that every warp runs once has the warp count), and the executed opcodes per mma.
"""

import csv
import sys
from collections import Counter

SAMPLES = "Warp Stall Sampling (All Samples)"
EXECUTED = "Instructions Executed"
MARKS = ("BAR.SYNC", "HGMMA", "LDGDEPBAR", "EXIT", "STRONG.GPU")


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(path: str, top: int = 25) -> None:
    with open(path) as f:
        rows = list(csv.reader(f))
    head, body = rows[1], rows[2:]  # row 0 names the kernel
    col = {h: i for i, h in enumerate(head)}
    reasons = [h for h in head if h.startswith("stall_") and "Not Issued" not in h]
    total = sum(number(r[col[SAMPLES]]) for r in body) or 1.0
    by_reason = {h[6:]: sum(number(r[col[h]]) for r in body) / total for h in reasons}
    leading = sorted(by_reason.items(), key=lambda kv: -kv[1])[:8]
    print(f"{total:.0f} samples;", ", ".join(f"{k} {v:.1%}" for k, v in leading))
    print(f"\ntop {top} instructions:")
    for r in sorted(body, key=lambda r: -number(r[col[SAMPLES]]))[:top]:
        n = number(r[col[SAMPLES]])
        lead = {h[6:]: int(number(r[col[h]])) for h in reasons if number(r[col[h]]) > 0.1 * n}
        print(f"  {r[col['Address']][-6:]} {n / total:6.1%}  {r[col['Source']][:64]:64} {lead}")
    print("\nrunning share at the phase marks:")
    seen = 0.0
    for r in body:
        seen += number(r[col[SAMPLES]])
        if any(m in r[col["Source"]] for m in MARKS):
            print(f"  {r[col['Address']][-6:]} {seen / total:6.1%}  {r[col['Source']][:64]}")
    if EXECUTED in col:
        executed(body, col, total)


def opcode(source: str) -> str:
    """The opcode of a SASS line without its predicate and modifiers (`@P0 IMAD.X R1, ...` -> IMAD)."""
    words = source.split()
    words = words[1:] if words and words[0].startswith("@") else words
    return words[0].split(".")[0] if words else ""


def executed(body: list[list[str]], col: dict[str, int], samples: float) -> None:
    """Executed warp instructions grouped by each instruction's count, and the executed opcodes per mma."""
    groups: dict[float, list[float]] = {}
    ops: Counter[str] = Counter()
    for r in body:
        ran = number(r[col[EXECUTED]])
        group = groups.setdefault(ran, [0, 0.0, 0.0])
        group[0] += 1
        group[1] += ran
        group[2] += number(r[col[SAMPLES]])
        ops[opcode(r[col["Source"]])] += ran
    total = sum(g[1] for g in groups.values()) or 1.0
    print(f"\n{total:.0f} warp instructions executed; by how many times an instruction ran:")
    for ran, (count, ex, smp) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:8]:
        print(f"  {ran:9.0f}x  {count:5d} instructions  {ex / total:6.1%} executed  {smp / samples:6.1%} samples")
    mma = ops["HMMA"] + ops["HGMMA"] or 1.0
    print(f"opcodes per mma ({mma:.0f} mma):", ", ".join(f"{op} {n / mma:.2f}" for op, n in ops.most_common(12)))


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))
