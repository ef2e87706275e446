"""Calibration windows: EOS-joined documents cut into consecutive, disjoint windows; clear errors."""

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


def test_windows_are_consecutive_slices_of_the_eos_joined_documents(tokenizer):
    ids = _joined(tokenizer, DOCS)
    windows = calibration_windows(tokenizer, DOCS, samples=3, seq_len=25)
    assert windows.shape == (3, 25) and windows.dtype == torch.int64
    assert windows.flatten().tolist() == ids[:75]
    assert (windows == tokenizer.eos_token_id).sum() == 2  # one between each pair of documents, none added
    assert torch.equal(windows, calibration_windows(tokenizer, DOCS, samples=3, seq_len=25))  # deterministic


def test_tokenization_stops_once_enough_tokens_are_there(tokenizer):
    def docs():
        yield DOCS[0]
        yield DOCS[1]
        raise AssertionError("a third document was read although two were enough")

    need = len(_joined(tokenizer, DOCS[:2]))
    assert calibration_windows(tokenizer, docs(), samples=1, seq_len=need).shape == (1, need)


def test_too_little_text_says_how_many_tokens(tokenizer):
    have = len(_joined(tokenizer, DOCS))
    with pytest.raises(CalibrationError, match=rf"holds {have} tokens, but 4 samples × 64 tokens need 256"):
        calibration_windows(tokenizer, DOCS, samples=4, seq_len=64)


@pytest.mark.parametrize(("samples", "seq_len"), [(0, 8), (2, 0), (-1, 8)])
def test_non_positive_sizes_are_rejected(tokenizer, samples, seq_len):
    with pytest.raises(CalibrationError, match="must both be >= 1"):
        calibration_windows(tokenizer, DOCS, samples=samples, seq_len=seq_len)
