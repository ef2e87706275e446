"""Sweep specs: YAML matrices expanded into configs, rank rules, unknown keys, the Pareto front."""

from pathlib import Path

import pytest
import yaml

from caldera.config import ConfigError
from caldera.io.model_shapes import model_shape
from caldera.pipeline.sweep import expand, linears_bits, pareto, parse_spec

SWEEPS = Path(__file__).resolve().parents[2] / "sweeps"


def _spec(text: str, tmp_path: Path):
    return parse_spec(yaml.safe_load(text), "s", tmp_path)


def test_grid_and_baselines_expand_in_order(qwen2_dir, tmp_path):
    spec = _spec(
        """
fixed: {method: caldera, bq: 2, iters: 2}
grid: {lr_bits: [4, 16], rank: [8, 16]}
baselines: [{method: gptq, bq: 3, group_size: 128, zero_point: true}]
""",
        tmp_path,
    )
    configs = expand(spec, qwen2_dir)
    assert [(c.cfg.bl, c.cfg.br, c.cfg.rank, c.baseline) for c in configs] == [
        (4, 4, 8, False), (4, 4, 16, False), (16, 16, 8, False), (16, 16, 16, False), (4, 4, 0, True)
    ]  # fmt: skip
    gptq = configs[-1].cfg
    assert (gptq.method.value, gptq.bq, gptq.group_size, gptq.zero_point, gptq.incoherence) == (
        "gptq", 3, 128, True, False
    )  # fmt: skip
    assert all(c.calibration["samples"] == 64 and c.calibration["seq_len"] == 256 for c in configs)


def test_calibration_keys_in_the_grid_change_only_the_calibration(qwen2_dir, tmp_path):
    spec = _spec("calibration: {seq_len: 32}\nfixed: {rank: 8}\ngrid: {samples: [4, 8]}", tmp_path)
    configs = expand(spec, qwen2_dir)
    assert [c.calibration["samples"] for c in configs] == [4, 8]
    assert {c.calibration["seq_len"] for c in configs} == {32} and configs[0].cfg == configs[1].cfg


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("fixed: {rnak: 8}", "rnak"),
        ("grid: {rank: [8], bits: [2]}", "bits"),
        ("calibration: {tokens: 5}", "tokens"),
        ("eval: {windows: 5}", "windows"),
        ("sweeps: 1", "sweeps"),
        ("baselines: [{method: rtn, zp: true}]", "zp"),
        ("fixed: {rank: {fraction: 0.5, bits_per_weight: 3}}", "exactly one"),
        ("fixed: {rank: {percent: 5}}", "percent"),
    ],
)
def test_unknown_keys_are_errors_naming_the_key(text, key, qwen2_dir, tmp_path):
    with pytest.raises(ConfigError, match=key):
        expand(_spec(text, tmp_path), qwen2_dir)


def test_rank_from_a_fraction_and_from_a_bits_budget(qwen2_dir, tmp_path):
    shape = model_shape(qwen2_dir)
    spec = _spec("fixed: {iters: 2}\ngrid: {rank: [{fraction: 0.25}, {bits_per_weight: 3.5}]}", tmp_path)
    by_fraction, by_bits = expand(spec, qwen2_dir)
    assert by_fraction.cfg.rank == round(0.25 * shape.hidden) and by_fraction.rank_rule == "fraction 0.25"
    k = by_bits.cfg.rank
    assert linears_bits(shape, by_bits.cfg, k) <= 3.5 < linears_bits(shape, by_bits.cfg, k + 1)
    with pytest.raises(ConfigError, match="below Q alone"):
        expand(_spec("fixed: {rank: {bits_per_weight: 2.0}}", tmp_path), qwen2_dir)  # Q alone is 2.25 + signs


def test_the_shipped_sweeps_parse_and_expand(tmp_path):
    shape_dir = tmp_path / "m"  # the default model's config alone: expanding needs only its shapes
    shape_dir.mkdir()
    (shape_dir / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, '
        '"num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": true}'
    )
    sizes = {}
    for path in sorted(SWEEPS.glob("*.yaml")):
        spec = parse_spec(yaml.safe_load(path.read_text()), path.stem, path.parent)
        sizes[path.stem] = len(expand(spec, shape_dir))
    assert sizes == {"baselines": 6, "calibration": 3, "protect": 6, "stage1": 8}


def test_pareto_front_against_a_brute_force_definition():
    points = [(2.0, 50.0), (2.5, 40.0), (2.5, 45.0), (3.0, 40.0), (4.0, 30.0), (1.9, 80.0), (4.0, 30.0)]
    assert pareto(points) == [True, True, False, False, True, True, True]
