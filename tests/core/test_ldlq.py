"""LDLQ: the blocked implementation against the textbook column loop, RTN, and bad Hessians."""

import numpy as np
import pytest
import torch

from caldera.config import DecomposeConfig, QuantConfig, Rounding
from caldera.core.decompose import decompose
from caldera.core.ldlq import HessianError, check_hessian, damp, damped_factors, ldlq
from caldera.core.metrics import act_err
from caldera.core.quantize import CLIP_RATIOS, quantize
from caldera.testing import lowrank_plus_noise, random_spd_hessian
from caldera.testing import reference as ref

M, N = 48, 256
# Codes may differ from the float64 reference where a value lands within float32 rounding of a half-step
# (and then along the rest of that row); allow 0.1% of codes. Observed: 0 mismatches.
MAX_MISMATCH = 1e-3
# Group scales: a near-tie between clip candidates can go either way; allow 1% of groups. Observed: 0.
MAX_SCALE_MISMATCH = 1e-2


def problem(m: int = M, n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A low-rank-plus-noise W (m, n) and a correlated H (n, n) with outlier channels."""
    return lowrank_plus_noise(m, n, 8, seed, noise=0.5), random_spd_hessian(n, seed + 1)


def mismatch(qt, codes: np.ndarray) -> float:
    return float((qt.codes.numpy().astype(np.int64) != codes).mean())


@pytest.mark.parametrize(
    ("bits", "zero_point", "clip", "n", "block"),
    [
        (2, False, False, 256, 128),
        (3, False, False, 256, 64),
        (4, True, False, 256, 128),
        (2, True, False, 200, 128),  # ragged last group
        (4, False, False, 200, 4096),  # one block
        (8, False, False, 256, 32),  # block smaller than the group: grows to one group
        (2, False, True, 256, 128),
        (3, True, True, 256, 128),
        (2, False, True, 200, 128),  # ragged last group with clip search
    ],
)
def test_blocked_matches_textbook(bits, zero_point, clip, n, block):
    w, h = problem(n=n, seed=bits)
    cfg = QuantConfig(bits, 64, zero_point, clip_search=clip)
    u, lam = damped_factors(h, 0.01)
    qt = ldlq(w, u, cfg, block_size=block)
    codes, scales, zeros = ref.ldlq(w.numpy(), ref.damp(h.numpy(), lam), cfg, CLIP_RATIOS if clip else (1.0,))
    assert mismatch(qt, codes) <= MAX_MISMATCH
    assert (qt.scales.float().numpy() != scales).mean() <= MAX_SCALE_MISMATCH
    if zero_point:
        assert (qt.zeros.numpy() != zeros).mean() <= MAX_SCALE_MISMATCH


def test_block_size_does_not_change_the_result():
    w, h = problem(seed=7)
    u, _ = damped_factors(h, 0.01)
    cfg = QuantConfig(3, 32)
    base = ldlq(w, u, cfg, block_size=32)
    for block in (64, 96, 256, 1000):
        assert float((ldlq(w, u, cfg, block_size=block).codes != base.codes).float().mean()) <= MAX_MISMATCH


@pytest.mark.parametrize(("bits", "clip"), [(2, False), (2, True), (3, True), (4, True)])
def test_beats_round_to_nearest(bits, clip):
    """The activation-aware error of LDLQ is below RTN's (public quantize(), same config) on a correlated H."""
    w, h = problem(seed=10 + bits)
    cfg = QuantConfig(bits, 64, clip_search=clip)
    u, _ = damped_factors(h, 0.01)
    e_ldlq = act_err(w, ldlq(w, u, cfg).dequantize(), h)
    e_rtn = act_err(w, quantize(w, cfg).dequantize(), h)
    assert e_ldlq < 0.95 * e_rtn


def test_stochastic_rounding_is_seeded():
    w, h = problem(seed=20)
    u, _ = damped_factors(h, 0.01)
    cfg = QuantConfig(2, 64, rounding=Rounding.STOCHASTIC, seed=1)
    a, b = ldlq(w, u, cfg), ldlq(w, u, cfg)
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.codes, ldlq(w, u, QuantConfig(2, 64, rounding=Rounding.STOCHASTIC, seed=2)).codes)


def test_damp_matches_reference_and_keeps_input():
    h = random_spd_hessian(64, 0)
    h[3, 3] = 0.0  # a dead input
    before = h.clone()
    got = damp(h, 0.01)
    assert torch.equal(h, before)
    np.testing.assert_allclose(got.double().numpy(), ref.damp(h.numpy(), 0.01), rtol=1e-6, atol=0)
    assert got[3, 3] > 1.0


def test_factors():
    h = random_spd_hessian(64, 1)
    u, lam = damped_factors(h, 0.01)
    hd = damp(h, 0.01).double()
    assert lam == 0.01
    eye = torch.eye(64, dtype=torch.float64)
    torch.testing.assert_close(u.double().T @ u.double() @ hd, eye, rtol=0, atol=1e-3)  # UᵀU = H⁻¹, float32
    assert torch.equal(u, u.triu())


def test_rank_deficient_hessian_gives_finite_output():
    """Fewer tokens than inputs: H = XᵀX/N has rank N < n; the requested damping is enough."""
    n = 128
    h = random_spd_hessian(n, 2, tokens=32)
    eig = torch.linalg.eigvalsh(h.double())
    assert eig[0] < 1e-6 * eig[-1]  # singular up to float32 rounding
    u, lam = damped_factors(h, 0.01)
    assert lam >= 0.01
    w = lowrank_plus_noise(32, n, 4, 3)
    qt = ldlq(w, u, QuantConfig(2, 64))
    assert torch.isfinite(qt.dequantize()).all()
    assert act_err(w, qt.dequantize(), h) < 1.0


def test_negative_eigenvalue_raises_damping():
    n = 128
    h = random_spd_hessian(n, 3).double() + torch.eye(n, dtype=torch.float64)  # diagonal floor: stays positive
    eig, vec = torch.linalg.eigh(h)
    # push the smallest eigenvalue to -0.02 · mean diagonal: 1% damping is not enough, 10% is
    target = -0.02 * h.diagonal().mean()
    h = (h + (target - eig[0]) * torch.outer(vec[:, 0], vec[:, 0])).float()
    assert torch.linalg.eigvalsh(h.double())[0] < 0 and (h.diagonal() > 0).all()
    u, lam = damped_factors(h, 0.01)
    assert lam > 0.01
    w = lowrank_plus_noise(32, n, 4, 4)
    assert torch.isfinite(ldlq(w, u, QuantConfig(2, 64)).dequantize()).all()
    dec = decompose(w, h, DecomposeConfig.for_method("gptq", bq=2, damping=0.01))
    assert dec.damping > 0.01
    assert torch.isfinite(dec.dense()).all() and np.isfinite(dec.act_err)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian_raises(bad):
    h = random_spd_hessian(64, 4)
    h[5, 7] = h[7, 5] = bad
    with pytest.raises(HessianError, match="NaN or Inf"):
        check_hessian(h)
    w = lowrank_plus_noise(16, 64, 4, 5)
    with pytest.raises(HessianError, match="NaN or Inf"):
        decompose(w, h, DecomposeConfig.for_method("gptq", bq=4))


def wildly_indefinite(n: int, seed: int) -> torch.Tensor:
    """Off-diagonal entries 1e5 × the diagonal: no damping up to 1000 × mean diagonal makes it definite."""
    h = random_spd_hessian(n, seed)
    h[0, 1] = h[1, 0] = 1e5 * h.diagonal().mean()
    return h


def test_wildly_indefinite_hessian_raises():
    h = wildly_indefinite(64, 5)
    with pytest.raises(HessianError, match="not positive definite.*damping"):
        damped_factors(h, 0.01)
    w = lowrank_plus_noise(16, 64, 4, 6)
    with pytest.raises(HessianError, match="not positive definite"):
        decompose(w, h, DecomposeConfig.for_method("gptq", bq=4))


def test_negative_diagonal_raises():
    h = -random_spd_hessian(64, 6)  # E[x xᵀ] can never have a negative diagonal
    with pytest.raises(HessianError):
        damped_factors(h, 0.01)
    with pytest.raises(HessianError, match="negative diagonal"):
        check_hessian(h)


def test_wildly_indefinite_hessian_raises_with_incoherence():
    """Incoherence spreads the huge off-diagonal onto the diagonal: half of diag(U H Uᵀ) is negative."""
    w = lowrank_plus_noise(16, 64, 4, 6)
    with pytest.raises(HessianError, match="not positive definite"):
        decompose(w, wildly_indefinite(64, 5), DecomposeConfig.for_method("ldlq-had", bq=4))


def test_random_hessian_helper():
    """The test Hessian is seeded, symmetric positive definite, correlated, with outlier channels."""
    h = random_spd_hessian(128, 0)
    assert h.dtype == torch.float32 and h.shape == (128, 128)
    assert torch.equal(h, random_spd_hessian(128, 0)) and not torch.equal(h, random_spd_hessian(128, 1))
    assert torch.equal(h, h.T) and torch.linalg.eigvalsh(h.double())[0] > 0
    d = h.diagonal()
    assert d.max() > 100 * d.median()  # outliers: 30x in magnitude, 900x in energy
    corr = h / torch.outer(d.sqrt(), d.sqrt())
    assert (corr - torch.eye(128)).abs().mean() > 0.1  # far from diagonal
