"""Hessian-weighted low-rank factors with quantized L and R.

Objective: min over L (m, k), R (k, n) of ||(A - L R) H^½||_F² = tr((A - LR) H (A - LR)ᵀ), H the
damped Hessian H₀ + shift·I. Any C with C Cᵀ = H works as H^½; LDLQ already has U (upper) with
UᵀU = H⁻¹, so C = U⁻¹. The unquantized minimiser comes from the SVD A C ≈ P Σ Vᵀ: L = P Σ^½,
R = Σ^½ Vᵀ C⁻¹ = Σ^½ Vᵀ U. Quantized factors are then refined by alternating least squares:
R = L⁺ A (exact for any invertible C), L = A H Rᵀ (R H Rᵀ)⁻¹, each followed by rounding.
"""

from __future__ import annotations

import torch

from caldera.config import QuantConfig
from caldera.core.quantize import QuantizedTensor, quantize

OVERSAMPLE = 16  # extra columns for the randomized range finder
POWER_ITERS = 4
RIDGE = 1e-6  # relative ridge for the small (k, k) normal equations


def top_singular(a: torch.Tensor, k: int, randomized: bool, generator: torch.Generator | None = None):
    """Top-k SVD of a (m, n): (U (m, k), S (k,), Vh (k, n)); randomized uses a seeded range finder."""
    if not randomized or k + OVERSAMPLE >= min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k]
    g = generator or torch.Generator().manual_seed(0)
    omega = torch.randn(a.shape[1], k + OVERSAMPLE, generator=g).to(a.device, a.dtype)
    y = a @ omega  # (m, k + p)
    for _ in range(POWER_ITERS):
        y, _ = torch.linalg.qr(y)
        y, _ = torch.linalg.qr(a.T @ y)
        y = a @ y
    basis, _ = torch.linalg.qr(y)
    ub, s, vh = torch.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ ub)[:, :k], s[:k], vh[:k]


def weighted_lowrank(a: torch.Tensor, u: torch.Tensor, k: int, randomized: bool = False, generator=None):
    """Rank-k minimiser of ||(A - L R) U⁻¹||_F: L (m, k), R (k, n), for U (n, n) upper triangular."""
    p, s, vh = top_singular(torch.linalg.solve_triangular(u, a, upper=True, left=False), k, randomized, generator)
    root = s.sqrt()
    return p * root, (root.unsqueeze(1) * vh) @ u


def weighted_sq_err(
    a_h_a: float, a_h: torch.Tensor, left: torch.Tensor, right: torch.Tensor, h: torch.Tensor, shift: float = 0.0
) -> float:
    """tr((A - LR) H (A - LR)ᵀ) for H = h + shift·I, from tr(A H Aᵀ) and A H (m, n), without forming A - LR.

    The expansion cancels in float32: good for ranking candidates, not for errors near 0.
    """
    rh = right @ h + shift * right  # (k, n)
    cross = torch.sum(left * (a_h @ right.T)).double()
    quad = torch.sum((left.T @ left) * (rh @ right.T)).double()
    return float(a_h_a - 2 * cross + quad)


def _solve_spd(gram: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """gram⁻¹ rhs for a (k, k) Gram matrix, with a small relative ridge."""
    k = gram.shape[0]
    ridge = RIDGE * gram.diagonal().mean().clamp(min=1e-30)
    return torch.linalg.solve(gram + ridge * torch.eye(k, device=gram.device, dtype=gram.dtype), rhs)


def quantized_lowrank(
    a: torch.Tensor,
    h: torch.Tensor,
    shift: float,
    u: torch.Tensor,
    k: int,
    lq: QuantConfig,
    rq: QuantConfig,
    iters: int,
    randomized: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[QuantizedTensor, QuantizedTensor, float]:
    """Quantized L (m, k), R (k, n) approximately minimising tr((A - LR) H (A - LR)ᵀ).

    The damped Hessian is h (n, n) + shift·I, and U its factor from ``damped_factors``. Returns the best
    pair seen over ``iters`` alternating refinements and its weighted squared error.
    """
    left, right = weighted_lowrank(a, u, k, randomized, generator)
    a_h = a @ h + shift * a
    a_h_a = float(torch.sum(a_h * a).double())
    lq_t, rq_t = quantize(left, lq), quantize(right, rq)
    best = (lq_t, rq_t, weighted_sq_err(a_h_a, a_h, lq_t.dequantize(), rq_t.dequantize(), h, shift))
    if lq.is_float and rq.is_float:
        return best
    for _ in range(iters):
        ld = lq_t.dequantize()
        rq_t = quantize(_solve_spd(ld.T @ ld, ld.T @ a), rq)  # R = L⁺ A
        rd = rq_t.dequantize()
        lq_t = quantize(_solve_spd((rd @ h + shift * rd) @ rd.T, rd @ a_h.T).T, lq)  # L = A H Rᵀ (R H Rᵀ)⁻¹
        err = weighted_sq_err(a_h_a, a_h, lq_t.dequantize(), rd, h, shift)
        if err < best[2]:
            best = (lq_t, rq_t, err)
    return best
