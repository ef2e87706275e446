"""`caldera` command line: options -> config -> pipeline stage, one module per stage.

Heavy imports (torch, transformers) happen inside the commands so that `caldera --help` is fast.
Every stage has `--json`: one JSON object per line on stdout, human output on stderr.
"""

# stage order: plan, synth, calibrate, allocate, decompose, export, finetune, eval, run, sweep, benches
from caldera.cli import plan, synth, calibrate, allocate, decompose, export, finetune, evaluate  # noqa: F401, I001
from caldera.cli import run_job, sweep, bench_decompose, bench  # noqa: F401, I001
from caldera.cli.common import app

__all__ = ["app", "main"]


def main() -> None:
    app()
