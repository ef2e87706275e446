"""`caldera` command line: options -> config -> pipeline stage.

Heavy imports (torch, transformers) happen inside the commands so that `caldera --help` is fast.
Every stage has `--json`: one JSON object per line on stdout, human output on stderr.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

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


JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]


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


@app.command("bench-decompose")
def bench_decompose(
    shapes: Annotated[str, typer.Option(help="OUTxIN list.")] = "896x896,4864x896,8192x8192,8192x29568",
    methods: Annotated[str, typer.Option(help="Presets: rtn, ldlq, ldlq-had, caldera-r64-b4, caldera-r256-b16.")] = (
        "rtn,ldlq,ldlq-had,caldera-r64-b4,caldera-r256-b16"
    ),
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


DECOMPOSE_SAMPLES = 64
DECOMPOSE_SEQ_LEN = 256
DECOMPOSE_ITERS = 4
"""CALDERA rounds of ``caldera decompose`` (DecomposeConfig's default is 10). Whole default model, 2-core CPU:
4 rounds take 9 min in all (7.4 min decomposing, 1.5 min calibration forward), 10 rounds ~20 min; the best of
4 rounds has act_err 2.5% above the best of 10 on average (5% at most; layers 0, 10, 20, 29)."""


@app.command("decompose")
def decompose(
    model: Annotated[Path | None, typer.Option(help="Local HF Llama/Qwen2 folder (default: embedded model).")] = None,
    run: Annotated[
        Path | None, typer.Option(help="Run directory, resumable (default: one per model and settings in the cache).")
    ] = None,
    method: Annotated[str, typer.Option(help="caldera, gptq, rtn or ldlq-had.")] = "caldera",
    bq: Annotated[int, typer.Option(help="Bits of Q.")] = 2,
    bl: Annotated[int, typer.Option(help="Bits of L (16: fp16).")] = 4,
    br: Annotated[int, typer.Option(help="Bits of R (16: fp16).")] = 4,
    rank: Annotated[int, typer.Option(help="Rank of L·R, caldera only (clamped to min(m, n)).")] = 256,
    group_size: Annotated[int, typer.Option(help="Q's group along the input dimension.")] = 64,
    iters: Annotated[int, typer.Option(help="CALDERA rounds (the best round is kept).")] = DECOMPOSE_ITERS,
    layers: Annotated[str | None, typer.Option(help="Decoder layers, e.g. 0-3,5 (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    samples: Annotated[int, typer.Option(help="Calibration windows (if RUN has no Hessians yet).")] = DECOMPOSE_SAMPLES,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = DECOMPOSE_SEQ_LEN,
    calib: Annotated[
        list[Path] | None, typer.Option(help="Calibration .txt/.jsonl file (repeatable; default: the corpus split).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Base seed; each matrix derives its own from (seed, layer, name).")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Decompose q/k/v/o/gate/up/down_proj layer by layer into a run directory; rerun to resume.

    Calibrates first (streaming) for the layers whose Hessians RUN lacks. Each finished layer is one file
    under RUN/layers; an interrupted run continues from the first missing layer with the same result.
    """
    import time

    from caldera.config import ConfigError, DecomposeConfig
    from caldera.core.ldlq import HessianError
    from caldera.io.calibration import CalibrationError
    from caldera.io.corpus import CorpusError
    from caldera.io.default_model import DefaultModelMissing
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.run_dir import RunDirError
    from caldera.io.shards import ShardError
    from caldera.pipeline.calibrate import CalibrateError

    errors = (ConfigError, HessianError, CalibrationError, CorpusError, ModelFolderError, DefaultModelMissing)
    errors += (RunDirError, ShardError, CalibrateError, FileExistsError)  # FileExistsError: half a default model
    start, results = time.perf_counter(), []
    try:
        cfg = DecomposeConfig.for_method(
            method, bq=bq, bl=bl, br=br, rank=rank, group_size=group_size, iters=iters, seed=seed
        )
        job = _decompose_open(model, run, layers, device, cfg, {"samples": samples, "seq_len": seq_len, "calib": calib})
        with job.run.lock():
            job.run.ensure_spec("decompose", job.spec)  # a resumed run must have the same settings
            _decompose_calibrate(job, samples, seq_len, calib, json_out)
            _decompose_layers(job, cfg, json_out, results)
    except errors as e:
        fail(str(e))
    except KeyboardInterrupt:
        message = f"interrupted after {len(results)} layers; rerun the same command to resume"
        err_console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    _decompose_report(results, time.perf_counter() - start, json_out, job.run.root)


def _progress(disable: bool):
    from rich import progress as rp

    columns = (rp.TextColumn("{task.description}"), rp.BarColumn(), rp.MofNCompleteColumn(), rp.TimeElapsedColumn())
    return rp.Progress(*columns, rp.TextColumn("eta"), rp.TimeRemainingColumn(), console=err_console, disable=disable)


@dataclasses.dataclass
class _DecomposeJob:
    folder: Path
    config: dict  # the model's config.json
    reader: object  # caldera.io.shards.ShardReader
    layers: list[int]
    device: object  # torch.device
    spec: dict  # run.json "decompose"
    run: object  # caldera.io.run_dir.RunDir


def _decompose_open(model_dir, run_dir, layers_spec, device, cfg, calibration: dict) -> _DecomposeJob:
    """Check the folder, shards, layers and device; the run.json "decompose" section and the run directory."""
    from caldera.io.default_model import cache_root, default_model_dir
    from caldera.io.model_folder import read_model_config
    from caldera.io.run_dir import RunDir
    from caldera.io.shards import ShardReader
    from caldera.pipeline.decompose_model import parse_layers, resolve_device
    from caldera.pipeline.run_decompose import decompose_spec, default_run_dir

    folder = model_dir if model_dir is not None else default_model_dir()
    config = read_model_config(folder)
    selected = parse_layers(layers_spec, config["num_hidden_layers"])
    dev, reader = resolve_device(device), ShardReader(folder)
    spec = decompose_spec(folder, reader, config["num_hidden_layers"], cfg, dev)
    if run_dir is None:
        calibration = calibration | {"calib": [str(p.resolve()) for p in calibration["calib"] or []]}
        run_dir = default_run_dir(cache_root(), spec, calibration)
    return _DecomposeJob(Path(folder), config, reader, selected, dev, spec, RunDir(run_dir))


def _decompose_calibrate(job: _DecomposeJob, samples: int, seq_len: int, calib, json_out: bool) -> None:
    """Say what will be done; compute (streaming) the Hessians of the selected layers that the run lacks."""
    from caldera.io.calibration import calibration_windows, default_calibration_texts
    from caldera.io.corpus import load_text_files
    from caldera.io.model_folder import load_tokenizer
    from caldera.pipeline.calibrate import calibrate as stream_hessians
    from caldera.pipeline.run_decompose import missing_hessians, unfinished_layers

    unfinished = sorted(set(job.layers) & set(unfinished_layers(job.run, job.config["num_hidden_layers"])))
    todo, ids = missing_hessians(job.run, unfinished), None  # finished layers need no Hessians
    if todo:  # the text is checked before anything is said
        texts = load_text_files(calib) if calib else default_calibration_texts()
        ids = calibration_windows(load_tokenizer(job.folder), texts, samples, seq_len)  # (samples, seq_len)
    job.run.remove_stale_files()
    done = len(job.layers) - len(unfinished)
    how = f"calibration {samples} × {seq_len} tokens" if todo else "Hessians from the run"
    _say(
        f"{job.folder}: {job.config['model_type']}, {job.config['num_hidden_layers']} layers; decomposing "
        f"{len(job.layers)} ({done} done) with {job.spec['method']} on {job.device}; {how}; run {job.run.root}",
        json_out,
    )
    for proj, k in job.spec["rank_clamps"].items():
        shape = next(tuple(info.shape) for name, info in job.reader.info.items() if name.endswith(f".{proj}.weight"))
        warning = f"[yellow]warning:[/] {proj} is {shape[0]}×{shape[1]}: rank {job.spec['rank']} > min(m, n), "
        err_console.print(warning + f"clamped to {k}", highlight=False, soft_wrap=True)
    if todo:
        source = ", ".join(str(p.resolve()) for p in calib) if calib else "default corpus (calibration split)"
        with _progress(json_out) as progress:
            task = progress.add_task("calibration", total=max(todo) + 1)
            kw = {"layers": unfinished, "device": job.device, "data": source}
            stream_hessians(job.folder, ids, job.run, **kw, on_layer=lambda *_: progress.advance(task))


def _say(line: str, json_out: bool) -> None:
    if not json_out:
        err_console.print(line, highlight=False, soft_wrap=True)


def _decompose_layers(job: _DecomposeJob, cfg, json_out: bool, results: list) -> None:
    """Decompose (or read back) layer by layer into ``results``: a JSON line or a human line per layer."""
    from caldera.pipeline.decompose_model import PROJECTIONS
    from caldera.pipeline.run_decompose import decompose_into_run, unfinished_layers

    todo = len(set(job.layers) & set(unfinished_layers(job.run, job.config["num_hidden_layers"])))
    with _progress(json_out) as progress:
        task = progress.add_task("matrices", total=todo * len(PROJECTIONS))
        on_matrix = lambda *_: progress.advance(task)  # noqa: E731
        for done in decompose_into_run(job.run, job.reader, job.layers, cfg, job.spec, job.device, on_matrix=on_matrix):
            layer = done.result
            results.append(layer)
            if json_out:
                emit(layer.to_dict() | ({"resumed": True} if done.resumed else {}))
                continue
            errs = " ".join(f"{p.removesuffix('_proj')} {r.act_err:.3f}" for p, r in layer.proj.items())
            seconds = sum(r.seconds for r in layer.proj.values())
            line = f"layer {layer.layer:>3}  act_err {errs}  {seconds:.1f} s" + ("  (resumed)" if done.resumed else "")
            progress.console.print(line, highlight=False, soft_wrap=True)


def _decompose_report(results: list, seconds: float, json_out: bool, run: Path) -> None:
    from caldera.pipeline.decompose_model import per_projection, summarize

    summary = summarize(results, seconds) | {"run": str(run)}
    if json_out:
        emit({"summary": summary})
        return
    table = Table("proj", "act_err min", "median", "max", "bits/w", title=None)
    for proj, row in per_projection(results).items():
        table.add_row(proj, *(f"{row[k]:.4f}" for k in ("min", "median", "max")), f"{row['bits_per_weight']:.3f}")
    err_console.print(table)
    err_console.print(
        f"{summary['layers']} layers: {summary['bits_per_weight']:.3f} bits/weight, "
        f"median act_err {summary['act_err_median']:.4f}, {summary['seconds']:.1f} s; run {run}",
        highlight=False,
        soft_wrap=True,
    )


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


@app.command("calibrate")
def calibrate(
    run: Annotated[Path, typer.Option(help="Run directory: hessians/layer_NNN.safetensors and run.json (resumable).")],
    model: Annotated[Path | None, typer.Option(help="Local HF Llama/Qwen2 folder (default: embedded model).")] = None,
    data: Annotated[
        list[Path] | None, typer.Option(help="Calibration .txt/.jsonl file (repeatable; default: the corpus split).")
    ] = None,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = 64,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = 256,
    layers: Annotated[str | None, typer.Option(help="Decoder layers, e.g. 0-3,5 (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Per-layer input Hessians (float64), streaming the model one decoder layer at a time from its shards."""
    import time

    from caldera.config import ConfigError
    from caldera.io.calibration import CalibrationError, calibration_windows, default_calibration_texts
    from caldera.io.corpus import CorpusError, load_text_files
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
        texts = load_text_files(data) if data else default_calibration_texts()
        source = ", ".join(str(p.resolve()) for p in data) if data else "default corpus (calibration split)"
        ids = calibration_windows(load_tokenizer(folder), texts, samples, seq_len)  # (samples, seq_len)
        todo = [i for i in selected if not rundir.has_hessians(i)]
        if not json_out:
            err_console.print(
                f"{folder}: {config['model_type']}, {config['num_hidden_layers']} layers; Hessians of {len(todo)} "
                f"layers ({len(selected) - len(todo)} already in {run}); calibration {samples} × {seq_len} tokens",
                highlight=False,
                soft_wrap=True,
            )
        with _progress(json_out) as progress:
            task = progress.add_task("layers", total=max(todo) + 1 if todo else 0)

            def on_layer(*_) -> None:
                progress.advance(task)

            with rundir.lock():
                rundir.remove_stale_files()
                kw = {"layers": selected, "device": dev, "data": source, "on_layer": on_layer}
                result = stream_hessians(folder, ids, rundir, **kw)
    except (*errors, CalibrateError, ShardError, FileExistsError) as e:
        fail(str(e))
    summary = {"run": str(run), "layers": len(result.layers), "tokens": result.tokens}
    summary |= {"hessian_bytes": result.hessian_bytes, "seconds": time.perf_counter() - start}
    if json_out:
        emit(summary)
    else:
        err_console.print(
            f"{summary['layers']} layers ({len(result.computed)} computed), {result.tokens} tokens each, "
            f"{result.hessian_bytes / 2**20:.1f} MiB of Hessians in {run}, {summary['seconds']:.1f} s",
            highlight=False,
            soft_wrap=True,
        )


def main() -> None:
    app()
