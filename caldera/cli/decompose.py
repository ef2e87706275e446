"""`caldera decompose`: calibrate if needed, then decompose layer by layer into a resumable run directory."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from caldera.cli.common import (
    TEXTS_HELP,
    DampingOpt,
    GroupSizeOpt,
    JsonOpt,
    ModelOpt,
    OverridesOpt,
    ProtectOpt,
    ZeroPointOpt,
    app,
    emit,
    err_console,
    fail,
    peak_gpu,
    progress_bar,
    say,
)

DECOMPOSE_SAMPLES = 64
DECOMPOSE_SEQ_LEN = 256
DECOMPOSE_ITERS = 4
"""CALDERA rounds of ``caldera decompose`` (DecomposeConfig's default is 10). Whole default model, 2-core CPU:
4 rounds take 9 min in all (7.4 min decomposing, 1.5 min calibration forward), 10 rounds ~20 min; the best of
4 rounds has act_err 2.5% above the best of 10 on average (5% at most; layers 0, 10, 20, 29)."""


@app.command("decompose")
def decompose(
    model: ModelOpt = None,
    run: Annotated[
        Path | None, typer.Option(help="Run directory, resumable (default: one per model and settings in the cache).")
    ] = None,
    method: Annotated[str, typer.Option(help="caldera, gptq, rtn or ldlq-had.")] = "caldera",
    bq: Annotated[int, typer.Option(help="Bits of Q.")] = 2,
    bl: Annotated[int, typer.Option(help="Bits of L (16: fp16).")] = 4,
    br: Annotated[int, typer.Option(help="Bits of R (16: fp16).")] = 4,
    rank: Annotated[int, typer.Option(help="Rank of L·R, caldera only (clamped to min(m, n)).")] = 256,
    group_size: GroupSizeOpt = 64,
    iters: Annotated[int, typer.Option(help="CALDERA rounds (the best round is kept).")] = DECOMPOSE_ITERS,
    layers: Annotated[str | None, typer.Option(help="Decoder layers, e.g. 0-3,5 (default: all).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    samples: Annotated[int, typer.Option(help="Calibration windows (if RUN has no Hessians yet).")] = DECOMPOSE_SAMPLES,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = DECOMPOSE_SEQ_LEN,
    calib: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP)] = None,
    damping: DampingOpt = 0.01,
    zero_point: ZeroPointOpt = False,
    protect: ProtectOpt = 0.0,
    seed: Annotated[int, typer.Option(help="Base seed; each matrix derives its own from (seed, layer, name).")] = 0,
    ray: Annotated[
        bool,
        typer.Option(
            "--ray",
            help="One Ray task per layer (a GPU each on cuda), RUN and the model on shared storage: the cluster in "
            "RAY_ADDRESS or a new local one. Needs caldera[distributed].",
        ),
    ] = False,
    ray_address: Annotated[
        str | None, typer.Option(help="The Ray cluster to join (implies --ray), e.g. auto or ray://head:10001.")
    ] = None,
    overrides: OverridesOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Decompose q/k/v/o/gate/up/down_proj layer by layer into a run directory; rerun to resume.

    Calibrates first (streaming) for the layers whose Hessians RUN lacks. Each finished layer is one file
    under RUN/layers; an interrupted run continues from the first missing layer with the same result.
    """
    import time

    from caldera.config import DecomposeConfig
    from caldera.pipeline.overrides import NO_OVERRIDES, load_overrides

    start, results = time.perf_counter(), []
    try:
        cfg = DecomposeConfig.for_method(
            method,
            bq=bq,
            bl=bl,
            br=br,
            rank=rank,
            group_size=group_size,
            iters=iters,
            seed=seed,
            damping=damping,
            zero_point=zero_point,
            protect=protect,
        )
        calibration = {"samples": samples, "seq_len": seq_len, "calib": calib}
        address = ray_address or ("local" if ray else None)
        rules = load_overrides(overrides) if overrides is not None else NO_OVERRIDES
        args = (model, run, layers, device, cfg, calibration, json_out, results)
        run_dir = decompose_run(*args, ray_address=address, overrides=rules)
    except decompose_errors() as e:
        fail(str(e))
    except KeyboardInterrupt as e:  # Interrupted once the run is open, else before any layer
        saved = e.saved if isinstance(e, Interrupted) else 0
        message = f"interrupted after {saved} layers; rerun the same command to resume"
        err_console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None
    peaks = [r.peak_gpu_mb for r in results if r.peak_gpu_mb is not None]  # Ray tasks' own (other processes)
    peak = peak_gpu(device) | ({"peak_gpu_mb": max(peaks)} if peaks else {})
    _decompose_report(results, time.perf_counter() - start, json_out, run_dir, peak)


def decompose_errors() -> tuple[type[Exception], ...]:
    """The exceptions a decomposition reports as a one-line error."""
    from caldera.config import ConfigError
    from caldera.core.ldlq import HessianError
    from caldera.io.calibration import CalibrationError
    from caldera.io.corpus import CorpusError
    from caldera.io.default_model import DefaultModelMissing
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.run_dir import RunDirError
    from caldera.io.shards import ShardError
    from caldera.pipeline.calibrate import CalibrateError

    errors = (ConfigError, HessianError, CalibrationError, CorpusError, ModelFolderError, DefaultModelMissing)
    from caldera.pipeline.distributed import ClusterError

    # FileExistsError: half a default model; ImportError: --ray without Ray
    return (*errors, RunDirError, ShardError, CalibrateError, FileExistsError, ImportError, ClusterError)


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during an open run: ``saved`` of the selected layers are in the run directory (counted there: a
    layer's file can land before its result is reported)."""

    def __init__(self, saved: int) -> None:
        super().__init__(saved)
        self.saved = saved


def decompose_run(
    model,
    run,
    layers,
    device,
    cfg,
    calibration: dict,
    json_out: bool,
    results: list,
    ray_address: str | None = None,
    overrides=None,
) -> Path:
    """Open (or resume) the run, calibrate the layers it lacks Hessians for, decompose layer by layer (``cfg``
    with ``overrides``, a caldera.pipeline.overrides.Overrides) into ``results`` (on a Ray cluster with
    ``ray_address``); returns the run directory."""
    job = _decompose_open(model, run, layers, device, cfg, calibration, overrides)
    if ray_address is not None:
        from caldera.pipeline.distributed import connect

        connect(ray_address)  # before the lock: an unreachable cluster leaves the run untouched
    with job.run.lock():
        try:
            job.run.ensure_spec("decompose", job.spec)  # a resumed run must have the same settings
            _decompose_calibrate(job, calibration["samples"], calibration["seq_len"], calibration["calib"], json_out)
            _decompose_layers(job, cfg, json_out, results, ray_address)
        except KeyboardInterrupt:
            raise Interrupted(len(job.layers) - len(job.unfinished())) from None
    return job.run.root


@dataclasses.dataclass
class _DecomposeJob:
    folder: Path
    config: dict  # the model's config.json
    reader: object  # caldera.io.shards.ShardReader
    layers: list[int]
    device: object  # torch.device
    spec: dict  # run.json "decompose"
    run: object  # caldera.io.run_dir.RunDir

    def unfinished(self) -> list[int]:
        """The selected layers whose file is not in the run yet."""
        from caldera.pipeline.run_decompose import unfinished_layers

        return sorted(set(self.layers) & set(unfinished_layers(self.run, self.config["num_hidden_layers"])))


def _decompose_open(model_dir, run_dir, layers_spec, device, cfg, calibration: dict, overrides) -> _DecomposeJob:
    """Check the folder, shards, layers and device; the run.json "decompose" section and the run directory."""
    from caldera.io.default_model import cache_root, default_model_dir
    from caldera.io.model_folder import read_model_config
    from caldera.io.run_dir import RunDir
    from caldera.io.shards import ShardReader
    from caldera.pipeline.decompose_model import parse_layers, resolve_device
    from caldera.pipeline.overrides import NO_OVERRIDES
    from caldera.pipeline.run_decompose import decompose_spec, default_run_dir

    folder = model_dir if model_dir is not None else default_model_dir()
    config = read_model_config(folder)
    selected = parse_layers(layers_spec, config["num_hidden_layers"])
    dev, reader = resolve_device(device), ShardReader(folder)
    spec = decompose_spec(folder, reader, config["num_hidden_layers"], cfg, dev, overrides or NO_OVERRIDES)
    if run_dir is None:
        calibration = calibration | {"calib": [str(p.resolve()) for p in calibration["calib"] or []]}
        run_dir = default_run_dir(cache_root(), spec, calibration)
    return _DecomposeJob(Path(folder), config, reader, selected, dev, spec, RunDir(run_dir))


def _decompose_calibrate(job: _DecomposeJob, samples: int, seq_len: int, calib, json_out: bool) -> None:
    """Say what will be done; compute (streaming) the Hessians of the selected layers that the run lacks."""
    from caldera.io.calibration import calibration_windows, default_calibration_texts
    from caldera.io.corpus import describe_texts, load_texts
    from caldera.io.model_folder import load_tokenizer
    from caldera.pipeline.calibrate import calibrate as stream_hessians
    from caldera.pipeline.run_decompose import missing_hessians

    unfinished = job.unfinished()
    todo, ids = missing_hessians(job.run, unfinished), None  # finished layers need no Hessians
    if todo:  # the text is checked before anything is said
        texts = load_texts(calib) if calib else default_calibration_texts()
        ids = calibration_windows(load_tokenizer(job.folder), texts, samples, seq_len)  # (samples, seq_len)
    job.run.remove_stale_files()
    done = len(job.layers) - len(unfinished)
    how = f"calibration {samples} × {seq_len} tokens" if todo else "Hessians from the run"
    say(
        f"{job.folder}: {job.config['model_type']}, {job.config['num_hidden_layers']} layers; decomposing "
        f"{len(job.layers)} ({done} done) with {job.spec['method']} on {job.device}; {how}; run {job.run.root}",
        json_out,
    )
    for proj, k in job.spec["rank_clamps"].items():
        shape = next(tuple(info.shape) for name, info in job.reader.info.items() if name.endswith(f".{proj}.weight"))
        warning = f"[yellow]warning:[/] {proj} is {shape[0]}×{shape[1]}: rank {job.spec['rank']} > min(m, n), "
        err_console.print(warning + f"clamped to {k}", highlight=False, soft_wrap=True)
    if todo:
        source = describe_texts(calib) if calib else "default corpus (calibration split)"
        with progress_bar(json_out) as progress:
            task = progress.add_task("calibration", total=max(todo) + 1)
            kw = {"layers": unfinished, "device": job.device, "data": source}
            stream_hessians(job.folder, ids, job.run, **kw, on_layer=lambda *_: progress.advance(task))


def _decompose_layers(job: _DecomposeJob, cfg, json_out: bool, results: list, ray_address: str | None) -> None:
    """Decompose (or read back) layer by layer into ``results``: a JSON line or a human line per layer."""
    from caldera.pipeline.decompose_model import PROJECTIONS
    from caldera.pipeline.distributed import ray_decompose_into_run
    from caldera.pipeline.run_decompose import decompose_into_run

    todo = len(job.unfinished())
    with progress_bar(json_out) as progress:
        if ray_address is None:
            task = progress.add_task("matrices", total=todo * len(PROJECTIONS))
            on_matrix = lambda *_: progress.advance(task)  # noqa: E731
            done_layers = decompose_into_run(
                job.run, job.reader, job.layers, cfg, job.spec, job.device, on_matrix=on_matrix
            )
        else:
            task = progress.add_task("layers (ray)", total=todo)
            done_layers = ray_decompose_into_run(job.run, job.folder, job.layers, cfg, job.spec, job.device.type)
        for done in done_layers:
            if ray_address is not None and not done.resumed:
                progress.advance(task)
            layer = done.result
            results.append(layer)
            if json_out:
                emit(layer.to_dict() | ({"resumed": True} if done.resumed else {}))
                continue
            errs = " ".join(f"{p.removesuffix('_proj')} {r.act_err:.3f}" for p, r in layer.proj.items())
            seconds = sum(r.seconds for r in layer.proj.values())
            line = f"layer {layer.layer:>3}  act_err {errs}  {seconds:.1f} s" + ("  (resumed)" if done.resumed else "")
            progress.console.print(line, highlight=False, soft_wrap=True)


def _decompose_report(results: list, seconds: float, json_out: bool, run: Path, peak: dict) -> None:
    from caldera.pipeline.decompose_model import per_projection, summarize

    summary = summarize(results, seconds) | {"run": str(run)} | peak
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
