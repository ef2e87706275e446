"""`caldera finetune`: distil an export toward the original model's logits; the same bits, a new export folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from caldera.cli.common import TEXTS_HELP, JsonOpt, app, emit, err_console, fail, peak_gpu, progress_bar
from caldera.config import FinetuneConfig


def finetune_errors() -> tuple[type[Exception], ...]:
    from caldera.config import ConfigError
    from caldera.io.calibration import CalibrationError
    from caldera.io.corpus import CorpusError
    from caldera.io.default_model import DefaultModelMissing
    from caldera.io.model_folder import ModelFolderError
    from caldera.pipeline.finetune import FinetuneError
    from caldera.runtime.load import LoadError

    errors = (ConfigError, CalibrationError, CorpusError, DefaultModelMissing, ModelFolderError, LoadError, OSError)
    return (*errors, FinetuneError)


def run_finetune(model: Path, out: Path, original: Path | None, data: list[Path] | None, cfg, device: str, json_out):
    """Fine-tune the export MODEL into OUT (the CLI's work, shared with ``caldera run``); the summary dict."""
    import hashlib
    import json

    from caldera.io.calibration import calibration_windows, default_calibration_texts
    from caldera.io.corpus import load_texts
    from caldera.io.default_model import default_model_dir
    from caldera.io.model_folder import load_tokenizer
    from caldera.pipeline.decompose_model import resolve_device
    from caldera.pipeline.finetune import FinetuneError, finetune

    dev = resolve_device(device)
    if not (model / "config.json").is_file():
        raise FinetuneError(f"{model} is not an export folder (no config.json)")
    original = original if original is not None else default_model_dir()
    qc = json.loads((model / "config.json").read_text()).get("quantization_config", {})
    expected = qc.get("decompose", {}).get("model_config_sha256")
    if expected and expected != hashlib.sha256((original / "config.json").read_bytes()).hexdigest():
        raise FinetuneError(f"{model} was not decomposed from {original} (config.json differs); give --original")
    texts = load_texts(data) if data else default_calibration_texts()
    ids = calibration_windows(load_tokenizer(original), texts, cfg.samples, cfg.seq_len, at_most=True)
    with progress_bar(json_out) as progress:
        task = progress.add_task("distil", total=cfg.steps)

        def on_step(step: int, loss: float) -> None:
            progress.update(task, advance=1, description=f"distil  KL {loss:.4f}")

        summary = finetune(model, original, out, ids, cfg, dev, on_step)
    return summary.to_dict() | peak_gpu(dev)


@app.command("finetune")
def finetune_cmd(
    model: Annotated[Path, typer.Option(help="An export folder (caldera export).")],
    out: Annotated[Path, typer.Option(help="New export folder with the fine-tuned tensors (must not exist).")],
    original: Annotated[
        Path | None, typer.Option(help="The uncompressed model the export was made from (default: embedded model).")
    ] = None,
    data: Annotated[list[Path] | None, typer.Option(help=TEXTS_HELP + " Default: the calibration split.")] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 200,
    lr: Annotated[float, typer.Option(help="Adam learning rate (warm-up 5%, cosine decay).")] = FinetuneConfig.lr,
    batch_size: Annotated[int, typer.Option(help="Windows per step.")] = 8,
    seq_len: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    samples: Annotated[
        int, typer.Option(help="Windows drawn from the text, at most (as many as it holds); reshuffled every epoch.")
    ] = 1024,
    micro_batch: Annotated[
        int,
        typer.Option(help="Windows per forward/backward, gradients accumulated (0: the whole batch; 1 on a CPU)."),
    ] = 0,
    norms: Annotated[bool, typer.Option(help="Train the RMSNorm weights too.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the window order.")] = 0,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    json_out: JsonOpt = False,
) -> None:
    """Distil an export toward the original's next-token distributions (KL per token): trains L and R (re-quantized
    every step, straight-through), Q's scales and the norms; writes a new export with the same bits per weight.
    Interrupted: nothing is written; run again."""
    try:
        cfg = FinetuneConfig(steps, lr, batch_size, seq_len, samples, norms, seed, micro_batch)
        summary = run_finetune(model, out, original, data, cfg, device, json_out)
    except finetune_errors() as e:
        fail(str(e))
    except KeyboardInterrupt:
        err_console.print(f"interrupted; nothing was written to {out}: run again", highlight=False)
        raise typer.Exit(130) from None
    if json_out:
        emit(summary)
        return
    err_console.print(
        f"{summary['steps']} steps, {summary['tokens']:,} tokens: KL {summary['loss_first']:.4f} → "
        f"{summary['loss_last']:.4f} nats/token, {summary['trained_parameters']:,} trained parameters, "
        f"{summary['seconds']:.1f} s; wrote {out}",
        highlight=False,
        soft_wrap=True,
    )
