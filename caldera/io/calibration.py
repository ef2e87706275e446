"""Token windows for calibration and evaluation: documents -> (windows, seq_len) token ids, deterministic.

The documents are tokenized in order (no special tokens added) and joined with the tokenizer's EOS token
between consecutive documents; the stream is cut into disjoint windows of ``seq_len`` tokens. Calibration
takes ``samples`` of them evenly spaced over the whole stream, so every part of the corpus is seen (the first
windows alone would come from one or two articles); evaluation takes them all, in order, up to a token budget.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


class CalibrationError(ValueError):
    """Calibration data cannot give the windows asked for; the message gives the counts."""


def _eos_id(tokenizer: PreTrainedTokenizerBase) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise CalibrationError("the tokenizer has no EOS token to separate calibration documents with")
    return int(eos)


def token_stream(tokenizer: PreTrainedTokenizerBase, texts: Iterable[str]) -> list[int]:
    """Token ids of the documents in order, an EOS token between consecutive ones."""
    ids: list[int] = []
    eos = _eos_id(tokenizer)
    for i, text in enumerate(texts):
        if i:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], samples: int, seq_len: int, at_most: bool = False
) -> torch.Tensor:
    """Token ids (samples, seq_len) int64: evenly spaced disjoint windows of the EOS-joined documents.

    Raises CalibrationError if ``samples`` or ``seq_len`` is not positive, or if all documents together
    hold fewer than samples × seq_len tokens (with ``at_most``: fewer than seq_len; then as many windows as fit).
    """
    import torch

    if samples < 1 or seq_len < 1:
        raise CalibrationError(f"samples={samples} and seq_len={seq_len} must both be >= 1")
    ids = token_stream(tokenizer, texts)
    samples = max(1, min(samples, len(ids) // seq_len)) if at_most else samples
    needed = samples * seq_len
    if len(ids) < needed:
        raise CalibrationError(
            f"calibration text holds {len(ids)} tokens, but {samples} samples × {seq_len} tokens need {needed}; "
            "use fewer samples, shorter windows or more text"
        )
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len], dtype=torch.int64).view(-1, seq_len)
    pick = torch.arange(samples, dtype=torch.int64) * len(windows) // samples
    return windows[pick]


def evaluation_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], seq_len: int, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids (windows, seq_len) int64: the consecutive disjoint windows of the EOS-joined documents, from the
    start, as many as fit in ``max_tokens`` (default: all); the incomplete last window is dropped.

    Raises CalibrationError if seq_len < 2 (nothing to predict) or if not one window fits.
    """
    import torch

    if seq_len < 2:
        raise CalibrationError(f"seq_len={seq_len} must be >= 2 (each window predicts tokens 2..seq_len)")
    ids = token_stream(tokenizer, texts)
    budget = len(ids) if max_tokens is None else min(len(ids), max_tokens)
    count = budget // seq_len
    if count == 0:
        raise CalibrationError(
            f"evaluation text gives {budget} tokens (of {len(ids)}), fewer than one {seq_len}-token window; "
            "use shorter windows, a larger --max-tokens or more text"
        )
    return torch.tensor(ids[: count * seq_len], dtype=torch.int64).view(count, seq_len)


def default_evaluation_texts() -> list[str]:
    """The evaluation articles of the default corpus split: disjoint from the calibration articles."""
    from caldera.io.corpus import default_split

    return [article.text for article in default_split().evaluation]


def default_calibration_texts() -> list[str]:
    """The calibration articles of the default corpus split (``caldera.io.corpus.default_split``)."""
    from caldera.io.corpus import default_split

    return [article.text for article in default_split().calibration]
