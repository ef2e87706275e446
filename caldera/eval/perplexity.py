"""Perplexity of a causal LM over fixed, non-overlapping token windows.

Every window (seq_len tokens) is scored on its own: tokens 2..seq_len are predicted from the ones before them,
so each window contributes seq_len - 1 predictions. ppl = exp(Σ NLL / predictions), accumulated in float64.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclasses.dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, nats
    predictions: int  # windows × (seq_len - 1)
    windows: int
    seq_len: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    batch_size: int = 4,
    on_batch: Callable[[int], None] | None = None,
) -> Perplexity:
    """Perplexity of ``model`` (on its own device) over ``windows`` (count, seq_len) int64 token ids."""
    if windows.ndim != 2 or windows.shape[1] < 2 or windows.shape[0] < 1:
        raise ValueError(f"windows must be (count >= 1, seq_len >= 2) token ids, got {tuple(windows.shape)}")
    start, device = time.perf_counter(), next(model.parameters()).device
    total = 0.0
    for batch in windows.split(batch_size):
        ids = batch.to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]  # (B, L - 1, vocab)
        total += nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").item()
        if on_batch is not None:
            on_batch(batch.shape[0])
    predictions = windows.shape[0] * (windows.shape[1] - 1)
    nll = total / predictions
    return Perplexity(math.exp(nll), nll, predictions, windows.shape[0], windows.shape[1], time.perf_counter() - start)


def model_fingerprint(folder: Path | str) -> str:
    """sha256 over config.json and the name, size and mtime of every safetensors file: changes when the model does."""
    folder = Path(folder)
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for path in sorted(folder.glob("*.safetensors")):
        st = path.stat()
        h.update(f"{path.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_perplexity(
    cache: Path, folder: Path | str, windows: torch.Tensor, tag: str, compute: Callable[[], Perplexity]
) -> tuple[Perplexity, bool]:
    """``compute()``, or its stored result for the same model (fingerprint), windows and ``tag`` (device, dtype).

    The original model's perplexity is asked for again by every compressed variant; this keeps it to once.
    Returns (Perplexity, cached).
    """
    key = hashlib.sha256(f"{model_fingerprint(folder)}:{tag}".encode() + windows.numpy().tobytes()).hexdigest()[:16]
    path = Path(cache) / "ppl" / f"{key}.json"
    if path.is_file():
        try:
            return Perplexity(**json.loads(path.read_text())), True
        except (ValueError, TypeError):
            path.unlink(missing_ok=True)  # unreadable: recompute
    result = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result.to_dict()))
    tmp.replace(path)
    return result, False
