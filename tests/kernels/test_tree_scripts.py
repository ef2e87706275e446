"""benchmarks/pack_trees.sh and parity_trees.sh, the GPU lease's A/B plumbing, on this machine (no GPU needed)."""

import os
import subprocess
import tarfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def run(cmd: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, parity_trees.sh runs the real parity suite")
def test_pack_then_parity_trees(tmp_path):
    clone = tmp_path / "clone"
    assert run(["git", "clone", "-q", str(ROOT), str(clone)], tmp_path).returncode == 0
    bad = run(["bash", "benchmarks/pack_trees.sh", "a-b=HEAD"], clone)
    assert bad.returncode == 2 and "no '-'" in bad.stderr  # ab_trees.sh cuts tags at "-"
    assert run(["bash", "benchmarks/pack_trees.sh", "one=HEAD", "two=HEAD~1"], clone).returncode == 0
    with tarfile.open(clone / ".gpu" / "trees.tgz") as tar:
        names = set(tar.getnames())
    assert {"./one/kernels_mojo/gpu.mojo", "./two/caldera/__init__.py", "./one/tests/kernels"} <= names
    out = tmp_path / "out"
    out.mkdir()
    # parity_trees unpacks the trees and, per tree, runs its GPU parity tests and a bench run; without a GPU the
    # tests skip and the bench refuses, and the summary says so per tree
    result = run(["bash", "benchmarks/parity_trees.sh", "one", "new"], clone, OUT=str(out))
    lines = result.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["one", "new"], result.stdout
    assert all("skipped" in line and "warm rc 2" in line for line in lines), result.stdout
    assert (clone / ".gpu" / "one" / "kernels_mojo").is_dir()
    assert "no CUDA device" in (out / "warm-one.err").read_text()
    (out / "parity-one.log").unlink()
    warm_only = run(["bash", "benchmarks/parity_trees.sh", "one"], clone, OUT=str(out), PARITY="0")
    assert warm_only.stdout.startswith("one: no parity (PARITY=0) | warm rc 2"), warm_only.stdout
    assert not (out / "parity-one.log").exists()
    # PARITY_K: only the cases pytest -k selects (a short lease)
    some = run(["bash", "benchmarks/parity_trees.sh", "one"], clone, OUT=str(out), PARITY_K="qwen")
    assert "deselected" in some.stdout, some.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU, ab_trees.sh times the real benches")
def test_ab_trees_copies_each_trees_rows_to_out(tmp_path):
    # without a GPU the bench refuses; the summary says so and the (empty) rows still come back under $OUT
    result = run(["bash", "benchmarks/ab_trees.sh", "here-1"], ROOT, OUT=str(tmp_path), SEQ="128")
    assert "bench here-1 failed" in result.stdout and result.stdout.splitlines()[-1].strip() == "here-1"
    assert (tmp_path / "ab-seq128-here-1.jsonl").is_file()
