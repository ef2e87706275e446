"""`caldera bench` on the CPU: every impl's product against float64, the timing fields, and bad options.

Tolerance: rel_err < 1e-5 with float32 activations (float32 dot products over ≤ 200 terms land near 1e-7).
"""

import json

import pytest
from typer.testing import CliRunner

from caldera.cli import app
from caldera.pipeline import bench_kernel as bk

TINY = bk.ModelShapes("tiny", 3, {p: (80, 200) if i % 2 else (48, 64) for i, p in enumerate(bk.PROJECTIONS)})


@pytest.mark.max
def test_every_impl_matches_float64_and_is_timed():
    cfg = bk.BenchConfig(seq=3, device="cpu", rank=16, cpu_seconds=0.05, seed=5)
    result = bk.run(TINY, cfg)
    assert {(tuple(r.shape), r.impl) for r in result.rows} == {(s, i) for s in TINY.distinct() for i in bk.IMPLS}
    for row in result.rows:
        assert row.rel_err < 1e-5, row
        assert row.median_us > 0 and row.gbps > 0 and row.timing == "perf_counter"
    us = {(r.impl, tuple(r.shape)): r.median_us for r in result.rows}
    for impl, tps in result.tokens_per_s.items():
        layer_us = 4 * us[(impl, (48, 64))] + 3 * us[(impl, (80, 200))]  # 7 projections, alternating shapes
        assert tps == pytest.approx(3 * 1e6 / (3 * layer_us), rel=1e-9)
    assert "fused" in result.markdown()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq", "0"], "--seq 0"),
        (["--seq", "1", "--impls", "fused,bogus"], "unknown impl 'bogus'"),
        (["--seq", "1", "--device", "tpu"], "--device 'tpu'"),
        (["--seq", "1", "--shape", "/no/such/model", "--device", "cpu"], "neither 'qwen2-72b'"),
        (["--seq", "1", "--device", "cpu", "--projections", "q_proj,bogus"], "unknown projection 'bogus'"),
    ],
)
def test_bad_options_are_named(args, message):
    result = CliRunner().invoke(app, ["bench", *args, "--json"])
    assert result.exit_code != 0
    assert message in result.output, result.output


def test_json_rows_of_the_torch_impls(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2})
    )
    args = ["bench", "--seq", "2", "--shape", str(tmp_path), "--device", "cpu", "--impls", "unfused_torch,dense"]
    result = CliRunner().invoke(app, [*args, "--json", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.splitlines() if line.startswith('{"shape"')]
    assert {(tuple(r["shape"]), r["impl"]) for r in rows} == {
        (s, i) for s in [(64, 64), (96, 64), (64, 96)] for i in ("unfused_torch", "dense")
    }
    assert all(r["rel_err"] < 1e-5 and r["seq"] == 2 and r["median_us"] > 0 for r in rows)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["bench-seq2-cpu.csv", "bench-seq2-cpu.md"]


def test_projections_time_only_those_shapes(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 96, "num_hidden_layers": 2})
    )
    args = ["bench", "--seq", "2", "--shape", str(tmp_path), "--device", "cpu", "--impls", "dense"]
    result = CliRunner().invoke(app, [*args, "--projections", "down_proj", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    table = (tmp_path / "out" / "bench-seq2-cpu.md").read_text()
    assert "| 64×96 | dense |" in table and "64×64" not in table
    assert "Tokens/s" not in table  # a layer stack needs every projection
