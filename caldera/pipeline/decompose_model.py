"""Decompose every projection of the selected decoder layers against its layer-input Hessian.

For each layer and each of q, k, v, o, gate, up, down_proj: W (m, n) ≈ Q + L·R minimising
||(W - Q - L R) H^½||_F, with the config's bits and rank. Each matrix gets its own seed (so its own
incoherence signs), derived from (config seed, layer, projection). A rank above min(m, n) is clamped
to min(m, n); ``rank_clamps`` names them before the work starts.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import statistics
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from caldera.config import ConfigError, DecomposeConfig
from caldera.core.decompose import Decomposition, decompose
from caldera.pipeline.hessians import PROJ_PATH, Hessians, decoder_layers
from caldera.pipeline.overrides import NO_OVERRIDES, Overrides

PROJECTIONS = tuple(PROJ_PATH)
"""q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj: the order they are decomposed in."""


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """'0-3', '5', '0,2,4-6' -> sorted distinct layer indices; None or '' -> all. ConfigError when malformed."""
    if spec is None or not spec.strip():
        return list(range(num_layers))
    layers: set[int] = set()
    for part in spec.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not (lo.isdigit() and (hi.isdigit() if sep else not hi)):
            raise ConfigError(f"bad layer spec {part.strip()!r} in {spec!r}: expected N or N-M, e.g. 0-3,5")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first > last:
            raise ConfigError(f"bad layer range {part.strip()!r}: start is after end")
        if last >= num_layers:
            raise ConfigError(f"layer {last} is out of range: the model has {num_layers} layers (0-{num_layers - 1})")
        layers.update(range(first, last + 1))
    return sorted(layers)


def projection_seed(seed: int, layer: int, proj: str) -> int:
    """A 31-bit seed of its own for each (config seed, layer, projection); the same on every run."""
    digest = hashlib.sha256(f"{seed}:{layer}:{proj}".encode()).digest()
    return int.from_bytes(digest[:4], "little") >> 1


def clamped_rank(rank: int, shape: tuple[int, int]) -> int:
    return min(rank, *shape)


def projection_shapes(model: nn.Module, layers: Iterable[int]) -> dict[tuple[int, str], tuple[int, int]]:
    """(layer, projection) -> weight shape (out, in)."""
    modules = decoder_layers(model)
    return {(i, p): tuple(modules[i].get_submodule(PROJ_PATH[p]).weight.shape) for i in layers for p in PROJECTIONS}


def rank_clamps(shapes: dict[tuple[int, str], tuple[int, int]], rank: int) -> dict[str, tuple[tuple[int, int], int]]:
    """Projection type -> (shape, clamped rank), once per type, for the types whose rank must be clamped."""
    out: dict[str, tuple[tuple[int, int], int]] = {}
    for (_, proj), shape in shapes.items():
        if clamped_rank(rank, shape) < rank and proj not in out:
            out[proj] = (shape, clamped_rank(rank, shape))
    return out


@dataclasses.dataclass
class MatrixResult:
    act_err: float
    fro_err: float
    bits_per_weight: float
    seconds: float
    rank: int
    numel: int
    decomposition: Decomposition | None = None  # kept for a later export; not part of to_dict

    def to_dict(self) -> dict[str, float | int]:
        keys = ("act_err", "fro_err", "bits_per_weight", "seconds", "rank")
        return {k: getattr(self, k) for k in keys}


@dataclasses.dataclass
class LayerResult:
    layer: int
    proj: dict[str, MatrixResult]
    peak_gpu_mb: float | None = None  # set by a Ray task on CUDA: its process's allocator peak, MiB

    def to_dict(self) -> dict:
        peak = {} if self.peak_gpu_mb is None else {"peak_gpu_mb": self.peak_gpu_mb}
        return {"layer": self.layer, "proj": {name: r.to_dict() for name, r in self.proj.items()}} | peak


def resolve_device(device: str) -> torch.device:
    """torch.device for 'cpu' or 'cuda[:i]'; ConfigError if unknown or if CUDA is not available."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ConfigError(f"device {device!r} is not understood; use cpu or cuda") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r} is not supported; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for, but CUDA is not available")
    return dev


def decompose_layer(
    layer: int,
    weights: Mapping[str, torch.Tensor],
    hessian_of: Callable[[str], torch.Tensor],
    cfg: DecomposeConfig,
    device: torch.device | str = "cpu",
    *,
    keep: bool = False,
    on_matrix: Callable[[int, str, MatrixResult], None] | None = None,
    overrides: Overrides = NO_OVERRIDES,
) -> LayerResult:
    """Decompose the projections of one layer: ``weights`` {proj: W (m, n)}, ``hessian_of(proj)`` -> H (n, n).

    Every matrix uses its own seed and clamped rank, and ``cfg`` with the ``overrides`` that match it;
    ``on_matrix`` is called after each matrix; ``keep`` keeps each Decomposition in its MatrixResult.
    """
    device = torch.device(device)
    results = {}
    for proj in PROJECTIONS:
        w = weights[proj].detach()  # (m, n)
        own = overrides.apply(cfg, layer, proj)
        rank = clamped_rank(own.rank, tuple(w.shape))
        mcfg = dataclasses.replace(own, rank=rank, seed=projection_seed(cfg.seed, layer, proj))
        dec = decompose(w.to(device, torch.float32), hessian_of(proj).float(), mcfg)  # H stays on the CPU
        results[proj] = MatrixResult(
            dec.act_err, dec.fro_err, dec.bits_per_weight(), dec.seconds, dec.rank, w.numel(), dec if keep else None
        )
        if on_matrix is not None:
            on_matrix(layer, proj, results[proj])
    return LayerResult(layer, results)


def layer_weights(model: nn.Module, layer: int) -> dict[str, torch.Tensor]:
    """{proj: weight (m, n)} of one decoder layer of an in-memory model."""
    module = decoder_layers(model)[layer]
    return {proj: module.get_submodule(PROJ_PATH[proj]).weight.detach() for proj in PROJECTIONS}


def decompose_layers(
    model: nn.Module,
    hessians: Hessians,
    layers: Iterable[int],
    cfg: DecomposeConfig,
    device: torch.device | str = "cpu",
    *,
    keep: bool = False,
    on_matrix: Callable[[int, str, MatrixResult], None] | None = None,
) -> Iterator[LayerResult]:
    """Yield one LayerResult per layer of an in-memory model, in order (see ``decompose_layer``)."""
    for i in layers:
        hessian_of = functools.partial(hessians.of, i)
        yield decompose_layer(i, layer_weights(model, i), hessian_of, cfg, device, keep=keep, on_matrix=on_matrix)


def summarize(results: list[LayerResult], seconds: float) -> dict:
    """Summary over all matrices: layers, bits per weight weighted by element count, wall seconds, median act_err."""
    matrices = [r for layer in results for r in layer.proj.values()]
    numel = sum(r.numel for r in matrices)
    return {
        "layers": len(results),
        "bits_per_weight": sum(r.bits_per_weight * r.numel for r in matrices) / numel if numel else 0.0,
        "seconds": seconds,
        "act_err_median": statistics.median(r.act_err for r in matrices) if matrices else float("nan"),
    }


def per_projection(results: list[LayerResult]) -> dict[str, dict[str, float]]:
    """Projection type -> act_err min, median and max over the layers, and its bits per weight."""
    out = {}
    for proj in PROJECTIONS:
        rows = [layer.proj[proj] for layer in results if proj in layer.proj]
        if rows:
            errs = [r.act_err for r in rows]
            bpw = sum(r.bits_per_weight * r.numel for r in rows) / sum(r.numel for r in rows)
            out[proj] = {"min": min(errs), "median": statistics.median(errs), "max": max(errs), "bits_per_weight": bpw}
    return out
