"""`caldera eval` (perplexity and the quality report of one model) and `caldera report` (several models)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import TEXTS_HELP, JsonOpt, app, default_device, emit, err_console, fail, progress_bar

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def eval_texts(data: list[Path] | None) -> tuple[list[str], str]:
    """(documents, description): the given files / dataset names, else the default corpus's evaluation articles."""
    from caldera.io.calibration import default_evaluation_texts
    from caldera.io.corpus import describe_texts, load_texts

    if data:
        return load_texts(data), describe_texts(data)
    return default_evaluation_texts(), "default corpus (evaluation split)"


def run_eval(model: Path, data, baseline, seq_len, max_tokens, device, dtype, batch_size, dense, json_out) -> dict:
    """evaluate() with a progress bar per scored model; the report written into MODEL/report/."""
    import torch

    from caldera.eval.evaluate import evaluate
    from caldera.eval.report import write_report
    from caldera.io.default_model import cache_root

    texts, label = eval_texts(data)
    with progress_bar(json_out) as progress:
        tasks = []

        def on_model(name: str, windows: int) -> None:
            tasks.append(progress.add_task(f"ppl {name}", total=windows))

        kw = {"baseline": baseline, "seq_len": seq_len, "max_tokens": max_tokens, "batch_size": batch_size}
        kw |= {"dense_weights": dense}
        kw |= {"device": device or default_device(), "dtype": getattr(torch, DTYPES[dtype]), "cache": cache_root()}
        result = evaluate(
            model, texts, label, **kw, on_model=on_model, on_batch=lambda b: progress.advance(tasks[-1], b)
        )
    write_report(model, result)
    return result


def eval_errors() -> tuple[type[Exception], ...]:
    from caldera.io.calibration import CalibrationError
    from caldera.io.corpus import CorpusError
    from caldera.io.model_folder import ModelFolderError
    from caldera.io.shards import ShardError
    from caldera.runtime.load import LoadError

    return CalibrationError, CorpusError, ModelFolderError, ShardError, LoadError


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option(help="Folder written by caldera export (or any Llama/Qwen2 folder).")],
    baseline: Annotated[Path | None, typer.Option(help="The original model folder, for baseline_ppl.")] = None,
    data: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP)] = None,
    seq_len: Annotated[int, typer.Option(help="Tokens per window (non-overlapping).")] = 512,
    max_tokens: Annotated[int | None, typer.Option(help="Score at most this many tokens (default: all).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present).")] = None,
    dtype: Annotated[str, typer.Option(help="Activations: float32, bfloat16 or float16.")] = "float32",
    batch_size: Annotated[int, typer.Option(help="Windows per forward.")] = 4,
    dense_weights: Annotated[
        bool, typer.Option(help="Materialize each linear's Ŵ once: dense speed and memory, the same logits.")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity over fixed windows of the evaluation text, against the original; report in MODEL/report/."""
    if dtype not in DTYPES:
        fail(f"dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    try:
        args = (seq_len, max_tokens, device, dtype, batch_size, dense_weights, json_out)
        result = run_eval(model, data, baseline, *args)
    except (*eval_errors(), ValueError) as e:
        fail(str(e))
    if json_out:
        emit(result)
        return
    from caldera.eval.report import markdown

    err_console.print(markdown(result, None), highlight=False, soft_wrap=True)
    err_console.print(f"report: {model / 'report'}", highlight=False)


@app.command("report")
def report_command(
    models: Annotated[list[Path], typer.Argument(help="Evaluated folders (each has report/eval.json).")],
    out: Annotated[Path, typer.Option(help="Folder for comparison.json, comparison.md, ppl_vs_bits.png.")],
    json_out: JsonOpt = False,
) -> None:
    """Compare evaluated models: the quality table and perplexity versus bits per weight."""
    from caldera.eval.evaluate import read_result
    from caldera.eval.report import quality_table, write_comparison

    results = []
    for folder in models:
        try:
            results.append(read_result(folder))
        except (OSError, ValueError) as e:
            fail(f"{folder}: no readable report/eval.json ({e}); run caldera eval --model {folder} first")
    files = write_comparison(results, out)
    if json_out:
        emit({"out": str(out), "files": [str(f) for f in files], "models": len(results)})
        return
    err_console.print(quality_table(results), highlight=False, soft_wrap=True)
