"""LDLQ (equivalently GPTQ): sequential rounding with Hessian-aware error feedback.

Minimises tr((W - Q) H (W - Q)ᵀ) column by column: after rounding column j, its error, scaled by the
upper Cholesky factor of H⁻¹, is pushed onto the columns not yet rounded. Updates are applied lazily,
one block of columns at a time.
"""

from __future__ import annotations

import torch

from caldera.config import QuantConfig, Rounding
from caldera.core.quantize import QuantizedTensor, fit_scales, num_groups

MAX_DAMPING_TRIES = 6  # damping grows ×10 per failed try


class HessianError(RuntimeError):
    """H is not usable: non-finite, wrong shape, or not positive definite even after damping."""


def check_hessian(h: torch.Tensor) -> None:
    """Raise HessianError unless h is finite with a non-negative diagonal (as any E[x xᵀ] is)."""
    if not torch.isfinite(h).all():
        raise HessianError("Hessian contains NaN or Inf")
    if (torch.diagonal(h) < 0).any():
        raise HessianError("Hessian has negative diagonal entries: it is not E[x xᵀ] of any inputs")


def damping_shift(h: torch.Tensor, damping: float) -> float:
    """damping · mean(diag H), zero (dead) diagonal entries counted as 1: the multiple of I ``damp`` adds."""
    diag = torch.diagonal(h).double()
    return damping * float(torch.where(diag == 0, 1.0, diag).mean())


def damp(h: torch.Tensor, damping: float) -> torch.Tensor:
    """H + damping · mean(diag H) · I, float32; zero-diagonal (dead) inputs get a unit diagonal."""
    shift = damping_shift(h, damping)
    h = h.float().clone()
    diag = torch.diagonal(h)
    diag[diag == 0] = 1.0
    diag += shift
    return h


def damped_factors(h: torch.Tensor, damping: float) -> tuple[torch.Tensor, float]:
    """U (n, n) upper triangular with UᵀU = H_damped⁻¹, and the damping used.

    Damping grows ×10 until H is positive definite; HessianError after MAX_DAMPING_TRIES. At most
    three (n, n) buffers are alive at once (29568² float32 is 3.5 GB).
    """
    lam = damping
    for _ in range(MAX_DAMPING_TRIES):
        c, info = torch.linalg.cholesky_ex(damp(h, lam))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(c)
            del c
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            del hinv
            if int(info) == 0 and torch.isfinite(u).all():
                return u, lam
        lam *= 10
    raise HessianError(
        f"Hessian is not positive definite even with damping {lam / 10:g} × mean diagonal; "
        "check the calibration data (too few tokens, or constant inputs)"
    )


def ldlq(
    w: torch.Tensor,
    u: torch.Tensor,
    cfg: QuantConfig,
    block_size: int = 128,
    generator: torch.Generator | None = None,
) -> QuantizedTensor:
    """Quantize w (m, n) given U (n, n), the upper Cholesky factor of H⁻¹ (see ``damped_factors``).

    Group scales are fitted when the sweep reaches each group, from the error-corrected columns.
    """
    m, n = w.shape
    g = cfg.group_size
    block = max(g, block_size // g * g) if g <= block_size else g  # groups never straddle blocks
    qmax = 2**cfg.bits - 1
    if generator is None and cfg.rounding is Rounding.STOCHASTIC:
        generator = torch.Generator().manual_seed(cfg.seed)
    work = w.float().clone()
    codes = torch.empty(m, n, dtype=torch.uint8, device=w.device)
    ng = num_groups(n, g)
    scales = torch.empty(m, ng, dtype=torch.float16, device=w.device)
    zeros = torch.empty(m, ng, dtype=torch.uint8, device=w.device) if cfg.zero_point else None
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        wb = work[:, i1:i2]  # a view: updated in place
        err = torch.empty_like(wb)
        ub = u[i1:i2, i1:i2]
        noise = None
        if cfg.rounding is Rounding.STOCHASTIC:
            noise = torch.rand(wb.shape, generator=generator).to(w.device)
        for j in range(i2 - i1):
            col = i1 + j
            if col % g == 0:
                gi = col // g
                s, z = fit_scales(wb[:, j : j + g], cfg)
                scales[:, gi] = s[:, 0]
                if zeros is not None:
                    zeros[:, gi] = z[:, 0]
                scale = s[:, 0].float()
                off = z[:, 0].float() if z is not None else qmax / 2
            x = wb[:, j] / scale + off
            x = torch.floor(x + noise[:, j]) if noise is not None else torch.round(x)
            c = x.clamp_(0, qmax)
            codes[:, col] = c.to(torch.uint8)
            e = (wb[:, j] - (c - off) * scale) / ub[j, j]
            wb[:, j:] -= e.unsqueeze(1) * ub[j, j:].unsqueeze(0)
            err[:, j] = e
        if i2 < n:
            work[:, i2:] -= err @ u[i1:i2, i2:]
    return QuantizedTensor(codes, scales, zeros, cfg.bits, g)
