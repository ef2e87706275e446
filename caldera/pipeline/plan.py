"""Footprint plan: the bytes of a compressed model on the GPU, with its KV cache and activations, against a budget.

Stored bytes come from the code that writes them, never from a formula of their own:

    linears      ``linear_tensors`` (the packed-format writer) of a ``layout`` decomposition: the quantizer's own
                 dtypes and shapes on the meta device, at each projection's (clamped) rank; biases stored as the
                 writer stores them (fp16 kept, else fp32); the shared incoherence blocks (``incoherence_blocks``)
                 once per shard of ``layers_per_shard`` layers, as the exporter stores them
    embed        fp16, or packed as the exporter packs it (``embedding_config``: round to nearest, Q's group size)
    lm_head      the same, absent when tied
    norms        fp16, two per layer and the final one

``tests/pipeline/test_plan.py`` checks these sums against real exports. Estimated, not stored:

    kv_cache     2 (K, V) · layers · kv_heads · head_dim · ctx values: fp16, or at 8/4 bits with an fp16 scale and
                 zero per head vector (a quantized cache)
    activations  one prefill chunk of T = min(ctx, 512) tokens in fp16, batch 1: residual and normed input
                 (2·T·hidden), q, k, v and attention output (T·(2·q + 2·kv)), MLP gate, up and product
                 (3·T·intermediate), plus the last token's fp32 logits (4·vocab)
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Any

import torch

from caldera.config import ConfigError, DecomposeConfig
from caldera.core.decompose import layout
from caldera.io.model_shapes import ModelShape
from caldera.io.packed_format import incoherence_blocks, linear_tensors
from caldera.pipeline.decompose_model import PROJECTIONS, clamped_rank
from caldera.pipeline.export import EMBED_BITS, embedding_config, tensor_bytes

KV_BITS = (16, 8, 4)
PREFILL_CHUNK = 512  # tokens per prefill step the activation estimate assumes
LAYERS_PER_SHARD = 8  # caldera export's default
ATTENTION, MLP = PROJECTIONS[:4], PROJECTIONS[4:]

FIT_GROUPS = (64, 128, 256)
FIT_RANKS = (0, 64, 128, 256)
FIT_FACTOR_BITS = (4, 8, 16)
"""The --fit grid: Q's group size, the rank of the attention and of the MLP projections, BL and BR (each),
and every embedding and KV-cache width (EMBED_BITS, KV_BITS)."""


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    """A compression config and the serving context to size. ``ranks``: one per projection, in PROJECTIONS order."""

    bq: int = 2
    bl: int = 4
    br: int = 4
    ranks: tuple[int, ...] = (256,) * len(PROJECTIONS)
    group_size: int = 64
    lr_group_size: int = 64
    zero_point: bool = False
    embed_bits: int = 4
    kv_bits: int = 16
    ctx: int = 4096
    layers_per_shard: int = LAYERS_PER_SHARD
    protect: float = 0.0  # fraction of each linear's weights kept exactly (fp16 outliers)

    def __post_init__(self) -> None:
        if len(self.ranks) != len(PROJECTIONS) or min(self.ranks) < 0:
            raise ConfigError(f"ranks={self.ranks} must be {len(PROJECTIONS)} ranks >= 0, one per projection")
        if self.embed_bits not in EMBED_BITS:
            raise ConfigError(f"embed_bits={self.embed_bits} is not supported; choose one of {EMBED_BITS}")
        if self.kv_bits not in KV_BITS:
            raise ConfigError(f"kv_bits={self.kv_bits} is not supported; choose one of {KV_BITS}")
        if self.ctx < 1 or self.layers_per_shard < 1:
            raise ConfigError(f"ctx={self.ctx} and layers_per_shard={self.layers_per_shard} must be >= 1")
        self.decompose_config(0)  # bits and group sizes checked by DecomposeConfig

    def decompose_config(self, rank: int) -> DecomposeConfig:
        kw = {"bq": self.bq, "bl": self.bl, "br": self.br, "group_size": self.group_size, "protect": self.protect}
        return DecomposeConfig(rank=rank, lr_group_size=self.lr_group_size, zero_point=self.zero_point, **kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ranks": dict(zip(PROJECTIONS, self.ranks, strict=True))}


def parse_ranks(text: str) -> tuple[int, ...]:
    """'256' -> that rank everywhere; 'attn=64,mlp=128' or 'q_proj=64,down_proj=0,...' (later entries win)."""
    groups = {"attn": ATTENTION, "mlp": MLP} | {p: (p,) for p in PROJECTIONS}
    groups |= {p.removesuffix("_proj"): (p,) for p in PROJECTIONS}
    ranks: dict[str, int] = {}
    for part in text.replace(" ", "").split(","):
        key, sep, value = part.rpartition("=")
        if (sep and key not in groups) or not value.isdigit():
            raise ConfigError(f"bad rank {part!r} in {text!r}: expected K, or attn=K, mlp=K, q_proj=K, ...")
        ranks |= dict.fromkeys(groups[key] if sep else PROJECTIONS, int(value))
    missing = [p for p in PROJECTIONS if p not in ranks]
    if missing:
        raise ConfigError(f"rank {text!r} sets no rank for {', '.join(missing)}")
    return tuple(ranks[p] for p in PROJECTIONS)


# stored bytes, from the writer ---------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def linear_bytes(shape: tuple[int, int], cfg: DecomposeConfig, bias_dtype: torch.dtype | None) -> int:
    """Bytes ``linear_tensors`` writes for one (m, n) linear decomposed with ``cfg`` (bias of ``bias_dtype``)."""
    bias = None if bias_dtype is None else torch.empty(shape[0], dtype=bias_dtype, device="meta")
    return tensor_bytes(linear_tensors("linear", layout(shape, cfg), bias))


@functools.lru_cache(maxsize=1024)
def block_bytes(shapes: tuple[tuple[int, int], ...], cfg: DecomposeConfig) -> int:
    """Bytes of the shared incoherence blocks one shard stores for linears of these shapes."""
    return tensor_bytes(incoherence_blocks(layout(shape, cfg) for shape in shapes) if cfg.incoherence else {})


@functools.lru_cache(maxsize=64)
def embedding_bytes(vocab: int, hidden: int, bits: int, group: int) -> int:
    """Bytes of one [vocab, hidden] embedding as the exporter stores it: fp16, or packed at ``bits``."""
    if bits == 16:
        return vocab * hidden * 2
    return tensor_bytes(linear_tensors("embedding", layout((vocab, hidden), embedding_config(bits, group))))


def _bias_dtype(shape: ModelShape, proj: str) -> torch.dtype | None:
    if not (shape.qkv_bias and proj in ("q_proj", "k_proj", "v_proj")):
        return None
    return torch.float16 if shape.dtype == "float16" else torch.bfloat16  # stored: fp16 kept, else fp32


# the plan ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    model: str
    config: PlanConfig
    linears_by_projection: dict[str, int]  # bytes over all layers, biases included
    components: dict[str, int]  # linears (blocks included), embed, lm_head, norms, kv_cache, activations
    linear_weights: int
    budget_bytes: int

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    @property
    def stored_bytes(self) -> int:
        """What ``caldera export`` writes as tensors (its index's total_size)."""
        return sum(self.components[k] for k in ("linears", "embed", "lm_head", "norms"))

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.budget_bytes

    @property
    def bits_per_weight_linears(self) -> float:
        return 8 * self.components["linears"] / self.linear_weights

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "total_bytes": self.total_bytes,
            "fits": self.fits,
            "budget_bytes": self.budget_bytes,
            "components": dict(self.components),
            "bits_per_weight_linears": self.bits_per_weight_linears,
            "linears_by_projection": dict(self.linears_by_projection),
            "stored_bytes": self.stored_bytes,
            "config": self.config.to_dict(),
        }


def kv_cache_bytes(shape: ModelShape, ctx: int, bits: int) -> int:
    vectors = 2 * shape.layers * shape.kv_heads * ctx  # K and V head vectors of head_dim values
    if bits == 16:
        return vectors * shape.head_dim * 2
    return vectors * (-(-shape.head_dim * bits // 8) + 4)  # codes + fp16 scale and zero


def activation_bytes(shape: ModelShape, ctx: int) -> int:
    t = min(ctx, PREFILL_CHUNK)
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    values = 2 * t * shape.hidden + t * (2 * q + 2 * kv) + 3 * t * shape.intermediate
    return 2 * values + 4 * shape.vocab


def plan(shape: ModelShape, cfg: PlanConfig, budget_bytes: int) -> Plan:
    """Every component's bytes for ``shape`` compressed with ``cfg``, against ``budget_bytes``."""
    shapes = shape.projection_shapes
    per_layer = {}
    for proj, rank in zip(PROJECTIONS, cfg.ranks, strict=True):
        dcfg = cfg.decompose_config(clamped_rank(rank, shapes[proj]))
        per_layer[proj] = linear_bytes(shapes[proj], dcfg, _bias_dtype(shape, proj))
    by_proj = {proj: shape.layers * b for proj, b in per_layer.items()}
    shards = -(-shape.layers // cfg.layers_per_shard)
    blocks = shards * block_bytes(tuple(shapes[p] for p in PROJECTIONS), cfg.decompose_config(0))
    embed = embedding_bytes(shape.vocab, shape.hidden, cfg.embed_bits, cfg.group_size)
    components = {
        "linears": sum(by_proj.values()) + blocks,
        "embed": embed,
        "lm_head": 0 if shape.tied else embed,
        "norms": (2 * shape.layers + 1) * shape.hidden * 2,
        "kv_cache": kv_cache_bytes(shape, cfg.ctx, cfg.kv_bits),
        "activations": activation_bytes(shape, cfg.ctx),
    }
    weights = shape.layers * sum(math.prod(s) for s in shapes.values())
    return Plan(shape.name, cfg, by_proj, components, weights, budget_bytes)


def fit(shape: ModelShape, base: PlanConfig, budget_bytes: int) -> tuple[list[Plan], int]:
    """(the plans that fit, most bits per weight of the linears first; how many configs were searched).

    Searched: FIT_GROUPS × FIT_RANKS (attention) × FIT_RANKS (MLP) × FIT_FACTOR_BITS (BL) × FIT_FACTOR_BITS (BR)
    × EMBED_BITS × KV_BITS, with ``base``'s BQ, zero points, context and L/R group size.
    """
    seen, fitting = set(), []
    grid = itertools.product(FIT_GROUPS, FIT_RANKS, FIT_RANKS, FIT_FACTOR_BITS, FIT_FACTOR_BITS, EMBED_BITS, KV_BITS)
    for group, r_attn, r_mlp, bl, br, embed_bits, kv_bits in grid:
        if not (r_attn or r_mlp):
            bl = br = base.bl  # no factors: their widths do not matter
        ranks = tuple(r_attn if p in ATTENTION else r_mlp for p in PROJECTIONS)
        kw = {"bl": bl, "br": br, "ranks": ranks, "group_size": group, "embed_bits": embed_bits, "kv_bits": kv_bits}
        cfg = dataclasses.replace(base, **kw)
        if cfg in seen:
            continue
        seen.add(cfg)
        p = plan(shape, cfg, budget_bytes)
        if p.fits:
            fitting.append(p)
    fitting.sort(key=lambda p: (-p.bits_per_weight_linears, -p.config.embed_bits, -p.config.kv_bits, p.total_bytes))
    return fitting, len(seen)
