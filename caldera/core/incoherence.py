"""Incoherence processing: fast random orthogonal transforms for any dimension.

For n = 2^p · q (2^p the largest power-of-two factor) the transform is U = (B ⊗ H) · diag(s):
s random signs (n,), H the normalised Walsh-Hadamard matrix of size 2^p (applied as a fast transform,
O(n log n)) and B a Haar-random orthogonal (q, q) block (O(n·q); q is 1 to 231 for real models).
W (m, n) is processed as W̃ = U_m W U_nᵀ and H as U_n H U_nᵀ; both are exactly invertible.
"""

from __future__ import annotations

import functools
import math

import torch

MAX_BLOCK = 4096  # largest odd factor q handled (B is q × q)
BLOCK_SEED = 0x5EED  # B depends on q alone, so all transforms of one width share it


FWHT_RADIX = 64  # the transform is applied as dense Hadamard factors of at most this size (batched matmuls)


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix (n, n) float64, n a power of two ≤ FWHT_RADIX."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal Walsh-Hadamard transform along the last dim (a power of two), Sylvester order.

    H_(ab) = H_a ⊗ H_b, so with the last dim viewed as (a, b) the transform is X -> H_a X H_bᵀ: the dim is split
    into factors of at most FWHT_RADIX, each applied as one small dense matmul (fast on CPU and GPU alike).
    """
    n = x.shape[-1]
    if n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two length, got {n}")
    factors = []
    while n > 1:
        factors.insert(0, min(n, FWHT_RADIX))  # the least significant (contiguous) factor is the largest
        n //= factors[0]
    y, rest = x.reshape(-1, x.shape[-1]), x.shape[-1]
    for k, f in enumerate(factors):
        h = _hadamard(f).to(x.device, x.dtype)  # symmetric
        rest //= f
        last = k + 1 == len(factors)  # the least significant factor: one GEMM over all rows; others batched
        y = y.reshape(-1, f) @ h if last else torch.matmul(h, y.reshape(-1, f, rest))
    return y.reshape(x.shape)


def split_pow2(n: int) -> tuple[int, int]:
    """n -> (2^p, q) with n = 2^p · q and q odd."""
    p2 = n & -n
    return p2, n // p2


@functools.lru_cache(maxsize=32)
def orthogonal_block(q: int) -> torch.Tensor:
    """Haar-random orthogonal (q, q) float64, a fixed function of q (CPU, seeded)."""
    if q > MAX_BLOCK:
        raise ValueError(f"dimension with odd factor {q} > {MAX_BLOCK} is not supported by the incoherence transform")
    if q == 1:
        return torch.ones(1, 1, dtype=torch.float64)
    g = torch.Generator().manual_seed(BLOCK_SEED + q)
    a = torch.randn(q, q, generator=g, dtype=torch.float64)
    qm, r = torch.linalg.qr(a)
    return qm * torch.sign(torch.diagonal(r)).unsqueeze(0)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 float64 (n,), a fixed function of (n, seed)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


class IncoherenceTransform:
    """U = (B ⊗ H) diag(s) of size n, from a seed. ``forward`` maps rows x -> x Uᵀ, ``inverse`` x -> x U."""

    def __init__(self, n: int, seed: int, signs: torch.Tensor | None = None, block: torch.Tensor | None = None) -> None:
        """Signs and block from the seed (float64, CPU), or as given (e.g. read back from a packed file: kept on
        their device and dtype, so a runtime's buffers are used in place)."""
        self.n = n
        self.seed = seed
        self.p2, self.q = split_pow2(n)
        self.signs = random_signs(n, seed) if signs is None else signs
        self.block = orthogonal_block(self.q) if block is None else block

    def _mix(self, x: torch.Tensor, block: torch.Tensor) -> torch.Tensor:
        if self.q == 1:
            return x
        y = x.reshape(*x.shape[:-1], self.q, self.p2)
        return torch.einsum("ij,...jk->...ik", block.to(x.device, x.dtype), y).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> x Uᵀ (..., n): each row r becomes U r."""
        y = x * self.signs.to(x.device, x.dtype)
        y = fwht(y.reshape(*x.shape[:-1], self.q, self.p2)).reshape(x.shape)
        return self._mix(y, self.block)

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) -> x U (..., n), the inverse of ``forward``."""
        y = self._mix(x, self.block.T)
        y = fwht(y.reshape(*x.shape[:-1], self.q, self.p2)).reshape(x.shape)
        return y * self.signs.to(x.device, x.dtype)


def transform_weight(w: torch.Tensor, u_out: IncoherenceTransform, u_in: IncoherenceTransform) -> torch.Tensor:
    """W (m, n) -> U_out W U_inᵀ."""
    return u_out.forward(u_in.forward(w).T).T


def restore_weight(w: torch.Tensor, u_out: IncoherenceTransform, u_in: IncoherenceTransform) -> torch.Tensor:
    """U_outᵀ W̃ U_in (m, n): the inverse of ``transform_weight``."""
    return u_out.inverse(u_in.inverse(w).T).T


def transform_hessian(
    h: torch.Tensor,
    u_in: IncoherenceTransform,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    chunk: int = 2048,
) -> torch.Tensor:
    """H (n, n) -> U_in H U_inᵀ on ``device`` (default: h's) in ``dtype`` (default: h's, at least float32).

    Works through ``chunk`` rows at a time, so h may stay on the host and at most two (n, n) buffers
    exist on the device (29568² float32 is 3.5 GB).
    """
    n = h.shape[0]
    device = h.device if device is None else torch.device(device)
    dtype = torch.promote_types(h.dtype, torch.float32) if dtype is None else dtype
    half = torch.empty(n, n, device=device, dtype=dtype)  # H U_inᵀ
    for i in range(0, n, chunk):
        half[i : i + chunk] = u_in.forward(h[i : i + chunk].to(device, dtype))
    out = torch.empty_like(half)
    for i in range(0, n, chunk):  # U_in (H U_inᵀ), a block of columns at a time
        out[:, i : i + chunk] = u_in.forward(half[:, i : i + chunk].T.contiguous()).T
    return out
