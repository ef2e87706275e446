"""Model shapes by name or folder: the public config.json values of the models we target, or a local config.json.

The shipped entries copy the architecture fields of the published base-model config.json files
(Qwen/Qwen2-72B, Qwen/Qwen2-7B, Qwen/Qwen2.5-72B on the Hugging Face hub); only shapes matter here
(hidden, intermediate, layers, heads, KV heads, vocabulary, tied embeddings). ``caldera plan`` sizes
them; ``caldera synth`` writes random weights of these shapes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from caldera.io.model_folder import ModelFolderError, read_model_config

_QWEN2_COMMON = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_act": "silu",
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "sliding_window": None,
    "torch_dtype": "bfloat16",
    "vocab_size": 152064,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

SHIPPED_CONFIGS: dict[str, dict[str, Any]] = {
    "qwen2-72b": _QWEN2_COMMON
    | {
        "hidden_size": 8192,
        "intermediate_size": 29568,
        "num_hidden_layers": 80,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "max_position_embeddings": 131072,
        "max_window_layers": 80,
        "rms_norm_eps": 1e-05,
    },
    "qwen2-7b": _QWEN2_COMMON
    | {
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 131072,
        "max_window_layers": 28,
        "rms_norm_eps": 1e-06,
    },
}
"""Name -> config.json (public values; the three share vocabulary 152064, untied embeddings, q/k/v biases)."""
SHIPPED_CONFIGS["qwen2.5-72b"] = SHIPPED_CONFIGS["qwen2-72b"]  # Qwen/Qwen2.5-72B's config.json: the same fields


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What sizes a decoder-only Llama/Qwen2 model: its config.json, reduced to shapes."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool  # Qwen2: q/k/v_proj carry biases; Llama: only with attention_bias
    dtype: str  # of the weights as published (torch_dtype)

    @property
    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """Projection -> weight shape (out, in) of every decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        h, i = self.hidden, self.intermediate
        shapes = {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q)}
        return shapes | {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}

    @classmethod
    def from_config(cls, name: str, config: dict[str, Any]) -> ModelShape:
        try:
            heads = int(config["num_attention_heads"])
            hidden = int(config["hidden_size"])
            shape = cls(
                name=name,
                model_type=str(config["model_type"]),
                hidden=hidden,
                intermediate=int(config["intermediate_size"]),
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                qkv_bias=config["model_type"] == "qwen2" or bool(config.get("attention_bias", False)),
                dtype=str(config.get("torch_dtype") or config.get("dtype") or "bfloat16"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ModelFolderError(f"{name}: config.json lacks a usable {e} field") from None
        sizes = (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.head_dim)
        if min(*sizes, shape.vocab) < 1:
            raise ModelFolderError(f"{name}: config.json has a non-positive size")
        return shape


def shipped_names() -> list[str]:
    return sorted(SHIPPED_CONFIGS)


def model_config(model: str | Path) -> tuple[str, dict[str, Any]]:
    """(display name, config.json) of a shipped name or of a local model folder; ModelFolderError otherwise."""
    key = str(model).lower()
    if key in SHIPPED_CONFIGS:
        return key, dict(SHIPPED_CONFIGS[key])
    if not Path(model).is_dir():
        raise ModelFolderError(
            f"{model!s}: neither a shipped model ({', '.join(shipped_names())}) nor a folder with a config.json"
        )
    return str(model), read_model_config(model)


def model_shape(model: str | Path) -> ModelShape:
    """The shape of a shipped name or a local model folder."""
    return ModelShape.from_config(*model_config(model))
