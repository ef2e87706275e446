"""Resumable decomposition of a model into a run directory, one layer file at a time.

    RUN/run.json "decompose"          DecomposeConfig.to_dict() + model folder, its config.json sha256, rank
                                      clamps, device type
    RUN/hessians/layer_007...         input Hessians (from ``caldera.pipeline.calibrate``)
    RUN/layers/layer_007.safetensors  packed tensors of the layer's 7 projections (docs/FORMAT.md), prefixes
                                      ``model.layers.7.self_attn.q_proj`` ...; header keys besides the format's:
                                      ``caldera.layer``, ``caldera.decompose`` (the run.json section, JSON),
                                      ``caldera.metrics`` ({proj: act_err, fro_err, bits_per_weight, seconds,
                                      rank, numel, damping, history}, JSON), ``caldera.device``

A layer file appears only when whole (``atomic_write``), so a run killed at any point resumes at the first
layer without one. Every layer is decomposed from the weights in the model's shards and the Hessians *as stored
in the run*, with seeds derived from (seed, layer, projection): a resumed run gives the same tensors, bit for
bit, as an uninterrupted one on the same device. A layer file whose recorded config differs from run.json is
an error, never silently reused. One process at a time holds ``RUN/.lock`` (``RunDir.lock``).

``CALDERA_TEST_LAYER_DELAY`` (seconds, float): sleep after each written layer, so that tests can kill a run
between layers. Not meant for anything else.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from caldera.config import DecomposeConfig
from caldera.io.packed_format import file_metadata, incoherence_blocks, linear_metadata, linear_tensors
from caldera.io.run_dir import RunDir, RunDirError, atomic_write
from caldera.io.shards import ShardError, ShardReader
from caldera.pipeline.decompose_model import (
    PROJECTIONS,
    LayerResult,
    MatrixResult,
    decompose_layer,
    rank_clamps,
)
from caldera.pipeline.hessians import PROJ_GROUP, PROJ_PATH
from caldera.pipeline.overrides import NO_OVERRIDES, Overrides
from caldera.pipeline.overrides import SPEC_KEY as OVERRIDES_KEY

SECTION = "decompose"  # run.json section
LAYER_DELAY_ENV = "CALDERA_TEST_LAYER_DELAY"
LAYER_KEY, SPEC_KEY, METRICS_KEY, DEVICE_KEY = "caldera.layer", "caldera.decompose", "caldera.metrics", "caldera.device"


def linear_prefix(layer: int, proj: str) -> str:
    """The linear's module path in the model, e.g. ``model.layers.3.self_attn.q_proj``."""
    return f"model.layers.{layer}.{PROJ_PATH[proj]}"


# the run's identity ----------------------------------------------------------------------------------------------


def projection_shapes(reader: ShardReader, num_layers: int) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, projection) -> weight shape (out, in), from the shard headers (no tensor data is read)."""
    shapes = {}
    for i in range(num_layers):
        for proj in PROJECTIONS:
            name = linear_prefix(i, proj) + ".weight"
            if name not in reader:
                raise ShardError(f"{reader.folder}: tensor {name} is not in the model's shards")
            shapes[i, proj] = tuple(reader.info[name].shape)
    return shapes


def decompose_spec(
    folder: Path,
    reader: ShardReader,
    num_layers: int,
    cfg: DecomposeConfig,
    device: torch.device | str = "cpu",
    overrides: Overrides = NO_OVERRIDES,
) -> dict[str, Any]:
    """The run.json "decompose" section: the config, the model (path and config.json sha256), rank clamps, the
    device type (cpu, cuda: float rounding differs between devices, so a run stays on one), and the per-layer
    overrides when there are any."""
    overrides.check(cfg, num_layers)
    clamps = rank_clamps(projection_shapes(reader, num_layers), cfg.rank)
    spec = cfg.to_dict() | {
        "device": torch.device(device).type,
        "model": str(Path(folder).resolve()),
        "model_config_sha256": hashlib.sha256((Path(folder) / "config.json").read_bytes()).hexdigest(),
        "rank_clamps": {proj: k for proj, (_, k) in sorted(clamps.items())},
    }
    return spec | ({OVERRIDES_KEY: overrides.to_dict()} if overrides else {})


def default_run_dir(cache: Path, spec: dict[str, Any], calibration: dict[str, Any]) -> Path:
    """``cache/runs/<model folder name>-<8 hex digits of the decompose spec and calibration options>``."""
    key = json.dumps({"decompose": spec, "calibration": calibration}, sort_keys=True)
    return cache / "runs" / f"{Path(spec['model']).name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def missing_hessians(run: RunDir, layers: Iterable[int]) -> list[int]:
    return [i for i in layers if not run.has_hessians(i)]


# layer files -----------------------------------------------------------------------------------------------------


def layer_header(run: RunDir, layer: int) -> dict[str, str] | None:
    """The safetensors header of a finished layer file, or None when the layer is not finished."""
    path = run.layer_path(layer)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (OSError, SafetensorError) as e:
        raise RunDirError(f"{path} is corrupt ({e}); delete it to recompute the layer") from None


def check_layer_header(run: RunDir, layer: int, header: dict[str, str], spec: dict[str, Any]) -> None:
    """RunDirError unless the layer file is layer ``layer`` made with ``spec`` (the run.json section)."""
    path = run.layer_path(layer)
    try:
        stored, number = json.loads(header[SPEC_KEY]), int(header[LAYER_KEY])
    except (KeyError, ValueError) as e:
        raise RunDirError(f"{path} has no valid {e} header entry; delete it to recompute the layer") from None
    if number != layer:
        raise RunDirError(f"{path} holds layer {number}, not {layer}; delete it to recompute the layer")
    if stored != spec:
        key = sorted(k for k in set(stored) | set(spec) if stored.get(k) != spec.get(k))[0]
        raise RunDirError(
            f"{path} was made with {SECTION}.{key}={stored.get(key)!r}, but run.json says {spec.get(key)!r}; "
            "delete it to recompute the layer"
        )


def stored_result(run: RunDir, layer: int, spec: dict[str, Any]) -> LayerResult | None:
    """The LayerResult recorded in a finished layer file (checked against ``spec``), or None if unfinished."""
    header = layer_header(run, layer)
    if header is None:
        return None
    check_layer_header(run, layer, header, spec)
    try:
        metrics = json.loads(header[METRICS_KEY])
        proj = {p: MatrixResult(**{k: metrics[p][k] for k in _RESULT_KEYS}) for p in PROJECTIONS}
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{run.layer_path(layer)}: bad {METRICS_KEY} header ({e}); delete it to recompute") from None
    return LayerResult(layer, proj)


_RESULT_KEYS = ("act_err", "fro_err", "bits_per_weight", "seconds", "rank", "numel")


def layer_file(
    result: LayerResult, biases: dict[str, torch.Tensor | None], spec: dict[str, Any], device: torch.device
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and header of one layer's file, from a LayerResult that kept its decompositions."""
    decs = {p: r.decomposition for p, r in result.proj.items()}
    tensors: dict[str, torch.Tensor] = {}
    for proj, dec in decs.items():
        tensors |= linear_tensors(linear_prefix(result.layer, proj), dec, biases.get(proj))
    tensors |= incoherence_blocks(decs.values())
    metrics = {
        p: {k: getattr(r, k) for k in _RESULT_KEYS} | {"damping": decs[p].damping, "history": decs[p].history}
        for p, r in result.proj.items()
    }
    header = file_metadata({linear_prefix(result.layer, p): linear_metadata(d) for p, d in decs.items()})
    header |= {
        LAYER_KEY: str(result.layer),
        SPEC_KEY: json.dumps(spec, sort_keys=True),
        METRICS_KEY: json.dumps(metrics, sort_keys=True),
        DEVICE_KEY: str(device),
    }
    return tensors, header


def _layer_inputs(reader: ShardReader, run: RunDir, layer: int):
    """({proj: W (m, n)}, {proj: bias or None}, hessian_of) of one layer: weights from the shards, H from the run."""
    tensors = reader.tensors(f"model.layers.{layer}.")
    weights = {p: tensors[linear_prefix(layer, p) + ".weight"] for p in PROJECTIONS}
    biases = {p: tensors.get(linear_prefix(layer, p) + ".bias") for p in PROJECTIONS}
    hessians = run.load_hessians(layer)  # {group: H (n, n) float64}
    return weights, biases, lambda proj: hessians[PROJ_GROUP[proj]]


@dataclasses.dataclass
class LayerDone:
    result: LayerResult
    resumed: bool  # read back from the run's layer file, not computed now


def decompose_into_run(
    run: RunDir,
    reader: ShardReader,
    layers: Iterable[int],
    cfg: DecomposeConfig,
    spec: dict[str, Any],
    device: torch.device | str = "cpu",
    *,
    on_matrix: Callable[[int, str, MatrixResult], None] | None = None,
) -> Iterator[LayerDone]:
    """For each layer in order: its stored result if its file exists, else decompose it and write the file.

    Needs every layer's Hessians in ``run`` and ``spec`` recorded in run.json (call under ``RunDir.lock``).
    """
    delay = float(os.environ.get(LAYER_DELAY_ENV) or 0)
    for i in layers:
        stored = stored_result(run, i, spec)
        if stored is not None:
            yield LayerDone(stored, resumed=True)
            continue
        yield LayerDone(decompose_layer_into_run(run, reader, i, cfg, spec, device, on_matrix=on_matrix), False)
        if delay:
            time.sleep(delay)


def decompose_layer_into_run(
    run: RunDir,
    reader: ShardReader,
    layer: int,
    cfg: DecomposeConfig,
    spec: dict[str, Any],
    device: torch.device | str = "cpu",
    *,
    on_matrix: Callable[[int, str, MatrixResult], None] | None = None,
) -> LayerResult:
    """Decompose one layer from the shards and the run's Hessians and write its file (atomically); the result
    without its decompositions (the file has them). Local runs and Ray tasks both go through here."""
    device = torch.device(device)
    weights, biases, hessian_of = _layer_inputs(reader, run, layer)
    overrides = Overrides.from_spec(spec)
    result = decompose_layer(
        layer, weights, hessian_of, cfg, device, keep=True, on_matrix=on_matrix, overrides=overrides
    )
    tensors, header = layer_file(result, biases, spec, device)
    atomic_write(run.layer_path(layer), lambda p: save_file(tensors, str(p), metadata=header))
    for r in result.proj.values():
        r.decomposition = None
    return result


def unfinished_layers(run: RunDir, num_layers: int) -> list[int]:
    return [i for i in range(num_layers) if not run.layer_path(i).exists()]


def format_layers(layers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8' (the --layers syntax)."""
    parts, start = [], None
    for k, i in enumerate(layers):
        if start is None:
            start = i
        if k + 1 == len(layers) or layers[k + 1] != i + 1:
            parts.append(str(i) if i == start else f"{start}-{i}")
            start = None
    return ",".join(parts)
