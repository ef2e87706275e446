"""`caldera export` and `caldera verify`: the HF-style packed folder and its integrity check."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import JsonOpt, app, emit, err_console, fail


@app.command("export")
def export(
    run: Annotated[Path, typer.Option(help="Run directory of a finished caldera decompose.")],
    out: Annotated[Path, typer.Option(help="Model folder to create (must not exist).")],
    embed_bits: Annotated[int, typer.Option(help="Embeddings and lm_head: 16 (fp16), 8 or 4 (packed).")] = 16,
    layers_per_shard: Annotated[int, typer.Option(help="Decoder layers per safetensors shard.")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Write an HF-style folder: config.json with quantization_config, tokenizer, embeddings and fp16 norms,
    packed linears in safetensors shards with an index, and manifest.json (sha256 and size of every file)."""
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.packed_format import FormatError
    from caldera.io.run_dir import RunDirError
    from caldera.io.shards import ShardError
    from caldera.pipeline.export import ExportError
    from caldera.pipeline.export import export as export_run

    try:
        summary = export_run(run, out, embed_bits=embed_bits, layers_per_shard=layers_per_shard)
    except (ExportError, RunDirError, ModelFolderError, ShardError, FormatError) as e:
        fail(str(e))
    if json_out:
        emit(summary.to_dict())
        return
    err_console.print(
        f"{summary.path}: {summary.layers} layers in {summary.shards} shards, {summary.files} files, "
        f"{summary.bytes / 2**20:.1f} MiB; linears {summary.bits_per_weight:.3f} bits/weight",
        highlight=False,
        soft_wrap=True,
    )


@app.command("verify")
def verify(
    model: Annotated[Path, typer.Option(help="Folder written by caldera export.")],
    json_out: JsonOpt = False,
) -> None:
    """Check an exported folder: every file against manifest.json (size, sha256), every packed tensor's format."""
    from caldera.pipeline.export import ExportError
    from caldera.pipeline.export import verify as verify_folder

    try:
        manifest = verify_folder(model, packed=True)
    except ExportError as e:
        fail(str(e))
    files = manifest["files"]
    summary = {"model": str(model), "files": len(files), "bytes": sum(f["bytes"] for f in files.values())}
    summary["packed_entries"] = manifest["packed_entries"]
    if json_out:
        emit(summary)
        return
    err_console.print(
        f"{model}: {summary['files']} files ({summary['bytes'] / 2**20:.1f} MiB) match manifest.json; "
        f"{summary['packed_entries']} packed entries valid",
        highlight=False,
        soft_wrap=True,
    )
