"""`caldera run`: calibrate once, per method decompose → export → eval, the quality table; resumes."""

import json

from typer.testing import CliRunner

from caldera.cli import app
from caldera.io.run_dir import RunDir

runner = CliRunner()


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def test_whole_job_on_a_tiny_model_then_resume(qwen2_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    args = ["run", "--model", str(qwen2_dir), "--calib", str(calib_file), "--eval-data", str(calib_file)]
    args += ["--methods", "caldera,rtn", "--rank", "16", "--iters", "2", "--samples", "4", "--seq-len", "32"]
    args += ["--eval-seq-len", "64", "--max-tokens", "1024", "--workdir", str(tmp_path / "job"), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = _lines(first.stdout)
    results = {line["tag"]: line["result"] for line in lines if "tag" in line}
    assert sorted(results) == ["caldera-q2-l4-r4-k16-g64-i2", "rtn-q2-g64"]
    caldera, rtn = results["caldera-q2-l4-r4-k16-g64-i2"], results["rtn-q2-g64"]
    assert caldera["baseline_ppl"] == rtn["baseline_ppl"] and rtn["baseline_cached"] is True
    assert caldera["bits_per_weight"] > rtn["bits_per_weight"]
    job = tmp_path / "job"
    calibrated = RunDir(job / "caldera-q2-l4-r4-k16-g64-i2" / "run").hessian_path(0)
    shared = RunDir(job / "rtn-q2-g64" / "run").hessian_path(0)
    assert shared.stat().st_ino == calibrated.stat().st_ino  # calibrated once, hard-linked
    table = (job / "comparison.md").read_text()
    assert "| caldera | 2/4/4/r16/g64 |" in table and "| rtn | 2/–/–/r0/g64 |" in table
    again = runner.invoke(app, args)  # everything is done: read back, same numbers
    assert again.exit_code == 0, again.output
    assert {line["tag"]: line["result"]["ppl"] for line in _lines(again.stdout) if "tag" in line} == {
        tag: r["ppl"] for tag, r in results.items()
    }
    more = runner.invoke(app, [*args[: args.index("--methods")], "--methods", "gptq", *args[args.index("--rank") :]])
    assert more.exit_code == 0, more.output  # another method later: calibration reused, the table grows
    table = (job / "comparison.md").read_text()
    assert all(f"| {m} |" in table for m in ("caldera", "rtn", "gptq"))
    summary = _lines(more.stdout)[-1]["summary"]
    assert summary["ran"] == 1 and summary["methods"] == 3


def test_finetune_steps_add_a_tuned_row_at_the_same_bits_and_resume(qwen2_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    args = ["run", "--model", str(qwen2_dir), "--calib", str(calib_file), "--eval-data", str(calib_file)]
    args += ["--methods", "caldera", "--rank", "8", "--iters", "2", "--samples", "4", "--seq-len", "32"]
    args += ["--eval-seq-len", "64", "--max-tokens", "1024", "--workdir", str(tmp_path / "job"), "--json"]
    args += ["--finetune-steps", "20", "--finetune-lr", "3e-3", "--finetune-seq-len", "32"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    lines = _lines(first.stdout)
    results = {line["tag"]: line["result"] for line in lines if "result" in line}
    plain, tuned = results["caldera-q2-l4-r4-k8-g64-i2"], results["caldera-q2-l4-r4-k8-g64-i2-ft20-lr0.003-s1024x32"]
    assert tuned["bits_per_weight"] == plain["bits_per_weight"] and tuned["finetune_steps"] == 20
    assert tuned["ppl"] != plain["ppl"]  # KL toward the original: tests/pipeline/test_finetune.py
    table = (tmp_path / "job" / "comparison.md").read_text()
    assert "| caldera + finetune | 2/4/4/r8/g64/ft20 |" in table
    again = runner.invoke(app, args)  # read back: nothing trained again
    assert again.exit_code == 0 and not any("finetune" in line for line in _lines(again.stdout))
    assert {line["tag"]: line["result"]["ppl"] for line in _lines(again.stdout) if "result" in line} == {
        tag: r["ppl"] for tag, r in results.items()
    }


def test_ctrl_c_in_a_decomposition_stops_the_job_and_says_how_to_resume(qwen2_dir, calib_file, tmp_path, monkeypatch):
    import caldera.cli.decompose as cli

    def interrupt(*_):
        raise KeyboardInterrupt

    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cli, "_decompose_layers", interrupt)  # decompose_run turns it into its Interrupted
    args = ["run", "--model", str(qwen2_dir), "--calib", str(calib_file), "--eval-data", str(calib_file)]
    args += ["--methods", "rtn", "--samples", "4", "--seq-len", "32", "--workdir", str(tmp_path / "job")]
    result = runner.invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "interrupted; rerun the same command to resume" in result.stderr
