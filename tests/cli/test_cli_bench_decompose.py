"""`caldera bench-decompose` end to end through the CLI (tiny shapes)."""

import json

from typer.testing import CliRunner

from caldera.cli import app

runner = CliRunner()


def test_help_lists_stages():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "bench-decompose" in result.output


def test_bench_decompose_json_rows():
    args = ["bench-decompose", "--shapes", "64x128,96x64", "--methods", "rtn,ldlq-had,caldera-r64-b4"]
    result = runner.invoke(app, [*args, "--iters", "2", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(tuple(r["shape"]), r["method"]) for r in rows] == [
        (s, m) for s in ((64, 128), (96, 64)) for m in ("rtn", "ldlq-had", "caldera-r64-b4")
    ]
    for r in rows:
        assert 0 < r["act_err"] < 1 and r["seconds"] > 0 and r["peak_mb"] > 0 and r["device"] == "cpu"
    by = {(tuple(r["shape"]), r["method"]): r for r in rows}
    for shape in ((64, 128), (96, 64)):
        assert by[shape, "caldera-r64-b4"]["act_err"] < by[shape, "ldlq-had"]["act_err"] < by[shape, "rtn"]["act_err"]
        assert by[shape, "rtn"]["bits_per_weight"] == 2.25  # 2-bit codes + fp16 scale per 64
        assert by[shape, "caldera-r64-b4"]["bits_per_weight"] > 2.25


def test_bad_arguments_fail_in_one_line():
    for args, needle in (
        (["--shapes", "64by128"], "bad shape"),
        (["--methods", "nope"], "unknown method preset"),
        (["--shapes", "64x32", "--methods", "caldera-r64-b4", "--iters", "0"], "iters=0"),
    ):
        result = runner.invoke(app, ["bench-decompose", "--device", "cpu", *args])
        assert result.exit_code == 2, result.output
        assert needle in result.output
