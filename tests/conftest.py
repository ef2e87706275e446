"""Tiny random model folders shared by the pipeline tests (built once per session, a few seconds)."""

from pathlib import Path

import pytest

from caldera.testing.tiny_models import tiny_llama, tiny_qwen2

CALIB_TEXT = (
    "The quick brown fox jumps over the lazy dog. Calibration text for a tiny model: every byte is a token, "
    "so a few paragraphs give thousands of tokens. Numbers 0123456789 and punctuation (;:!?) appear too.\n\n"
)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_llama(tmp_path_factory.mktemp("models") / "llama", seed=0)


@pytest.fixture(scope="session")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_qwen2(tmp_path_factory.mktemp("models") / "qwen2", seed=0)


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A .txt calibration file of ~16k bytes (tokens, for the byte-level tiny tokenizer)."""
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(CALIB_TEXT * 80, encoding="utf-8")
    return path
