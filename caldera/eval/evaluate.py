"""`caldera eval` without the command line: perplexity of a model folder (compressed or not) and of its original.

A folder with a caldera ``quantization_config`` is loaded with ``caldera.load`` (packed linears); any other
supported folder is loaded dense. The windows are tokenized once with the evaluated folder's tokenizer and
scored for both models; the original's perplexity is cached (``caldera.eval.perplexity.cached_perplexity``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from caldera.eval.perplexity import Perplexity, cached_perplexity, perplexity
from caldera.io.calibration import evaluation_windows
from caldera.io.model_folder import load_tokenizer, read_model_config
from caldera.io.shards import ShardReader

SETTING_KEYS = ("method", "bq", "bl", "br", "rank", "group_size")


def is_compressed(folder: Path | str) -> bool:
    qc = read_model_config(folder).get("quantization_config")
    return isinstance(qc, dict) and qc.get("quant_method") == "caldera"


def load_any(folder: Path | str, device: torch.device, dtype: torch.dtype, dense_weights: bool = False):
    """caldera.load for an export (``dense_weights``: see there), else the dense transformers model; eval mode,
    on ``device``."""
    if is_compressed(folder):
        from caldera.runtime.load import load

        return load(folder, device=device, dtype=dtype, dense_weights=dense_weights)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    read_model_config(folder)
    logging.disable_progress_bar()  # ours is on screen
    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()


def size_stats(folder: Path | str) -> dict[str, Any]:
    """bits_per_weight (linears), bits_per_weight_total, bytes_total, settings: from quantization_config.stats
    for an export; from the stored dtypes for a dense folder."""
    config = read_model_config(folder)
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "caldera":
        stats = qc["stats"]
        rank = qc["rank"] if qc["method"] == "caldera" else 0
        return {
            "bits_per_weight": stats["bits_per_weight"],
            "bits_per_weight_total": stats["bits_per_weight_total"],
            "bytes_total": stats["tensor_bytes"],
            **{k: qc[k] for k in SETTING_KEYS},
            "rank": rank,
            "embed_bits": qc["embed_bits"],
            "zero_point": qc["zero_point"],
            "damping": qc["decompose"]["damping"],
            "overrides": len(qc["decompose"].get("overrides") or {}),
            "finetune_steps": (qc.get("finetune") or {}).get("steps", 0),
            "protect": qc["decompose"].get("protect", 0.0),
        }
    reader = ShardReader(folder)
    params = sum(math.prod(i.shape) for i in reader.info.values())
    linear = [n for n in reader.info if n.startswith("model.layers.") and n.endswith("_proj.weight")]
    linear_bytes = sum(reader.nbytes(n) for n in linear)
    return {
        "bits_per_weight": 8 * linear_bytes / sum(math.prod(reader.info[n].shape) for n in linear),
        "bits_per_weight_total": 8 * reader.nbytes() / params,
        "bytes_total": reader.nbytes(),
        "method": "dense",
    }


def evaluate(
    model_dir: Path | str,
    texts: Sequence[str],
    data: str,
    *,
    baseline: Path | str | None = None,
    seq_len: int = 512,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 4,
    dense_weights: bool = False,
    cache: Path | None = None,
    on_batch: Callable[[int], None] | None = None,
    on_model: Callable[[str, int], None] | None = None,
) -> dict[str, Any]:
    """The `caldera eval --json` object: ppl (and baseline_ppl, ppl_delta_pct with a baseline), sizes, settings.

    ``on_model(name, windows)`` is called before each model is scored, ``on_batch(b)`` after every batch.
    """
    start, device = time.perf_counter(), torch.device(device)
    windows = evaluation_windows(load_tokenizer(model_dir), texts, seq_len, max_tokens)  # (count, seq_len)
    if on_model is not None:
        on_model(Path(model_dir).name, windows.shape[0])
    model = load_any(model_dir, device, dtype, dense_weights)
    memory = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    result = perplexity(model, windows, batch_size=batch_size, on_batch=on_batch)
    del model
    out = {"model": str(Path(model_dir).resolve()), "data": data} | _ppl_fields(result)
    out |= {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "memory_bytes": memory}
    out |= {"weights": "dense" if dense_weights else "packed"}
    out |= size_stats(model_dir)
    out |= {"baseline": None, "baseline_ppl": None, "ppl_delta_pct": None, "baseline_cached": None}
    if baseline is not None:
        if read_model_config(baseline)["vocab_size"] != read_model_config(model_dir)["vocab_size"]:
            raise ValueError(f"{baseline} has another vocabulary than {model_dir}: not its original model")

        def compute() -> Perplexity:
            if on_model is not None:
                on_model(f"{Path(baseline).name} (original)", windows.shape[0])
            return perplexity(load_any(baseline, device, dtype), windows, batch_size=batch_size, on_batch=on_batch)

        tag = f"{device.type}:{dtype}:{batch_size}"
        if cache is None:
            base, cached = compute(), False
        else:
            base, cached = cached_perplexity(cache, baseline, windows, tag, compute)
        out |= {"baseline": str(Path(baseline).resolve()), "baseline_ppl": base.ppl, "baseline_cached": cached}
        out |= {
            "ppl_delta_pct": 100 * (result.ppl / base.ppl - 1),
            "baseline_bytes": size_stats(baseline)["bytes_total"],
        }
    return out | {"seconds": time.perf_counter() - start}


def _ppl_fields(result: Perplexity) -> dict[str, Any]:
    return {k: getattr(result, k) for k in ("ppl", "nll", "predictions", "windows", "seq_len")}


def read_result(model_dir: Path | str) -> dict[str, Any]:
    """The eval.json of an evaluated folder (written by ``caldera eval``)."""
    return json.loads((Path(model_dir) / "report" / "eval.json").read_text())
