"""Hessians of a whole in-memory model from forward pre-hooks: the reference for the streamed calibration.

``collect_hessians`` runs a transformers causal LM (float32) and accumulates Σ x xᵀ of the four input groups of
every requested decoder layer, exactly what ``caldera.pipeline.calibrate`` computes one layer at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from caldera.pipeline.hessians import GROUP_PATH, Hessians, InputStats, decoder_layers


class _StopForward(Exception):
    """Raised after the last hooked layer: the layers above it are not needed."""


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
