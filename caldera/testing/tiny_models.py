"""Tiny random Llama and Qwen2 folders (config.json, safetensors, tokenizer) for pipeline tests.

Dimensions are small but not all powers of two: hidden 64, intermediate 160, 2 layers, 4 heads of 16
with 2 KV heads (so k_proj and v_proj are 32 × 64). The tokenizer is byte-level with no merges, built
in-process (``caldera.io.byte_tokenizer``): every UTF-8 byte is one token, plus BOS/EOS/PAD.
Weights are drawn under ``torch.random.fork_rng``: the caller's global RNG state is left as it was.
``shards=N`` writes the weights as N safetensors shards with a ``model.safetensors.index.json`` (tensors in
file order, split into N runs of about equal bytes, so a layer may straddle two shards).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from caldera.io.byte_tokenizer import byte_tokenizer as tiny_tokenizer

HIDDEN = 64
INTERMEDIATE = 160
LAYERS = 2
HEADS = 4
KV_HEADS = 2


def reshard(path: Path | str, shards: int) -> None:
    """Split ``path``/model.safetensors into ``shards`` files plus model.safetensors.index.json."""
    from safetensors.torch import load_file, save_file

    path = Path(path)
    single = path / "model.safetensors"
    tensors = load_file(single)  # insertion order = file order
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    groups: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    seen = 0
    for name, t in tensors.items():
        groups[min(shards - 1, seen * shards // total)][name] = t
        seen += t.numel() * t.element_size()
    weight_map = {}
    for k, group in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file(group, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    single.unlink()


def _save(config, path: Path | str, seed: int, shards: int = 1) -> Path:
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer(path)
    config.vocab_size = len(tokenizer)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id,
        tokenizer.eos_token_id,
        tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    if shards > 1:
        reshard(path, shards)
    return path


def _dims(**overrides) -> dict:
    dims = {
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": 512,
        "tie_word_embeddings": False,
    }
    return dims | overrides


def tiny_llama(path: Path | str, seed: int = 0, shards: int = 1, **overrides) -> Path:
    """A random LlamaForCausalLM folder at ``path`` (created); ``overrides`` change config fields."""
    from transformers import LlamaConfig

    return _save(LlamaConfig(**_dims(**overrides)), path, seed, shards)


def tiny_qwen2(path: Path | str, seed: int = 0, shards: int = 1, **overrides) -> Path:
    """A random Qwen2ForCausalLM folder at ``path`` (created; q/k/v carry biases as in Qwen2)."""
    from transformers import Qwen2Config

    return _save(Qwen2Config(**_dims(**overrides)), path, seed, shards)
