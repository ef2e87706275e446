"""`caldera bench-decompose`: seconds, memory and error of the decomposition at real layer shapes."""

from __future__ import annotations

import dataclasses
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from caldera.cli.common import JsonOpt, app, default_device, emit, err_console, fail


@app.command("bench-decompose")
def bench_decompose(
    shapes: Annotated[str, typer.Option(help="OUTxIN list.")] = "896x896,4864x896,8192x8192,8192x29568",
    methods: Annotated[
        str, typer.Option(help="Presets: rtn, ldlq, ldlq-had, caldera-r64-b4, caldera-r256-b4, caldera-r256-b16.")
    ] = ("rtn,ldlq,ldlq-had,caldera-r64-b4,caldera-r256-b16"),
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    iters: Annotated[int | None, typer.Option(help="CALDERA rounds (default: the config's).")] = None,
    randomized_svd: Annotated[bool, typer.Option(" /--exact-svd", help="Exact SVD in the low-rank step.")] = True,
    seed: int = 0,
    json_out: JsonOpt = False,
) -> None:
    """Time the decomposition of synthetic matrices at real layer shapes (seconds, peak memory, error)."""
    from caldera.config import ConfigError
    from caldera.pipeline import bench_decompose as bench

    overrides = {"randomized_svd": randomized_svd}
    if iters is not None:
        overrides["iters"] = iters
    try:
        rows = bench.run(bench.parse_shapes(shapes), methods.split(","), device or default_device(), seed, **overrides)
        table = Table("shape", "method", "act_err", "fro_err", "bits/w", "seconds", "peak MB", "rounds", title=None)
        for row in rows:
            if json_out:
                emit(dataclasses.asdict(row))
            else:
                err_console.print(f"{row.shape[0]}x{row.shape[1]} {row.method}: {row.seconds:.1f} s", highlight=False)
            table.add_row(
                f"{row.shape[0]}×{row.shape[1]}",
                row.method,
                f"{row.act_err:.4f}",
                f"{row.fro_err:.4f}",
                f"{row.bits_per_weight:.3f}",
                f"{row.seconds:.2f}",
                f"{row.peak_mb:.0f}",
                str(row.iters),
            )
    except ConfigError as e:
        fail(str(e))
    if not json_out:
        Console(width=None if sys.stdout.isatty() else 160).print(table)
