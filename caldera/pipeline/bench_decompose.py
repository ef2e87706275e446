"""Benchmark of the decomposition itself: seconds, peak memory and error per (shape, method).

Weights and Hessians are synthetic at the real shapes (caldera.testing.synthetic), so no model is
needed. Peak memory: the CUDA allocator's peak on GPU; the process's peak RSS (VmHWM, reset per case)
on CPU.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from caldera.config import ConfigError, DecomposeConfig, Method
from caldera.core.decompose import decompose
from caldera.testing.synthetic import synthetic_hessian, synthetic_weight

DEFAULT_SHAPES = ((896, 896), (4864, 896), (8192, 8192), (8192, 29568))

PRESETS: dict[str, dict] = {
    "rtn": {"method": Method.RTN},
    "ldlq": {"method": Method.GPTQ},
    "ldlq-had": {"method": Method.LDLQ_HAD},
    "caldera-r64-b4": {"method": Method.CALDERA, "rank": 64, "bl": 4, "br": 4},
    "caldera-r256-b4": {"method": Method.CALDERA, "rank": 256, "bl": 4, "br": 4},  # caldera decompose's defaults
    "caldera-r256-b16": {"method": Method.CALDERA, "rank": 256, "bl": 16, "br": 16},
}


@dataclasses.dataclass
class BenchRow:
    shape: tuple[int, int]
    method: str
    device: str
    act_err: float
    fro_err: float
    bits_per_weight: float
    seconds: float
    peak_mb: float
    iters: int


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'896x896,8192x29568' -> [(896, 896), (8192, 29568)] (out × in)."""
    shapes = []
    for part in text.split(","):
        try:
            m, n = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"bad shape {part!r}: expected OUTxIN, e.g. 8192x29568") from None
        if m < 1 or n < 1:
            raise ConfigError(f"bad shape {part!r}: dimensions must be positive")
        shapes.append((m, n))
    return shapes


def preset_config(name: str, **overrides) -> DecomposeConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown method preset {name!r}; choose from {', '.join(PRESETS)}")
    kw = dict(PRESETS[name])
    return DecomposeConfig.for_method(kw.pop("method"), **kw, **overrides)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _peak_mb(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(
    shapes: list[tuple[int, int]], methods: list[str], device: str, seed: int = 0, **overrides
) -> Iterator[BenchRow]:
    """Yield one row per (shape, method); the shape's W and H are generated once on ``device``."""
    dev = torch.device(device)
    configs = {name: preset_config(name, seed=seed, **overrides) for name in methods}
    for m, n in shapes:
        w = synthetic_weight(m, n, seed, device=dev)
        h = synthetic_hessian(n, seed + 1, device=dev).cpu()  # as a pipeline loads it: H stays in host memory
        for name, cfg in configs.items():
            if cfg.rank > min(m, n):
                cfg = dataclasses.replace(cfg, rank=min(m, n))
            _reset_peak(dev)
            start = time.perf_counter()
            dec = decompose(w, h, cfg)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            seconds = time.perf_counter() - start
            yield BenchRow(
                (m, n),
                name,
                str(dev),
                dec.act_err,
                dec.fro_err,
                dec.bits_per_weight(),
                seconds,
                _peak_mb(dev),
                len(dec.history),
            )
            del dec
        del w, h
