"""Group-wise uniform quantization along the last (input) dimension.

A tensor (rows, cols) is cut into groups of ``group_size`` consecutive columns (the last group may be
shorter); each (row, group) has an fp16 scale and, optionally, an integer zero point.
"""

from __future__ import annotations

import dataclasses

import torch

from caldera.config import QuantConfig, Rounding

FP16_TINY = 2.0**-14  # smallest normal fp16: scales never go below it
CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(13))  # 1.0 .. 0.4, candidates for the clip search


@dataclasses.dataclass
class QuantizedTensor:
    """Codes plus the parameters that dequantize them.

    bits < 16: ``codes`` uint8 (rows, cols) in [0, 2^bits - 1], ``scales`` fp16 (rows, ngroups),
    ``zeros`` uint8 (rows, ngroups) or None (symmetric grid). bits == 16: ``codes`` holds fp16 values.
    """

    codes: torch.Tensor
    scales: torch.Tensor | None
    zeros: torch.Tensor | None
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented values, (rows, cols)."""
        if self.bits == 16:
            return self.codes.to(dtype)
        return dequantize(self.codes, self.scales, self.zeros, self.bits, self.group_size).to(dtype)

    def nbytes(self) -> int:
        """Bytes stored: packed codes, fp16 scales, uint8 zero points."""
        rows, cols = self.shape
        if self.bits == 16:
            return rows * cols * 2
        n = rows * -(-cols * self.bits // 8)
        n += self.scales.numel() * 2
        if self.zeros is not None:
            n += self.zeros.numel()
        return n


def num_groups(cols: int, group_size: int) -> int:
    return -(-cols // group_size)


def _expand(p: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """Per-group parameters (rows, ngroups) -> per-column (rows, cols)."""
    return p.repeat_interleave(group_size, dim=1)[:, :cols]


def _offset(zeros: torch.Tensor | None, bits: int) -> torch.Tensor | float:
    return (2**bits - 1) / 2 if zeros is None else zeros.float()


def dequantize(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """float32 (rows, cols) = (code - offset) * scale, offset = zero or (2^bits - 1) / 2."""
    cols = codes.shape[1]
    off = _offset(zeros, bits)
    off = _expand(off, cols, group_size) if isinstance(off, torch.Tensor) else off
    return (codes.float() - off) * _expand(scales.float(), cols, group_size)


def quantize_with(
    w: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    cfg: QuantConfig,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Codes uint8 (rows, cols) of w (rows, cols) on the grid given by per-group scales/zeros."""
    cols = w.shape[1]
    off = _offset(zeros, cfg.bits)
    off = _expand(off, cols, cfg.group_size) if isinstance(off, torch.Tensor) else off
    x = w.float() / _expand(scales.float(), cols, cfg.group_size) + off
    if cfg.rounding is Rounding.STOCHASTIC:
        u = torch.rand(x.shape, generator=generator, device="cpu").to(x.device)
        x = torch.floor(x + u)
    else:
        x = torch.round(x)
    return x.clamp_(0, 2**cfg.bits - 1).to(torch.uint8)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(rows, cols) -> (rows, ngroups, group_size), zero-padded."""
    rows, cols = w.shape
    pad = num_groups(cols, group_size) * group_size - cols
    return torch.nn.functional.pad(w.float(), (0, pad)).view(rows, -1, group_size)


def _to_fp16_scale(s: torch.Tensor, pow2: bool) -> torch.Tensor:
    s = s.clamp(min=FP16_TINY)
    if pow2:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return s.clamp(max=65504.0).half()


def _candidate(
    lo: torch.Tensor, hi: torch.Tensor, ratio: float, cfg: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (rows, ngroups) fp16 and zeros for a group range [lo, hi] (max-abs in hi when symmetric)
    shrunk by ratio."""
    qmax = 2**cfg.bits - 1
    if cfg.zero_point:
        scale = _to_fp16_scale((hi - lo) * ratio / qmax, cfg.pow2_scales)
        zeros = torch.round(-lo * ratio / scale.float()).clamp(0, qmax).to(torch.uint8)
        return scale, zeros
    return _to_fp16_scale(hi * ratio / (qmax / 2), cfg.pow2_scales), None


def fit_scales(w: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group fp16 scales (rows, ngroups) and uint8 zeros (or None) for w (rows, cols).

    With ``clip_search`` each group takes, among ranges shrunk by CLIP_RATIOS, the one with the least
    squared rounding error (round to nearest), which matters at 2-3 bits where max-abs wastes levels.
    """
    g = _grouped(w, cfg.group_size)
    if cfg.zero_point:
        lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    else:
        lo, hi = None, g.abs().amax(-1)
    ratios = CLIP_RATIOS if cfg.clip_search else (1.0,)
    qmax = 2**cfg.bits - 1
    cols = w.shape[1]
    valid = None  # the zero padding of a ragged last group must not count in the error
    if cols % cfg.group_size:
        valid = (torch.arange(g.shape[1] * cfg.group_size, device=g.device) < cols).view(1, -1, cfg.group_size)
    best = best_err = None
    for ratio in ratios:
        scale, zeros = _candidate(lo, hi, ratio, cfg)
        if len(ratios) == 1:
            return scale, zeros
        s = scale.float().unsqueeze(-1)
        off = (qmax / 2) if zeros is None else zeros.float().unsqueeze(-1)
        err = ((torch.round(g / s + off).clamp_(0, qmax) - off) * s - g).square_()
        err = err.mul_(valid).sum(-1) if valid is not None else err.sum(-1)
        if best is None:
            best, best_err = (scale, zeros), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = (
            torch.where(better, scale, best[0]),
            None if zeros is None else torch.where(better, zeros, best[1]),
        )
    return best


def quantize(w: torch.Tensor, cfg: QuantConfig, generator: torch.Generator | None = None) -> QuantizedTensor:
    """Round-to-nearest (or stochastic) group-wise quantization of w (rows, cols)."""
    if cfg.is_float:
        return QuantizedTensor(w.half(), None, None, 16, cfg.group_size)
    if generator is None and cfg.rounding is Rounding.STOCHASTIC:
        generator = torch.Generator().manual_seed(cfg.seed)
    scales, zeros = fit_scales(w, cfg)
    return QuantizedTensor(quantize_with(w, scales, zeros, cfg, generator), scales, zeros, cfg.bits, cfg.group_size)


def fake_quantize(w: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``quantize(w, cfg).dequantize()`` (float32, (rows, cols)) in the forward pass, the identity in the backward
    pass (straight-through estimator): training moves w, and the values used are exactly those stored."""
    q = quantize(w.detach(), cfg).dequantize()
    return q + (w - w.detach())  # adds an exact 0: the forward value is q bit for bit


def fp16_rounded(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 (as float32) in the forward pass, the identity in the backward pass."""
    return x.detach().half().float() + (x - x.detach())
