"""docs/FORMAT.md read literally, in float64: the reference that the runtime and the kernels are checked against.

Everything here is rebuilt from the raw safetensors tensors and the text of the format (bit streams, dense
Hadamard and Kronecker matrices), never through ``caldera.io.packed_format``, so a bug there cannot hide itself.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch


def hadamard(n: int) -> torch.Tensor:
    """Sylvester order, H_2n = [[H_n, H_n], [H_n, -H_n]] (H[i, j] = (-1)^popcount(i & j)), over sqrt(n); float64."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def doc_decode(tensors, name: str, bits: int, group: int, rows: int, cols: int, zero_point: bool) -> torch.Tensor:
    """Dequantize per docs/FORMAT.md from the raw tensors: bit stream -> codes -> (code - offset) · scale, float64."""
    if bits == 16:
        return tensors[name].double()
    stream = (tensors[f"{name}.codes"].long().unsqueeze(-1) >> torch.arange(8)) & 1  # (rows, bytes, 8)
    stream = stream.reshape(rows, -1)[:, : cols * bits].reshape(rows, cols, bits)
    codes = (stream << torch.arange(bits)).sum(-1).double()
    col_group = torch.arange(cols) // group
    scale = tensors[f"{name}.scales"].double()[:, col_group]
    offset = tensors[f"{name}.zeros"].double()[:, col_group] if zero_point else (2**bits - 1) / 2
    return (codes - offset) * scale


def doc_transform(tensors, signs_name: str, n: int) -> torch.Tensor:
    """U = (B ⊗ H_{2^p}) diag(s) (n, n) float64 from the raw sign bits and the stored block."""
    p2, q = n & -n, n // (n & -n)
    bits = (tensors[signs_name].long().unsqueeze(-1) >> torch.arange(8)) & 1
    signs = 1 - 2 * bits.reshape(-1)[:n].double()
    block = tensors[f"incoherence.block.{q}"].double() if q > 1 else torch.ones(1, 1, dtype=torch.float64)
    return torch.kron(block, hadamard(p2)) * signs


def doc_weight(tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> torch.Tensor:
    """Ŵ = U_outᵀ (Q + L R) U_in + S, float64 (out, in), of the linear ``prefix`` with metadata ``meta``."""
    (m, n), k = meta["shape"], meta["rank"]

    def part(p: str, rows: int, cols: int) -> torch.Tensor:
        pm = meta[p]
        return doc_decode(tensors, f"{prefix}.{p}", pm["bits"], pm["group_size"], rows, cols, pm["zero_point"])

    w = part("q", m, n) + (part("l", m, k) @ part("r", k, n) if k else 0)
    if meta["incoherence"]:
        w = doc_transform(tensors, f"{prefix}.su", m).T @ w @ doc_transform(tensors, f"{prefix}.sv", n)
    for pos, value in zip(*(tensors.get(f"{prefix}.outlier_{t}", []) for t in ("index", "value")), strict=True):
        w[int(pos) // n, int(pos) % n] += float(value)  # S: kept weights, one at a time as §6 states
    return w


def doc_forward(tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any], x: torch.Tensor):
    """y = x Ŵᵀ + b, float64 (..., out), for activations x (..., in)."""
    y = x.double() @ doc_weight(tensors, prefix, meta).T
    bias = tensors.get(f"{prefix}.bias")
    return y if bias is None else y + bias.double()
