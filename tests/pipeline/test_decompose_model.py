"""Per-layer decomposition of a tiny model: layer specs, seeds, rank clamping, results and summary."""

import dataclasses
import math

import pytest
import torch

from caldera.config import ConfigError, DecomposeConfig, Method
from caldera.io.model_folder import load_model
from caldera.pipeline.decompose_model import (
    PROJECTIONS,
    LayerResult,
    MatrixResult,
    decompose_layers,
    parse_layers,
    per_projection,
    projection_seed,
    projection_shapes,
    rank_clamps,
    resolve_device,
    summarize,
)
from caldera.testing.model_hessians import collect_hessians


@pytest.mark.parametrize(
    ("spec", "expected"),
    [(None, list(range(30))), ("", list(range(30))), ("0-3", [0, 1, 2, 3]), ("5", [5]), ("0,2,4-6", [0, 2, 4, 5, 6])],
)
def test_parse_layers(spec, expected):
    assert parse_layers(spec, 30) == expected


def test_parse_layers_merges_overlaps_and_sorts():
    assert parse_layers("6, 4-6,0", 30) == [0, 4, 5, 6]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("a", "bad layer spec 'a'"),
        ("1-", "bad layer spec '1-'"),
        ("-1", "bad layer spec '-1'"),
        ("0,,2", "bad layer spec ''"),
        ("1-2-3", "bad layer spec"),
        ("3-1", "start is after end"),
        ("30", "layer 30 is out of range: the model has 30 layers (0-29)"),
        ("28-31", "layer 31 is out of range"),
    ],
)
def test_bad_layer_specs(spec, needle):
    with pytest.raises(ConfigError) as info:
        parse_layers(spec, 30)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_projection_seeds_are_fixed_and_distinct():
    seeds = {projection_seed(0, i, p) for i in range(30) for p in PROJECTIONS}
    assert len(seeds) == 30 * len(PROJECTIONS)
    assert all(0 <= s < 2**31 for s in seeds)
    assert projection_seed(0, 3, "q_proj") == projection_seed(0, 3, "q_proj") != projection_seed(1, 3, "q_proj")


def test_rank_clamps_once_per_projection_type():
    shapes = {(i, p): (32, 64) if p in ("k_proj", "v_proj") else (64, 64) for i in range(2) for p in PROJECTIONS}
    assert rank_clamps(shapes, 48) == {"k_proj": ((32, 64), 32), "v_proj": ((32, 64), 32)}
    assert rank_clamps(shapes, 32) == {}
    assert rank_clamps(shapes, 0) == {}


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="not supported"):
        resolve_device("meta")
    with pytest.raises(ConfigError, match="not understood"):
        resolve_device("gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def tiny(llama_dir):
    model = load_model(llama_dir)
    ids = torch.randint(0, model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(0))
    return model, collect_hessians(model, ids)


def test_decompose_layers_yields_each_layer_with_every_projection(tiny):
    model, hessians = tiny
    cfg = DecomposeConfig(rank=48, iters=2)
    seen = []
    results = list(
        decompose_layers(model, hessians, [1, 0], cfg, keep=True, on_matrix=lambda i, p, r: seen.append((i, p)))
    )
    assert [r.layer for r in results] == [1, 0]
    assert seen == [(i, p) for i in (1, 0) for p in PROJECTIONS]
    shapes = projection_shapes(model, [0, 1])
    for layer in results:
        assert list(layer.proj) == list(PROJECTIONS)
        for proj, r in layer.proj.items():
            m, n = shapes[layer.layer, proj]
            assert r.rank == min(48, m, n) == r.decomposition.rank and r.numel == m * n
            assert 0 < r.act_err < 1 and math.isfinite(r.fro_err) and r.bits_per_weight > 2 and r.seconds > 0
            assert set(r.to_dict()) == {"act_err", "fro_err", "bits_per_weight", "seconds", "rank"}
            # the matrix was decomposed with its own seed: its incoherence signs come from it
            assert r.decomposition.u_in.seed == 2 * projection_seed(cfg.seed, layer.layer, proj) + 1
    signs = [r.decomposition.u_in.signs for r in results[0].proj.values() if r.decomposition.u_in.n == 64]
    assert not torch.equal(signs[0], signs[1])


def test_decompose_layers_is_reproducible_and_beats_rank_zero(tiny):
    model, hessians = tiny
    cfg = DecomposeConfig(rank=16, iters=2, seed=3)
    first, again = (next(decompose_layers(model, hessians, [0], cfg)) for _ in range(2))
    assert {p: r.act_err for p, r in first.proj.items()} == {p: r.act_err for p, r in again.proj.items()}
    ldlq = next(decompose_layers(model, hessians, [0], DecomposeConfig.for_method(Method.LDLQ_HAD, seed=3)))
    for proj in PROJECTIONS:
        assert ldlq.proj[proj].rank == 0
        assert first.proj[proj].act_err < ldlq.proj[proj].act_err


def _result(act_err: float, bpw: float, numel: int) -> MatrixResult:
    return MatrixResult(act_err, 0.1, bpw, 1.0, 0, numel)


def test_summary_weights_bits_by_element_count():
    a = LayerResult(0, {"q_proj": _result(0.1, 2.0, 300), "k_proj": _result(0.3, 6.0, 100)})
    b = LayerResult(1, {"q_proj": _result(0.2, 2.0, 300), "k_proj": _result(0.5, 6.0, 100)})
    summary = summarize([a, b], seconds=12.5)
    assert summary == {"layers": 2, "bits_per_weight": 3.0, "seconds": 12.5, "act_err_median": 0.25}
    table = per_projection([a, b])
    assert table["k_proj"] == {"min": 0.3, "median": 0.4, "max": 0.5, "bits_per_weight": 6.0}
    assert dataclasses.asdict(a.proj["q_proj"])["numel"] == 300 and "numel" not in a.to_dict()["proj"]["q_proj"]
