"""`caldera bench`: the fused Mojo/MAX kernel against unfused PyTorch and dense fp16 at real projection shapes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import JsonOpt, app, default_device, emit, fail, say


@app.command("bench")
def bench(
    seq: Annotated[int, typer.Option(help="Tokens per call: 1 (decode) or 128 (prefill).")],
    shape: Annotated[str, typer.Option(help="qwen2-72b, or a model folder (its config.json's projections).")] = (
        "qwen2-72b"
    ),
    device: Annotated[str | None, typer.Option(help="cpu or gpu (default: gpu if present).")] = None,
    out: Annotated[Path | None, typer.Option(help="Write bench-seq<S>-<device>.csv and .md here.")] = None,
    impls: Annotated[str, typer.Option(help="Comma list of fused, two_stage, unfused_torch, dense.")] = (
        "fused,two_stage,unfused_torch,dense"
    ),
    projections: Annotated[
        str | None, typer.Option(help="Comma list of projections to time, e.g. q_proj,down_proj (default: all).")
    ] = None,
    sets: Annotated[int | None, typer.Option(help="Weight sets to rotate (default: 2× the L2; 2 on a CPU).")] = None,
    iters: Annotated[int, typer.Option(help="Timed samples on a GPU.")] = 50,
    json_out: JsonOpt = False,
) -> None:
    """Median time, GB/s and error of each implementation of a compressed linear; tokens/s of the layer stack."""
    from caldera.pipeline import bench_kernel as bk

    if seq < 1:
        fail(f"--seq {seq} must be >= 1")
    chosen = tuple(i for i in impls.split(",") if i)
    if unknown := sorted(set(chosen) - set(bk.IMPLS)):
        fail(f"unknown impl {unknown[0]!r}; choose from {', '.join(bk.IMPLS)}")
    kind = {"gpu": "cuda", "cuda": "cuda", "cpu": "cpu", None: default_device()}.get(device)
    if kind is None:
        fail(f"--device {device!r}: choose cpu or gpu")
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():
            fail("--device gpu: no CUDA device here")
    try:
        shapes = bk.model_shapes(shape)
        if projections is not None:
            shapes = shapes.only([p for p in projections.split(",") if p])
    except (FileNotFoundError, KeyError, ValueError) as e:
        fail(str(e))
    cfg = bk.BenchConfig(seq, kind, chosen, sets=sets, iters=iters)
    result = bk.run(shapes, cfg, progress=lambda s: say(f"bench {s} (seq {seq}, {kind})", json_out))
    for row in result.rows:
        if json_out:
            emit(dataclasses.asdict(row))
    if out is not None:
        for path in result.write(out):
            say(f"wrote {path}", json_out)
    if not json_out:
        typer.echo(result.markdown())
