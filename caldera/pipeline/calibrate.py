"""Layer-input Hessians streamed one decoder layer at a time, straight from the safetensors shards.

    ids (S, L) -> embed_tokens -> X₀ (S, L, hidden) float32
    for i in 0..last:  layer i (read from the shards alone) maps Xᵢ -> Xᵢ₊₁, batch by batch, in place;
                       pre-hooks on q_proj / o_proj / gate_proj / down_proj accumulate Σ x xᵀ (float64)
                       and the run directory gets H = Σ x xᵀ / tokens for attn, o, mlp, down.

Only one decoder layer's weights are alive at a time; the activations X (S · L · hidden · 4 bytes) stay in
memory up to ``max_activation_bytes``, else in a memory-mapped file that is mapped one batch at a time.
The Hessians are those of the original model (every layer sees the original layers' outputs), equal to
``caldera.testing.model_hessians.collect_hessians`` on the whole model. A layer whose Hessian file already
exists is not accumulated again (resume); the forward still passes through it when a later layer needs it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from caldera.io.model_folder import ModelFolderError, read_model_config
from caldera.io.run_dir import RunDir
from caldera.io.shards import ShardError, ShardReader
from caldera.pipeline.hessians import GROUP_PATH, InputStats

CALIBRATION_VERSION = 1
DEFAULT_MAX_ACTIVATION_BYTES = 2 * 1024**3
ATTN_IMPLEMENTATION = "sdpa"  # what transformers picks for the whole model on CPU and CUDA


@dataclasses.dataclass(frozen=True)
class Architecture:
    """The transformers classes that make one decoder layer and the rotary embedding of a model type."""

    module: str
    decoder_layer: str
    rotary_embedding: str

    def classes(self) -> tuple[type[nn.Module], type[nn.Module]]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.decoder_layer), getattr(mod, self.rotary_embedding)


ARCHITECTURES: dict[str, Architecture] = {
    "llama": Architecture("transformers.models.llama.modeling_llama", "LlamaDecoderLayer", "LlamaRotaryEmbedding"),
    "qwen2": Architecture("transformers.models.qwen2.modeling_qwen2", "Qwen2DecoderLayer", "Qwen2RotaryEmbedding"),
}
"""model_type -> its decoder-layer classes (the keys match caldera.io.model_folder.SUPPORTED_MODEL_TYPES)."""

EMBED = "model.embed_tokens.weight"


class CalibrateError(ValueError):
    """The token ids, layers or batch size cannot be calibrated with (one line)."""


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


@dataclasses.dataclass(frozen=True)
class CalibrationSpec:
    """What the Hessians of a run were computed from; recorded in run.json, checked on resume."""

    samples: int
    seq_len: int
    data: str  # where the calibration text came from (files, or the default corpus split)
    model: str  # resolved model folder (the tokenizer's too)
    config_sha256: str  # of the folder's config.json
    input_ids_sha256: str  # of the (samples, seq_len) int64 token ids
    dtype: str = "float32"  # of the forward; the sums are float64
    version: int = CALIBRATION_VERSION

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 1:
            raise CalibrateError(f"samples={self.samples} and seq_len={self.seq_len} must both be >= 1")
        if self.version != CALIBRATION_VERSION:
            raise CalibrateError(f"calibration spec version {self.version} is not supported")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class CalibrationResult:
    layers: list[int]  # requested layers, all with a Hessian file now
    computed: list[int]  # accumulated by this call (the rest were there already)
    tokens: int  # per group and layer: samples × seq_len
    hessian_bytes: int  # size of the requested layers' Hessian files
    seconds: float
    spilled: bool  # activations went to a memory-mapped file


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _sha256_ids(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


# activations between layers ------------------------------------------------------------------------------
class ActivationStore:
    """Activations X (S, L, hidden) float32: a tensor in memory, or a file under ``spill_dir`` that is
    memory-mapped one batch of rows at a time (so it never counts in full towards the resident set).

    Rows are independent sequences: a layer reads a batch of rows and writes its outputs over them.
    Closing removes the file (and ``spill_dir`` if this store created it).
    """

    def __init__(self, shape: tuple[int, int, int], max_bytes: int, spill_dir: Path) -> None:
        self.shape = shape
        self.nbytes = math.prod(shape) * 4
        self.spilled = self.nbytes > max_bytes
        self.path: Path | None = None
        self._made_dir = False
        if not self.spilled:
            self._mem = torch.empty(shape, dtype=torch.float32)
            return
        self._made_dir = not spill_dir.exists()
        spill_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="activations.", suffix=".f32", dir=spill_dir)
        self.path = Path(name)
        try:
            os.ftruncate(fd, self.nbytes)
        finally:
            os.close(fd)

    def _map(self, start: int, stop: int, mode: str) -> np.memmap:
        row = self.nbytes // self.shape[0]
        return np.memmap(self.path, np.float32, mode, offset=start * row, shape=(stop - start, *self.shape[1:]))

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Rows start..stop (B, L, hidden); a view when in memory, a copy when spilled."""
        stop = min(stop, self.shape[0])
        if not self.spilled:
            return self._mem[start:stop]
        rows = self._map(start, stop, "r")
        out = torch.from_numpy(np.array(rows))
        del rows  # unmapped: its pages leave the resident set
        return out

    def write(self, start: int, values: torch.Tensor) -> None:
        """Overwrite rows start..start+B with values (B, L, hidden)."""
        if not self.spilled:
            self._mem[start : start + values.shape[0]].copy_(values)
            return
        rows = self._map(start, start + values.shape[0], "r+")
        rows[:] = values.detach().to("cpu", torch.float32).numpy()
        rows.flush()
        del rows

    def close(self) -> None:
        self._mem = None
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            if self._made_dir and not any(self.path.parent.iterdir()):
                self.path.parent.rmdir()
            self.path = None

    def __enter__(self) -> ActivationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# the model, one piece at a time ---------------------------------------------------------------------------
class LayerStream:
    """The HF config, the architecture's classes and the shards: builds the embedding and single layers."""

    def __init__(self, folder: Path | str) -> None:
        from transformers import AutoConfig

        self.folder = Path(folder)
        model_type = read_model_config(self.folder)["model_type"]
        if model_type not in ARCHITECTURES:
            raise ModelFolderError(f"{self.folder}: model_type {model_type!r} cannot be calibrated layer by layer")
        self.reader = ShardReader(self.folder)
        self.config = AutoConfig.from_pretrained(self.folder)
        self.config._attn_implementation = ATTN_IMPLEMENTATION
        self.layer_cls, self.rotary_cls = ARCHITECTURES[model_type].classes()

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def check(self, layers: Iterable[int]) -> None:
        """ShardError unless the embedding and every tensor of ``layers`` are in the shards, shaped as built."""
        expected = {EMBED: (self.config.vocab_size, self.config.hidden_size)}
        for i in layers:
            with torch.device("meta"):
                skeleton = self.layer_cls(self.config, layer_idx=i)
            expected.update({layer_prefix(i) + k: tuple(v.shape) for k, v in skeleton.state_dict().items()})
        for name, shape in expected.items():
            if name not in self.reader:
                raise ShardError(f"{self.folder}: tensor {name} is not in the model's shards")
            if self.reader.info[name].shape != shape:
                raise ShardError(f"{self.folder}: {name} is {self.reader.info[name].shape}, the config implies {shape}")

    def embedding(self) -> torch.Tensor:
        return self.reader.tensor(EMBED).to(torch.float32)  # (vocab, hidden)

    def rotary(self, seq_len: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (1, seq_len, head_dim) float32 for positions 0..seq_len-1."""
        rotary = self.rotary_cls(config=self.config).to(device)
        positions = torch.arange(seq_len, device=device).unsqueeze(0)  # (1, L)
        return rotary(torch.zeros(1, device=device), positions)

    def layer(self, i: int, device: torch.device) -> nn.Module:
        return build_layer(self.layer_cls, self.config, i, self.reader.tensors(layer_prefix(i)), device)

    def masks(self, hidden: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """Layer type -> the causal mask the whole model would pass for a batch ``hidden`` (B, L, hidden)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        kw = {"config": self.config, "inputs_embeds": hidden, "attention_mask": None, "past_key_values": None}
        masks = {"full_attention": create_causal_mask(**kw, position_ids=positions)}
        if "sliding_attention" in (getattr(self.config, "layer_types", None) or ()):
            masks["sliding_attention"] = create_sliding_window_causal_mask(**kw, position_ids=positions)
        return masks

    def layer_type(self, i: int) -> str:
        types = getattr(self.config, "layer_types", None)
        return types[i] if types else "full_attention"


def build_layer(cls: type[nn.Module], config, i: int, tensors: dict[str, torch.Tensor], device) -> nn.Module:
    """Decoder layer ``i`` built on the meta device and given the shard tensors (float32) by assignment."""
    prefix = layer_prefix(i)
    with torch.device("meta"):
        layer = cls(config, layer_idx=i)
    keys = set(layer.state_dict())
    state = {k.removeprefix(prefix): t.to(torch.float32) for k, t in tensors.items() if k.removeprefix(prefix) in keys}
    layer.load_state_dict(state, strict=True, assign=True)
    return layer.to(device).eval()


# one layer's pass -----------------------------------------------------------------------------------------
def _hook_stats(layer: nn.Module, device: torch.device) -> tuple[dict[str, InputStats], list]:
    stats, handles = {}, []
    for group, path in GROUP_PATH.items():
        linear = layer.get_submodule(path)
        stats[group] = InputStats.zeros(linear.in_features, device)
        handles.append(linear.register_forward_pre_hook(lambda _m, args, s=stats[group]: s.add(args[0])))
    return stats, handles


def _forward(stream, layer, i, acts: ActivationStore, batch_size, rope, device, write: bool) -> None:
    """Run every batch of ``acts`` through ``layer``; write the outputs back in place when ``write``."""
    positions = torch.arange(acts.shape[1], device=device).unsqueeze(0)  # (1, L)
    for start in range(0, acts.shape[0], batch_size):
        x = acts.read(start, start + batch_size).to(device)  # (B, L, hidden)
        mask = stream.masks(x, positions)[stream.layer_type(i)]
        y = layer(x, attention_mask=mask, position_ids=positions, position_embeddings=rope, use_cache=False)
        if write:
            acts.write(start, y.to("cpu", torch.float32))


@torch.no_grad()
def calibrate(
    folder: Path | str,
    input_ids: torch.Tensor,
    run: RunDir,
    *,
    layers: Iterable[int] | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
    max_activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES,
    spill_dir: Path | str | None = None,
    data: str = "token ids",
    on_layer: Callable[[int, bool], None] | None = None,
) -> CalibrationResult:
    """Hessians of ``layers`` (default: all) from input_ids (samples, seq_len), saved per layer under ``run``.

    Checks the folder, the shards and the requested layers' tensors before any work; ``on_layer(i, computed)``
    is called after each layer's pass (computed: its Hessians were accumulated, not already on disk).
    """
    start_time, device = time.perf_counter(), torch.device(device)
    stream = LayerStream(folder)
    layers = sorted(set(range(stream.num_layers) if layers is None else layers))
    _check_args(input_ids, layers, stream.num_layers, stream.config.vocab_size, batch_size)
    todo = [i for i in layers if not run.has_hessians(i)]
    stream.check(range(max(todo) + 1) if todo else [])
    samples, seq_len = input_ids.shape
    model, config_sha256 = str(stream.folder.resolve()), sha256_file(stream.folder / "config.json")
    spec = CalibrationSpec(samples, seq_len, data, model, config_sha256, _sha256_ids(input_ids))
    run.ensure_spec("calibration", spec.to_dict())  # a resumed run must use the same model and tokens
    spilled = False
    if todo:
        shape = (samples, seq_len, stream.config.hidden_size)
        spill = Path(spill_dir) if spill_dir is not None else run.root / "activations"
        with ActivationStore(shape, max_activation_bytes, spill) as acts:
            spilled = acts.spilled
            _embed(stream, input_ids, acts, batch_size)
            _run_layers(stream, acts, todo, run, batch_size, device, on_layer)
    hessian_bytes = sum(run.hessian_path(i).stat().st_size for i in layers)
    return CalibrationResult(layers, todo, samples * seq_len, hessian_bytes, time.perf_counter() - start_time, spilled)


def _check_args(input_ids: torch.Tensor, layers: list[int], num_layers: int, vocab: int, batch_size: int) -> None:
    if input_ids.ndim != 2 or input_ids.dtype not in (torch.int64, torch.int32) or 0 in input_ids.shape:
        raise CalibrateError(f"input_ids must be non-empty integer token ids (samples, seq_len), not {input_ids.shape}")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise CalibrateError(f"token ids must lie in 0..{vocab - 1} (the model's vocabulary)")
    if not layers or layers[0] < 0 or layers[-1] >= num_layers:
        raise CalibrateError(f"layers {layers} are not a non-empty subset of 0..{num_layers - 1}")
    if batch_size < 1:
        raise CalibrateError(f"batch_size={batch_size} must be >= 1")


def _embed(stream: LayerStream, input_ids: torch.Tensor, acts: ActivationStore, batch_size: int) -> None:
    weight = stream.embedding()  # (vocab, hidden), freed on return
    for start in range(0, input_ids.shape[0], batch_size):
        acts.write(start, nn.functional.embedding(input_ids[start : start + batch_size], weight))


def _run_layers(stream, acts, todo, run: RunDir, batch_size, device, on_layer) -> None:
    rope = stream.rotary(acts.shape[1], device)
    last = max(todo)
    for i in range(last + 1):
        layer = stream.layer(i, device)
        stats, handles = _hook_stats(layer, device) if i in todo else ({}, [])
        _forward(stream, layer, i, acts, batch_size, rope, device, write=i < last)
        for handle in handles:
            handle.remove()
        if stats:
            tokens = {s.tokens for s in stats.values()}.pop()
            run.save_hessians(i, {g: s.hessian("cpu") for g, s in stats.items()}, tokens)  # no GPU copy
        del layer, stats, handles  # freed here (no reference cycles): one layer alive at a time
        if on_layer is not None:
            on_layer(i, i in todo)
