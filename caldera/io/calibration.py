"""Calibration token windows: documents -> (samples, seq_len) token ids, deterministic.

The documents are tokenized in order (no special tokens added) and joined with the tokenizer's EOS token
between consecutive documents; the stream is cut into disjoint windows of ``seq_len`` tokens, and
``samples`` of them are taken evenly spaced over the whole stream, so every part of the corpus is seen
(the first windows alone would come from one or two articles).
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


def calibration_windows(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], samples: int, seq_len: int
) -> torch.Tensor:
    """Token ids (samples, seq_len) int64: evenly spaced disjoint windows of the EOS-joined documents.

    Raises CalibrationError if ``samples`` or ``seq_len`` is not positive, or if all documents together
    hold fewer than samples × seq_len tokens.
    """
    import torch

    if samples < 1 or seq_len < 1:
        raise CalibrationError(f"samples={samples} and seq_len={seq_len} must both be >= 1")
    needed, eos = samples * seq_len, _eos_id(tokenizer)
    ids: list[int] = []
    for i, text in enumerate(texts):
        if i:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < needed:
        raise CalibrationError(
            f"calibration text holds {len(ids)} tokens, but {samples} samples × {seq_len} tokens need {needed}; "
            "use fewer samples, shorter windows or more text"
        )
    windows = torch.tensor(ids[: len(ids) // seq_len * seq_len], dtype=torch.int64).view(-1, seq_len)
    pick = torch.arange(samples, dtype=torch.int64) * len(windows) // samples
    return windows[pick]


def default_calibration_texts() -> list[str]:
    """The calibration articles of the default corpus split (``caldera.io.corpus.default_split``)."""
    from caldera.io.corpus import default_split

    return [article.text for article in default_split().calibration]
