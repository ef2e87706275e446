"""Per-layer overrides: patterns, order, errors; a decomposed + exported model follows them and loads exactly."""

import json

import pytest
import torch
from typer.testing import CliRunner

import caldera
from caldera.cli import app
from caldera.config import ConfigError, DecomposeConfig
from caldera.eval.evaluate import size_stats
from caldera.eval.report import settings
from caldera.pipeline.overrides import Overrides, load_overrides
from tests.runtime.test_load import dense_reference

runner = CliRunner()
BASE = DecomposeConfig(rank=16, iters=1)


def test_rules_match_layers_and_projections_and_later_rules_win():
    rules = Overrides.parse(
        {
            "layers.*.self_attn": {"rank": 8},
            "layers.0-1,3.mlp.down_proj": {"rank": 32, "bq": 3},
            "down_proj": {"bl": 16},
            "layers.3": {"bq": 4},
        }
    )
    pick = lambda layer, proj: rules.apply(BASE, layer, proj)  # noqa: E731
    assert (pick(0, "q_proj").rank, pick(0, "q_proj").bq) == (8, 2)
    assert (pick(1, "down_proj").rank, pick(1, "down_proj").bq, pick(1, "down_proj").bl) == (32, 3, 16)
    assert (pick(2, "down_proj").rank, pick(2, "down_proj").bq, pick(2, "down_proj").bl) == (16, 2, 16)
    assert pick(3, "down_proj").bq == 4 and pick(3, "up_proj").bq == 4  # the later whole-layer rule wins
    assert pick(2, "gate_proj") == BASE
    assert Overrides.parse(rules.to_dict()) == rules  # the run spec's form round-trips


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"layers.0.mlp.down_proj": {"rnak": 8}}, "unknown field 'rnak'"),
        ({"layers.0.mlp.dwn_proj": {"rank": 8}}, "not a projection"),
        ({"layers.3-1.mlp": {"rank": 8}}, "bad layer set"),
        ({"layers.a.mlp": {"rank": 8}}, "bad layer set"),
        ({"layers.0": {"rank": "8"}}, "integers"),
        ({"layers.0": {}}, "give a mapping"),
    ],
)
def test_malformed_rules_are_errors_naming_the_rule(rules, message):
    with pytest.raises(ConfigError, match=message):
        Overrides.parse(rules)


def test_check_against_the_model_and_the_config():
    with pytest.raises(ConfigError, match="layers 0-1"):
        Overrides.parse({"layers.2": {"rank": 4}}).check(BASE, 2)
    with pytest.raises(ConfigError, match="bq=5"):
        Overrides.parse({"layers.0": {"bq": 5}}).check(BASE, 2)
    with pytest.raises(ConfigError, match="no low-rank part"):
        Overrides.parse({"layers.0": {"rank": 4}}).check(DecomposeConfig.for_method("gptq"), 2)


def test_load_overrides_file_errors(tmp_path):
    path = tmp_path / "o.yaml"
    path.write_text("[1, 2]\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_overrides(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_overrides(tmp_path / "missing.yaml")


def test_decompose_export_load_with_overrides(qwen2_dir, calib_file, tmp_path):
    rules = {"layers.*.self_attn": {"rank": 8}, "layers.1.mlp.down_proj": {"rank": 24, "bq": 3, "bl": 16}}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    run, out = tmp_path / "run", tmp_path / "out"
    args = ["decompose", "--model", str(qwen2_dir), "--calib", str(calib_file), "--samples", "4", "--seq-len", "32"]
    args += ["--iters", "1", "--rank", "16", "--run", str(run), "--overrides", str(tmp_path / "rules.json"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(out)]).exit_code == 0
    metrics = json.loads((out / "caldera_metrics.json").read_text())["layers"]
    ranks = {(m["layer"], p): r["rank"] for m in metrics for p, r in m["proj"].items()}
    assert ranks[0, "q_proj"] == ranks[1, "o_proj"] == 8 and ranks[0, "down_proj"] == 16 and ranks[1, "down_proj"] == 24
    stats = size_stats(out)
    assert stats["overrides"] == 2 and settings(stats).endswith("/+2 rules")  # the quality table says so
    model = caldera.load(out)
    down = model.model.layers[1].mlp.down_proj
    assert (down.q.bits, down.l.bits) == (3, 16) and model.model.layers[0].mlp.down_proj.q.bits == 2
    ids = torch.randint(3, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, expected = model(ids).logits, dense_reference(qwen2_dir, out)(ids).logits
    assert ((logits - expected).norm() / expected.norm()).item() < 1e-5  # float32 rounding only
    (tmp_path / "rules.json").write_text(json.dumps({"layers.*.self_attn": {"rank": 4}}))
    again = runner.invoke(app, args)  # the same run with other rules: refused, naming the setting
    assert again.exit_code != 0 and "overrides" in again.output


def test_run_tags_tell_override_sets_apart():
    from caldera.cli.run_job import method_tag

    a, b = Overrides.parse({"layers.0": {"rank": 4}}), Overrides.parse({"layers.0": {"rank": 8}})
    assert method_tag(BASE) == "caldera-q2-l4-r4-k16-g64-i1"
    assert method_tag(BASE, a).startswith(method_tag(BASE) + "-o") and method_tag(BASE, a) != method_tag(BASE, b)
    assert method_tag(BASE, a) == method_tag(BASE, Overrides.parse({"layers.0": {"rank": 4}}))  # stable
