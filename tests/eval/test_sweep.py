"""`caldera sweep`: every config of a YAML matrix decomposed, exported and evaluated; CSV/Markdown/PNG; resumes."""

import csv
import json

from typer.testing import CliRunner

from caldera.cli import app

runner = CliRunner()


def _write_spec(path, model, calib):
    path.write_text(
        f"""
name: tiny
model: {model}
calibration: {{samples: 4, seq_len: 32, calib: [{calib}]}}
eval: {{seq_len: 64, max_tokens: 1024, data: [{calib}]}}
fixed: {{method: caldera, bq: 2, iters: 1}}
grid:
  rank: [4, 16]
baselines:
  - {{method: rtn, bq: 2}}
"""
    )


def test_sweep_runs_every_config_writes_tables_and_resumes(qwen2_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    spec = tmp_path / "sweeps" / "tiny.yaml"
    spec.parent.mkdir()
    _write_spec(spec, qwen2_dir, calib_file)
    args = ["sweep", str(spec), "--workdir", str(tmp_path / "work"), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out = tmp_path / "sweeps" / "results"
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [(r["method"], r["settings"], r["baseline"]) for r in rows] == [
        ("caldera", "2/4/4/r4/g64", "False"),
        ("caldera", "2/4/4/r16/g64", "False"),
        ("rtn", "2/–/–/r0/g64", "True"),
    ]
    bits = [float(r["bits_per_weight"]) for r in rows]
    assert bits[2] < bits[0] < bits[1]  # every stored byte: rank 16 costs more than rank 4, RTN least
    assert rows[2]["pareto"] == "False"  # baselines are drawn, not put on the front
    assert (out / "tiny.png").stat().st_size > 10_000 and "# sweep tiny" in (out / "tiny.md").read_text()
    job = tmp_path / "work" / "cal-4x32-"  # one job folder for the shared calibration (+ hash of the text)
    (folder,) = [p for p in (tmp_path / "work").iterdir() if str(p).startswith(str(job))]
    evals = {p: p.stat().st_mtime_ns for p in folder.glob("*/model/report/eval.json")}
    assert len(evals) == 3
    again = runner.invoke(app, args)  # all done: nothing recomputed, the same table
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in evals} == evals
    assert list(csv.DictReader((out / "tiny.csv").open())) == rows
    summary = [json.loads(line) for line in again.stdout.splitlines() if line.startswith('{"summary"')]
    assert summary[0]["summary"]["configs"] == 3


def test_unknown_key_and_bad_yaml_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fixed: {rank: 8, bogus: 1}\n")
    result = runner.invoke(app, ["sweep", str(bad)])
    assert result.exit_code != 0 and "unknown key 'bogus'" in result.output
    bad.write_text("fixed: {rank: [\n")
    result = runner.invoke(app, ["sweep", str(bad)])
    assert result.exit_code != 0 and "not valid YAML" in result.output
    result = runner.invoke(app, ["sweep", str(tmp_path / "missing.yaml")])
    assert result.exit_code != 0 and "cannot read" in result.output
