"""Lean imports: `import caldera` and the CLI's --help load neither MAX nor CUDA (nor torch)."""

import subprocess
import sys

PROBE = """
import sys
import caldera, caldera.cli, caldera.config
heavy = sorted(m for m in ("max", "torch", "transformers") if m in sys.modules)
print(",".join(heavy))
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"importing caldera pulled in: {out}"


def test_core_import_does_not_start_cuda():
    probe = "import caldera.core.decompose, torch, sys; print(torch.cuda.is_initialized(), 'max' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
