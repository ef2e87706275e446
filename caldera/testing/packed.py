"""Random packed linears (docs/FORMAT.md) of any shape, for runtime and kernel tests and benchmarks.

No decomposition is run: codes are uniform, scales log-uniform, so a 29568 × 8192 layer is built in seconds.
The weight that results is as large as a real layer's (|Ŵ| ~ 0.02) with a low-rank part ~ 1/4 of Q's norm.
"""

from __future__ import annotations

from typing import Any

import torch

from caldera.core.decompose import Decomposition
from caldera.core.incoherence import IncoherenceTransform
from caldera.core.quantize import QuantizedTensor, num_groups
from caldera.io.packed_format import incoherence_blocks, linear_metadata, linear_tensors


def _part(rows: int, cols: int, bits: int, group: int, scale: float, zero_point: bool, g: torch.Generator):
    if bits == 16:
        return QuantizedTensor((torch.randn(rows, cols, generator=g) * scale).half(), None, None, 16, cols)
    codes = torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)
    spread = torch.empty(rows, num_groups(cols, group)).uniform_(-0.5, 0.5, generator=g).exp2()
    scales = (spread * scale / (2 ** (bits - 1))).half()  # |code - offset| · scale ~ scale
    zeros = None
    if zero_point:
        zeros = torch.randint(0, 2**bits, (rows, num_groups(cols, group)), generator=g, dtype=torch.uint8)
    return QuantizedTensor(codes, scales, zeros, bits, group)


def random_packed_linear(
    m: int,
    n: int,
    *,
    rank: int = 0,
    bq: int = 2,
    bl: int = 4,
    br: int = 4,
    group_size: int = 64,
    lr_group_size: int = 64,
    incoherence: bool = True,
    zero_point: bool = False,
    bias: bool = False,
    seed: int = 0,
    prefix: str = "linear",
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of one packed linear ``prefix`` of shape (m, n): its tensors, blocks and bias."""
    g = torch.Generator().manual_seed(seed)
    q = _part(m, n, bq, group_size, 0.02, zero_point, g)
    left = right = None
    if rank:
        amplitude = (0.005 / rank**0.5) ** 0.5  # |L R| ~ 0.005 per entry
        left = _part(m, rank, bl, lr_group_size, amplitude, zero_point, g)
        right = _part(rank, n, br, lr_group_size, amplitude, zero_point, g)
    u_out = u_in = None
    if incoherence:
        u_out, u_in = IncoherenceTransform(m, 2 * seed), IncoherenceTransform(n, 2 * seed + 1)
    dec = Decomposition(q, left, right, u_out, u_in, 0.0, 0.0, [], 0.0, 0.0)
    b = torch.randn(m, generator=g) * 0.1 if bias else None
    return linear_tensors(prefix, dec, b) | incoherence_blocks([dec]), linear_metadata(dec)
