"""decompose(): method equivalences, Q + L·R beating Q alone, reported metrics, seeds, byte counts, bad input."""

import math

import pytest
import torch

from caldera.config import ConfigError, DecomposeConfig, Method
from caldera.core.decompose import decompose
from caldera.core.metrics import act_err, fro_err
from caldera.testing import correlated_inputs, lowrank_plus_noise, random_spd_hessian
from caldera.testing import reference as ref

M, N = 256, 512
CALDERA = DecomposeConfig(bq=2, rank=64, bl=4, br=4, iters=4, lr_iters=3)


@pytest.fixture(scope="module")
def problem() -> tuple[torch.Tensor, torch.Tensor]:
    """Low-rank-plus-noise W (M, N) and a correlated H (N, N) with outlier channels."""
    return lowrank_plus_noise(M, N, 32, seed=1, noise=0.3), random_spd_hessian(N, seed=2)


@pytest.fixture(scope="module")
def caldera_dec(problem):
    return decompose(*problem, CALDERA)


def small(seed: int = 0, m: int = 64, n: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    return lowrank_plus_noise(m, n, 8, seed=seed, noise=0.3), random_spd_hessian(n, seed=seed + 100)


def equal_or_none(x: torch.Tensor | None, y: torch.Tensor | None) -> bool:
    return x is None and y is None or (x is not None and y is not None and torch.equal(x, y))


def same_codes(a, b) -> bool:
    """Bit-identical Q, L, R (codes, scales, zeros) and incoherence signs of two decompositions."""
    for x, y in ((a.q, b.q), (a.l, b.l), (a.r, b.r)):
        if (x is None) != (y is None):
            return False
        if x is not None and not all(
            equal_or_none(*p) for p in ((x.codes, y.codes), (x.scales, y.scales), (x.zeros, y.zeros))
        ):
            return False
    signs = [(t.u_in.signs if t.u_in else None, t.u_out.signs if t.u_out else None) for t in (a, b)]
    return equal_or_none(signs[0][0], signs[1][0]) and equal_or_none(signs[0][1], signs[1][1])


@pytest.mark.parametrize(("method", "incoherence"), [(Method.GPTQ, False), (Method.LDLQ_HAD, True)])
def test_rank_zero_caldera_equals_ldlq_methods(method, incoherence):
    w, h = small(seed=3, m=128, n=256)
    base = decompose(w, h, DecomposeConfig.for_method(method, bq=3))
    cal = decompose(w, h, DecomposeConfig(rank=0, bq=3, iters=5, incoherence=incoherence))
    assert same_codes(base, cal)
    assert cal.act_err == base.act_err and len(cal.history) == 1  # rank 0: one round, whatever iters says
    assert (base.u_in is not None) == incoherence


def test_caldera_beats_rank_zero_ldlq(problem, caldera_dec):
    w, h = problem
    ldlq_had = decompose(w, h, DecomposeConfig.for_method("ldlq-had", bq=2))
    gptq = decompose(w, h, DecomposeConfig.for_method("gptq", bq=2))
    rtn = decompose(w, None, DecomposeConfig.for_method("rtn", bq=2))
    assert caldera_dec.rank == 64 and caldera_dec.shape == (M, N)
    assert caldera_dec.act_err < 0.7 * ldlq_had.act_err  # observed ~0.5
    assert ldlq_had.act_err < gptq.act_err  # incoherence helps at 2 bits with outlier channels
    assert gptq.act_err < act_err(w, rtn.dense(), h)


def test_reported_errors(problem, caldera_dec):
    """act_err is the best round's; dense() reproduces it against the original W and H."""
    w, h = problem
    dec = caldera_dec
    assert len(dec.history) == CALDERA.iters
    assert dec.act_err == min(dec.history)  # the kept iterate is the best round
    assert dec.history[-1] < dec.history[0]  # alternating helps over the first (Q then L·R) round
    assert act_err(w, dec.dense(), h) == pytest.approx(dec.act_err, abs=1e-4, rel=1e-4)
    assert ref.act_err(w.numpy(), dec.dense().numpy(), h.numpy()) == pytest.approx(dec.act_err, abs=1e-4, rel=1e-4)
    assert fro_err(w, dec.dense()) == pytest.approx(dec.fro_err, abs=1e-4, rel=1e-4)
    assert dec.damping == CALDERA.damping and dec.seconds > 0
    # dense() undoes the transforms: the transformed-domain approximation is far from W itself
    assert fro_err(w, dec.transformed()) > 0.5


def test_act_err_is_output_error_on_inputs():
    """act_err = ||(W - Ŵ) Xᵀ|| / ||W Xᵀ|| for the inputs X (N, n) that H = XᵀX / N comes from."""
    n = 96
    x = correlated_inputs(n, seed=4, tokens=300)  # (tokens, n) float64
    h = (x.T @ x / x.shape[0]).float()
    w, w_hat = lowrank_plus_noise(32, n, 4, seed=5), lowrank_plus_noise(32, n, 4, seed=6)
    want = torch.linalg.norm((w - w_hat).double() @ x.T) / torch.linalg.norm(w.double() @ x.T)
    assert act_err(w, w_hat, h) == pytest.approx(float(want), rel=1e-5)


def test_seeds():
    w, h = small(seed=7)
    cfg = DecomposeConfig(bq=2, rank=8, iters=2, lr_iters=2, randomized_svd=True, seed=5)
    a, b = decompose(w, h, cfg), decompose(w, h, cfg)
    assert same_codes(a, b) and torch.equal(a.dense(), b.dense()) and a.history == b.history
    c = decompose(w, h, DecomposeConfig(bq=2, rank=8, iters=2, lr_iters=2, randomized_svd=True, seed=6))
    assert not same_codes(a, c)
    assert not torch.equal(a.q.codes, c.q.codes) and not torch.equal(a.u_in.signs, c.u_in.signs)


def test_bits_per_weight_hand_count(caldera_dec):
    # Q: 256 rows * 512 cols * 2 bits / 8 = 32768 bytes, scales 256 * 8 groups * 2 bytes = 4096
    # L (256, 64) at 4 bits: 8192 + scales 256 * 1 * 2 = 512; R (64, 512) at 4 bits: 16384 + 64 * 8 * 2 = 1024
    # signs: (256 + 512) bits = 96 bytes
    nbytes = 32768 + 4096 + 8192 + 512 + 16384 + 1024 + 96
    assert caldera_dec.nbytes() == nbytes
    assert caldera_dec.bits_per_weight() == pytest.approx(8 * nbytes / (M * N), abs=1e-12)  # 3.8496...


def test_bits_per_weight_rank_zero():
    w, h = small(seed=8)
    # 64 x 128 at 3 bits with zero points: codes 64 * 48, scales 64 * 2 * 2, zeros 64 * 2
    gptq = decompose(w, h, DecomposeConfig.for_method("gptq", bq=3, zero_point=True))
    assert gptq.nbytes() == 64 * 48 + 256 + 128
    rtn = decompose(w, None, DecomposeConfig.for_method("rtn", bq=3, zero_point=True))
    assert rtn.nbytes() == gptq.nbytes()
    had = decompose(w, h, DecomposeConfig.for_method("ldlq-had", bq=3, zero_point=True))
    assert had.nbytes() == gptq.nbytes() + math.ceil((64 + 128) / 8)  # one sign bit per dimension


def test_rtn_ignores_hessian():
    w, h = small(seed=9)
    a = decompose(w, None, DecomposeConfig.for_method("rtn", bq=4))
    b = decompose(w, h, DecomposeConfig.for_method("rtn", bq=4))
    assert same_codes(a, b) and a.damping == 0.0
    assert a.act_err == pytest.approx(a.fro_err, rel=1e-6)  # H = I without a Hessian
    assert b.act_err == pytest.approx(act_err(w, b.dense(), h), rel=1e-5)


def test_inputs_not_modified():
    w, h = small(seed=10)
    w0, h0 = w.clone(), h.clone()
    decompose(w, h, DecomposeConfig(bq=2, rank=8, iters=2, lr_iters=1))
    assert torch.equal(w, w0) and torch.equal(h, h0)


@pytest.mark.parametrize(
    "bad",
    ["rank", "nan_weight", "inf_weight", "one_d_weight", "no_hessian"],
)
def test_bad_input_raises_config_error(bad):
    w, h = small(seed=11)
    cfg = DecomposeConfig(bq=2, rank=8, iters=1, lr_iters=0)
    if bad == "rank":
        cfg, match = DecomposeConfig(bq=2, rank=65, iters=1), "rank=65 exceeds min"
    elif bad == "nan_weight":
        w[3, 4], match = float("nan"), "NaN or Inf"
    elif bad == "inf_weight":
        w[0, 0], match = float("-inf"), "NaN or Inf"
    elif bad == "one_d_weight":
        w, match = w[0], "2-D"
    else:
        h, match = None, "needs a Hessian"
    with pytest.raises(ConfigError, match=match):
        decompose(w, h, cfg)


@pytest.mark.parametrize(
    "kw", [{"bq": 16}, {"bq": 5}, {"bl": 7}, {"br": 1}, {"rank": -1}, {"method": "gptq", "rank": 8}]
)
def test_bad_config_raises_config_error(kw):
    with pytest.raises(ConfigError, match=next(iter(kw))):
        DecomposeConfig(**kw)


@pytest.mark.parametrize(
    "method",
    ["gptq", "rtn"],
)
def test_wrong_hessian_shape_raises_config_error(method):
    w, _ = small(seed=12)  # (64, 128)
    with pytest.raises(ConfigError, match="127"):
        decompose(w, torch.eye(127), DecomposeConfig.for_method(method, bq=4))
