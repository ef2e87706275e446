"""Group quantizer: grids bit-exact against the per-element numpy reference, scale rules, rounding modes."""

import numpy as np
import pytest
import torch

from caldera.config import QuantConfig, Rounding
from caldera.core.quantize import (
    CLIP_RATIOS,
    QuantizedTensor,
    dequantize,
    fake_quantize,
    fit_scales,
    fp16_rounded,
    quantize,
    quantize_with,
)
from caldera.testing import reference as ref

BITS = (2, 3, 4, 8)
ROWS = 12
COLS = {"even": 256, "ragged": 200}  # 200 = 3 groups of 64 and a last group of 8


def weights(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Gaussian weights (rows, cols) with a few large outlier columns and one all-positive row."""
    g = torch.Generator().manual_seed(seed)
    w = 0.02 * torch.randn(rows, cols, generator=g)
    w[:, torch.randperm(cols, generator=g)[:3]] *= 15.0
    w[0] = w[0].abs()  # zero points matter when a group is one-sided
    return w


def zeros_np(qt: QuantizedTensor) -> np.ndarray | None:
    return None if qt.zeros is None else qt.zeros.numpy().astype(np.int64)


def group_sq_err(w: torch.Tensor, w_hat: torch.Tensor, group_size: int) -> torch.Tensor:
    """Squared error per (row, group), float64 (rows, ngroups)."""
    d = (w.double() - w_hat.double()).square()
    return torch.stack([c.sum(1) for c in d.split(group_size, dim=1)], dim=1)


@pytest.mark.parametrize("cols", COLS.values(), ids=COLS.keys())
@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", BITS)
def test_codes_bit_exact_given_scales(bits, zero_point, cols):
    w = weights(ROWS, cols, seed=bits * 10 + zero_point)
    cfg = QuantConfig(bits, 64, zero_point)
    qt = quantize(w, cfg)
    assert qt.codes.dtype == torch.uint8 and qt.scales.dtype == torch.float16
    assert qt.scales.shape == (ROWS, -(-cols // 64))
    want = ref.quantize_codes(w.numpy(), qt.scales.float().numpy(), zeros_np(qt), bits, 64)
    np.testing.assert_array_equal(qt.codes.numpy().astype(np.int64), want)
    assert qt.codes.max() <= 2**bits - 1


@pytest.mark.parametrize("cols", COLS.values(), ids=COLS.keys())
@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", BITS)
def test_scales_without_clip_search_match_reference(bits, zero_point, cols):
    """max-abs / ((2^b - 1) / 2), or (max - min) / (2^b - 1) with zero = round(-min / scale): bit-exact."""
    w = weights(ROWS, cols, seed=100 + bits)
    cfg = QuantConfig(bits, 64, zero_point, clip_search=False)
    scales, zeros = fit_scales(w, cfg)
    want_s, want_z = ref.fit_scales(w.numpy(), cfg)
    np.testing.assert_array_equal(scales.float().numpy(), want_s)
    if zero_point:
        np.testing.assert_array_equal(zeros.numpy().astype(np.int64), want_z)
    else:
        assert zeros is None


@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", [2, 3])
def test_clip_search_scales_match_reference(bits, zero_point):
    """Per group, the clip ratio with the least squared error (groups of full size)."""
    w = weights(ROWS, COLS["even"], seed=200 + bits)
    cfg = QuantConfig(bits, 64, zero_point, clip_search=True)
    scales, zeros = fit_scales(w, cfg)
    want_s, want_z = ref.fit_scales(w.numpy(), cfg, CLIP_RATIOS)
    # the search compares float32 sums against the reference's float64 ones: allow one near-tie in 48 groups
    assert (scales.float().numpy() != want_s).sum() <= 1
    if zero_point:
        assert (zeros.numpy() != want_z).sum() <= 1


@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", BITS)
def test_clip_search_never_worse_per_group(bits, zero_point):
    w = weights(32, COLS["even"], seed=300 + bits)
    clip = quantize(w, QuantConfig(bits, 64, zero_point, clip_search=True)).dequantize()
    plain = quantize(w, QuantConfig(bits, 64, zero_point, clip_search=False)).dequantize()
    e_clip, e_plain = group_sq_err(w, clip, 64), group_sq_err(w, plain, 64)
    assert (e_clip <= e_plain * (1 + 1e-5)).all()  # 1e-5: float32 sums in the search
    if bits <= 3:
        assert e_clip.sum() < 0.98 * e_plain.sum()  # and it helps at 2-3 bits (outlier groups gain least)


@pytest.mark.parametrize("bits", [2, 3])
def test_clip_search_never_worse_on_ragged_last_group(bits):
    w = weights(32, 66, seed=400 + bits)  # last group: 2 real columns, 62 pads
    clip = quantize(w, QuantConfig(bits, 64, clip_search=True)).dequantize()
    plain = quantize(w, QuantConfig(bits, 64, clip_search=False)).dequantize()
    e_clip, e_plain = group_sq_err(w, clip, 64)[:, -1], group_sq_err(w, plain, 64)[:, -1]
    assert (e_clip <= e_plain * (1 + 1e-5)).all()


@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
@pytest.mark.parametrize("bits", BITS)
def test_dequantized_values_lie_on_the_grid(bits, zero_point):
    w = weights(ROWS, COLS["ragged"], seed=500 + bits)
    qt = quantize(w, QuantConfig(bits, 64, zero_point))
    got = qt.dequantize(torch.float64).numpy()
    want = ref.dequantize(qt.codes.numpy(), qt.scales.float().numpy(), zeros_np(qt), bits, 64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # (code - offset) * scale, float32 product
    # each value is an integer level of its group's grid, within [0, 2^b - 1]
    scale = qt.scales.double().repeat_interleave(64, dim=1)[:, : w.shape[1]]
    off = (2**bits - 1) / 2 if qt.zeros is None else qt.zeros.double().repeat_interleave(64, dim=1)[:, : w.shape[1]]
    level = torch.from_numpy(got) / scale + off
    assert (level - level.round()).abs().max() < 1e-4
    assert level.min() > -1e-4 and level.max() < 2**bits - 1 + 1e-4


@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
def test_pow2_scales_are_powers_of_two(zero_point):
    w = weights(ROWS, COLS["ragged"], seed=600)
    cfg = QuantConfig(3, 64, zero_point, pow2_scales=True, clip_search=False)
    qt = quantize(w, cfg)
    log2 = torch.log2(qt.scales.double())
    assert torch.equal(log2, log2.round())
    # rounded up from the plain scale: s <= 2^k < 2s (the float32 log2 may land on the lower power at a boundary)
    plain, _ = fit_scales(w, QuantConfig(3, 64, zero_point, clip_search=False))
    ratio = qt.scales.double() / plain.double()
    assert ratio.min() >= 1 - 1e-3 and ratio.max() < 2 + 1e-3
    want = ref.quantize_codes(w.numpy(), qt.scales.float().numpy(), zeros_np(qt), 3, 64)
    np.testing.assert_array_equal(qt.codes.numpy().astype(np.int64), want)


def test_sixteen_bits_keeps_fp16():
    w = weights(ROWS, COLS["ragged"], seed=700)
    qt = quantize(w, QuantConfig(16, 64))
    assert qt.codes.dtype == torch.float16 and qt.scales is None and qt.zeros is None
    assert torch.equal(qt.codes, w.half())
    assert torch.equal(qt.dequantize(), w.half().float())
    assert qt.nbytes() == ROWS * COLS["ragged"] * 2


def test_stochastic_rounding_is_seeded():
    w = weights(ROWS, COLS["even"], seed=800)
    cfg = QuantConfig(2, 64, rounding=Rounding.STOCHASTIC, seed=3)
    a, b = quantize(w, cfg), quantize(w, cfg)
    assert torch.equal(a.codes, b.codes)
    other = quantize(w, QuantConfig(2, 64, rounding=Rounding.STOCHASTIC, seed=4))
    assert not torch.equal(a.codes, other.codes)
    explicit = quantize(w, QuantConfig(2, 64, rounding=Rounding.STOCHASTIC), torch.Generator().manual_seed(3))
    assert torch.equal(a.codes, explicit.codes)
    assert not torch.equal(a.codes, quantize(w, QuantConfig(2, 64)).codes)


@pytest.mark.parametrize("zero_point", [False, True], ids=["sym", "zp"])
def test_stochastic_rounding_is_unbiased(zero_point):
    """Over many draws on a fixed grid the mean of Q(w) is w; the error of each draw is below one step."""
    draws = 4000
    w = weights(1, 64, seed=900)
    cfg = QuantConfig(2, 64, zero_point, rounding=Rounding.STOCHASTIC, clip_search=False)
    scales, zeros = fit_scales(w, cfg)
    rep = w.expand(draws, -1).contiguous()  # (draws, 64): one draw per row, same grid
    s_rep = scales.expand(draws, -1)
    z_rep = None if zeros is None else zeros.expand(draws, -1)
    codes = quantize_with(rep, s_rep, z_rep, cfg, torch.Generator().manual_seed(0))
    deq = dequantize(codes, s_rep, z_rep, 2, 64)
    step = scales.float().item()
    assert (deq - rep).abs().max() < step * (1 + 1e-5)
    # per element the error has std <= step / 2, so its mean over the draws has std <= step / (2 sqrt(draws))
    assert (deq - rep).mean(0).abs().max() < 5 * step / (2 * draws**0.5)
    # nearest rounding, by contrast, is biased by up to step / 2 per element
    nearest = quantize_with(w, scales, zeros, QuantConfig(2, 64, zero_point))
    assert (dequantize(nearest, scales, zeros, 2, 64) - w).abs().max() > 10 * step / (2 * draws**0.5)


def test_nbytes_hand_count():
    w = weights(16, 200, seed=1000)
    # 3 bits: codes 16 rows * ceil(200 * 3 / 8) = 1200 bytes, fp16 scales 16 * 4 groups * 2 = 128, zeros 64
    assert quantize(w, QuantConfig(3, 64, zero_point=True)).nbytes() == 1200 + 128 + 64
    assert quantize(w, QuantConfig(3, 64)).nbytes() == 1200 + 128


def test_input_not_modified():
    w = weights(ROWS, COLS["ragged"], seed=1100)
    before = w.clone()
    quantize(w, QuantConfig(2, 64, zero_point=True))
    assert torch.equal(w, before)


@pytest.mark.parametrize("bits", (2, 4))
@pytest.mark.parametrize("zero_point", (False, True))
def test_fake_quantize_is_the_stored_grid_forward_and_identity_backward(bits, zero_point):
    cfg = QuantConfig(bits, 64, zero_point)
    w = weights(ROWS, COLS["ragged"], seed=7).requires_grad_(True)
    out = fake_quantize(w, cfg)
    assert torch.equal(out, quantize(w.detach(), cfg).dequantize())  # bit for bit
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(8))
    out.backward(upstream)
    assert torch.equal(w.grad, upstream)


def test_fp16_rounded_forward_rounds_backward_passes():
    x = torch.randn(50, generator=torch.Generator().manual_seed(9)).mul_(1e-3).requires_grad_(True)
    y = fp16_rounded(x)
    ref64 = x.detach().double().numpy().astype(np.float16).astype(np.float32)
    assert np.array_equal(y.detach().numpy(), ref64) and not torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(50))
