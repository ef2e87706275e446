"""Synthetic weights and Hessians at real layer sizes (up to 29568 wide), cheap to generate.

Weights: a decaying low-rank part plus heavy-tailed noise, like trained projections. Hessians:
H = G Gᵀ / r + diag(d) with a decaying spectrum in G, a few outlier channels and a small log-normal d,
so the result is positive definite, strongly correlated and far from the identity, as real activation
statistics are.
"""

from __future__ import annotations

import torch


def synthetic_weight(m: int, n: int, seed: int, rank: int = 64, device: str | torch.device = "cpu") -> torch.Tensor:
    """(m, n) float32: low rank with a decaying spectrum plus heavy-tailed (log-normal scale) noise, ~0.02 per entry."""
    g = torch.Generator().manual_seed(seed)
    k = min(rank, m, n)
    spectrum = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32)) ** 0.5
    left = torch.randn(m, k, generator=g) * spectrum
    right = torch.randn(k, n, generator=g)
    noise = torch.randn(m, n, generator=g) * torch.exp(0.4 * torch.randn(m, n, generator=g))  # heavy tails
    w = left @ right / (k**0.5) + noise
    return (0.02 * w / w.std()).to(device)


def synthetic_hessian(
    n: int, seed: int, rank: int = 512, outliers: int = 8, device: str | torch.device = "cpu"
) -> torch.Tensor:
    """(n, n) float32 SPD: G Gᵀ / r (decaying column scales, ``outliers`` rows ×10) + small log-normal diagonal."""
    g = torch.Generator().manual_seed(seed)
    r = min(rank, n)
    cols = torch.randn(n, r, generator=g) / (1.0 + torch.arange(r, dtype=torch.float32)) ** 0.5
    diag = 0.02 * torch.exp(0.5 * torch.randn(n, generator=g))
    idx = torch.randperm(n, generator=g)[:outliers]
    cols[idx] *= 10.0  # outlier channels: 100× the energy
    cols = cols.to(device)
    h = cols @ cols.T / r
    h.diagonal().add_(diag.to(device))
    return h
