"""`caldera decompose` into a run directory: killed runs resume bit-identically, settings are pinned."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from caldera.cli import app
from caldera.io.run_dir import RunDir
from caldera.pipeline.run_decompose import LAYER_DELAY_ENV, format_layers
from caldera.testing.tiny_models import tiny_llama

runner = CliRunner()
FAST = ["--samples", "4", "--seq-len", "32", "--iters", "2", "--rank", "16"]


@pytest.fixture(scope="module")
def llama4_dir(tmp_path_factory):
    """A tiny Llama with 4 layers, its weights in 2 shards."""
    return tiny_llama(tmp_path_factory.mktemp("models") / "llama4", seed=1, num_hidden_layers=4, shards=2)


def _args(model, calib, run, *extra):
    return ["decompose", "--model", str(model), "--calib", str(calib), *FAST, "--run", str(run), "--json", *extra]


def _lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines()]


def _start(args, delay: float) -> subprocess.Popen:
    env = os.environ | {LAYER_DELAY_ENV: str(delay)}
    cmd = [sys.executable, "-m", "caldera", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {path.name} appeared: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear in {timeout} s")
        time.sleep(0.02)


def _export(run, out) -> dict[str, dict]:
    result = runner.invoke(app, ["export", "--run", str(run), "--out", str(out), "--layers-per-shard", "3"])
    assert result.exit_code == 0, result.output
    return json.loads((out / "manifest.json").read_text())["files"]


def test_killed_run_resumes_to_the_same_bits(llama4_dir, calib_file, tmp_path):
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    proc = _start(_args(llama4_dir, calib_file, killed), delay=60)
    _wait_for(RunDir(killed).layer_path(0), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert sorted(p.name for p in (killed / "layers").iterdir()) == ["layer_000.safetensors"]

    resumed = runner.invoke(app, _args(llama4_dir, calib_file, killed))
    assert resumed.exit_code == 0, resumed.output
    lines = _lines(resumed.stdout)
    assert [(line["layer"], line.get("resumed", False)) for line in lines[:-1]] == [
        (0, True),
        (1, False),
        (2, False),
        (3, False),
    ]
    uninterrupted = runner.invoke(app, _args(llama4_dir, calib_file, whole))
    assert uninterrupted.exit_code == 0, uninterrupted.output
    again = _lines(uninterrupted.stdout)
    for a, b in zip(lines[:-1], again[:-1], strict=True):  # the same errors, layer by layer (timings aside)
        assert {p: r["act_err"] for p, r in a["proj"].items()} == {p: r["act_err"] for p, r in b["proj"].items()}

    files_killed, files_whole = _export(killed, tmp_path / "out-killed"), _export(whole, tmp_path / "out-whole")
    assert files_killed == files_whole  # every exported file has the same sha256 and size
    shards = [name for name in files_whole if name.endswith(".safetensors")]
    assert len(shards) == 3  # embeddings, layers 0-2, layer 3
    for name in shards:
        a, b = load_file(tmp_path / "out-killed" / name), load_file(tmp_path / "out-whole" / name)
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype and torch.equal(a[key].view(torch.uint8), b[key].view(torch.uint8)), key


def test_ctrl_c_stops_between_layers_and_says_how_to_resume(llama4_dir, calib_file, tmp_path):
    run = tmp_path / "run"
    proc = _start(_args(llama4_dir, calib_file, run), delay=60)
    _wait_for(RunDir(run).layer_path(0), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "interrupted after 1 layers; rerun the same command to resume" in stderr
    assert [p.name for p in (run / "layers").iterdir()] == ["layer_000.safetensors"]  # no temporary left
    result = runner.invoke(app, _args(llama4_dir, calib_file, run))
    assert result.exit_code == 0, result.output
    assert [line.get("resumed", False) for line in _lines(result.stdout)[:-1]] == [True, False, False, False]


def test_ctrl_c_counts_the_layers_saved_in_the_run(llama4_dir, calib_file, tmp_path, monkeypatch):
    # Ctrl-C right after layer 0's file lands, before its result is reported: the message counts the run's files
    import caldera.cli.decompose as cli

    run = tmp_path / "run"

    def save_layer_0_then_interrupt(job, *_):
        job.run.layer_path(0).parent.mkdir(parents=True, exist_ok=True)
        job.run.layer_path(0).write_bytes(b"")
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_decompose_layers", save_layer_0_then_interrupt)
    result = runner.invoke(app, _args(llama4_dir, calib_file, run))
    assert result.exit_code == 130
    assert "interrupted after 1 layers; rerun the same command to resume" in result.stderr


@pytest.mark.parametrize(
    ("other", "needle"),
    [(["--rank", "8"], "decompose.rank=16, not 8"), (["--bq", "3"], "decompose.bq=2, not 3")],
)
def test_resuming_with_other_settings_is_an_error_naming_the_key(llama4_dir, calib_file, tmp_path, other, needle):
    run = tmp_path / "run"
    first = runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0"))
    assert first.exit_code == 0, first.output
    result = runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0-1", *other))  # the last value wins
    assert result.exit_code == 2, result.output
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not RunDir(run).layer_path(1).exists()


def test_a_run_started_on_another_device_is_not_resumed_here(llama4_dir, calib_file, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0")).exit_code == 0
    spec = json.loads((run / "run.json").read_text())
    assert spec["decompose"]["device"] == "cpu"
    spec["decompose"]["device"] = "cuda"  # as if started on a GPU: its rounding differs from the CPU's
    (run / "run.json").write_text(json.dumps(spec))
    result = runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0-1"))
    assert result.exit_code == 2 and "decompose.device='cuda', not 'cpu'" in result.stderr, result.output


def test_a_layer_file_of_another_config_is_never_reused(llama4_dir, calib_file, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0")).exit_code == 0
    spec = json.loads((run / "run.json").read_text())
    del spec["decompose"]  # as if run.json had been lost: the layer file still knows its config
    (run / "run.json").write_text(json.dumps(spec))
    result = runner.invoke(app, _args(llama4_dir, calib_file, run, "--layers", "0", "--rank", "8"))
    assert result.exit_code == 2, result.output
    assert "layer_000.safetensors was made with decompose.rank=16, but run.json says 8" in result.stderr


def test_default_run_dir_is_in_the_cache_one_per_settings(llama4_dir, calib_file, tmp_path, monkeypatch):
    monkeypatch.setenv("CALDERA_CACHE", str(tmp_path / "cache"))
    args = ["decompose", "--model", str(llama4_dir), "--calib", str(calib_file), *FAST, "--layers", "0", "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    run = first_run = _lines(first.stdout)[-1]["summary"]["run"]
    assert run.startswith(str(tmp_path / "cache" / "runs" / "llama4-")) and len(run.rsplit("-", 1)[1]) == 8
    again = runner.invoke(app, args)
    assert _lines(again.stdout)[0]["resumed"] is True and _lines(again.stdout)[-1]["summary"]["run"] == first_run
    other = runner.invoke(app, [*args, "--seed", "1"])
    assert other.exit_code == 0 and _lines(other.stdout)[-1]["summary"]["run"] != first_run
    human = runner.invoke(app, args[:-1])
    assert f"run {first_run}" in " ".join(human.stderr.split())  # says where


def test_stale_temporaries_are_removed_and_a_busy_run_is_refused(llama4_dir, calib_file, tmp_path):
    run = RunDir(tmp_path / "run")
    stale = run.root / "layers" / ".layer_000.safetensors.x1y2.tmp"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a layer")
    with run.lock():
        busy = runner.invoke(app, _args(llama4_dir, calib_file, run.root, "--layers", "0"))
    assert busy.exit_code == 2 and "is in use by another caldera process" in busy.stderr
    result = runner.invoke(app, _args(llama4_dir, calib_file, run.root, "--layers", "0"))
    assert result.exit_code == 0, result.output
    assert [p.name for p in (run.root / "layers").iterdir()] == ["layer_000.safetensors"]


def test_full_disk_while_writing_a_layer_is_one_line_and_leaves_no_file(llama4_dir, calib_file, tmp_path, monkeypatch):
    def full(*_args, **_kw):
        raise OSError(28, "No space left on device")

    run = RunDir(tmp_path / "run")
    assert runner.invoke(app, _args(llama4_dir, calib_file, run.root, "--layers", "0")).exit_code == 0
    monkeypatch.setattr("caldera.pipeline.run_decompose.save_file", full)
    result = runner.invoke(app, _args(llama4_dir, calib_file, run.root, "--layers", "0-1"))
    assert result.exit_code == 2, result.output
    assert "layer_001.safetensors: No space left on device" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert [p.name for p in (run.root / "layers").iterdir()] == ["layer_000.safetensors"]


def test_format_layers():
    assert format_layers([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert format_layers([3]) == "3" and format_layers([]) == ""
