"""Run directory: atomic writes, config pinning in run.json, Hessian files."""

import os

import pytest
import torch

from caldera.io.run_dir import GROUPS, RunDir, RunDirError, atomic_write
from caldera.testing import random_spd_hessian


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a" / "file.txt"

    def boom(p):
        p.write_text("partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, boom)
    assert not target.exists() and list(target.parent.iterdir()) == []
    atomic_write(target, lambda p: p.write_text("whole"))
    assert target.read_text() == "whole" and len(list(target.parent.iterdir())) == 1


def test_disk_write_failure_is_one_clear_error(tmp_path):
    def full(p):
        raise OSError(28, "No space left on device")

    with pytest.raises(RunDirError, match="No space left on device"):
        atomic_write(tmp_path / "x.bin", full)
    assert list(tmp_path.iterdir()) == []


def test_spec_is_pinned(tmp_path):
    run = RunDir(tmp_path / "run")
    run.ensure_spec("decompose", {"bq": 2, "rank": 64})
    run.ensure_spec("decompose", {"bq": 2, "rank": 64})  # same settings: fine
    run.ensure_spec("calibrate", {"samples": 8})  # another section is added
    assert run.read_spec()["calibrate"] == {"samples": 8}
    with pytest.raises(RunDirError, match=r"decompose.rank=64, not 128"):
        run.ensure_spec("decompose", {"bq": 2, "rank": 128})


def test_hessians_round_trip_and_corruption(tmp_path):
    run = RunDir(tmp_path)
    hs = {g: random_spd_hessian(32, seed=i).double() for i, g in enumerate(GROUPS)}
    run.save_hessians(3, hs, tokens=1234)
    assert run.has_hessians(3) and not run.has_hessians(4)
    back = run.load_hessians(3)
    for g in GROUPS:
        assert back[g].dtype == torch.float64 and torch.equal(back[g], hs[g])
    data = run.hessian_path(3).read_bytes()
    run.hessian_path(3).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(RunDirError, match="missing or corrupt"):
        run.load_hessians(3)


def test_atomic_write_gives_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "f.txt", lambda p: p.write_text("x"))
    finally:
        os.umask(old)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
