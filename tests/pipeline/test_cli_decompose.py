"""`caldera decompose` end to end through the CLI on tiny random models."""

import json
import math

import pytest
from typer.testing import CliRunner

from caldera.cli import app
from caldera.pipeline.decompose_model import PROJECTIONS

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--iters", "2", "--rank", "16"]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """Without --run, decompose writes a run directory under the cache: a fresh one per test."""
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))


def _invoke(*args):
    return runner.invoke(app, ["decompose", *args])


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def test_json_lines_one_per_layer_then_summary(llama_dir, tmp_path):
    result = _invoke("--model", str(llama_dir), *FAST, "--json")  # default calibration corpus
    assert result.exit_code == 0, result.output
    lines = _lines(result.stdout)
    assert [line.get("layer") for line in lines[:-1]] == [0, 1]
    for line in lines[:-1]:
        assert set(line) == {"layer", "proj"} and list(line["proj"]) == list(PROJECTIONS)
        for r in line["proj"].values():
            assert set(r) == {"act_err", "fro_err", "bits_per_weight", "seconds", "rank"}
            assert math.isfinite(r["act_err"]) and 0 < r["act_err"] < 1 and r["rank"] == 16
    summary = lines[-1]["summary"]
    assert set(summary) == {"layers", "bits_per_weight", "seconds", "act_err_median", "run"} and summary["layers"] == 2
    assert summary["run"].startswith(str(tmp_path / "cache" / "runs" / "llama-"))
    assert 0 < summary["act_err_median"] < 1 and summary["bits_per_weight"] > 2
    assert "━" not in result.stderr  # no progress bar with --json


def test_qwen2_selected_layer_gptq_human_output(qwen2_dir, calib_file):
    result = _invoke("--model", str(qwen2_dir), "--calib", str(calib_file), *FAST, "--layers", "1", "--method", "gptq")
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # human output goes to stderr
    assert "layer   1" in result.stderr and "layer   0" not in result.stderr and "1 layers:" in result.stderr


def test_rank_clamp_warns_once_per_projection_type_and_reports_the_rank(llama_dir, calib_file):
    args = ["--model", str(llama_dir), "--calib", str(calib_file), "--samples", "4", "--seq-len", "32"]
    result = _invoke(*args, "--iters", "1", "--rank", "48", "--json")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert sorted(warnings) == [
        "warning: k_proj is 32×64: rank 48 > min(m, n), clamped to 32",
        "warning: v_proj is 32×64: rank 48 > min(m, n), clamped to 32",
    ]
    for line in _lines(result.stdout)[:-1]:
        expected = {p: 32 if p in ("k_proj", "v_proj") else 48 for p in PROJECTIONS}
        assert {p: r["rank"] for p, r in line["proj"].items()} == expected


def _unsupported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    return tmp_path


@pytest.mark.parametrize(
    ("make_args", "needle"),
    [
        (lambda d, tmp, c: ["--model", str(tmp / "nope")], "no such model folder"),
        (lambda d, tmp, c: ["--model", str(tmp)], "no config.json"),
        (lambda d, tmp, c: ["--model", str(_unsupported(tmp))], "'gpt2' is not supported; supported: llama, qwen2"),
        (lambda d, tmp, c: ["--model", str(d), "--layers", "0-x"], "bad layer spec '0-x'"),
        (lambda d, tmp, c: ["--model", str(d), "--layers", "2"], "layer 2 is out of range: the model has 2 layers"),
        (lambda d, tmp, c: ["--model", str(d), "--method", "awq"], "method='awq' is not one of"),
        (lambda d, tmp, c: ["--model", str(d), "--bq", "5"], "bq=5 is not supported"),
        (lambda d, tmp, c: ["--model", str(d), "--calib", str(c), "--samples", "64", "--seq-len", "4096"], "tokens"),
        (lambda d, tmp, c: ["--model", str(d), "--calib", str(tmp / "missing.txt")], "no such file"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(llama_dir, calib_file, tmp_path, make_args, needle):
    result = _invoke(*make_args(llama_dir, tmp_path, calib_file))
    assert result.exit_code == 2, result.output
    assert needle in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
