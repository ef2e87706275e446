"""Frozen configuration objects: one per algorithm, validated on construction, JSON round-trip."""

from __future__ import annotations

import dataclasses
import enum
import json
from typing import Any, ClassVar, Self

SUPPORTED_BITS = (2, 3, 4, 8, 16)
"""Bit widths the quantizer supports; 16 means "keep fp16" (used for L and R)."""


class ConfigError(ValueError):
    """An impossible or unsupported setting; the message names the field."""


class Rounding(enum.StrEnum):
    NEAREST = "nearest"
    STOCHASTIC = "stochastic"


class Method(enum.StrEnum):
    """Decomposition methods, all producing Q (+ L·R) in the same format."""

    RTN = "rtn"  # group-wise round to nearest, no Hessian
    GPTQ = "gptq"  # LDLQ against H, rank 0, no incoherence
    LDLQ_HAD = "ldlq-had"  # LDLQ with incoherence processing (QuIP-style), rank 0
    CALDERA = "caldera"  # Q + L·R, alternating, with incoherence


def _enum(cls: type[enum.Enum], field: str, value: Any) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise ConfigError(f"{field}={value!r} is not one of {', '.join(str(v.value) for v in cls)}") from None


class _Config:
    """JSON round-trip for the frozen dataclasses below (enums as their values)."""

    version: ClassVar[int] = 1

    def to_dict(self) -> dict[str, Any]:
        out = {"version": self.version}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            out[f.name] = v.value if isinstance(v, enum.Enum) else v
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Self:
        d = dict(d)
        version = d.pop("version", cls.version)
        if version != cls.version:
            raise ConfigError(f"{cls.__name__}: version {version} is not supported (expected {cls.version})")
        fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(fields))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {', '.join(unknown)}")
        return cls(**d)  # __post_init__ coerces enum values

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> Self:
        return cls.from_dict(json.loads(s))


@dataclasses.dataclass(frozen=True)
class QuantConfig(_Config):
    """Group-wise uniform quantizer.

    Groups run along the input (last) dimension, ``group_size`` columns each (the last group may be
    shorter). Without zero points the grid is symmetric: w ≈ (code - (2^b - 1)/2) · scale; with them,
    w ≈ (code - zero) · scale, zero an integer in [0, 2^b - 1]. Scales are fp16.
    """

    bits: int = 2
    group_size: int = 64
    zero_point: bool = False
    rounding: Rounding = Rounding.NEAREST
    pow2_scales: bool = False
    clip_search: bool = True  # pick each group's scale among shrunk max-abs scales by squared error
    seed: int = 0  # stochastic rounding only

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"bits={self.bits} is not supported; choose one of {SUPPORTED_BITS}")
        if self.group_size < 1:
            raise ConfigError(f"group_size={self.group_size} must be >= 1")
        object.__setattr__(self, "rounding", _enum(Rounding, "rounding", self.rounding))

    @property
    def is_float(self) -> bool:
        return self.bits == 16


@dataclasses.dataclass(frozen=True)
class DecomposeConfig(_Config):
    """One matrix W (m, n) ≈ Q + L·R against the input Hessian H (n, n).

    ``rank`` 0 gives plain LDLQ (GPTQ, or QuIP-style with ``incoherence``); ``method`` RTN ignores H.
    """

    method: Method = Method.CALDERA
    bq: int = 2
    bl: int = 4
    br: int = 4
    rank: int = 256
    group_size: int = 64  # Q's group along the input dimension
    lr_group_size: int = 64  # L's group (along the rank) and R's group (along the input dimension)
    iters: int = 10  # outer CALDERA rounds (Q update, then L·R update)
    lr_iters: int = 5  # alternating refinement of the quantized factors per round
    incoherence: bool | None = None  # None: as the method implies (ldlq-had and caldera: on)
    damping: float = 0.01  # relative to the mean diagonal of H
    block_size: int = 128  # LDLQ lazy-update block (columns)
    randomized_svd: bool = True  # exact SVD costs ~4x at 8192² on an H100 for the same error
    zero_point: bool = False
    clip_search: bool = True
    seed: int = 0
    protect: float = 0.0  # fraction of weights kept exactly (fp16 outliers beside Q), by importance w² · H_jj

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", _enum(Method, "method", self.method))
        if not 0 <= self.protect <= 0.01:
            raise ConfigError(f"protect={self.protect} must be in [0, 0.01] (a fraction of the weights; 0: off)")
        implied = self.method in (Method.LDLQ_HAD, Method.CALDERA)
        if self.incoherence is None:
            object.__setattr__(self, "incoherence", implied)
        elif self.method is not Method.CALDERA and self.incoherence != implied:
            raise ConfigError(f"method {self.method.value} implies incoherence={implied}")
        for name in ("bq", "bl", "br"):
            if getattr(self, name) not in SUPPORTED_BITS:
                raise ConfigError(f"{name}={getattr(self, name)} is not supported; choose one of {SUPPORTED_BITS}")
        if self.bq == 16:
            raise ConfigError("bq=16 would store Q unquantized; choose one of 2, 3, 4, 8")
        if self.rank < 0:
            raise ConfigError(f"rank={self.rank} must be >= 0")
        if self.method is not Method.CALDERA and self.rank:
            raise ConfigError(f"method {self.method.value} has no low-rank part; use rank=0 or method=caldera")
        for name in ("group_size", "lr_group_size", "iters", "block_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.lr_iters < 0:
            raise ConfigError(f"lr_iters={self.lr_iters} must be >= 0")
        if not 0 < self.damping < 1:
            raise ConfigError(f"damping={self.damping} must be in (0, 1)")

    def to_dict(self) -> dict[str, Any]:
        """As _Config, without ``protect`` when it is off: run directories made before it existed stay valid."""
        out = super().to_dict()
        return out if self.protect else {k: v for k, v in out.items() if k != "protect"}

    @classmethod
    def for_method(cls, method: Method | str, **kw: Any) -> DecomposeConfig:
        """The config of a method with the other defaults: rank 0 unless caldera."""
        method = _enum(Method, "method", method)
        if method is not Method.CALDERA:
            kw["rank"] = 0
        return cls(method=method, **kw)

    def q_quant(self) -> QuantConfig:
        return QuantConfig(self.bq, self.group_size, self.zero_point, clip_search=self.clip_search, seed=self.seed)

    def l_quant(self) -> QuantConfig:
        return QuantConfig(self.bl, self.lr_group_size, self.zero_point, clip_search=self.clip_search)

    def r_quant(self) -> QuantConfig:
        return QuantConfig(self.br, self.lr_group_size, self.zero_point, clip_search=self.clip_search)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(_Config):
    """Distillation of a compressed model into the original's next-token distributions (``caldera finetune``).

    Trained: L and R (float latents, re-quantized on every step with straight-through gradients), Q's fp16 scales
    (codes fixed), and with ``norms`` the RMSNorm weights. Stored bits do not change. ``samples`` windows of
    ``seq_len`` tokens from the calibration text, ``batch_size`` of them per step, reshuffled every epoch.
    """

    steps: int = 200
    lr: float = 3e-4  # Adam, cosine decay to 0 after a linear warm-up over the first 5% of steps
    batch_size: int = 8
    seq_len: int = 512
    samples: int = 1024
    norms: bool = True
    seed: int = 0
    micro_batch: int = 0  # windows per forward/backward, gradients accumulated over the batch (0: the whole batch)

    def __post_init__(self) -> None:
        if self.micro_batch < 0:
            raise ConfigError(f"micro_batch={self.micro_batch} must be >= 0 (0: the whole batch)")
        for name in ("steps", "batch_size", "seq_len", "samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.lr < 1:
            raise ConfigError(f"lr={self.lr} must be in (0, 1)")
