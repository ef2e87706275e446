"""Layer-input Hessians H = E[x xᵀ] of every decoder layer's linear inputs, from forward pre-hooks.

Each decoder layer has four input groups; the projections of a group read the same input, so they share H:

    attn  (hidden,)        -> q_proj, k_proj, v_proj
    o     (heads · dim,)   -> o_proj
    mlp   (hidden,)        -> gate_proj, up_proj
    down  (intermediate,)  -> down_proj

The whole model sits in memory (a later version streams one layer at a time). Σ x xᵀ is accumulated in
float64 together with the token count; H = Σ x xᵀ / tokens.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable

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


class _StopForward(Exception):
    """Raised after the last hooked layer: the layers above it are not needed."""


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

    def hessian(self) -> torch.Tensor:
        """H = Σ x xᵀ / tokens, (n, n) float64."""
        if self.tokens == 0:
            raise ValueError("no inputs were accumulated")
        return self.xtx / self.tokens


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


def _hooks(model: nn.Module, layers: list[int], stats: dict[tuple[int, str], InputStats], device: torch.device):
    """Register the pre-hooks that fill ``stats`` and a hook stopping the forward after the last layer."""
    modules = decoder_layers(model)
    handles = []
    for i in layers:
        for group, path in GROUP_PATH.items():
            linear = modules[i].get_submodule(path)
            stats[i, group] = InputStats.zeros(linear.in_features, device)

            def hook(_module, args, key=(i, group)):
                stats[key].add(args[0])

            handles.append(linear.register_forward_pre_hook(hook))

    def stop(*_):
        raise _StopForward

    handles.append(modules[max(layers)].register_forward_hook(stop))
    return handles


@torch.no_grad()
def collect_hessians(
    model: nn.Module,
    input_ids: torch.Tensor,
    layers: Iterable[int] | None = None,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> Hessians:
    """Hessians of ``layers`` (default: all) from a float32 forward of input_ids (samples, seq_len).

    Sequences run ``batch_size`` at a time on ``device`` (the model is moved there); the forward stops after
    the last requested layer; ``on_batch`` gets the number of sequences of each finished batch. The returned
    statistics live on the CPU.
    """
    device = torch.device(device)
    layers = sorted(set(range(len(decoder_layers(model))) if layers is None else layers))
    if not layers:
        raise ValueError("no layers to collect Hessians for")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    model = model.to(device=device, dtype=torch.float32).eval()
    base = getattr(model, "model", model)  # the decoder stack: no lm_head, no logits
    stats: dict[tuple[int, str], InputStats] = {}
    handles = _hooks(model, layers, stats, device)
    try:
        for batch in input_ids.split(batch_size):
            with contextlib.suppress(_StopForward):
                base(input_ids=batch.to(device), use_cache=False)
            if on_batch is not None:
                on_batch(batch.shape[0])
    finally:
        for handle in handles:
            handle.remove()
    return Hessians({key: InputStats(s.xtx.cpu(), s.tokens) for key, s in stats.items()})
