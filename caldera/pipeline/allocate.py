"""Sensitivity-guided per-layer budgets: probe every matrix of a calibrated run, allocate rank and BQ per
(layer, projection) under a bits-per-weight budget, and write the choice as per-layer overrides.

Objective: Σ numel · multiplier(projection) · predicted relative error² (caldera.core.sensitivity), i.e. the
size-weighted mean relative activation-aware error that uniform settings also minimise, with a profile's
multiplier favouring some projections. Bits are what the packed-format writer stores for each option.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from caldera.config import ConfigError, DecomposeConfig
from caldera.core.allocate import Option, allocate
from caldera.core.sensitivity import Sensitivity, probe
from caldera.io.run_dir import RunDir, atomic_write
from caldera.io.shards import ShardReader
from caldera.pipeline.decompose_model import PROJECTIONS, clamped_rank, projection_seed
from caldera.pipeline.hessians import PROJ_GROUP, PROJ_PATH
from caldera.pipeline.plan import linear_bytes

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclasses.dataclass(frozen=True)
class Profile:
    """Which options the allocator may pick, how it weighs projections, and its default budget."""

    bqs: tuple[int, ...]
    ranks: tuple[int, ...]
    attention_weight: float  # multiplier of q/k/v/o errors (MLP: 1)
    budget: float  # bits per weight of the linears when none is given


PROFILES = {
    "balanced": Profile((2, 3), (0, 16, 32, 64, 96, 128, 192, 256), 1.0, 3.0),
    "attention-high": Profile((2, 3), (0, 16, 32, 64, 96, 128, 192, 256), 4.0, 3.0),
    "compression-max": Profile((2,), (0, 8, 16, 32, 48, 64), 1.0, 2.5),
}


SENSITIVITY_FILE = "sensitivity.json"
"""RUN/sensitivity.json: the probes, keyed by their settings; written after every layer, so probing resumes and
allocating again (another budget or profile) reads them instead of probing."""


def probe_run(
    run: RunDir, reader: ShardReader, num_layers: int, cfg: DecomposeConfig, max_rank: int, device: torch.device,
    on_matrix: Callable[[int, str], None] | None = None,
) -> dict[tuple[int, str], tuple[Sensitivity, tuple[int, int]]]:  # fmt: skip
    """(layer, proj) -> (Sensitivity at cfg.bq, shape) for every matrix, from the shards and the run's Hessians
    (probes already in RUN/sensitivity.json with the same settings are read back)."""
    path = run.root / SENSITIVITY_FILE
    key = {"probe": cfg.to_dict(), "max_rank": max_rank, "device": device.type}
    stored = json.loads(path.read_text()) if path.is_file() else {}
    done = stored.get("matrices", {}) if stored.get("key") == key else {}
    out = {}
    for i in range(num_layers):
        if all(f"{i}:{p}" in done for p in PROJECTIONS):
            for proj in PROJECTIONS:
                entry = done[f"{i}:{proj}"]
                out[i, proj] = (
                    Sensitivity(**{**entry["sensitivity"], "spectrum": tuple(entry["sensitivity"]["spectrum"])}),
                    tuple(entry["shape"]),
                )
                if on_matrix is not None:
                    on_matrix(i, proj)
            continue
        hessians = run.load_hessians(i)
        tensors = reader.tensors(f"model.layers.{i}.")
        for proj in PROJECTIONS:
            w = tensors[f"model.layers.{i}.{PROJ_PATH[proj]}.weight"].to(device, torch.float32)
            mcfg = dataclasses.replace(cfg, seed=projection_seed(cfg.seed, i, proj))
            out[i, proj] = probe(w, hessians[PROJ_GROUP[proj]], mcfg, max_rank), tuple(w.shape)
            done[f"{i}:{proj}"] = {"sensitivity": dataclasses.asdict(out[i, proj][0]), "shape": list(w.shape)}
            if on_matrix is not None:
                on_matrix(i, proj)
        text = json.dumps({"key": key, "matrices": done})
        atomic_write(path, lambda tmp, text=text: tmp.write_text(text))
    return out


def options_for(
    sens: Sensitivity, shape: tuple[int, int], cfg: DecomposeConfig, profile: Profile, weight: float
) -> list[Option]:
    """Every (bq, rank) option of the profile for one matrix, with its stored bits and weighted error."""
    out = []
    for bq in profile.bqs:
        for rank in sorted({clamped_rank(r, shape) for r in profile.ranks}):
            bits = 8 * linear_bytes(shape, dataclasses.replace(cfg, bq=bq, rank=rank), None)
            out.append(Option(bq, rank, bits, weight * sens.rel_error(bq, rank) ** 2))
    return out


def choose(
    probes: dict[tuple[int, str], tuple[Sensitivity, tuple[int, int]]],
    cfg: DecomposeConfig,
    profile: Profile,
    budget: float,
) -> dict[tuple[int, str], Option]:
    """The allocation under ``budget`` bits per weight over all matrices (ConfigError if it cannot be met)."""
    numel = sum(shape[0] * shape[1] for _, shape in probes.values())
    options = {
        key: options_for(s, shape, cfg, profile, shape[0] * shape[1] * _weight(key[1], profile))
        for key, (s, shape) in probes.items()
    }
    try:
        return allocate(options, int(budget * numel))
    except ValueError as e:
        raise ConfigError(f"budget {budget:g} bits per weight cannot be met: {e}") from None


def _weight(proj: str, profile: Profile) -> float:
    return profile.attention_weight if proj in ATTENTION else 1.0


def as_overrides(choice: dict[tuple[int, str], Option]) -> dict[str, dict[str, int]]:
    """One override rule per matrix: ``layers.I.<module path>: {rank, bq}`` (caldera.pipeline.overrides)."""
    return {f"layers.{i}.{PROJ_PATH[p]}": {"rank": o.rank, "bq": o.bq} for (i, p), o in sorted(choice.items())}


def summary(
    choice: dict[tuple[int, str], Option],
    probes: dict[tuple[int, str], tuple[Sensitivity, tuple[int, int]]],
) -> dict[str, Any]:
    """Bits per weight of the allocation and its predicted size-weighted relative error."""
    numel = {k: shape[0] * shape[1] for k, (_, shape) in probes.items()}
    total = sum(numel.values())
    rel2 = sum(numel[k] * probes[k][0].rel_error(o.bq, o.rank) ** 2 for k, o in choice.items()) / total
    return {"bits_per_weight": sum(o.bits for o in choice.values()) / total, "predicted_rel_error": rel2**0.5}


def write_allocation(path: Path, rules: dict[str, dict[str, int]], info: dict[str, Any]) -> None:
    """The overrides file (YAML, loadable by --overrides) with the allocation's settings as a comment header."""
    import yaml

    header = "".join(f"# {k}: {v}\n" for k, v in info.items())
    path.write_text(header + yaml.safe_dump(rules, sort_keys=False, default_flow_style=None))
