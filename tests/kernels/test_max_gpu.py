"""The Mojo ops on a CUDA GPU (run on the lent H100; skipped without one): parity with bf16/fp16 activations.

Tolerance ||Δ||/||ref|| < 1e-2 against docs/FORMAT.md in float64: the weights are rounded to the 16-bit
activation type for the tensor cores (2^-9 relative for bf16) and t = x̃ Rᵀ is rounded once more before t Lᵀ.
"""

import pytest
import torch

from caldera.runtime import max_graph as mg
from caldera.runtime.compressed import CompressedLinear
from caldera.testing.format_reference import doc_forward
from caldera.testing.packed import random_packed_linear

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.max,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CASES = {
    # name: (m, n, options, activation dtype); ragged shapes take the guarded byte loads
    "qwen-kv": (1024, 8192, {"rank": 256, "incoherence": False}, torch.bfloat16),
    "rank16-incoherence-bias": (64, 256, {"rank": 16, "bias": True}, torch.bfloat16),
    "ragged-rank5": (72, 100, {"rank": 5}, torch.bfloat16),
    "rank0-bias": (96, 80, {"rank": 0, "bias": True, "incoherence": False}, torch.bfloat16),
    "fp16-factors-fp16": (80, 96, {"rank": 8, "bl": 16, "br": 16}, torch.float16),
    "q4-groups128-fp16": (48, 416, {"rank": 12, "bq": 4, "group_size": 128, "incoherence": False}, torch.float16),
    "q2-lr2-bf16": (40, 320, {"rank": 20, "bl": 2, "br": 2}, torch.bfloat16),
    # 265 row tiles, two per stage-2 block at decode (the last block's second one is past m); stage 2 reads stage
    # 1's prepared x; 896 columns end in a K step of 2 chunks (zero-filled in the ring)
    "two-launches-fp16": (4240, 896, {"rank": 128, "bias": True}, torch.float16),
    # two tiles per block, the last one with 10 rows: the guarded loads of the mixed kernel
    "ragged-two-tiles-bf16": (4250, 200, {"rank": 8}, torch.bfloat16),
    # wide launch with wgmma for 4-bit Q (8 slices a K step) and 2-bit factors; 200 rows: the second block's last
    # warpgroup holds 8 rows; 1000 columns end in a partial K step
    "q4-wgmma-bf16": (200, 1000, {"rank": 24, "bq": 4, "bl": 2, "br": 2, "incoherence": False}, torch.bfloat16),
    # wide launch reading x in B-tile order (`wg_ring_part`) with no low-rank part (no stage-1 blocks): 420 columns
    # (rows not 16-byte aligned in x) padded to two K steps; 136 rows, the last warpgroup with 8
    "q2-tiles-rank0-bf16": (136, 420, {"rank": 0, "bias": True, "incoherence": False}, torch.bfloat16),
    # the same with fp16 factors: Q's loop from the staged tiles, L's and R's by mma.sync (no t tiles)
    "q2-tiles-fp16-factors-bf16": (136, 512, {"rank": 12, "bl": 16, "br": 16, "incoherence": False}, torch.bfloat16),
    # at 130 tokens 66 row blocks × 2 passes of 128 tokens are 132 tiles, as many as the SMs: 128-token tiles
    # (`tile_nt`, wgmma m64n128k16), the second pass with 2 tokens, the last row block with 80 rows
    "q2-tiles128-bf16": (8400, 512, {"rank": 32}, torch.bfloat16),
    # at 130 tokens 2 row blocks × 2 passes of 128-token tiles with K long enough to split (65 steps, the last one
    # partial: 2 splits of at least LONG_SPLIT_STEPS, `k_splits`); at 9 tokens 64-token tiles split 8 ways
    "q2-tiles128-split-bf16": (200, 16448, {"rank": 16}, torch.bfloat16),
    # decode with 28160 columns: a block's own prepared x would pass LOCAL_X_BYTES (`local_x_fits`), so stage 1
    # prepares it in xp and stage 2 reads it through the ring (`prepares_x`: the path of 8192×29568)
    "q2-stage1-xp-bf16": (64, 28160, {"rank": 16}, torch.bfloat16),
    # decode, 264 blocks of 64 rows: each stage-2 warp holds two row tiles (`warp_tiles`), Q's and L's rings side by
    # side (at 1 and 2 tokens); the same with fp16 factors and activations (L's fp16 loop one tile after the other)
    "warp-tile-pairs-bf16": (16896, 512, {"rank": 32, "bias": True}, torch.bfloat16),
    "warp-tile-pairs-fp16-factors-fp16": (16960, 256, {"rank": 8, "bl": 16, "br": 16}, torch.float16),
}
ROWS = (1, 2, 5, 9, 130)  # decode (activations in the ring up to 2 tokens), wide launch with one and three token passes


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double().cpu() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_the_format_on_the_gpu(name):
    m, n, options, dtype = CASES[name]
    tensors, meta = random_packed_linear(m, n, seed=21, **options)
    module = CompressedLinear(tensors, "linear", meta).cuda()
    layer = mg.MaxLinear(module)
    assert layer.reason is None
    for rows in ROWS:
        x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows))
        reference = doc_forward(tensors, "linear", meta, x.to(dtype).double())
        xs = x.to("cuda", dtype)
        first = layer.outputs(xs, mg.IMPLS)
        for impl, y in zip(mg.IMPLS, first, strict=True):
            assert y.dtype == dtype and y.shape == (rows, m)
            err = rel_err(y, reference)
            assert err < 1e-2, f"{impl}, {rows} rows: ||Δ||/||ref|| = {err:.2e}"
        again = layer.outputs(xs, mg.IMPLS)  # the fused launch's counters were reset: same bits again
        assert all(map(torch.equal, first, again))
