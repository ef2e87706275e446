"""Error metrics of an approximation What ≈ W (m, n) against the input Hessian H (n, n)."""

from __future__ import annotations

import torch


def act_err(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """Activation-aware relative error sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ)), Δ = W - What.

    Equal to ||(W - What) X|| / ||W X|| for inputs X with H = X Xᵀ / N.
    """
    w = w.float()
    d = w - w_hat.float()
    h = h.float()
    num = torch.sum((d @ h) * d).double()
    den = torch.sum((w @ h) * w).double()
    if not den > 0:
        raise ValueError(f"tr(W H Wᵀ) = {float(den):g} is not positive: W is zero or H is not positive semi-definite")
    return float(torch.sqrt(num.clamp(min=0) / den))


def fro_err(w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """Relative Frobenius error ||W - What||_F / ||W||_F."""
    w = w.float()
    return float(torch.linalg.norm(w - w_hat.float()) / torch.linalg.norm(w))
