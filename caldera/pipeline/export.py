"""Export a finished run as a Hugging Face-style model folder whose linears are packed CALDERA tensors.

    OUT/config.json                         the model's config.json, dtype float16, plus "quantization_config"
    OUT/tokenizer.json, ...                 tokenizer and generation files, copied from the model folder
    OUT/model-00001-of-0000K.safetensors    embeddings, final norm and lm_head (not stored when tied): fp16, or
                                            with ``embed_bits`` 8 or 4 the embeddings and lm_head as rank-0 packed
                                            entries (round to nearest, the run's group size; docs/FORMAT.md §7)
    OUT/model-0000k-of-0000K.safetensors    ``layers_per_shard`` decoder layers each: their packed linears
                                            (docs/FORMAT.md: header with the format version and per-linear
                                            metadata, shared incoherence blocks) and their norms in fp16
    OUT/model.safetensors.index.json        tensor name -> shard (a shared block: the first shard holding it),
                                            total_size (bytes of every stored tensor)
    OUT/caldera_metrics.json                per layer and projection: act_err, fro_err, bits per weight, rank
    OUT/manifest.json                       sha256 and size of every other file; ``verify(OUT)`` checks them
    OUT/report/                             written later by ``caldera eval`` (not in the manifest)

Everything is checked (every layer finished with the run's config, every linear readable) before anything is
written; the folder is built under a temporary name beside OUT and renamed at the end, so OUT appears whole or
not at all. The bytes are a function of the run alone (safetensors headers are written with sorted keys).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from caldera.config import DecomposeConfig
from caldera.core.decompose import decompose
from caldera.io.model_folder import read_model_config
from caldera.io.packed_format import (
    BLOCK_KEY,
    FORMAT_VERSION,
    VERSION_KEY,
    FormatError,
    file_metadata,
    linear_metadata,
    linear_tensors,
    read_file_metadata,
    read_linear,
)
from caldera.io.run_dir import RunDir, atomic_folder
from caldera.io.shards import ShardReader
from caldera.pipeline.decompose_model import PROJECTIONS
from caldera.pipeline.hessians import PROJ_PATH
from caldera.pipeline.run_decompose import (
    METRICS_KEY,
    SECTION,
    check_layer_header,
    format_layers,
    layer_header,
    linear_prefix,
    unfinished_layers,
)

MANIFEST = "manifest.json"
METRICS = "caldera_metrics.json"
REPORT_DIR = "report"  # written by caldera eval; not part of the model, not in the manifest
INDEX = "model.safetensors.index.json"
MANIFEST_VERSION = 1
EMBED_BITS = (16, 8, 4)  # embeddings and lm_head: fp16, or packed at 8 or 4 bits
EMBEDDINGS = ("model.embed_tokens", "lm_head")  # module paths of the [vocab, hidden] matrices
COPIED_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
"""Files copied as they are from the model folder when present."""


class ExportError(RuntimeError):
    """The run cannot be exported, the output cannot be written, or a folder fails verification (one line)."""


@dataclasses.dataclass
class ExportSummary:
    path: str
    files: int  # including manifest.json
    bytes: int  # of every file
    bits_per_weight: float  # of the linears: 8 × bytes of all their tensors (bias too) and shared blocks / weights
    linear_bytes: int
    linear_weights: int
    bits_per_weight_total: float  # 8 × bytes of every stored tensor / parameters of the original model
    tensor_bytes: int  # of every stored tensor (the index's total_size)
    parameters: int  # of the original model (a tied lm_head counted once)
    embed_error: dict[str, float]  # module -> relative Frobenius error of its quantized weight (embed_bits < 16)
    layers: int
    shards: int
    embed_bits: int
    tied_embeddings: bool

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- checks before writing ----------------------------------------------------------------------------------------


def _run_spec(run: RunDir) -> dict[str, Any]:
    if not run.root.is_dir():
        raise ExportError(f"{run.root}: no such run directory")
    spec = (run.read_spec() or {}).get(SECTION)
    if spec is None:
        raise ExportError(f"{run.root} has no decomposition; run caldera decompose --run {run.root} first")
    return spec


def _check_model(spec: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    folder = Path(spec["model"])
    config = read_model_config(folder)
    sha = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    if sha != spec["model_config_sha256"]:
        raise ExportError(f"{folder}/config.json has changed since the run was decomposed (sha256 {sha[:12]}...)")
    return folder, config


def _check_layers(run: RunDir, spec: dict[str, Any], num_layers: int) -> None:
    missing = unfinished_layers(run, num_layers)
    if missing:
        raise ExportError(
            f"{run.root}: layers {format_layers(missing)} of {num_layers} are not decomposed; "
            f"finish them with caldera decompose --run {run.root}"
        )
    for i in range(num_layers):
        check_layer_header(run, i, layer_header(run, i), spec)


# --- building the tensors -----------------------------------------------------------------------------------------


def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).contiguous() if t.is_floating_point() else t.contiguous()


def _layer_tensors(run: RunDir, reader: ShardReader, layer: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A layer's packed linears (validated by reading them back) and its other tensors (norms) in fp16."""
    path = run.layer_path(layer)
    header = layer_header(run, layer)
    packed = load_file(str(path))
    metas = read_file_metadata(header)
    prefixes = {linear_prefix(layer, p) for p in PROJECTIONS}
    if set(metas) != prefixes:
        raise ExportError(f"{path}: holds linears {sorted(metas)}, expected {sorted(prefixes)}")
    for prefix in sorted(prefixes):
        read_linear(packed, prefix, metas[prefix])  # FormatError names the tensor
    linear_names = {f"{linear_prefix(layer, p)}.{s}" for p in PROJECTIONS for s in ("weight", "bias")}
    others = {n: _fp16(reader.tensor(n)) for n in reader.names(f"model.layers.{layer}.") if n not in linear_names}
    linear_header = {k: v for k, v in header.items() if k.startswith("caldera.linear.")}
    return packed | others, linear_header


def embedding_config(bits: int, group: int) -> DecomposeConfig:
    """How embeddings and lm_head [vocab, hidden] are packed at ``bits`` < 16: round to nearest, groups along hidden."""
    return DecomposeConfig.for_method("rtn", bq=bits, group_size=group)


def _top_tensors(reader: ShardReader, tied: bool, bits: int, group: int, errors: dict[str, float]) -> tuple:
    """(tensors, header) of the non-layer tensors: fp16, the embeddings and lm_head packed when ``bits`` < 16."""
    names = [n for n in reader.names() if not n.startswith("model.layers.") and not (tied and n == "lm_head.weight")]
    packed = {f"{p}.weight": p for p in EMBEDDINGS} if bits < 16 else {}
    top = {n: _fp16(reader.tensor(n)) for n in names if n not in packed}
    metas = {}
    for name in sorted(set(names) & set(packed)):
        dec = decompose(reader.tensor(name).float(), None, embedding_config(bits, group))  # [vocab, hidden]
        top |= linear_tensors(packed[name], dec)
        metas[packed[name]], errors[packed[name]] = linear_metadata(dec), dec.fro_err
    header = {k: v for k, v in file_metadata(metas).items() if k != VERSION_KEY}  # the shard adds the version
    return top, header


def _shards(run: RunDir, reader: ShardReader, num_layers: int, per_shard: int, top: tuple) -> Iterator[tuple]:
    """(tensors, header) of every shard in order: the non-layer tensors, then ``per_shard`` layers at a time."""
    yield top
    for first in range(0, num_layers, per_shard):
        tensors, header = {}, {}
        for i in range(first, min(first + per_shard, num_layers)):
            t, h = _layer_tensors(run, reader, i)
            tensors |= t  # shared incoherence blocks: identical in every layer file
            header |= h
        yield tensors, header


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A safetensors file whose header has sorted keys (safetensors' own writer orders metadata at random)."""
    raw = save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n :]


def quantization_config(spec: dict[str, Any], embed_bits: int, tied: bool) -> dict[str, Any]:
    """The config.json block a loader dispatches on: method, bits, rank, groups, packed format version."""
    keys = ("method", "bq", "bl", "br", "rank", "group_size", "lr_group_size", "zero_point", "incoherence")
    return {
        "quant_method": "caldera",
        "format_version": FORMAT_VERSION,
        **{k: spec[k] for k in keys},
        "rank_clamps": spec["rank_clamps"],
        "modules": [PROJ_PATH[p] for p in PROJECTIONS],
        "embed_bits": embed_bits,
        "tied_embeddings": tied,
        "decompose": {k: v for k, v in spec.items() if k != "model"},
    }


# --- writing ------------------------------------------------------------------------------------------------------


def _layer_metrics(run: RunDir, num_layers: int) -> dict[str, Any]:
    """{"layers": [{"layer": i, "proj": {proj: act_err, fro_err, bits_per_weight, rank, damping, history}}]}.

    Timings are left out: the export is a function of the run's results alone (a resumed run exports the same
    bytes as an uninterrupted one)."""
    layers = []
    for i in range(num_layers):
        metrics = json.loads(layer_header(run, i)[METRICS_KEY])
        layers.append(
            {"layer": i, "proj": {p: {k: v for k, v in m.items() if k != "seconds"} for p, m in metrics.items()}}
        )
    return {"layers": layers}


def write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """Write MANIFEST (sha256 and size of every other file in ``folder``, no subfolders); the files' entries."""
    files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}
    manifest = {"manifest_version": MANIFEST_VERSION, "files": files}
    write_durably(folder / MANIFEST, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return files


def _build(tmp: Path, run: RunDir, spec, folder: Path, config, embed_bits: int, per_shard: int) -> ExportSummary:
    num_layers, tied = config["num_hidden_layers"], bool(config.get("tie_word_embeddings", False))
    reader = ShardReader(folder)
    count = 1 + -(-num_layers // per_shard)
    weight_map, total, linear_bytes, embed_error = {}, 0, 0, {}
    top = _top_tensors(reader, tied, embed_bits, spec["group_size"], embed_error)
    for k, (tensors, header) in enumerate(_shards(run, reader, num_layers, per_shard, top)):
        name = f"model-{k + 1:05d}-of-{count:05d}.safetensors"
        write_durably(
            tmp / name, safetensors_bytes(tensors, {"format": "pt", VERSION_KEY: str(FORMAT_VERSION)} | header)
        )
        for tensor in tensors:
            weight_map.setdefault(tensor, name)  # a shared block: the first shard holding it
        total += tensor_bytes(tensors)
        linear_bytes += tensor_bytes({n: t for n, t in tensors.items() if is_linear_tensor(n)})
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_durably(tmp / INDEX, (json.dumps(index, indent=2) + "\n").encode())
    shapes = [reader.info[f"{linear_prefix(i, p)}.weight"].shape for i in range(num_layers) for p in PROJECTIONS]
    weights = sum(math.prod(shape) for shape in shapes)
    params = sum(math.prod(info.shape) for n, info in reader.info.items() if not (tied and n == "lm_head.weight"))
    stats = {
        "bits_per_weight": 8 * linear_bytes / weights,
        "bits_per_weight_total": 8 * total / params,
        "linear_bytes": linear_bytes,
        "linear_weights": weights,
        "tensor_bytes": total,
        "parameters": params,
    }
    qc = quantization_config(spec, embed_bits, tied) | {"stats": stats}
    out_config = config | {"dtype": "float16", "quantization_config": qc}
    if "torch_dtype" in out_config:
        out_config["torch_dtype"] = "float16"
    write_durably(tmp / "config.json", (json.dumps(out_config, indent=2, sort_keys=True) + "\n").encode())
    write_durably(
        tmp / METRICS, (json.dumps(_layer_metrics(run, num_layers), indent=1, sort_keys=True) + "\n").encode()
    )
    for name in COPIED_FILES:
        if (folder / name).is_file():
            shutil.copyfile(folder / name, tmp / name)
    files = write_manifest(tmp)
    return ExportSummary(
        path="",
        files=len(files) + 1,
        bytes=sum(f["bytes"] for f in files.values()) + (tmp / MANIFEST).stat().st_size,
        bits_per_weight=stats["bits_per_weight"],
        linear_bytes=linear_bytes,
        linear_weights=weights,
        bits_per_weight_total=stats["bits_per_weight_total"],
        tensor_bytes=total,
        parameters=params,
        embed_error=embed_error,
        layers=num_layers,
        shards=count,
        embed_bits=embed_bits,
        tied_embeddings=tied,
    )


def is_linear_tensor(name: str) -> bool:
    """A tensor the linears' bits per weight count: a packed linear's part (q/l/r, signs, bias:
    ``model.layers.<i>.<path>.<part>``) or a shared incoherence block."""
    return name.startswith(BLOCK_KEY) or any(f".{path}." in name for path in PROJ_PATH.values())


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    """Bytes the tensors take in a safetensors file (numel × element size; meta tensors count the same)."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export(run_dir: Path | str, out: Path | str, *, embed_bits: int = 16, layers_per_shard: int = 8) -> ExportSummary:
    """Write the HF-style folder ``out`` for the finished run ``run_dir``; ExportError (one line) if it cannot."""
    run, out = RunDir(run_dir), Path(out)
    if embed_bits not in EMBED_BITS:
        raise ExportError(f"embed_bits={embed_bits} is not supported; choose one of {', '.join(map(str, EMBED_BITS))}")
    if layers_per_shard < 1:
        raise ExportError(f"layers_per_shard={layers_per_shard} must be >= 1")
    if out.exists():
        raise ExportError(f"{out} already exists; remove it or choose another output folder")
    spec = _run_spec(run)
    folder, config = _check_model(spec)
    _check_layers(run, spec, config["num_hidden_layers"])
    with atomic_folder(out, ExportError) as tmp:
        summary = _build(tmp, run, spec, folder, config, embed_bits, layers_per_shard)
    summary.path = str(out)
    return summary


def verify(model_dir: Path | str, *, packed: bool = False) -> dict[str, Any]:
    """Check every file of an exported folder against manifest.json (size, then sha256); returns the manifest.

    With ``packed``, also read every packed entry of every shard (docs/FORMAT.md §8 validation) and add
    ``"packed_entries"`` (their count) to the returned dict. ExportError (FormatError for a bad entry) names the
    first file that is missing, altered, present but not in the manifest, or not in the format.
    """
    folder = Path(model_dir)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{folder / MANIFEST}: missing or unreadable ({e})") from None
    for name, entry in sorted(files.items()):
        path = folder / name
        if not path.is_file():
            raise ExportError(f"{path}: listed in the manifest but missing")
        if path.stat().st_size != entry["bytes"]:
            raise ExportError(f"{path}: {path.stat().st_size} bytes, the manifest says {entry['bytes']}")
        if sha256_file(path) != entry["sha256"]:
            raise ExportError(f"{path}: sha256 differs from the manifest (the file was altered or corrupted)")
    extra = sorted(p.name for p in folder.iterdir() if p.name not in files and p.name not in (MANIFEST, REPORT_DIR))
    if extra:
        raise ExportError(f"{folder / extra[0]}: not listed in the manifest")
    if packed:
        manifest = manifest | {"packed_entries": _read_every_entry(folder, sorted(files))}
    return manifest


def _read_every_entry(folder: Path, names: list[str]) -> int:
    count = 0
    for name in (n for n in names if n.endswith(".safetensors")):
        tensors = load_file(str(folder / name))
        with safe_open(str(folder / name), framework="pt") as f:
            header = f.metadata()
        try:
            for prefix, meta in read_file_metadata(header).items():
                read_linear(tensors, prefix, meta)
                count += 1
        except FormatError as e:
            raise ExportError(f"{folder / name}: {e}") from None
    return count
