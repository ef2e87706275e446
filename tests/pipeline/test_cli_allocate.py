"""`caldera allocate`: probes a calibrated run, writes overrides within the budget that decompose then follows."""

import json

import yaml
from typer.testing import CliRunner

from caldera.cli import app

runner = CliRunner()


def test_allocate_then_decompose_meets_the_budget(qwen2_dir, calib_file, tmp_path):
    run, rules = tmp_path / "run", tmp_path / "alloc.yaml"
    calib = ["calibrate", "--model", str(qwen2_dir), "--data", str(calib_file), "--samples", "4", "--seq-len", "32"]
    assert runner.invoke(app, [*calib, "--run", str(run)]).exit_code == 0
    result = runner.invoke(app, ["allocate", "--run", str(run), "--out", str(rules), "--budget", "3.5", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["bits_per_weight"] <= 3.5 and info["profile"] == "balanced"
    overrides = yaml.safe_load(rules.read_text())
    assert len(overrides) == 2 * 7 and set(overrides["layers.0.mlp.down_proj"]) == {"rank", "bq"}
    assert len({(r["rank"], r["bq"]) for r in overrides.values()}) > 1  # not uniform
    assert json.loads((run / "allocation.json").read_text())["overrides"] == overrides
    probes = run / "sensitivity.json"
    stamp = probes.stat().st_mtime_ns
    again = runner.invoke(app, ["allocate", "--run", str(run), "--out", str(rules), "--budget", "3.5", "--json"])
    assert again.exit_code == 0 and json.loads(again.stdout) == info  # the stored probes, not new ones
    assert probes.stat().st_mtime_ns == stamp and yaml.safe_load(rules.read_text()) == overrides
    args = ["decompose", "--model", str(qwen2_dir), "--run", str(run), "--iters", "1", "--overrides", str(rules)]
    done = runner.invoke(app, [*args, "--json"])
    assert done.exit_code == 0, done.output
    summary = json.loads(done.stdout.splitlines()[-1])["summary"]
    assert abs(summary["bits_per_weight"] - info["bits_per_weight"]) < 0.02  # the writer's bits, biases aside


def test_allocate_errors(qwen2_dir, tmp_path):
    out = str(tmp_path / "a.yaml")
    result = runner.invoke(app, ["allocate", "--run", str(tmp_path / "none"), "--out", out])
    assert result.exit_code != 0 and "no calibration" in result.output
    result = runner.invoke(app, ["allocate", "--run", str(tmp_path), "--out", out, "--profile", "greedy"])
    assert result.exit_code != 0 and "profile 'greedy'" in result.output
