"""The runbook's CPU steps, run as written but at tiny settings, so that runbook/README.md cannot rot.

Every `caldera ...` line of an indented code block in runbook/README.md is a step (shell continuations joined,
trailing `# comments` dropped), in the README's order, except GPU steps: a `--device cuda`/`--device gpu` option
or a section whose heading says GPU (today 01c, 02, 03, 04). What runs today:

    01   caldera run (uniform CALDERA and the references, at <= 3 bits, with and without zero points/damping)
    01b  caldera decompose, caldera export
    05   caldera sweep sweeps/{stage1,calibration,baselines}.yaml, caldera allocate, caldera run --overrides
    06   caldera plan --model qwen2-72b (as written: it reads shapes only and is instant)

Each command runs through CliRunner on the tiny random Qwen2 of tests/conftest.py (`--model`, and its calibration
text as `--calib`/`--eval-data`/`--data`) with TINY's numbers, for the options the command has: the README's own
copy of such an option is removed first (Typer keeps the last of a repeated scalar option but accumulates list
options such as --calib). `runs/...` paths go to tmp_path, `RUN` is the run of step 01b, and `sweeps/NAME.yaml`
is a copy of the real file with TINY_SWEEP's numbers and the tiny model and text. At rank 8 the first two
`caldera run` lines are the same CALDERA config, so the second finds the first's work done (resume).
"""

import re
import shlex
from pathlib import Path

import pytest
import torch
import typer
import yaml
from typer.testing import CliRunner

from caldera.cli import app

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "runbook" / "README.md"
MIN_COMMANDS = 14  # what the README holds today: fewer means the extraction no longer finds them
AS_WRITTEN = {"plan"}  # instant and model-free (qwen2-72b is a built-in shape): no tiny settings
PLACEHOLDERS = {"RUN": "runs/demo"}  # "RUN: any calibrated run": the one decomposed in step 01b
TINY = {"--samples": 4, "--seq-len": 32, "--iters": 2, "--rank": 8, "--max-tokens": 512, "--eval-seq-len": 64}
TINY_SWEEP = {"samples": 4, "seq_len": 32, "max_tokens": 512, "iters": 2, "rank": 8}


def runbook_commands() -> list[list[str]]:
    """The CPU `caldera` commands of the runbook's indented code blocks, as argument lists."""
    commands, gpu_section = [], False
    for line in RUNBOOK.read_text().replace("\\\n", " ").splitlines():
        if line.startswith("#"):
            gpu_section = "GPU" in line
        elif line.startswith("    caldera ") and not gpu_section and not re.search(r"--device (cuda|gpu)", line):
            commands.append(shlex.split(line, comments=True)[1:])
    return commands


def tiny_sweep(path: Path, out: Path, model: Path, text: Path) -> Path:
    """A copy of the sweep YAML ``path`` at ``out``: the same keys, TINY_SWEEP's numbers, the tiny model and text."""

    def shrink(node, key=None):
        if isinstance(node, dict):
            return {k: shrink(v, k) for k, v in node.items()}
        if isinstance(node, list):
            items = [shrink(v, key) for v in node]
            return [v for i, v in enumerate(items) if v not in items[:i]]  # a grid of 64/256/1024 windows -> [4]
        return TINY_SWEEP[key] if key in TINY_SWEEP and isinstance(node, int) else node

    spec = shrink(yaml.safe_load(path.read_text()))
    spec["model"] = str(model)
    spec.setdefault("calibration", {})["calib"] = [str(text)]
    spec.setdefault("eval", {})["data"] = [str(text)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(spec))
    return out


def tiny(args: list[str], tmp_path: Path, model: Path, text: Path) -> list[str]:
    """``args`` at tiny settings: the tiny model, text and TINY's numbers replace the README's options, paths are
    redirected into tmp_path."""
    name = args[0]
    tiny_options = TINY | {"--model": model, "--calib": text, "--eval-data": text, "--data": text}
    accepted = {opt for p in typer.main.get_command(app).commands[name].params for opt in p.opts}
    replaced = set() if name in AS_WRITTEN else accepted & set(tiny_options)
    out, i = [], 0
    while i < len(args):
        arg = PLACEHOLDERS.get(args[i], args[i])
        if arg in replaced:
            i += 2  # drop the README's value: the tiny one is appended below
            continue
        if arg.startswith("runs/"):
            arg = str(tmp_path / arg)
        elif arg.startswith("sweeps/"):
            arg = str(tiny_sweep(ROOT / arg, tmp_path / arg, model, text))
        out.append(arg)
        i += 1
    return out + [str(v) for opt in sorted(replaced) for v in (opt, tiny_options[opt])]


@pytest.fixture
def one_thread():
    """Tiny matrices: on the busy 2-core machine two torch threads make the steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_runbook_cpu_steps_run_at_tiny_settings(qwen2_dir, calib_file, tmp_path, monkeypatch, one_thread):
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    commands = runbook_commands()
    assert len(commands) >= MIN_COMMANDS, f"only {len(commands)} caldera commands found in {RUNBOOK}"
    runner = CliRunner()
    for args in commands:
        argv = tiny(args, tmp_path, qwen2_dir, calib_file)
        result = runner.invoke(app, argv)
        shown = "caldera " + shlex.join(args) + "\n  as: caldera " + shlex.join(argv)
        assert result.exit_code == 0, f"{shown}\n{result.output}\n{result.exception!r}"
