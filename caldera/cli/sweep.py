"""`caldera sweep sweeps/NAME.yaml`: every config of an experiment matrix through `caldera run`'s stages, then
the table and plot (caldera/pipeline/sweep.py describes the YAML).

    WORK/cal-<samples>x<seq_len>[-<calib hash>]/<tag>/{run,model}   one job folder per calibration setting:
                                                                   its configs share the Hessians
    OUT/NAME.csv, NAME.md, NAME.png                                  default OUT: results/ beside the YAML

Resumable: a config whose export verifies and whose evaluation is stored with the same settings is not redone.
"""

from __future__ import annotations

import csv
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import JsonOpt, app, emit, err_console, fail, say


def _calibration_folder(calibration: dict) -> str:
    name = f"cal-{calibration['samples']}x{calibration['seq_len']}"
    if calibration["calib"]:
        name += "-" + hashlib.sha256(json.dumps(calibration["calib"]).encode()).hexdigest()[:8]
    return name


def _load_spec(path: Path):
    import yaml

    from caldera.pipeline.sweep import parse_spec

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_spec(data, path.stem, path.parent)


def _write_outputs(name: str, results: list[dict], out: Path) -> list[Path]:
    from caldera.eval.report import SWEEP_COLUMNS, plot_sweep, sweep_markdown, sweep_rows
    from caldera.pipeline.sweep import pareto

    front = pareto([(r["bits_per_weight"], r["ppl"]) for r in results])
    rows = sweep_rows(results, [f and not r["baseline"] for f, r in zip(front, results, strict=True)])
    base = next((r["baseline_ppl"] for r in results if r.get("baseline_ppl") is not None), None)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / f"{name}.csv", out / f"{name}.md", out / f"{name}.png"]
    with files[0].open("w", newline="") as f:
        writer = csv.DictWriter(f, SWEEP_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    files[1].write_text(sweep_markdown(name, rows, base))
    plot_sweep(rows, base, files[2], f"sweep {name}")
    return files


@app.command("sweep")
def sweep(
    spec_file: Annotated[Path, typer.Argument(help="Sweep YAML, e.g. sweeps/stage1.yaml.", metavar="YAML")],
    workdir: Annotated[
        Path | None, typer.Option(help="Job folders (default: the cache's sweeps/NAME).", show_default=False)
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Tables and plot (default: results/ beside the YAML).")] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Run every config of a sweep (decompose → export → eval, finished ones skipped); write CSV, Markdown, PNG."""
    from caldera.cli.decompose import decompose_errors
    from caldera.cli.evaluate import eval_errors
    from caldera.cli.run_job import run_method
    from caldera.io.default_model import cache_root, default_model_dir
    from caldera.pipeline.export import ExportError
    from caldera.pipeline.sweep import expand

    start, results = time.perf_counter(), []
    try:
        spec = _load_spec(spec_file)
        folder = spec.model if spec.model is not None else default_model_dir()
        configs = expand(spec, folder)
        work = workdir if workdir is not None else cache_root() / "sweeps" / spec.name
        say(f"sweep {spec.name}: {len(configs)} configs on {folder}; job folders in {work}", json_out)
        for i, sc in enumerate(configs, 1):
            say(f"[bold]config {i}/{len(configs)}[/]", json_out)
            job = work / _calibration_folder(sc.calibration)
            eval_settings = spec.eval | {"device": device}
            result = run_method(folder, job, sc.cfg, sc.calibration, eval_settings, spec.embed_bits, json_out)
            extra = {
                "baseline": sc.baseline,
                "rank_rule": sc.rank_rule,
                **{k: sc.calibration[k] for k in ("samples", "seq_len")},
            }
            results.append(result | extra)
    except (*decompose_errors(), *eval_errors(), ExportError, ValueError) as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume", highlight=False)
        raise typer.Exit(130) from None
    files = _write_outputs(spec.name, results, out if out is not None else spec_file.parent / "results")
    summary = {"sweep": spec.name, "configs": len(results), "seconds": time.perf_counter() - start}
    if json_out:
        emit({"summary": summary | {"files": [str(f) for f in files]}})
        return
    err_console.print(files[1].read_text(), highlight=False, soft_wrap=True)
    err_console.print(f"{len(results)} configs in {summary['seconds'] / 60:.1f} min; {files[0]}", highlight=False)
