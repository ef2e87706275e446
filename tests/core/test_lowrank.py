"""Hessian-weighted low rank: the SVD optimum, quantized factors with refinement, the error formula."""

import numpy as np
import pytest
import torch

from caldera.config import QuantConfig
from caldera.core.ldlq import damp
from caldera.core.lowrank import quantized_lowrank, top_singular, weighted_lowrank, weighted_sq_err
from caldera.core.quantize import quantize
from caldera.testing import lowrank_plus_noise, random_spd_hessian
from caldera.testing import reference as ref

M, N, K = 96, 192, 16


@pytest.fixture(scope="module")
def problem():
    """A (M, N) with more structure than rank K, damped correlated H (N, N), U upper with UᵀU = H⁻¹."""
    a = lowrank_plus_noise(M, N, 24, seed=0, noise=0.3)
    h = damp(random_spd_hessian(N, seed=1), 0.01)
    return a, h, inverse_factor(h)


def inverse_factor(h: torch.Tensor) -> torch.Tensor:
    """U (upper) with UᵀU = H⁻¹, computed in float64 (the factor ``damped_factors`` returns)."""
    h64 = h.double()
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h64)), upper=True)


def true_err(a: torch.Tensor, left: torch.Tensor, right: torch.Tensor, h: torch.Tensor) -> float:
    """tr((A - LR) H (A - LR)ᵀ) from the difference, float64 numpy."""
    return ref.weighted_sq_err(a.numpy(), (left.double() @ right.double()).numpy(), h.numpy())


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_weighted_lowrank_is_optimal(problem, dtype, rtol):
    """Eckart-Young after the change of variables: the optimum is the tail of the spectrum of A C."""
    a, h, c = problem  # c: U, the inverse factor
    left, right = weighted_lowrank(a.to(dtype), c.to(dtype), K)
    assert left.shape == (M, K) and right.shape == (K, N)
    opt = ref.optimal_weighted_sq_err(a.numpy(), h.numpy(), K)
    assert opt > 0
    assert true_err(a, left, right, h) == pytest.approx(opt, rel=rtol)


def test_randomized_svd_is_near_optimal_and_seeded(problem):
    a, h, c = problem  # c: U, the inverse factor
    gen = torch.Generator
    l1, r1 = weighted_lowrank(a, c.float(), K, randomized=True, generator=gen().manual_seed(0))
    l2, r2 = weighted_lowrank(a, c.float(), K, randomized=True, generator=gen().manual_seed(0))
    assert torch.equal(l1, l2) and torch.equal(r1, r2)
    opt = ref.optimal_weighted_sq_err(a.numpy(), h.numpy(), K)
    assert true_err(a, l1, r1, h) == pytest.approx(opt, rel=1e-3)  # 4 power iterations, 16 oversamples


def test_top_singular_matches_numpy():
    a = lowrank_plus_noise(64, 48, 8, seed=2)
    _, s, _ = top_singular(a.double(), 8, randomized=False)
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(a.double().numpy(), compute_uv=False)[:8], rtol=1e-12)


def test_sixteen_bit_factors_reach_the_optimum(problem):
    a, h, c = problem  # c: U, the inverse factor
    fp16 = QuantConfig(16)
    left, right, err = quantized_lowrank(a, h, 0.0, c.float(), K, fp16, fp16, iters=5)
    assert left.codes.dtype == torch.float16 and right.codes.dtype == torch.float16
    opt = ref.optimal_weighted_sq_err(a.numpy(), h.numpy(), K)
    got = true_err(a, left.dequantize(), right.dequantize(), h)
    assert got == pytest.approx(opt, rel=1e-3)  # fp16 factors: 2^-11 relative rounding
    assert err == pytest.approx(got, rel=1e-4)  # the reported error (float32 expansion, see weighted_sq_err)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_refinement_no_worse_than_quantized_svd(problem, bits):
    a, h, c = problem  # c: U, the inverse factor
    q = QuantConfig(bits, 64)
    left, right = weighted_lowrank(a, c.float(), K)
    plain = true_err(a, quantize(left, q).dequantize(), quantize(right, q).dequantize(), h)
    lq0, rq0, err0 = quantized_lowrank(a, h, 0.0, c.float(), K, q, q, iters=0)
    assert err0 == pytest.approx(plain, rel=1e-4)  # iters=0 is plain quantization of the SVD factors
    lq, rq, err = quantized_lowrank(a, h, 0.0, c.float(), K, q, q, iters=5)
    assert err <= err0
    assert err < 0.9 * plain  # observed 0.3-0.4: C⁻¹ in R makes max-abs groups poor, refinement fixes much of it
    assert err == pytest.approx(true_err(a, lq.dequantize(), rq.dequantize(), h), rel=1e-4)
    assert lq.shape == (M, K) and rq.shape == (K, N) and lq.bits == rq.bits == bits


def test_weighted_sq_err_equals_direct_formula(problem):
    a, h, _ = problem
    g = torch.Generator().manual_seed(3)
    left, right = 0.1 * torch.randn(M, K, generator=g), 0.1 * torch.randn(K, N, generator=g)
    a_h = a @ h
    a_h_a = float(torch.sum(a_h * a).double())
    assert a_h_a == pytest.approx(ref.weighted_sq_err(a.numpy(), np.zeros((M, N)), h.numpy()), rel=1e-5)
    want = true_err(a, left, right, h)
    assert weighted_sq_err(a_h_a, a_h, left, right, h) == pytest.approx(want, rel=1e-5)
    # near the optimum the expansion cancels: the absolute error is float32 rounding of tr(A H Aᵀ)
    left, right = weighted_lowrank(a, inverse_factor(h).float(), K)
    got = weighted_sq_err(a_h_a, a_h, left, right, h)
    assert abs(got - true_err(a, left, right, h)) < 1e-5 * a_h_a


def test_lowrank_plus_noise_helper():
    w = lowrank_plus_noise(64, 96, 8, seed=0, noise=0.1)
    assert w.dtype == torch.float32 and w.shape == (64, 96)
    assert torch.equal(w, lowrank_plus_noise(64, 96, 8, seed=0, noise=0.1))
    assert w.square().mean().sqrt().item() == pytest.approx(0.02, rel=1e-4)
    s = torch.linalg.svdvals(w.double())
    assert s[7] > 3 * s[8]  # the rank-8 part stands above the noise
    assert lowrank_plus_noise(8, 8, 0, seed=1).abs().sum() > 0  # rank 0: pure noise, never all zeros
    with pytest.raises(ValueError, match="all zeros"):
        lowrank_plus_noise(8, 8, 0, seed=1, noise=0.0)
