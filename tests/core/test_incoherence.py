"""Incoherence transforms: orthogonal for every model dimension, equal to the dense (B ⊗ H) diag(s) matrix."""

import numpy as np
import pytest
import torch

from caldera.core.incoherence import (
    MAX_BLOCK,
    IncoherenceTransform,
    fwht,
    orthogonal_block,
    random_signs,
    restore_weight,
    split_pow2,
    transform_hessian,
    transform_weight,
)
from caldera.testing import random_spd_hessian
from caldera.testing import reference as ref

MODEL_DIMS = (29568, 8192, 4864, 896, 1536, 576, 1024, 128)  # Qwen2 / Llama widths: odd factors up to 231
SMALL_DIMS = (1, 7, 12, 24, 40, 96, 128)
F64_TOL = 1e-10  # float64: observed errors are ~1e-15
F32_TOL = 1e-5


def randn(*shape: int, seed: int, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def dense(t: IncoherenceTransform) -> np.ndarray:
    return ref.incoherence_matrix(t.signs.numpy(), t.block.numpy())


@pytest.mark.parametrize("n", MODEL_DIMS)
def test_orthogonal_for_model_dims(n):
    t = IncoherenceTransform(n, seed=n)
    x = randn(4, n, seed=n)  # (4, n)
    y = t.forward(x)
    assert y.shape == x.shape and y.dtype == torch.float64
    # norms and inner products preserved (an isometry), inverse undoes forward
    torch.testing.assert_close(y @ y.T, x @ x.T, rtol=F64_TOL, atol=F64_TOL * n)
    torch.testing.assert_close(t.inverse(y), x, rtol=F64_TOL, atol=F64_TOL)
    torch.testing.assert_close(t.forward(t.inverse(x)), x, rtol=F64_TOL, atol=F64_TOL)


@pytest.mark.parametrize("n", (29568, 4864, 896))
def test_round_trip_float32(n):
    t = IncoherenceTransform(n, seed=1)
    x = randn(2, n, seed=n, dtype=torch.float32)
    y = t.forward(x)
    assert y.dtype == torch.float32
    rel = (y.norm(dim=1) / x.norm(dim=1) - 1).abs().max()
    assert rel < F32_TOL
    err = (t.inverse(y) - x).norm(dim=1) / x.norm(dim=1)
    assert err.max() < F32_TOL


@pytest.mark.parametrize("n", SMALL_DIMS)
def test_matches_dense_reference(n):
    t = IncoherenceTransform(n, seed=3)
    p2, q = split_pow2(n)
    assert p2 * q == n and q % 2 == 1 and p2 & (p2 - 1) == 0
    u = torch.from_numpy(dense(t))  # (n, n)
    torch.testing.assert_close(u @ u.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=F64_TOL)
    x = randn(5, n, seed=n)
    torch.testing.assert_close(t.forward(x), x @ u.T, rtol=F64_TOL, atol=F64_TOL)
    torch.testing.assert_close(t.inverse(x), x @ u, rtol=F64_TOL, atol=F64_TOL)


@pytest.mark.parametrize(("m", "n"), [(12, 40), (96, 24), (7, 128)])
def test_weight_and_hessian_match_dense_reference(m, n):
    u_out, u_in = IncoherenceTransform(m, seed=0), IncoherenceTransform(n, seed=1)
    uo, ui = torch.from_numpy(dense(u_out)), torch.from_numpy(dense(u_in))
    w = randn(m, n, seed=m * n)
    h = random_spd_hessian(n, seed=n).double()
    torch.testing.assert_close(transform_weight(w, u_out, u_in), uo @ w @ ui.T, rtol=F64_TOL, atol=F64_TOL)
    torch.testing.assert_close(restore_weight(w, u_out, u_in), uo.T @ w @ ui, rtol=F64_TOL, atol=F64_TOL)
    scale = h.abs().max().item()
    torch.testing.assert_close(transform_hessian(h, u_in), ui @ h @ ui.T, rtol=F64_TOL, atol=F64_TOL * scale)


def test_fwht_matches_hadamard_matrix():
    x = randn(3, 64, seed=0)
    want = x @ torch.from_numpy(ref.incoherence_matrix(np.ones(64), np.ones((1, 1)))).T
    torch.testing.assert_close(fwht(x), want, rtol=F64_TOL, atol=F64_TOL)
    with pytest.raises(ValueError, match="power-of-two"):
        fwht(randn(2, 12, seed=0))


def test_seeds():
    n = 1024
    assert torch.equal(IncoherenceTransform(n, 5).signs, IncoherenceTransform(n, 5).signs)
    assert not torch.equal(IncoherenceTransform(n, 5).signs, IncoherenceTransform(n, 6).signs)
    s = random_signs(n, 5)
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(s.mean().item()) < 0.15  # balanced: mean of 1024 fair signs has std 0.03
    x = randn(2, n, seed=0)
    assert not torch.allclose(IncoherenceTransform(n, 5).forward(x), IncoherenceTransform(n, 6).forward(x))
    # the odd block depends on q alone, and is orthogonal
    b = orthogonal_block(231)
    assert torch.equal(b, orthogonal_block(231))
    torch.testing.assert_close(b @ b.T, torch.eye(231, dtype=torch.float64), rtol=0, atol=F64_TOL)


def test_explicit_signs_are_used():
    signs = random_signs(96, 11)
    t = IncoherenceTransform(96, seed=0, signs=signs)
    assert torch.equal(t.signs, signs)
    x = randn(2, 96, seed=1)
    torch.testing.assert_close(t.forward(x), IncoherenceTransform(96, 11).forward(x), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("m", "n", "dtype", "tol"), [(96, 40, torch.float64, F64_TOL), (896, 576, torch.float32, 1e-5)]
)
def test_weight_round_trip_and_trace_invariant(m, n, dtype, tol):
    """restore(transform(W)) = W and tr(W̃ H̃ W̃ᵀ) = tr(W H Wᵀ), since the transforms are orthogonal."""
    u_out, u_in = IncoherenceTransform(m, seed=2), IncoherenceTransform(n, seed=3)
    w = randn(m, n, seed=m, dtype=dtype)
    h = random_spd_hessian(n, seed=n).to(dtype)
    wt, ht = transform_weight(w, u_out, u_in), transform_hessian(h, u_in)
    assert (restore_weight(wt, u_out, u_in) - w).norm() / w.norm() < tol
    assert (wt.norm() / w.norm() - 1).abs() < tol
    before = torch.sum((w @ h) * w).double()
    after = torch.sum((wt @ ht) * wt).double()
    assert abs(after / before - 1) < tol * 10  # float32: two transforms and a matmul per side
    torch.testing.assert_close(ht, ht.T, rtol=0, atol=tol * h.abs().max().item())


def test_spreads_an_outlier():
    """A single large input channel is spread over all channels (what incoherence is for)."""
    n = 4864
    x = torch.zeros(1, n, dtype=torch.float64)
    x[0, 17] = 1.0
    y = IncoherenceTransform(n, seed=0).forward(x)
    assert y.abs().max() <= 1 / split_pow2(n)[0] ** 0.5 + 1e-12  # |B_ij| <= 1, Hadamard entries 1/sqrt(2^p)
    assert (y != 0).sum() > n // 2


def test_odd_factor_too_large():
    with pytest.raises(ValueError, match=str(MAX_BLOCK)):
        IncoherenceTransform(2 * (MAX_BLOCK + 3), seed=0)  # odd factor 4099
