"""Read single tensors, or all tensors under a prefix, from a model folder's safetensors shards.

A folder holds either ``model.safetensors.index.json`` (its ``weight_map``: tensor name -> shard file) or a
single ``model.safetensors``. Every shard's header is read and checked when the reader is built, before any
tensor data is touched: a missing shard, a truncated or corrupt file, or an index entry that its shard does
not hold is a ``ShardError`` naming the file. Tensor data is read lazily through ``safetensors.safe_open``
(memory-mapped, closed again after each call), so asking for one layer reads one layer, never a whole shard.

safetensors layout: 8 bytes little-endian header length N, N bytes of JSON header
(``name -> {dtype, shape, data_offsets: [begin, end]}`` relative to the data section), then the data.
"""

from __future__ import annotations

import json
import struct
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


class ShardError(ValueError):
    """A shard is missing, truncated or corrupt, or a tensor is not where the index says (one line)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, from its shard's header."""

    file: str
    dtype: str  # safetensors dtype name: F32, BF16, F16, ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> info from one shard's header; ShardError unless the data section covers the file exactly."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ShardError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise ShardError(f"{path}: truncated or corrupt safetensors file (header of {n} bytes, file {size})")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ShardError(f"{path}: cannot read ({e.strerror or e})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise ShardError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    infos, end = {}, 0
    for name, entry in header.items():
        try:
            begin, stop = entry["data_offsets"]
            infos[name] = TensorInfo(path.name, str(entry["dtype"]), tuple(int(d) for d in entry["shape"]))
        except (KeyError, TypeError, ValueError):
            raise ShardError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        end = max(end, int(stop))
    if 8 + n + end != size:
        what = "truncated" if 8 + n + end > size else "corrupt"
        raise ShardError(f"{path}: {what} safetensors file: header describes {8 + n + end} bytes, file holds {size}")
    return infos


class ShardReader:
    """Lazy, validated access to the tensors of a Hugging Face model folder."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise ShardError(f"{self.folder}: no such model folder")
        weight_map = self._weight_map()  # None: a single model.safetensors holds everything
        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        self.info: dict[str, TensorInfo] = {}
        for file in files:
            path = self.folder / file
            if not path.is_file():
                raise ShardError(f"{self.folder}: shard {file} is missing")
            header = read_header(path)
            self._check_opens(path)
            self.info.update((n, i) for n, i in header.items() if weight_map is None or weight_map.get(n) == file)
        for name, file in (weight_map or {}).items():
            if name not in self.info:
                raise ShardError(f"{self.folder / INDEX_FILE} maps {name} to {file}, which does not hold it")

    def _weight_map(self) -> dict[str, str] | None:
        index = self.folder / INDEX_FILE
        if not index.is_file():
            if not (self.folder / SINGLE_FILE).is_file():
                raise ShardError(f"{self.folder}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
            return None
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise ShardError(f"{index}: unreadable shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ShardError(f"{index}: weight_map must map tensor names to shard file names")
        bad = [f for f in weight_map.values() if Path(f).name != f]
        if bad:
            raise ShardError(f"{index}: shard {bad[0]!r} is not a file name inside the folder")
        return weight_map

    @staticmethod
    def _check_opens(path: Path) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (OSError, SafetensorError) as e:
            raise ShardError(f"{path}: truncated or corrupt safetensors file ({e})") from None

    # queries ------------------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self.info

    def names(self, prefix: str = "") -> list[str]:
        """Tensor names starting with ``prefix``, sorted."""
        return sorted(n for n in self.info if n.startswith(prefix))

    def nbytes(self, prefix: str = "") -> int:
        """Bytes of the stored tensors under ``prefix`` (as stored: dtype sizes from the headers)."""
        sizes = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}
        total = 0
        for name in self.names(prefix):
            numel = 1
            for d in self.info[name].shape:
                numel *= d
            total += numel * sizes.get(self.info[name].dtype, 4)
        return total

    # reads --------------------------------------------------------------------------------------------
    def tensor(self, name: str) -> torch.Tensor:
        """One tensor, as stored (dtype unchanged), read from its shard only."""
        if name not in self.info:
            raise ShardError(f"{self.folder}: tensor {name} is not in the model's shards")
        return self._read(self.info[name].file, [name])[name]

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors whose names start with ``prefix`` (e.g. ``model.layers.3.``), full names as keys."""
        by_file: dict[str, list[str]] = defaultdict(list)
        for name in self.names(prefix):
            by_file[self.info[name].file].append(name)
        out: dict[str, torch.Tensor] = {}
        for file, names in sorted(by_file.items()):
            out.update(self._read(file, names))
        return out

    def _read(self, file: str, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import SafetensorError, safe_open

        path = self.folder / file
        try:
            with safe_open(str(path), framework="pt") as f:
                return {name: f.get_tensor(name) for name in names}
        except (OSError, SafetensorError) as e:  # changed or removed since the reader checked it
            raise ShardError(f"{path}: cannot read tensors ({e})") from None
