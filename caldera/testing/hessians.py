"""Seeded random inputs, Hessians and weights that look like an LLM layer's.

Every function draws from its own ``torch.Generator`` seeded by ``seed``: the global RNG is never touched,
and the same arguments always give the same tensor.
"""

from __future__ import annotations

import math

import torch

OUTLIER_SCALE = 30.0  # outlier channels are this many times larger than the rest (LLM activations: 10-100x)


def correlated_inputs(
    n: int,
    seed: int,
    *,
    tokens: int | None = None,
    outliers: int | None = None,
    correlation: float = 0.5,
    outlier_scale: float = OUTLIER_SCALE,
) -> torch.Tensor:
    """Activations X (tokens, n) float64: correlated Gaussian channels with a few large outlier channels.

    Each row is x = (sqrt(1 - c)·e + sqrt(c)·f P) · d with e (n,) i.i.d. noise, f (k,) shared latent factors
    (k = max(1, n // 16)) mixed by P (k, n), c = ``correlation``, and d (n,) per-channel magnitudes: log-normal,
    with ``outliers`` channels (default max(1, n // 64)) multiplied by ``outlier_scale``.
    """
    if not 0 <= correlation < 1:
        raise ValueError(f"correlation={correlation} must be in [0, 1)")
    tokens = 4 * n if tokens is None else tokens
    outliers = max(1, n // 64) if outliers is None else outliers
    if tokens < 1 or not 0 <= outliers <= n:
        raise ValueError(f"need tokens >= 1 and 0 <= outliers <= n, got tokens={tokens}, outliers={outliers}")
    g = torch.Generator().manual_seed(seed)
    k = max(1, n // 16)
    e = torch.randn(tokens, n, generator=g, dtype=torch.float64)  # (N, n)
    f = torch.randn(tokens, k, generator=g, dtype=torch.float64)  # (N, k)
    p = torch.randn(k, n, generator=g, dtype=torch.float64) / math.sqrt(k)  # (k, n)
    d = torch.exp(0.5 * torch.randn(n, generator=g, dtype=torch.float64))  # (n,)
    d[torch.randperm(n, generator=g)[:outliers]] *= outlier_scale
    return (math.sqrt(1 - correlation) * e + math.sqrt(correlation) * (f @ p)) * d


def random_spd_hessian(n: int, seed: int, **inputs) -> torch.Tensor:
    """H = XᵀX / N (n, n) float32 for X = ``correlated_inputs(n, seed, **inputs)``.

    Positive definite when tokens >= n (the default is 4n); fewer tokens give a rank-deficient H.
    For real layer widths (up to 29568), where XᵀX is too slow, see ``caldera.testing.synthetic``.
    """
    x = correlated_inputs(n, seed, **inputs)
    h = x.T @ x / x.shape[0]
    return ((h + h.T) / 2).float()


def lowrank_plus_noise(
    m: int, n: int, rank: int, seed: int, *, noise: float = 0.1, decay: float = 0.9, std: float = 0.02
) -> torch.Tensor:
    """W = std · (L diag(σ) R + noise · E) / norm, (m, n) float32, never all zeros.

    L (m, rank), R (rank, n), E (m, n) standard Gaussian; σ_i = decay^i. The low-rank part and the noise
    part are normalised to unit RMS before mixing, so ``noise`` is the noise-to-signal RMS ratio.
    """
    if rank < 0 or rank > min(m, n):
        raise ValueError(f"rank={rank} must be in [0, min(m, n)={min(m, n)}]")
    if noise < 0 or (rank == 0 and noise == 0):
        raise ValueError("need noise > 0 when rank is 0 (W would be all zeros), and noise >= 0")
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(m, n, dtype=torch.float64)
    if rank:
        left = torch.randn(m, rank, generator=g, dtype=torch.float64)
        right = torch.randn(rank, n, generator=g, dtype=torch.float64)
        sigma = decay ** torch.arange(rank, dtype=torch.float64)
        lr = (left * sigma) @ right
        w += lr / lr.square().mean().sqrt()
    w += noise * torch.randn(m, n, generator=g, dtype=torch.float64)
    return (std * w / w.square().mean().sqrt()).float()
