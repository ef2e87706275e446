"""`caldera run`: the whole job on one model: calibrate once, then per method decompose → export → eval, and the
quality table (method | BQ/BL/BR/rank/group | bits per weight | ppl | delta %).

    WORK/<tag>/run      the method's run directory (Hessians hard-linked from the first method's run)
    WORK/<tag>/model    its export, with model/report/ from caldera eval
    WORK/<tag>-ft<N>/model  with --finetune-steps N: the export after caldera finetune, and its report
    WORK/comparison.*   the quality table (JSON, Markdown) and ppl_vs_bits.png of every method evaluated in WORK
                        with the same evaluation settings (earlier invocations included)

Every stage resumes: rerunning the same command after Ctrl-C or kill -9 skips finished layers, exports that
verify, and evaluations already reported with the same evaluation settings.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer

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
    say,
)
from caldera.cli.decompose import DECOMPOSE_ITERS, DECOMPOSE_SAMPLES, DECOMPOSE_SEQ_LEN, decompose_errors, decompose_run
from caldera.cli.evaluate import eval_errors, run_eval
from caldera.cli.finetune import finetune_errors
from caldera.config import FinetuneConfig

METHODS = "caldera,ldlq-had,gptq,rtn"
RUN_EVAL_TOKENS = 16384
"""Evaluation budget of ``caldera run`` (``caldera eval`` scores everything by default): on the default model's
evaluation split (~38k tokens) 16k tokens keep five evaluations to ~1 min each on a 2-core CPU."""


def method_tag(cfg, overrides=None) -> str:
    """Folder name of one method's settings, e.g. caldera-q2-l4-r4-k256-g64-i4 or gptq-q2-g64 (-p0.0001 with kept
    weights); per-layer overrides add -o and 8 hex digits of their rules."""
    tag = f"{cfg.method.value}-q{cfg.bq}"
    if cfg.rank:
        tag += f"-l{cfg.bl}-r{cfg.br}-k{cfg.rank}"
    tag += f"-g{cfg.group_size}" + (f"-i{cfg.iters}" if cfg.rank else "")
    tag += ("" if cfg.damping == 0.01 else f"-d{cfg.damping:g}") + ("-z" if cfg.zero_point else "")
    tag += f"-p{cfg.protect:g}" if cfg.protect else ""
    if overrides:
        tag += "-o" + hashlib.sha256(json.dumps(overrides.to_dict()).encode()).hexdigest()[:8]
    return tag


def default_workdir(model: Path, calibration: dict) -> Path:
    from caldera.io.default_model import cache_root

    key = json.dumps({"model": str(model.resolve()), **calibration}, sort_keys=True, default=str)
    return cache_root() / "jobs" / f"{model.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _calibrated_run(work: Path):
    """A run in the job folder whose Hessians are complete (calibrated by an earlier method), or None."""
    from caldera.io.run_dir import RunDir

    for spec in sorted(work.glob("*/run/run.json")):
        run = RunDir(spec.parent)
        calibrated = (run.read_spec() or {}).get("calibration") is not None
        if calibrated and all(run.has_hessians(i) for i in range(_num_layers(run))):
            return run
    return None


def _num_layers(run) -> int:
    from caldera.io.model_folder import read_model_config

    return read_model_config(run.read_spec()["calibration"]["model"])["num_hidden_layers"]


def _job_results(work: Path, ran: list[dict]) -> list[dict]:
    """This invocation's results and those of earlier ones in the job folder made with the same evaluation
    settings (so the table grows as methods are added with more `caldera run --methods ...` calls)."""
    tags = {r["tag"] for r in ran}
    out = list(ran)
    for path in sorted(work.glob("*/model/report/eval.json")):
        tag = path.parents[2].name
        result = json.loads(path.read_text())
        if tag not in tags and result.get("job_settings") == ran[0].get("job_settings"):
            out.append(result | {"tag": tag} | _settings_of(path.parents[1]))
    return out


def _settings_of(model: Path) -> dict:
    """zero_point, damping, the number of per-layer override rules and fine-tuning steps of an export (eval.json
    files written before they were recorded lack them)."""
    qc = json.loads((model / "config.json").read_text())["quantization_config"]
    overrides = len(qc["decompose"].get("overrides") or {})
    steps = (qc.get("finetune") or {}).get("steps", 0)
    return {"zero_point": qc["zero_point"], "damping": qc["decompose"]["damping"], "overrides": overrides} | {
        "finetune_steps": steps,
        "protect": qc["decompose"].get("protect", 0.0),
    }


def _export_once(run: Path, out: Path, embed_bits: int) -> None:
    from caldera.pipeline.export import ExportError, export, verify

    if out.exists():
        try:
            verify(out)
            return
        except ExportError as e:
            raise ExportError(f"{e}; delete {out} to export again") from None
    export(run, out, embed_bits=embed_bits)


def _eval_once(model: Path, settings: dict, baseline: Path, json_out: bool) -> dict:
    """The stored report/eval.json when made with the same evaluation settings, else a fresh caldera eval."""
    stored = model / "report" / "eval.json"
    if stored.is_file():
        result = json.loads(stored.read_text())
        if result.get("job_settings") == settings:
            return result
    args = (settings["data"], baseline, settings["seq_len"], settings["max_tokens"], settings["device"])
    dense = settings["device"] == "cpu"  # the same logits; the packed path is 3x slower on a CPU
    result = run_eval(model, *args, "float32", 4, dense, json_out) | {"job_settings": settings}
    stored.write_text(json.dumps(result, indent=2) + "\n")
    return result


def run_method(
    folder: Path,
    work: Path,
    cfg,
    calibration: dict,
    eval_settings: dict,
    embed_bits: int,
    json_out: bool,
    overrides=None,
) -> dict:
    """One method in the job folder WORK: decompose (Hessians shared from a calibrated run in WORK; ``cfg`` with
    per-layer ``overrides``) → export → eval, each skipped when already done; its eval result with tag,
    zero_point and damping."""
    from caldera.io.run_dir import RunDir

    tag = method_tag(cfg, overrides)
    run, out = RunDir(work / tag / "run"), work / tag / "model"
    donor = _calibrated_run(work)
    if donor is not None and donor.root != run.root:
        donor.share_hessians(run)
    say(f"[bold]{tag}[/]: decompose → export → eval in {work / tag}", json_out)
    args = (folder, run.root, None, eval_settings["device"], cfg, calibration, json_out, [])
    decompose_run(*args, overrides=overrides)
    _export_once(run.root, out, embed_bits)
    settings = eval_settings | {"data": [str(p) for p in eval_settings["data"] or []]}
    result = _eval_once(out, settings, folder, json_out) | {"tag": tag} | _settings_of(out)
    if json_out:
        emit({"tag": tag, "result": result})
    return result


def finetune_tag(cfg) -> str:
    """Suffix of a fine-tuned export's folder, e.g. ft300 or ft300-lr0.001-b4-s256x512 (non-default settings)."""
    default, tag = FinetuneConfig(), f"ft{cfg.steps}"
    tag += "" if cfg.lr == default.lr else f"-lr{cfg.lr:g}"
    tag += "" if cfg.batch_size == default.batch_size else f"-b{cfg.batch_size}"
    same_windows = (cfg.samples, cfg.seq_len) == (default.samples, default.seq_len)
    tag += "" if same_windows else f"-s{cfg.samples}x{cfg.seq_len}"
    return tag + ("" if cfg.norms else "-nonorm") + ("" if cfg.seed == default.seed else f"-seed{cfg.seed}")


def run_finetuned(folder: Path, work: Path, tag: str, cfg, calib, eval_settings: dict, json_out: bool) -> dict:
    """Fine-tune the method ``tag``'s export in WORK (``caldera finetune``, the calibration text ``calib``) into
    WORK/<tag>-<finetune_tag>/model and evaluate it, each skipped when already done; its eval result."""
    from caldera.cli.finetune import run_finetune
    from caldera.pipeline.export import ExportError, verify

    ft_tag = f"{tag}-{finetune_tag(cfg)}"
    out = work / ft_tag / "model"
    say(f"[bold]{ft_tag}[/]: finetune → eval in {work / ft_tag}", json_out)
    if out.exists():
        try:
            verify(out)
        except ExportError as e:
            raise ExportError(f"{e}; delete {out} to fine-tune again") from None
    else:
        summary = run_finetune(work / tag / "model", out, folder, calib, cfg, eval_settings["device"], json_out)
        if json_out:
            emit({"tag": ft_tag, "finetune": summary})
    settings = eval_settings | {"data": [str(p) for p in eval_settings["data"] or []]}
    result = _eval_once(out, settings, folder, json_out) | {"tag": ft_tag} | _settings_of(out)
    if json_out:
        emit({"tag": ft_tag, "result": result})
    return result


@app.command("run")
def run_job(
    model: ModelOpt = None,
    methods: Annotated[str, typer.Option(help="Comma-separated: caldera, ldlq-had, gptq, rtn.")] = METHODS,
    bq: Annotated[int, typer.Option(help="Bits of Q (every method).")] = 2,
    bl: Annotated[int, typer.Option(help="Bits of L (caldera; 16: fp16).")] = 4,
    br: Annotated[int, typer.Option(help="Bits of R (caldera; 16: fp16).")] = 4,
    rank: Annotated[int, typer.Option(help="Rank of L·R (caldera; clamped to min(m, n)).")] = 256,
    group_size: GroupSizeOpt = 64,
    iters: Annotated[int, typer.Option(help="CALDERA rounds.")] = DECOMPOSE_ITERS,
    damping: DampingOpt = 0.01,
    zero_point: ZeroPointOpt = False,
    protect: ProtectOpt = 0.0,
    samples: Annotated[int, typer.Option(help="Calibration windows.")] = DECOMPOSE_SAMPLES,
    seq_len: Annotated[int, typer.Option(help="Tokens per calibration window.")] = DECOMPOSE_SEQ_LEN,
    calib: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP)] = None,
    eval_data: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP)] = None,
    eval_seq_len: Annotated[int, typer.Option(help="Tokens per evaluation window.")] = 512,
    max_tokens: Annotated[int, typer.Option(help="Evaluation tokens at most (32 windows of 512).")] = RUN_EVAL_TOKENS,
    embed_bits: Annotated[int, typer.Option(help="Embeddings and lm_head: 16, 8 or 4.")] = 16,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    workdir: Annotated[
        Path | None, typer.Option(help="Job folder (default: one per model and settings in the cache).")
    ] = None,
    overrides: OverridesOpt = None,
    finetune_steps: Annotated[
        int, typer.Option(help="Also fine-tune each export this many steps (caldera finetune) and evaluate it; 0: no.")
    ] = 0,
    finetune_lr: Annotated[float, typer.Option(help="Adam learning rate of the fine-tune.")] = FinetuneConfig.lr,
    finetune_seq_len: Annotated[int, typer.Option(help="Tokens per fine-tuning window.")] = FinetuneConfig.seq_len,
    json_out: JsonOpt = False,
) -> None:
    """The whole job: calibrate → decompose → export → eval for each method (→ finetune → eval with
    --finetune-steps), then the quality table."""
    from caldera.config import DecomposeConfig
    from caldera.eval.report import quality_table, write_comparison
    from caldera.io.default_model import default_model_dir
    from caldera.pipeline.export import ExportError
    from caldera.pipeline.overrides import load_overrides

    start, results = time.perf_counter(), []
    calibration = {"samples": samples, "seq_len": seq_len, "calib": calib}
    eval_settings = {"data": eval_data, "seq_len": eval_seq_len, "max_tokens": max_tokens, "device": device}
    try:
        configs = [
            DecomposeConfig.for_method(
                m.strip(),
                bq=bq,
                bl=bl,
                br=br,
                rank=rank,
                group_size=group_size,
                iters=iters,
                damping=damping,
                zero_point=zero_point,
                protect=protect,
            )
            for m in methods.split(",")
        ]
        rules = load_overrides(overrides) if overrides is not None else None
        folder = model if model is not None else default_model_dir()
        work = workdir if workdir is not None else default_workdir(folder, calibration)
        tune = None
        if finetune_steps:
            tune = FinetuneConfig(steps=finetune_steps, lr=finetune_lr, seq_len=finetune_seq_len)
        for cfg in configs:
            own = rules if cfg.method.value == "caldera" else None  # rank/BL/BR rules are CALDERA's
            results.append(run_method(folder, work, cfg, calibration, eval_settings, embed_bits, json_out, own))
            if tune is not None:
                tag = method_tag(cfg, own)
                results.append(run_finetuned(folder, work, tag, tune, calib, eval_settings, json_out))
    except (*decompose_errors(), *eval_errors(), *finetune_errors(), ExportError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    ran, results = len(results), _job_results(work, results)
    files = write_comparison(results, work)
    summary = {"workdir": str(work), "ran": ran, "methods": len(results), "seconds": time.perf_counter() - start}
    if json_out:
        emit({"summary": summary | {"files": [str(f) for f in files]}})
        return
    err_console.print(quality_table(results), highlight=False, soft_wrap=True)
    err_console.print(
        f"{ran} methods in {summary['seconds'] / 60:.1f} min; table: {work / 'comparison.md'}", highlight=False
    )
