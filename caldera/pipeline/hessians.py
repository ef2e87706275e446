"""Layer-input Hessians H = E[x xᵀ] of every decoder layer's linear inputs, from forward pre-hooks.

Each decoder layer has four input groups; the projections of a group read the same input, so they share H:

    attn  (hidden,)        -> q_proj, k_proj, v_proj
    o     (heads · dim,)   -> o_proj
    mlp   (hidden,)        -> gate_proj, up_proj
    down  (intermediate,)  -> down_proj

Σ x xᵀ is accumulated in float64 together with the token count; H = Σ x xᵀ / tokens. The pipeline computes them
streaming one layer at a time (``caldera.pipeline.calibrate``); ``caldera.testing.model_hessians`` hooks a whole
model in memory, the reference the streamed version is tested against.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

PROJ_GROUP: dict[str, str] = {
    "q_proj": "attn",
    "k_proj": "attn",
    "v_proj": "attn",
    "o_proj": "o",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "down",
}
"""Projection name -> the input group whose Hessian it is decomposed against."""

PROJ_PATH: dict[str, str] = {
    "q_proj": "self_attn.q_proj",
    "k_proj": "self_attn.k_proj",
    "v_proj": "self_attn.v_proj",
    "o_proj": "self_attn.o_proj",
    "gate_proj": "mlp.gate_proj",
    "up_proj": "mlp.up_proj",
    "down_proj": "mlp.down_proj",
}
"""Projection name -> its module path inside a decoder layer (Llama and Qwen2)."""

GROUP_PATH: dict[str, str] = {
    "attn": "self_attn.q_proj",
    "o": "self_attn.o_proj",
    "mlp": "mlp.gate_proj",
    "down": "mlp.down_proj",
}
"""Group -> the one module whose input is hooked for it."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM (``model.model.layers``) or of its base model (``model.layers``)."""
    base = getattr(model, "model", model)
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(model).__name__} has no decoder layers at model.layers")
    return layers


@dataclasses.dataclass
class InputStats:
    """Running Σ x xᵀ (n, n) float64 over ``tokens`` input vectors."""

    xtx: torch.Tensor
    tokens: int = 0

    @classmethod
    def zeros(cls, n: int, device: torch.device | str = "cpu") -> InputStats:
        return cls(torch.zeros(n, n, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor) -> None:
        """Accumulate inputs x (..., n): every leading index is one token."""
        x = x.detach().reshape(-1, self.xtx.shape[0]).to(self.xtx.device, torch.float64)  # (N, n)
        self.xtx.addmm_(x.T, x)
        self.tokens += x.shape[0]

    def hessian(self, device: torch.device | str | None = None) -> torch.Tensor:
        """H = Σ x xᵀ / tokens, (n, n) float64, on ``device`` (default: the sum's). Dividing on the host ("cpu")
        spares the GPU a second (n, n) float64 buffer (7 GB for Qwen2-72B's down_proj); the result is the same
        bit for bit (IEEE division)."""
        if self.tokens == 0:
            raise ValueError("no inputs were accumulated")
        return self.xtx.to(device or self.xtx.device) / self.tokens


@dataclasses.dataclass
class Hessians:
    """(layer, group) -> input statistics, and projection name -> group."""

    stats: dict[tuple[int, str], InputStats]
    proj_group: dict[str, str] = dataclasses.field(default_factory=lambda: dict(PROJ_GROUP))

    def __getitem__(self, key: tuple[int, str]) -> torch.Tensor:
        """H (n, n) float64 of (layer, group)."""
        return self.stats[key].hessian()

    def of(self, layer: int, proj: str) -> torch.Tensor:
        """H (n, n) float64 that projection ``proj`` of ``layer`` is decomposed against."""
        return self[layer, self.proj_group[proj]]

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.stats})

    @property
    def tokens(self) -> int:
        """Tokens behind the least-fed statistic (all are equal after a full forward)."""
        return min(s.tokens for s in self.stats.values())
