"""Perplexity against a float64 reference, evaluation windows, `caldera eval` / `caldera report` on tiny exports."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from caldera.cli import app
from caldera.eval.perplexity import perplexity
from caldera.io.calibration import CalibrationError, evaluation_windows
from caldera.io.model_folder import load_model, load_tokenizer
from caldera.pipeline.export import verify

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--iters", "2"]


def test_perplexity_equals_a_float64_reference(qwen2_dir):
    model = load_model(qwen2_dir)
    windows = torch.randint(3, 259, (5, 17), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, windows, batch_size=2)  # batches of 2, 2, 1
    nll = 0.0
    with torch.no_grad():
        for w in windows:
            logp = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            nll -= logp[torch.arange(16), w[1:]].sum().item()
    assert result.predictions == 5 * 16 and result.windows == 5
    assert result.nll == pytest.approx(nll / 80, rel=1e-6) and result.ppl == pytest.approx(math.exp(nll / 80), rel=1e-6)


def test_evaluation_windows_are_consecutive_and_budgeted(qwen2_dir):
    tokenizer = load_tokenizer(qwen2_dir)
    texts = ["abcdefghij" * 5, "klmnopqrst" * 5]  # 50 + 1 (EOS) + 50 byte tokens
    stream = tokenizer(texts[0], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    stream += tokenizer(texts[1], add_special_tokens=False)["input_ids"]
    windows = evaluation_windows(tokenizer, texts, 20)
    assert windows.shape == (5, 20) and windows.flatten().tolist() == stream[:100]
    assert evaluation_windows(tokenizer, texts, 20, max_tokens=45).shape == (2, 20)
    with pytest.raises(CalibrationError, match="fewer than one 200-token window"):
        evaluation_windows(tokenizer, texts, 200)


@pytest.fixture(scope="module")
def evaluated(qwen2_dir, calib_file, tmp_path_factory):
    """Two exports of tiny Qwen2 (caldera rank 16, rtn), each evaluated against the original with --json."""
    tmp = tmp_path_factory.mktemp("eval")
    results = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CALDERA_CACHE", str(tmp / "cache"))  # the baseline ppl cache, not the user's
        for method, extra in (("caldera", ["--rank", "16"]), ("rtn", [])):
            results[method] = _decompose_export_eval(qwen2_dir, calib_file, tmp, method, extra)
    return results


def _decompose_export_eval(qwen2_dir, calib_file, tmp, method, extra):
    run, out = tmp / f"run-{method}", tmp / f"out-{method}"
    args = ["decompose", "--model", str(qwen2_dir), "--calib", str(calib_file), *FAST, "--method", method]
    assert runner.invoke(app, [*args, *extra, "--run", str(run), "--json"]).exit_code == 0
    assert runner.invoke(app, ["export", "--run", str(run), "--out", str(out)]).exit_code == 0
    args = ["eval", "--model", str(out), "--baseline", str(qwen2_dir), "--data", str(calib_file)]
    result = runner.invoke(app, [*args, "--seq-len", "64", "--max-tokens", "2048", "--json"])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_eval_json_and_report(evaluated, tmp_path):
    out, result = evaluated["caldera"]
    for key in ("ppl", "baseline_ppl", "ppl_delta_pct", "bits_per_weight", "bits_per_weight_total", "bytes_total"):
        assert isinstance(result[key], float | int), key
    assert result["windows"] == 32 and result["predictions"] == 32 * 63 and result["method"] == "caldera"
    assert result["ppl_delta_pct"] == pytest.approx(100 * (result["ppl"] / result["baseline_ppl"] - 1))
    assert result["ppl"] != result["baseline_ppl"] and result["rank"] == 16
    config = json.loads((out / "config.json").read_text())["quantization_config"]["stats"]
    assert result["bits_per_weight"] == config["bits_per_weight"] and result["bytes_total"] == config["tensor_bytes"]
    report = out / "report"
    assert json.loads((report / "eval.json").read_text())["ppl"] == result["ppl"]
    assert "| caldera | 2/4/4/r16/g64 |" in (report / "report.md").read_text()
    assert (report / "layer_errors.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    verify(out)  # the report does not break the manifest


def test_baseline_ppl_is_cached_and_equal(evaluated):
    (_, caldera), (_, rtn) = evaluated["caldera"], evaluated["rtn"]
    assert caldera["baseline_cached"] is False and rtn["baseline_cached"] is True  # same model and windows
    assert caldera["baseline_ppl"] == rtn["baseline_ppl"]


def test_report_compares_several_models(evaluated, tmp_path):
    folders = [str(out) for out, _ in evaluated.values()]
    result = runner.invoke(app, ["report", *folders, "--out", str(tmp_path / "cmp"), "--json"])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| original | fp16 |" in table and "| rtn | 2/–/–/r0/g64 |" in table
    assert (tmp_path / "cmp" / "ppl_vs_bits.png").read_bytes()[:4] == b"\x89PNG"
    missing = runner.invoke(app, ["report", str(tmp_path), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "run caldera eval --model" in missing.stderr


def test_eval_errors_are_one_line(evaluated, tmp_path, calib_file):
    out, _ = evaluated["rtn"]
    args = ["eval", "--model", str(out), "--data", str(calib_file), "--seq-len", "100000"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "fewer than one 100000-token window" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    result = runner.invoke(app, ["eval", "--model", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "no such model folder" in result.stderr
