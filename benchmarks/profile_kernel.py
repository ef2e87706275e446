"""One impl of a compressed linear run a few times eagerly, for a profiler (Nsight Compute) to read its kernels.

    ncu --clock-control none --csv --metrics gpu__time_duration.sum,... \
        python3 benchmarks/profile_kernel.py 8192 8192 1 fused

Arguments: out features, in features, tokens, impl (fused, two_stage, unfused_torch or dense); BQ=2, BL=BR=4,
rank 256, groups of 64, no incoherence, bf16 activations (fp16 weights for dense), as `caldera bench`.
"""

import sys

import torch

from caldera.runtime.compressed import CompressedLinear
from caldera.testing.packed import random_packed_linear


def main(m: int, n: int, s: int, impl: str, calls: int = 5) -> None:
    tensors, meta = random_packed_linear(m, n, rank=256, incoherence=False, seed=0)
    module = CompressedLinear(tensors, "linear", meta).cuda()
    x = torch.randn(s, n, device="cuda", dtype=torch.bfloat16)
    if impl in ("fused", "two_stage"):
        from caldera.runtime import max_graph as mg

        spec, inputs = mg.KernelSpec.of(module, "cuda"), mg.KernelInputs.of(module, fuse_bias=False)
        call = lambda: mg.transformed_matmul(x, inputs, spec, (impl,))  # noqa: E731
    elif impl == "dense":
        w, xd = module.transformed_weight(torch.float16), x.half()
        call = lambda: torch.nn.functional.linear(xd, w)  # noqa: E731
    else:
        call = lambda: module(x)  # noqa: E731
    for _ in range(calls):
        call()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
