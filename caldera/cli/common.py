"""The Typer app and what every command shares: one-line errors, JSON lines, progress bars, the device."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

app = typer.Typer(
    help="CALDERA: compress LLM linear layers to Q (2-bit) + L·R (low rank), layer by layer.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


@app.callback()
def _root() -> None:
    """Stages: calibrate -> decompose -> export -> eval; bench and plan around them."""


TEXTS_HELP = ".txt or .jsonl file, or a datasets name: wikitext2, wikitext2-train, c4 (repeatable)."
ModelOpt = Annotated[Path | None, typer.Option(help="Local HF Llama/Qwen2 folder (default: embedded model).")]
GroupSizeOpt = Annotated[int, typer.Option(help="Q's group along the input dimension.")]
DampingOpt = Annotated[float, typer.Option(help="LDLQ damping, relative to H's mean diagonal.")]
ZeroPointOpt = Annotated[
    bool, typer.Option(help="Asymmetric grid with uint8 zero points (the usual GPTQ/RTN grid; counted in bits).")
]
OverridesOpt = Annotated[
    Path | None,
    typer.Option(
        help="YAML/JSON per-layer rules, pattern -> {rank, bq, bl, br}, e.g. 'layers.0-3.mlp.down_proj: {rank: 128}' "
        "(later rules win; part of the run's settings).",
        show_default=False,
    ),
]
ProtectOpt = Annotated[
    float,
    typer.Option(
        help="Fraction of each linear's weights kept exactly (fp16 outliers beside Q, chosen by w² · H_jj); "
        "0.0001 (0.01%) is the suggested value. Default 0 (off): at equal bits it helped at 2.94 bits per weight "
        "and hurt at 3.82 on the default model (sweeps/results/protect.md)."
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]


_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """'22GB' -> 22·10⁹ bytes, '20GiB' -> 20·2³⁰, '1.5 TB', '4096' (bytes); ValueError naming the text."""
    value = text.strip().lower().replace("_", "")
    number = value.rstrip("kmgtib ")
    unit = value[len(number) :].strip()
    try:
        size = float(number) * _SIZE_UNITS[unit]
    except (KeyError, ValueError):
        units = "B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        raise ValueError(f"bad size {text!r}: expected a number and a unit ({units})") from None
    if not 0 < size < float("inf"):
        raise ValueError(f"bad size {text!r}: must be positive and finite")
    return int(size)


def fail(message: str) -> None:
    """One-line error on stderr, exit code 2."""
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def emit(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def peak_gpu(device) -> dict[str, float]:
    """{"peak_gpu_mb": the CUDA allocator's peak (torch.cuda.max_memory_allocated) in MiB} on a CUDA device, else {}."""
    import torch

    if torch.device(device).type != "cuda":
        return {}
    return {"peak_gpu_mb": torch.cuda.max_memory_allocated(device) / 2**20}


def progress_bar(disable: bool):
    """A rich progress bar on stderr (count, elapsed, ETA); ``disable`` under --json."""
    from rich import progress as rp

    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn())
    return rp.Progress(*columns, rp.TextColumn("eta"), rp.TimeRemainingColumn(), console=err_console, disable=disable)


def say(line: str, json_out: bool) -> None:
    """A human line on stderr, unless --json."""
    if not json_out:
        err_console.print(line, highlight=False, soft_wrap=True)
