"""`caldera calibrate`: per-layer input Hessians, streaming one decoder layer at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import TEXTS_HELP, JsonOpt, ModelOpt, app, emit, err_console, fail, peak_gpu, progress_bar


@app.command("calibrate")
def calibrate(
    run: Annotated[Path, typer.Option(help="Run directory: hessians/layer_NNN.safetensors and run.json (resumable).")],
    model: ModelOpt = None,
    data: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP)] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    layers: Annotated[str | None, typer.Option(help="Decoder layers, e.g. 0-3,5 (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    batch_size: Annotated[int, typer.Option(help="Sequences per forward batch (GPU memory grows with it).")] = 8,
    json_out: JsonOpt = False,
) -> None:
    """Per-layer input Hessians (float64), streaming the model one decoder layer at a time from its shards."""
    import time

    from caldera.config import ConfigError
    from caldera.io.calibration import CalibrationError, calibration_windows, default_calibration_texts
    from caldera.io.corpus import CorpusError, describe_texts, load_texts
    from caldera.io.default_model import DefaultModelMissing, default_model_dir
    from caldera.io.model_folder import ModelFolderError, load_tokenizer, read_model_config
    from caldera.io.run_dir import RunDir, RunDirError
    from caldera.io.shards import ShardError, ShardReader
    from caldera.pipeline.calibrate import CalibrateError
    from caldera.pipeline.calibrate import calibrate as stream_hessians
    from caldera.pipeline.decompose_model import parse_layers, resolve_device

    start = time.perf_counter()
    errors = (ConfigError, CalibrationError, CorpusError, DefaultModelMissing, ModelFolderError, RunDirError)
    try:
        folder = model if model is not None else default_model_dir()
        config = read_model_config(folder)
        ShardReader(folder)  # shards checked before the text is tokenized
        selected, dev, rundir = parse_layers(layers, config["num_hidden_layers"]), resolve_device(device), RunDir(run)
        texts = load_texts(data) if data else default_calibration_texts()
        source = describe_texts(data) if data else "default corpus (calibration split)"
        ids = calibration_windows(load_tokenizer(folder), texts, samples, seq_len)  # (samples, seq_len)
        todo = [i for i in selected if not rundir.has_hessians(i)]
        if not json_out:
            err_console.print(
                f"{folder}: {config['model_type']}, {config['num_hidden_layers']} layers; Hessians of {len(todo)} "
                f"layers ({len(selected) - len(todo)} already in {run}); calibration {samples} × {seq_len} tokens",
                highlight=False,
                soft_wrap=True,
            )
        with progress_bar(json_out) as progress:
            task = progress.add_task("layers", total=max(todo) + 1 if todo else 0)

            def on_layer(*_) -> None:
                progress.advance(task)

            with rundir.lock():
                rundir.remove_stale_files()
                kw = {"layers": selected, "device": dev, "data": source, "on_layer": on_layer, "batch_size": batch_size}
                result = stream_hessians(folder, ids, rundir, **kw)
    except (*errors, CalibrateError, ShardError, FileExistsError) as e:
        fail(str(e))
    summary = {"run": str(run), "layers": len(result.layers), "tokens": result.tokens}
    summary |= {"hessian_bytes": result.hessian_bytes, "seconds": time.perf_counter() - start}
    summary |= {"computed": len(result.computed), "spilled": result.spilled} | peak_gpu(dev)
    if json_out:
        emit(summary)
    else:
        err_console.print(
            f"{summary['layers']} layers ({len(result.computed)} computed), {result.tokens} tokens each, "
            f"{result.hessian_bytes / 2**20:.1f} MiB of Hessians in {run}, {summary['seconds']:.1f} s",
            highlight=False,
            soft_wrap=True,
        )
