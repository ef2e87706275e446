"""Kept weights (``protect``): the most important weights stored exactly beside Q, through format and runtime."""

import numpy as np
import pytest
import torch

from caldera.config import ConfigError, DecomposeConfig
from caldera.core.decompose import decompose, layout, protected_count
from caldera.io.packed_format import FormatError, incoherence_blocks, linear_metadata, linear_tensors, read_linear
from caldera.runtime.compressed import CompressedLinear
from caldera.testing import lowrank_plus_noise, random_spd_hessian
from caldera.testing.format_reference import doc_forward

M, N = 80, 96
FAST = {"iters": 2, "lr_iters": 1}
PREFIX = "model.layers.0.mlp.down_proj"


def problem(seed: int = 0):
    """W (M, N) with 12 weights scaled ×25 (super weights) and an SPD H (N, N)."""
    w, h = lowrank_plus_noise(M, N, 8, seed=seed, noise=0.3), random_spd_hessian(N, seed=seed + 1)
    pick = torch.randperm(M * N, generator=torch.Generator().manual_seed(seed + 2))[:12]
    w.view(-1)[pick] *= 25.0
    return w, h


def act_err64(w: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> float:
    d, w, h = (t.double().numpy() for t in (approx - w, w, h))
    return float(np.sqrt(np.trace(d @ h @ d.T) / np.trace(w @ h @ w.T)))


@pytest.mark.parametrize("method,rank,incoherence", [("caldera", 8, True), ("gptq", 0, False), ("rtn", 0, False)])
def test_kept_weights_are_the_most_important_and_exact(method, rank, incoherence):
    w, h = problem()
    cfg = DecomposeConfig.for_method(method, rank=rank, protect=0.005, **FAST)
    dec = decompose(w, h, cfg)
    k = protected_count(M, N, 0.005)
    importance = (w.double().numpy() ** 2) * np.diag(h.double().numpy())  # w_ij² · H_jj
    expected = np.sort(np.argsort(-importance.reshape(-1), kind="stable")[:k])
    assert dec.outliers.index.dtype == torch.int32 and np.array_equal(dec.outliers.index.numpy(), expected)
    dense = dec.dense().double().reshape(-1)[expected]
    kept = w.double().view(-1)[expected]
    assert torch.allclose(dense, kept, rtol=2e-3, atol=1e-6)  # fp16 rounding of the difference, no more
    assert dec.act_err == pytest.approx(act_err64(w, dec.dense(), h), rel=1e-4)  # the final Ŵ's error
    plain = decompose(w, h, DecomposeConfig.for_method(method, rank=rank, **FAST))
    assert dec.act_err < 0.9 * plain.act_err  # super weights kept: a clearly smaller error
    assert dec.nbytes() == plain.nbytes() + 6 * k == layout((M, N), cfg).nbytes()


def test_format_round_trip_and_runtime_forward_against_float64():
    w, h = problem(seed=3)
    dec = decompose(w, h, DecomposeConfig(rank=8, protect=0.002, **FAST))
    meta, tensors = linear_metadata(dec), linear_tensors(PREFIX, dec)
    tensors |= incoherence_blocks([dec])
    assert meta["outliers"] == protected_count(M, N, 0.002)
    linear = read_linear(tensors, PREFIX, meta)
    assert torch.allclose(linear.dense_weight(), dec.dense(), atol=1e-5)
    module = CompressedLinear(tensors, PREFIX, meta)
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(4))
    expected = doc_forward(tensors, PREFIX, meta, x)  # docs/FORMAT.md §6 in float64
    assert torch.allclose(module(x).double(), expected, rtol=1e-4, atol=1e-4)
    assert torch.allclose(expected, x.double() @ dec.dense().double().T, rtol=1e-4, atol=1e-4)
    assert torch.allclose(module.dense_weight(), dec.dense(), atol=1e-5)
    assert module.nbytes() == dec.nbytes()


def test_bad_outlier_tensors_are_format_errors():
    w, h = problem(seed=5)
    dec = decompose(w, h, DecomposeConfig(rank=0, method="gptq", protect=0.002, **FAST))
    meta, tensors = linear_metadata(dec), linear_tensors(PREFIX, dec)
    index = tensors[f"{PREFIX}.outlier_index"]
    with pytest.raises(FormatError, match="ascend"):
        read_linear(tensors | {f"{PREFIX}.outlier_index": index.flip(0)}, PREFIX, meta)
    with pytest.raises(FormatError, match="outlier_value: contains NaN"):
        bad = tensors[f"{PREFIX}.outlier_value"].clone()
        bad[0] = float("nan")
        read_linear(tensors | {f"{PREFIX}.outlier_value": bad}, PREFIX, meta)
    with pytest.raises(FormatError, match="unexpected tensor .*outlier_index"):
        read_linear(tensors, PREFIX, {k: v for k, v in meta.items() if k != "outliers"})
    with pytest.raises(FormatError, match="outliers="):
        read_linear(tensors, PREFIX, meta | {"outliers": -1})


def test_protect_is_validated_and_absent_from_old_specs():
    assert "protect" not in DecomposeConfig().to_dict()  # run directories made before it stay valid
    assert DecomposeConfig(protect=1e-4).to_dict()["protect"] == 1e-4
    with pytest.raises(ConfigError, match="protect"):
        DecomposeConfig(protect=0.5)
