"""Per-layer, per-projection settings on top of one decomposition config.

Rules map a pattern to fields (rank, bq, bl, br); for a matrix, every matching rule applies in order, so a later
rule wins over an earlier one:

    layers.0-3.mlp.down_proj:   {rank: 128, bq: 3}     layers 0..3, one projection (module path or its name)
    layers.*.self_attn:         {rank: 64}             every layer, every attention projection
    layers.29:                  {bq: 3}                every projection of layer 29
    down_proj:                  {rank: 96}             a projection name alone: every layer

Layer sets use the --layers syntax (0-3,5). Unknown fields, projections or malformed layer sets are ConfigErrors
naming the rule. The rules are part of a run's decompose spec, so a resumed run must use the same ones.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from caldera.config import ConfigError, DecomposeConfig
from caldera.pipeline.hessians import PROJ_PATH

FIELDS = ("rank", "bq", "bl", "br")
GROUPS = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"), "mlp": ("gate_proj", "up_proj", "down_proj")}
SPEC_KEY = "overrides"  # the decompose spec's key (absent when there are no rules)


@dataclasses.dataclass(frozen=True)
class Rule:
    pattern: str
    layers: frozenset[int] | None  # None: every layer
    projections: frozenset[str]
    fields: tuple[tuple[str, int], ...]


def _projections(part: str, pattern: str) -> frozenset[str]:
    if part in ("", "*"):
        return frozenset(PROJ_PATH)
    if part in GROUPS:
        return frozenset(GROUPS[part])
    name = part.rsplit(".", 1)[-1]
    if name in PROJ_PATH and part in (name, PROJ_PATH[name]):
        return frozenset({name})
    raise ConfigError(f"override {pattern!r}: {part!r} is not a projection (e.g. mlp.down_proj, down_proj, self_attn)")


def _layer_set(part: str, pattern: str) -> frozenset[int] | None:
    if part == "*":
        return None
    layers: set[int] = set()
    for piece in part.split(","):
        lo, sep, hi = piece.partition("-")
        if not (lo.isdigit() and (hi.isdigit() if sep else not hi)) or (sep and int(lo) > int(hi)):
            raise ConfigError(f"override {pattern!r}: bad layer set {part!r} (expected *, N, N-M, e.g. 0-3,5)")
        layers.update(range(int(lo), int(hi if sep else lo) + 1))
    return frozenset(layers)


def parse_rule(pattern: str, fields: Any) -> Rule:
    """One rule from its pattern and its {field: value} mapping."""
    if not isinstance(fields, Mapping) or not fields:
        raise ConfigError(f"override {pattern!r}: give a mapping of {', '.join(FIELDS)}")
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise ConfigError(f"override {pattern!r}: unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in fields.values()):
        raise ConfigError(f"override {pattern!r}: values must be integers")
    if pattern.startswith("layers."):
        layer_part, _, proj_part = pattern.removeprefix("layers.").partition(".")
        layers = _layer_set(layer_part, pattern)
    else:
        layers, proj_part = None, pattern
    return Rule(pattern, layers, _projections(proj_part, pattern), tuple(sorted(fields.items())))


@dataclasses.dataclass(frozen=True)
class Overrides:
    """Ordered rules; ``apply`` gives one matrix's config."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def parse(cls, mapping: Mapping[str, Any] | None) -> Overrides:
        return cls(tuple(parse_rule(str(p), f) for p, f in (mapping or {}).items()))

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Overrides:
        """The rules recorded in a run's decompose spec (none when it has no ``overrides`` key)."""
        return cls.parse(dict(spec.get(SPEC_KEY) or {}))

    def to_dict(self) -> dict[str, dict[str, int]]:
        return {r.pattern: dict(r.fields) for r in self.rules}

    def check(self, cfg: DecomposeConfig, num_layers: int) -> None:
        """ConfigError if a rule names a layer the model lacks or gives a config DecomposeConfig rejects."""
        for rule in self.rules:
            if rule.layers and max(rule.layers) >= num_layers:
                raise ConfigError(f"override {rule.pattern!r}: the model has layers 0-{num_layers - 1}")
            try:
                dataclasses.replace(cfg, **dict(rule.fields))
            except ConfigError as e:
                raise ConfigError(f"override {rule.pattern!r}: {e}") from None

    def apply(self, cfg: DecomposeConfig, layer: int, proj: str) -> DecomposeConfig:
        """``cfg`` with every rule matching (layer, proj) applied in order."""
        fields = self._fields(layer, proj)
        return dataclasses.replace(cfg, **fields) if fields else cfg

    @functools.cache  # noqa: B019 (frozen, few instances)
    def _fields(self, layer: int, proj: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for rule in self.rules:
            if proj in rule.projections and (rule.layers is None or layer in rule.layers):
                out.update(rule.fields)
        return out

    def __bool__(self) -> bool:
        return bool(self.rules)


NO_OVERRIDES = Overrides()


def load_overrides(path: Path) -> Overrides:
    """The rules of a YAML or JSON file (a mapping pattern -> fields); ConfigError naming the file otherwise."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML/JSON ({str(e).splitlines()[0]})") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping of pattern -> {{{', '.join(FIELDS)}}}")
    return Overrides.parse(data)
