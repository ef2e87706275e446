"""Sensitivity probes (predicted error vs the decomposition's) and the greedy allocator (vs brute force)."""

import itertools
import random

import numpy as np
import pytest

from caldera.config import DecomposeConfig
from caldera.core.allocate import Option, allocate, lower_hull
from caldera.core.decompose import decompose
from caldera.core.sensitivity import probe
from caldera.testing.synthetic import synthetic_hessian, synthetic_weight


def test_probe_at_rank_0_is_the_ldlq_error_and_the_tail_falls_with_rank():
    w, h = synthetic_weight(96, 128, seed=1), synthetic_hessian(128, seed=2)
    cfg = DecomposeConfig(method="ldlq-had", rank=0, bq=2, seed=3)
    s = probe(w, h, cfg, max_rank=64)
    dec = decompose(w, h, cfg)  # the same LDLQ (same seed, damping): the probe's rank-0 error is its error
    assert s.rel_error(2, 0) == pytest.approx(dec.act_err, rel=2e-2)  # damped vs undamped H^½ only
    wd = w.double().numpy()
    assert s.energy == pytest.approx(float(np.trace(wd @ h.double().numpy() @ wd.T)), rel=1e-5)
    errs = [s.rel_error(2, k) for k in (0, 8, 16, 32, 64)]
    assert all(a > b for a, b in itertools.pairwise(errs)) and s.rel_error(3, 0) == pytest.approx(errs[0] / 2)


def test_predicted_rank_gain_tracks_caldera():
    """CALDERA at rank k lands near the probe's prediction (the factors are quantized and Q is refit)."""
    w, h = synthetic_weight(128, 128, seed=4, rank=16), synthetic_hessian(128, seed=5)
    cfg = DecomposeConfig(rank=0, bq=2, seed=6, iters=2)
    s = probe(w, h, DecomposeConfig(method="ldlq-had", rank=0, bq=2, seed=6), max_rank=64)
    for k in (16, 32):
        dec = decompose(w, h, DecomposeConfig(rank=k, bq=2, bl=16, br=16, seed=6, iters=2))
        assert dec.act_err < s.rel_error(2, 0)  # the low rank helps, as predicted
        assert 0.5 < dec.act_err / s.rel_error(2, k) < 1.5, (k, dec.act_err, s.rel_error(2, k))
    assert cfg.rank == 0


def _options(rng: random.Random, n: int) -> list[Option]:
    opts = [Option(2, 0, 100, 10.0)]
    bits, err = 100, 10.0
    for r in range(1, n):
        bits += rng.randint(5, 40)
        err *= rng.uniform(0.3, 1.05)  # some options are no better: not on the hull
        opts.append(Option(2, r, bits, err))
    return opts


def test_lower_hull_is_convex_and_drops_dominated_options():
    rng = random.Random(0)
    hull = lower_hull(_options(rng, 12))
    assert [o.bits for o in hull] == sorted(o.bits for o in hull)
    assert all(a.sq_error > b.sq_error for a, b in itertools.pairwise(hull))
    slopes = [(a.sq_error - b.sq_error) / (b.bits - a.bits) for a, b in itertools.pairwise(hull)]
    assert all(a >= b for a, b in itertools.pairwise(slopes))  # convex: diminishing returns


@pytest.mark.parametrize("seed", range(5))
def test_greedy_is_within_budget_and_near_the_brute_force_optimum(seed):
    rng = random.Random(seed)
    options = {k: _options(rng, 5) for k in range(4)}
    budget = 4 * 100 + rng.randint(30, 120)
    chosen = allocate(options, budget)
    assert sum(o.bits for o in chosen.values()) <= budget
    best = min(
        sum(o.sq_error for o in combo)
        for combo in itertools.product(*options.values())
        if sum(o.bits for o in combo) <= budget
    )
    greedy = sum(o.sq_error for o in chosen.values())
    assert best <= greedy <= 1.5 * best  # greedy on convex hulls: optimal at hull vertices, close otherwise
    with pytest.raises(ValueError, match="cheapest"):
        allocate(options, 399)
