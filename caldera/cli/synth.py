"""`caldera synth`: a random model folder with a real model's shapes, to run the pipeline at full layer scale."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import JsonOpt, app, emit, fail, parse_size, progress_bar, say


@app.command("synth")
def synth(
    shape: Annotated[str, typer.Option(help="qwen2-72b, qwen2-7b, qwen2.5-72b, or a folder with a config.json.")],
    layers: Annotated[int, typer.Option(help="Decoder layers to write (the shape's count is replaced).")],
    out: Annotated[Path, typer.Option(help="Model folder to create (must not exist).")],
    seed: Annotated[int, typer.Option(help="Base seed; each tensor draws from (seed, name).")] = 0,
    dtype: Annotated[str, typer.Option(help="bfloat16, float16 or float32.")] = "bfloat16",
    shard_size: Annotated[str, typer.Option(help="Largest shard, e.g. 4GB (a larger tensor gets its own).")] = "4GB",
    device: Annotated[str, typer.Option(help="Where values are drawn: cpu, or cuda (fast; other values).")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Random weights (biases included) in sharded safetensors with an index, config.json and a byte-level
    tokenizer: calibrate, decompose and export run on it as on the real model."""
    from caldera.config import ConfigError
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.model_shapes import model_config
    from caldera.pipeline.decompose_model import resolve_device
    from caldera.pipeline.synth import SynthError, total_bytes
    from caldera.pipeline.synth import synth as write_synth

    try:
        name, config = model_config(shape)
        shard_bytes = parse_size(shard_size)
        total = total_bytes(config, layers, dtype)  # checks the arguments before anything is written
        say(f"{name}: {layers} layers, {total / 1e9:.2f} GB of {dtype} into {out}", json_out)
        with progress_bar(json_out) as progress:
            task = progress.add_task("tensors (MB)", total=round(total / 1e6))
            on_tensor = lambda _name, nbytes: progress.advance(task, nbytes / 1e6)  # noqa: E731
            kw = {"seed": seed, "dtype": dtype, "shard_bytes": shard_bytes, "on_tensor": on_tensor}
            kw["device"] = str(resolve_device(device))
            summary = write_synth(config, out, layers, **kw)
    except (ConfigError, ModelFolderError, SynthError, ValueError) as e:
        fail(str(e))
    if json_out:
        emit(dataclasses.asdict(summary))
    else:
        say(
            f"{summary.path}: {summary.parameters / 1e9:.2f} B parameters, {summary.tensors} tensors in "
            f"{summary.shards} shards, {summary.bytes / 1e9:.2f} GB",
            json_out,
        )
