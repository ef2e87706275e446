"""A tiny exported model shared by the layer-graph tests (CPU and GPU), built once per session."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from caldera.cli import app

FAST = ["--samples", "4", "--seq-len", "32", "--rank", "16", "--iters", "2", "--bl", "4", "--br", "4"]


@pytest.fixture(scope="session")
def exported(qwen2_dir: Path, calib_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Qwen2 (biases on q/k/v; widths 64, 32 and 160 = 32·5) decomposed and exported by the CLI."""
    tmp = tmp_path_factory.mktemp("exported")
    args = ["decompose", "--model", str(qwen2_dir), "--calib", str(calib_file), *FAST, "--run", str(tmp / "run")]
    assert CliRunner().invoke(app, [*args, "--json"]).exit_code == 0
    result = CliRunner().invoke(app, ["export", "--run", str(tmp / "run"), "--out", str(tmp / "out")])
    assert result.exit_code == 0, result.output
    return tmp / "out"
