"""Synthetic model folders: random weights with a real model's shapes, written shard by shard.

    OUT/config.json                          the shape's config.json, num_hidden_layers = N, the tokenizer's ids
    OUT/model-0000k-of-0000K.safetensors     the tensors of the architecture's own state dict (names and shapes
                                             from transformers on the meta device: Qwen2's q/k/v biases included),
                                             in its order, cut into shards of at most ``shard_bytes`` (a larger
                                             tensor gets a shard of its own)
    OUT/model.safetensors.index.json         weight_map and total_size, as Hugging Face writes them
    OUT/tokenizer.json, ...                  the byte-level tokenizer (caldera.io.byte_tokenizer): calibration
                                             text becomes ids 0-258, valid for any vocabulary

Values: linear weights, biases and embeddings N(0, initializer_range²), norms 1; each tensor drawn from its own
generator seeded by (seed, name), so a tensor does not depend on the layer count or the shard size. Only one
shard's tensors are in memory at a time (the largest single tensor bounds it: a 152064 × 8192 embedding is
2.5 GB in bf16), so memory does not grow with N. The folder is built under a temporary name beside OUT and
renamed at the end: OUT appears whole or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from caldera.io.byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, byte_tokenizer
from caldera.io.model_folder import SUPPORTED_MODEL_TYPES
from caldera.io.run_dir import atomic_folder
from caldera.io.shards import INDEX_FILE

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
DEFAULT_SHARD_BYTES = 4 * 10**9
PER_LAYER_KEYS = ("layer_types",)  # config.json lists with one entry per layer
CHUNK_ROWS = 4096  # rows drawn at a time (float32), then cast: bounds the float32 scratch to 4096 × width


class SynthError(ValueError):
    """The synthetic model cannot be written (bad arguments, existing output, unwritable disk); one line."""


@dataclasses.dataclass
class SynthSummary:
    path: str
    layers: int
    tensors: int
    shards: int
    bytes: int  # of every tensor (the index's total_size)
    parameters: int
    dtype: str
    device: str  # where the values were drawn


def synth_config(config: dict[str, Any], layers: int, dtype: str) -> dict[str, Any]:
    """The shape's config.json with ``layers`` decoder layers, ``dtype`` and the byte tokenizer's special ids."""
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise SynthError(f"model_type {config.get('model_type')!r} is not one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    if layers < 1:
        raise SynthError(f"layers={layers} must be >= 1")
    if dtype not in DTYPES:
        raise SynthError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if config["vocab_size"] < VOCAB_SIZE:
        raise SynthError(f"vocab_size {config['vocab_size']} is below the byte tokenizer's {VOCAB_SIZE} tokens")
    ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    config = {k: v for k, v in config.items() if k not in PER_LAYER_KEYS}  # rebuilt by transformers for N layers
    return config | ids | {"num_hidden_layers": layers, "torch_dtype": dtype}


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of the architecture's state dict, in its order (built on the meta device)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    state = model.state_dict()
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    return {name: tuple(t.shape) for name, t in state.items()}


def total_bytes(config: dict[str, Any], layers: int, dtype: str) -> int:
    """Bytes of every tensor ``synth`` would write (checks the arguments like it)."""
    shapes = tensor_shapes(synth_config(config, layers, dtype))
    return sum(math.prod(s) for s in shapes.values()) * DTYPES[dtype].itemsize


def _seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def synth_tensor(
    name: str, shape: tuple[int, ...], seed: int, std: float, dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    """One tensor on the CPU: 1 for norm weights (1-D, not a bias), else N(0, std²), drawn on ``device``
    CHUNK_ROWS rows at a time (the values depend on the device's generator: CPU and CUDA draws differ)."""
    if len(shape) == 1 and not name.endswith(".bias"):
        return torch.ones(shape, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(_seed(seed, name))
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1, shape[-1])  # (rows, width)
    for start in range(0, flat.shape[0], CHUNK_ROWS):
        rows = flat[start : start + CHUNK_ROWS]
        rows.copy_(torch.randn(rows.shape, generator=gen, device=device).mul_(std).to(dtype))
    return out


def plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int, shard_bytes: int) -> list[list[str]]:
    """Tensor names, in order, cut into shards of at most ``shard_bytes`` (one larger tensor: a shard alone)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _write_shards(tmp: Path, shapes, shards, seed, std, dtype, device, on_tensor) -> Iterator[tuple[str, str]]:
    """Write every shard; yield (tensor name, shard file) in order."""
    for k, names in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            tensors[name] = synth_tensor(name, shapes[name], seed, std, dtype, device)
            if on_tensor is not None:
                on_tensor(name, tensors[name].numel() * tensors[name].element_size())
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        del tensors  # one shard in memory at a time
        yield from ((name, file) for name in names)


def synth(
    config: dict[str, Any],
    out: Path | str,
    layers: int,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    device: str = "cpu",
    on_tensor: Callable[[str, int], None] | None = None,
) -> SynthSummary:
    """Write a random model of ``config``'s shapes with ``layers`` decoder layers to ``out`` (must not exist).

    Values are drawn on ``device`` (cpu or cuda: much faster at 72B sizes; the two give different values).
    ``on_tensor(name, bytes)`` is called after each tensor is drawn (for a progress bar).
    """
    out = Path(out)
    if out.exists():
        raise SynthError(f"{out} already exists; remove it or choose another output folder")
    if shard_bytes < 1:
        raise SynthError(f"shard_bytes={shard_bytes} must be >= 1")
    cfg = synth_config(config, layers, dtype)
    shapes = tensor_shapes(cfg)
    torch_dtype = DTYPES[dtype]
    shards = plan_shards(shapes, torch_dtype.itemsize, shard_bytes)
    total = sum(math.prod(s) for s in shapes.values()) * torch_dtype.itemsize
    with atomic_folder(out, SynthError) as tmp:
        byte_tokenizer(tmp)
        std = float(cfg.get("initializer_range", 0.02))
        weight_map = dict(_write_shards(tmp, shapes, shards, seed, std, torch_dtype, device, on_tensor))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    params = sum(math.prod(s) for s in shapes.values())
    return SynthSummary(str(out), layers, len(shapes), len(shards), total, params, dtype, device)
