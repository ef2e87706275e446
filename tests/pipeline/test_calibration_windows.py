"""Calibration windows: EOS-joined documents cut into disjoint windows spread over the corpus; clear errors."""

import pytest
import torch

from caldera.io.calibration import CalibrationError, calibration_windows
from caldera.io.model_folder import load_tokenizer

DOCS = ["First document, short.", "Second one: ünïcode bytes count too.", "Third document closes the list."]


@pytest.fixture(scope="module")
def tokenizer(llama_dir):
    return load_tokenizer(llama_dir)


def _joined(tokenizer, docs):
    ids = []
    for i, doc in enumerate(docs):
        ids += ([tokenizer.eos_token_id] if i else []) + tokenizer(doc, add_special_tokens=False)["input_ids"]
    return ids


def test_windows_are_slices_of_the_eos_joined_documents(tokenizer):
    ids = _joined(tokenizer, DOCS)
    windows = calibration_windows(tokenizer, DOCS, samples=3, seq_len=len(ids) // 3)
    assert windows.shape == (3, len(ids) // 3) and windows.dtype == torch.int64
    assert windows.flatten().tolist() == ids[: 3 * (len(ids) // 3)]  # all windows taken: the whole stream
    assert torch.equal(windows, calibration_windows(tokenizer, DOCS, samples=3, seq_len=len(ids) // 3))


def test_windows_are_spread_over_the_whole_corpus(tokenizer):
    """Fewer samples than windows: evenly spaced, disjoint, the last documents included."""
    ids = _joined(tokenizer, DOCS * 4)
    seq = 8
    windows = calibration_windows(tokenizer, DOCS * 4, samples=3, seq_len=seq)
    total = len(ids) // seq
    starts = [i * total // 3 * seq for i in range(3)]
    assert windows.tolist() == [ids[s : s + seq] for s in starts]
    assert starts[-1] >= len(ids) // 2  # the second half of the corpus is sampled too


def test_too_little_text_says_how_many_tokens(tokenizer):
    have = len(_joined(tokenizer, DOCS))
    with pytest.raises(CalibrationError, match=rf"holds {have} tokens, but 4 samples × 64 tokens need 256"):
        calibration_windows(tokenizer, DOCS, samples=4, seq_len=64)


@pytest.mark.parametrize(("samples", "seq_len"), [(0, 8), (2, 0), (-1, 8)])
def test_non_positive_sizes_are_rejected(tokenizer, samples, seq_len):
    with pytest.raises(CalibrationError, match="must both be >= 1"):
        calibration_windows(tokenizer, DOCS, samples=samples, seq_len=seq_len)
