"""Trainable stand-ins for the packed parts of a CompressedLinear, for fine-tuning against the original model.

    QScales       Q with its codes fixed and its scales trained: dequant = (code − offset) · fp16(scale)
    LatentFactor  L or R as a float32 latent, quantized with the format's quantizer on every call; gradients pass
                  the rounding unchanged (straight-through), so the stored part, quantize(latent), holds exactly the
                  values the last forward pass used

Both keep PackedMatrix's ``dequantize(dtype)``, so CompressedLinear.forward runs unchanged; ``packed()`` gives the
QuantizedTensor to store.
"""

from __future__ import annotations

import torch
from torch import nn

from caldera.config import QuantConfig
from caldera.core.quantize import QuantizedTensor, dequantize, fake_quantize, fp16_rounded, quantize
from caldera.runtime.compressed import CompressedLinear


class QScales(nn.Module):
    """Q (rows, cols): uint8 codes and zero points fixed, float32 scales (rows, groups) trained, used as fp16."""

    def __init__(self, part: QuantizedTensor) -> None:
        super().__init__()
        self.bits, self.group_size = part.bits, part.group_size
        self.register_buffer("codes", part.codes)
        self.register_buffer("zeros", part.zeros)
        self.scales = nn.Parameter(part.scales.float())

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        scales = fp16_rounded(self.scales)
        return dequantize(self.codes, scales, self.zeros, self.bits, self.group_size).to(dtype)

    def packed(self) -> QuantizedTensor:
        return QuantizedTensor(self.codes, self.scales.detach().half(), self.zeros, self.bits, self.group_size)


class LatentFactor(nn.Module):
    """L (out, rank) or R (rank, in) as a trained float32 latent, quantized with ``quant`` (or rounded to fp16)."""

    def __init__(self, part: QuantizedTensor) -> None:
        super().__init__()
        # max-abs scales: the clip search would cost 13 candidate grids per factor and step, and training adapts
        self.quant = QuantConfig(part.bits, part.group_size, part.zeros is not None, clip_search=False)
        self.latent = nn.Parameter(part.dequantize(torch.float32))

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.quant.is_float:
            return fp16_rounded(self.latent).to(dtype)
        return fake_quantize(self.latent, self.quant).to(dtype)

    def packed(self) -> QuantizedTensor:
        return quantize(self.latent.detach(), self.quant)


def make_trainable(model: nn.Module, norms: bool = True) -> list[tuple[str, CompressedLinear]]:
    """Swap the parts of every decoder-layer CompressedLinear for trainable ones and freeze everything else (the
    RMSNorm weights stay trainable with ``norms``); the swapped modules by name."""
    model.requires_grad_(False)
    swapped = []
    for name, module in model.named_modules():
        if isinstance(module, CompressedLinear) and ".layers." in f".{name}":
            module.dense = None  # a materialized Ŵ would bypass the parts
            module.q = QScales(module.q.unpacked())
            if module.l is not None:
                module.l, module.r = LatentFactor(module.l.unpacked()), LatentFactor(module.r.unpacked())
            swapped.append((name, module))
    if norms:
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.requires_grad_(True)
    return swapped


def packed_parts(module: CompressedLinear) -> dict[str, QuantizedTensor]:
    """{"q": ..., "l": ..., "r": ...} of a module made trainable (no "l"/"r" at rank 0), as they would be stored."""
    parts = {"q": module.q.packed()}
    if module.l is not None:
        parts |= {"l": module.l.packed(), "r": module.r.packed()}
    return parts
