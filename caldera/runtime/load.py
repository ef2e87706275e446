"""``caldera.load``: an exported folder (``caldera export``) as a transformers causal LM with packed linears.

The model is built on the meta device from config.json, every linear named in the shards' headers becomes a
``CompressedLinear`` (packed embeddings a ``CompressedEmbedding``), the other tensors (norms, fp16 embeddings)
are assigned from the shards one file at a time, and the rotary embedding is rebuilt on the target device.
Nothing is allocated twice and no dense linear weight ever exists.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn

from caldera.io.model_folder import read_model_config
from caldera.io.packed_format import FORMAT_VERSION, FormatError, read_file_metadata
from caldera.pipeline.export import EMBEDDINGS, INDEX, ExportError
from caldera.pipeline.export import verify as verify_folder
from caldera.runtime.compressed import CompressedEmbedding, CompressedLinear

if TYPE_CHECKING:
    from transformers import PreTrainedModel

EMBED = EMBEDDINGS[0]  # model.embed_tokens


class LoadError(RuntimeError):
    """The folder is not a loadable caldera export (one line naming the file, key or tensor)."""


def quantization_config(folder: Path) -> dict:
    """The checked ``quantization_config`` of an exported folder's config.json."""
    config = read_model_config(folder)
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "caldera":
        raise LoadError(f"{folder}/config.json has no caldera quantization_config: not a caldera export")
    if qc.get("format_version") != FORMAT_VERSION:
        raise LoadError(f"{folder}: packed format {qc.get('format_version')!r} is not supported ({FORMAT_VERSION} is)")
    return qc


def shard_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder, from its index (or the single model.safetensors)."""
    if (folder / INDEX).is_file():
        try:
            names = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError) as e:
            raise LoadError(f"{folder / INDEX}: unreadable ({e})") from None
    else:
        names = ["model.safetensors"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise LoadError(f"{folder / missing[0]}: shard is missing")
    return [folder / n for n in names]


def _skeleton(folder: Path, dtype: torch.dtype) -> PreTrainedModel:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    config.quantization_config = None  # ours, not a transformers quantizer: handled here
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _read_shard(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise LoadError(f"{path}: unreadable safetensors file ({e})") from None
    try:
        return tensors, read_file_metadata(header)
    except FormatError as e:
        raise LoadError(f"{path}: {e}") from None


def _compressed(tensors, prefix: str, meta: dict, path: Path, embedding: bool) -> nn.Module:
    cls = CompressedEmbedding if embedding else CompressedLinear
    try:
        return cls(tensors, prefix, meta)
    except (FormatError, ValueError) as e:
        raise LoadError(f"{path}: {e}") from None


def _rebuild_rotary(model: nn.Module, device: torch.device) -> None:
    """Rotary embeddings keep their (non-persistent) inv_freq outside the shards: build them again, on device."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and hasattr(module, "inv_freq"):
            model.set_submodule(name, type(module)(config=model.config).to(device))


def load(
    model_dir: Path | str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    dense_weights: bool = False,
) -> PreTrainedModel:
    """A Qwen2ForCausalLM / LlamaForCausalLM whose linears are ``CompressedLinear``, in eval mode on ``device``.

    Activations (and norms, fp16 embeddings, biases) are in ``dtype``; the packed tensors stay packed. With
    ``verify`` every file is first checked against manifest.json (sha256). With ``dense_weights`` every
    CompressedLinear also keeps its Ŵ dense (``materialize``): dense speed and memory, the same logits.
    LoadError (one line) otherwise.
    """
    folder, device = Path(model_dir), torch.device(device)
    qc = quantization_config(folder)
    if verify:
        try:
            verify_folder(folder)
        except ExportError as e:
            raise LoadError(str(e)) from None
    model = _skeleton(folder, dtype)
    tied, filled = bool(qc.get("tied_embeddings")), set()
    for path in shard_files(folder):
        tensors, metas = _read_shard(path)
        for prefix, meta in sorted(metas.items()):
            for target in [prefix] + (["lm_head"] if tied and prefix == EMBED else []):  # a tied head shares codes
                module = _compressed(tensors, prefix, meta, path, embedding=target == EMBED).to(device)
                if isinstance(module, CompressedEmbedding):
                    module.dtype = dtype
                model.set_submodule(target, module)
            filled |= {n for n in tensors if n.startswith(prefix + ".")}
        plain = {n: _cast(t, device, dtype) for n, t in tensors.items() if n not in filled}
        plain = {n: t for n, t in plain.items() if not n.startswith("incoherence.")}
        unexpected = model.load_state_dict(plain, strict=False, assign=True).unexpected_keys
        if unexpected:
            raise LoadError(f"{path}: tensor {unexpected[0]} has no place in a {type(model).__name__}")
        filled |= set(plain)
    if tied and not isinstance(model.lm_head, CompressedLinear):
        model.lm_head.weight = model.get_input_embeddings().weight  # assign=True replaced the tied parameter
    _rebuild_rotary(model, device)
    if dense_weights:
        for module in model.modules():
            if isinstance(module, CompressedLinear):
                module.materialize(dtype)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise LoadError(f"{folder}: tensor {missing[0]} is in no shard")
    return model.eval()


def _cast(t: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return t.to(device, dtype) if t.is_floating_point() else t.to(device)
