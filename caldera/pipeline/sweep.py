"""Sweep specs: YAML experiment matrices expanded into concrete decomposition configs, and the results table.

    name: stage1                       # optional; default: the file's stem
    model: default                     # default (the embedded model) or a local Llama/Qwen2 folder
    calibration: {samples: 64, seq_len: 256, calib: [file.txt]}   # defaults for every config
    eval: {seq_len: 512, max_tokens: 16384, data: [wikitext2]}
    embed_bits: 16
    fixed: {method: caldera, bq: 2, group_size: 64, iters: 4}    # every config
    grid:                              # every combination of these lists
      lr_bits: [4, 16]                 # BL = BR
      rank: [64, 128, 256]
    baselines:                         # explicit configs, drawn as references (not on the Pareto front)
      - {method: gptq, bq: 3, group_size: 128, zero_point: true}

Config keys: method, bq, bl, br, lr_bits, rank, group_size, iters, damping, zero_point, protect, samples, seq_len (the
last two change the calibration: configs that share it share Hessians). ``rank`` is an integer, ``{fraction: f}`` of the
hidden size (min(m, n) of every projection whose rank is not clamped), or ``{bits_per_weight: b}``: the largest
uniform rank whose linears take at most b bits per weight, counted by the packed-format writer. Unknown keys
anywhere are an error naming the key.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from caldera.config import ConfigError, DecomposeConfig

TOP_KEYS = frozenset({"name", "model", "calibration", "eval", "embed_bits", "fixed", "grid", "baselines"})
CALIBRATION_KEYS = frozenset({"samples", "seq_len", "calib"})
EVAL_KEYS = frozenset({"seq_len", "max_tokens", "data"})
DECOMPOSE_KEYS = frozenset(
    {"method", "bq", "bl", "br", "lr_bits", "rank", "group_size", "iters", "damping", "zero_point", "protect"}
)
CONFIG_KEYS = DECOMPOSE_KEYS | {"samples", "seq_len"}
RANK_FORMS = frozenset({"fraction", "bits_per_weight"})
DEFAULT_CALIBRATION = {"samples": 64, "seq_len": 256, "calib": None}
DEFAULT_EVAL = {"seq_len": 512, "max_tokens": 16384, "data": None}
DEFAULT_ITERS = 4


@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """One row of a sweep: the decomposition config, its calibration, and whether it is a baseline."""

    cfg: DecomposeConfig
    calibration: dict[str, Any]  # samples, seq_len, calib
    baseline: bool
    rank_rule: str  # how the rank was given: "64", "fraction 0.25", "bits_per_weight 3.0"


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    name: str
    model: Path | None  # None: the embedded default model
    eval: dict[str, Any]
    embed_bits: int
    rows: list[dict[str, Any]]  # the raw configs, grid first (``baseline`` key added)
    calibration: dict[str, Any]


def _check_keys(where: str, value: Any, allowed: frozenset[str]) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, not {type(value).__name__}")
    unknown = sorted(set(value) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return dict(value)


def parse_spec(data: Any, name: str, base_dir: Path) -> SweepSpec:
    """A SweepSpec from the parsed YAML ``data``; relative paths are taken from ``base_dir``."""
    top = _check_keys("sweep", data, TOP_KEYS)
    calibration = DEFAULT_CALIBRATION | _check_keys("calibration", top.get("calibration"), CALIBRATION_KEYS)
    evaluation = DEFAULT_EVAL | _check_keys("eval", top.get("eval"), EVAL_KEYS)
    for section, key in ((calibration, "calib"), (evaluation, "data")):
        if section[key] is not None:
            section[key] = [_path(base_dir, p) for p in _as_list(section[key], key)]
    fixed = _check_keys("fixed", top.get("fixed"), CONFIG_KEYS)
    grid = _check_keys("grid", top.get("grid"), CONFIG_KEYS)
    axes = [(k, _as_list(v, f"grid.{k}")) for k, v in grid.items()]
    rows = [
        fixed | dict(zip([k for k, _ in axes], combo, strict=True))
        for combo in itertools.product(*[v for _, v in axes])
    ]
    baselines = top.get("baselines") or []
    if not isinstance(baselines, list):
        raise ConfigError("baselines must be a list of configs")
    rows = [r | {"baseline": False} for r in rows if r] + [
        _check_keys(f"baselines[{i}]", b, CONFIG_KEYS) | {"baseline": True} for i, b in enumerate(baselines)
    ]
    if not rows:
        raise ConfigError("the sweep has no configs: give fixed/grid or baselines")
    model = top.get("model")
    model = None if model in (None, "default") else Path(_path(base_dir, model))
    embed_bits = int(top.get("embed_bits", 16))
    return SweepSpec(str(top.get("name") or name), model, evaluation, embed_bits, rows, calibration)


def _as_list(value: Any, where: str) -> list[Any]:
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{where} is an empty list")
        return value
    return [value]


def _path(base_dir: Path, p: Any) -> str:
    """A file path relative to the YAML's folder; dataset names (no such file there) stay as given."""
    candidate = base_dir / str(p)
    return str(candidate) if candidate.exists() or Path(str(p)).is_absolute() else str(p)


def resolve_rank(rank: Any, cfg: DecomposeConfig, model_dir: Path) -> tuple[int, str]:
    """(rank, rule) for an integer rank, {fraction: f} or {bits_per_weight: b} on the model in ``model_dir``."""
    if isinstance(rank, bool) or not isinstance(rank, int | dict):
        raise ConfigError(f"rank={rank!r} must be an integer, {{fraction: f}} or {{bits_per_weight: b}}")
    if isinstance(rank, int):
        return rank, str(rank)
    form = _check_keys("rank", rank, RANK_FORMS)
    if len(form) != 1:
        raise ConfigError(f"rank={rank!r} must give exactly one of fraction, bits_per_weight")
    ((kind, value),) = form.items()
    from caldera.io.model_shapes import model_shape

    shape = model_shape(model_dir)
    if kind == "fraction":
        if not 0 < float(value) <= 1:
            raise ConfigError(f"rank fraction {value} must lie in (0, 1]")
        return max(1, round(float(value) * shape.hidden)), f"fraction {value:g}"
    return rank_for_bits(shape, cfg, float(value)), f"bits_per_weight {value:g}"


def linears_bits(shape, cfg: DecomposeConfig, rank: int) -> float:
    """Bits per weight of the linears of ``shape`` at a uniform ``rank`` (every stored byte, as exported)."""
    from caldera.pipeline.plan import PROJECTIONS, PlanConfig, plan

    kw = {"bq": cfg.bq, "bl": cfg.bl, "br": cfg.br, "group_size": cfg.group_size, "zero_point": cfg.zero_point}
    kw["protect"] = cfg.protect
    pc = PlanConfig(ranks=(rank,) * len(PROJECTIONS), lr_group_size=cfg.lr_group_size, embed_bits=16, **kw)
    return plan(shape, pc, 0).bits_per_weight_linears


def rank_for_bits(shape, cfg: DecomposeConfig, budget: float) -> int:
    """The largest uniform rank whose linears stay within ``budget`` bits per weight (ConfigError if rank 0
    does not)."""
    if linears_bits(shape, cfg, 0) > budget:
        raise ConfigError(f"bits_per_weight {budget:g} is below Q alone ({linears_bits(shape, cfg, 0):.3f})")
    lo, hi = 0, shape.hidden  # bits grow with the rank: bisect for the last rank within the budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if linears_bits(shape, cfg, mid) <= budget else (lo, mid - 1)
    return lo


def expand(spec: SweepSpec, model_dir: Path) -> list[SweepConfig]:
    """The concrete configs of ``spec`` for the model in ``model_dir`` (ranks resolved), in spec order."""
    out = []
    for row in spec.rows:
        row = dict(row)
        baseline = row.pop("baseline")
        calibration = spec.calibration | {k: row.pop(k) for k in ("samples", "seq_len") if k in row}
        if "lr_bits" in row:
            if "bl" in row or "br" in row:
                raise ConfigError("give lr_bits or bl/br, not both")
            row["bl"] = row["br"] = row.pop("lr_bits")
        rank = row.pop("rank", 0 if row.get("method", "caldera") != "caldera" else 256)
        method = row.pop("method", "caldera")
        row.setdefault("iters", DEFAULT_ITERS)
        cfg = DecomposeConfig.for_method(method, rank=0, **row)
        k, rule = resolve_rank(rank, cfg, model_dir) if cfg.method.value == "caldera" else (0, "0")
        out.append(SweepConfig(dataclasses.replace(cfg, rank=k), calibration, baseline, rule))
    return out


def pareto(points: Sequence[tuple[float, float]]) -> list[bool]:
    """For (bits, ppl) points: True where no other point has bits <= and ppl <= with one of them strictly less."""
    return [not any(b2 <= b and p2 <= p and (b2 < b or p2 < p) for b2, p2 in points) for b, p in points]
