"""The run directory: everything a calibrate → decompose → export run keeps between stages.

    RUN/run.json                          what the run is (model, calibration, decompose config)
    RUN/hessians/layer_007.safetensors    per-layer input Hessians (float64), one tensor per input group
    RUN/layers/layer_007.safetensors      per-layer packed Q/L/R (docs/FORMAT.md) and metrics

    RUN/activations/activations.*.f32     calibration activations spilled to disk (deleted when done)
    RUN/.lock                             held (flock) by the one caldera process working on the run

Every file is written atomically (temporary file in the same folder, fsync, rename), so a killed run
leaves either a whole file or none; ``.*.tmp`` and spill leftovers of a killed run are ignored, and
removed by ``remove_stale_files`` when the next process takes the lock.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

RUN_FORMAT_VERSION = 1
GROUPS = ("attn", "o", "mlp", "down")  # input groups: q/k/v, o_proj, gate/up, down_proj


class RunDirError(RuntimeError):
    """The run directory is unusable: mismatched config, corrupt file, unwritable disk (one line)."""


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(tmp) for a temporary file beside ``path``, fsync it and rename it over ``path``.

    The file gets the mode a plain ``open`` would give it (0o666 less the umask), not mkstemp's private 0o600.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~umask())
        write(tmp_path)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        tmp_path.unlink(missing_ok=True)
        raise RunDirError(f"cannot write {path}: {e.strerror or e}") from e
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_folder(out: Path, error: type[Exception]) -> Iterator[Path]:
    """A private temporary folder beside ``out`` to fill; renamed to ``out`` (with the umask's mode) when the block
    ends, removed if it raises, so ``out`` appears whole or not at all. An OSError becomes ``error`` naming ``out``."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise error(f"cannot create {out}: {e.strerror or e}") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask())  # mkdtemp made it private
        os.rename(tmp, out)
    except OSError as e:
        raise error(f"cannot write {out}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after the rename


def umask() -> int:
    """The process's file mode creation mask (read without changing it for good)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


class RunDir:
    """Paths and (de)serialisation of one run directory."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    @property
    def spec_path(self) -> Path:
        return self.root / "run.json"

    def hessian_path(self, layer: int) -> Path:
        return self.root / "hessians" / f"layer_{layer:03d}.safetensors"

    def layer_path(self, layer: int) -> Path:
        return self.root / "layers" / f"layer_{layer:03d}.safetensors"

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``RUN/.lock`` (an advisory flock, released by the kernel if the process dies)."""
        import fcntl

        try:
            self.root.mkdir(parents=True, exist_ok=True)
            f = open(self.root / ".lock", "w")  # noqa: SIM115 (closed below)
        except OSError as e:
            raise RunDirError(f"cannot create {self.root}: {e.strerror or e}") from None
        with f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunDirError(f"{self.root} is in use by another caldera process") from None
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def remove_stale_files(self) -> int:
        """Delete what a killed process left (temporaries, spilled activations); call under ``lock``."""
        stale = [p for d in ("hessians", "layers") for p in (self.root / d).glob(".*.tmp")]
        stale += (self.root / "activations").glob("activations.*.f32")
        stale += [p for p in self.root.glob(".*.tmp") if p.is_file()]
        for path in stale:
            path.unlink(missing_ok=True)
        return len(stale)

    # run.json -------------------------------------------------------------------------------------
    def read_spec(self) -> dict[str, Any] | None:
        if not self.spec_path.exists():
            return None
        try:
            spec = json.loads(self.spec_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise RunDirError(f"{self.spec_path} is unreadable: {e}") from e
        if spec.get("format_version") != RUN_FORMAT_VERSION:
            raise RunDirError(f"{self.spec_path}: run format {spec.get('format_version')} is not supported")
        return spec

    def ensure_spec(self, section: str, value: dict[str, Any]) -> None:
        """Record ``value`` under ``section`` of run.json, or check it equals what is recorded.

        A run resumed with different settings is an error naming the first differing key, never a
        silent mix of two configurations.
        """
        spec = self.read_spec() or {"format_version": RUN_FORMAT_VERSION}
        old = spec.get(section)
        if old is not None and old != value:
            diff = sorted(k for k in set(old) | set(value) if old.get(k) != value.get(k))
            key = diff[0] if diff else section
            raise RunDirError(
                f"{self.root} was started with {section}.{key}={old.get(key)!r}, not {value.get(key)!r}; "
                "use a new --run directory or the original settings"
            )
        if old is None:
            spec[section] = value
            atomic_write(self.spec_path, lambda p: p.write_text(json.dumps(spec, indent=2, sort_keys=True)))

    def share_hessians(self, other: RunDir) -> int:
        """Give ``other`` this run's calibration: its run.json "calibration" section and hard links to (copies of,
        across file systems) the Hessian files ``other`` lacks. Returns how many files were linked."""
        calibration = (self.read_spec() or {}).get("calibration")
        if calibration is None:
            raise RunDirError(f"{self.root} has no calibration to share")
        other.ensure_spec("calibration", calibration)
        count = 0
        for src in sorted((self.root / "hessians").glob("layer_*.safetensors")):
            dest = other.root / "hessians" / src.name
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, dest)
                except OSError:
                    atomic_write(dest, lambda p, s=src: p.write_bytes(s.read_bytes()))
                count += 1
        return count

    # Hessians -------------------------------------------------------------------------------------
    def save_hessians(self, layer: int, hessians: dict[str, torch.Tensor], tokens: int) -> None:
        """H (n, n) float64 per input group of one layer, with the token count they average over."""
        tensors = {g: h.double().contiguous().cpu() for g, h in hessians.items()}
        meta = {"tokens": str(tokens), "format_version": str(RUN_FORMAT_VERSION)}
        atomic_write(self.hessian_path(layer), lambda p: save_file(tensors, str(p), metadata=meta))

    def has_hessians(self, layer: int) -> bool:
        return self.hessian_path(layer).exists()

    def load_hessians(self, layer: int) -> dict[str, torch.Tensor]:
        path = self.hessian_path(layer)
        try:
            tensors = load_file(str(path))
        except (OSError, SafetensorError) as e:
            raise RunDirError(f"{path} is missing or corrupt ({e}); delete it to recompute") from e
        missing = [g for g in GROUPS if g not in tensors]
        if missing:
            raise RunDirError(f"{path} lacks the Hessians of {', '.join(missing)}; delete it to recompute")
        return tensors
