"""`caldera decompose --ray`: one Ray task per layer on a local 2-worker Ray, bit-identical to the local run."""

import json

import pytest
from typer.testing import CliRunner

from caldera.cli import app
from caldera.pipeline.export import sha256_file

ray = pytest.importorskip("ray", reason="the distributed extra (pip install 'caldera[distributed]') is not installed")
runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--iters", "2", "--rank", "16"]


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray of 2 CPU workers for this module (the CLI joins it instead of starting its own)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _decompose(model, calib, run, *args) -> list[dict]:
    result = runner.invoke(
        app, ["decompose", "--model", str(model), "--calib", str(calib), "--run", str(run), *FAST, *args, "--json"]
    )
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def _export(run, out) -> dict[str, str]:
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--embed-bits", "8"])
    assert result.exit_code == 0, result.output
    return {p.name: sha256_file(p) for p in sorted(out.iterdir())}


def test_a_bad_cluster_address_is_a_one_line_error_and_leaves_no_run(qwen2_dir, calib_file, tmp_path):
    if ray.is_initialized():
        pytest.skip("a Ray session is already open in this process")
    args = ["--model", str(qwen2_dir), "--calib", str(calib_file), "--run", str(tmp_path / "r"), *FAST]
    result = runner.invoke(app, ["decompose", *args, "--ray-address", "nohost:notaport"])
    assert result.exit_code == 2 and "cannot join the Ray cluster at nohost:notaport" in result.stderr, result.output
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_ray_run_resumes_and_exports_the_local_runs_bytes(local_ray, qwen2_dir, calib_file, tmp_path):
    local = _decompose(qwen2_dir, calib_file, tmp_path / "local")
    assert local[-1]["summary"]["layers"] == 2
    first = _decompose(qwen2_dir, calib_file, tmp_path / "ray", "--layers", "1", "--ray")  # one layer, then resume
    assert [line.get("layer") for line in first[:-1]] == [1] and "resumed" not in first[0]
    lines = _decompose(qwen2_dir, calib_file, tmp_path / "ray", "--ray")
    assert sorted((line["layer"], line.get("resumed", False)) for line in lines[:-1]) == [(0, False), (1, True)]
    assert lines[-1]["summary"]["layers"] == 2
    for i in (0, 1):  # the layer files hold the same tensors and metrics (timings aside)
        proj_local = {p: {k: v for k, v in r.items() if k != "seconds"} for p, r in local[i]["proj"].items()}
        proj_ray = next(
            {p: {k: v for k, v in r.items() if k != "seconds"} for p, r in line["proj"].items()}
            for line in lines[:-1]
            if line["layer"] == i
        )
        assert proj_ray == proj_local
    assert _export(tmp_path / "ray", tmp_path / "out-ray") == _export(tmp_path / "local", tmp_path / "out-local")
