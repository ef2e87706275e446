"""Local Hugging Face model folders: checked before anything heavy is loaded, then loaded float32.

Supported are decoder-only architectures whose layers hold ``self_attn.{q,k,v,o}_proj`` and
``mlp.{gate,up,down}_proj`` under ``model.layers`` (Llama and Qwen2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ModelFolderError(ValueError):
    """The folder is missing, has no readable config.json, or holds an unsupported architecture."""


def read_model_config(folder: Path | str) -> dict[str, Any]:
    """config.json of a model folder, checked: it parses, model_type is supported, num_hidden_layers is set."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFolderError(f"{folder}: no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFolderError(f"{path}: not valid JSON ({e})") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ModelFolderError(
            f"{folder}: model_type {model_type!r} is not supported; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    layers = config.get("num_hidden_layers")
    if not isinstance(layers, int) or layers < 1:
        raise ModelFolderError(f"{path}: num_hidden_layers={layers!r} is not a positive integer")
    return config


def load_tokenizer(folder: Path | str) -> PreTrainedTokenizerBase:
    """Tokenizer of a checked model folder."""
    from transformers import AutoTokenizer

    read_model_config(folder)
    return AutoTokenizer.from_pretrained(folder)


def load_model(folder: Path | str) -> PreTrainedModel:
    """Causal LM of a checked model folder: float32, eval mode, on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    read_model_config(folder)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
