"""The registered MAX custom ops: one compressed linear in the transformed domain, ỹ = x̃·(Q + L·R)ᵀ (+ b).

Every part is read as docs/FORMAT.md stores it: `*_codes`/`*_data` uint8 rows of packed codes (a 16-bit part's
fp16 values as their bytes, (rows, 2·cols)) and `*_scales` fp16 (rows, ceil(cols/group)) ((rows, 0) for 16-bit
parts); no zero points. Parameters: `bq`/`gq` Q's bits and group size, `bl`/`gl` and `br`/`gr` L's and R's
(bits 16: fp16). The rank k is R's row count (0: L and R are empty); `bias` is float32 (m,), or (0,) for none.
Shapes: x (s, n) and y (s, m) in the activations' dtype; t (P, s, k) float32 holds P partial sums of x·Rᵀ
(P = 1 on the CPU, gpu.P_SPLIT on the GPU); xp (X, s, n) in x's dtype is scratch for the activations that the GPU's
stage 1 prepares for stage 2 (X = gpu.XP_PARTS for 2-bit Q on the GPU, else 0: none); the fused op's partials
(V,) float32 is scratch for split K (V = gpu.SPLIT_VALUES on the GPU, else 0).

    caldera_qlr_fused   y = x·dequant(Q)ᵀ + (x·dequant(R)ᵀ)·dequant(L)ᵀ + b in one op (one GPU launch)
    caldera_lr_project  t = x·dequant(R)ᵀ                                  (two-stage, stage 1)
    caldera_qlr_apply   y = x·dequant(Q)ᵀ + t·dequant(L)ᵀ + b              (two-stage, stage 2)
"""

import extensibility
from extensibility import InputTensor, OutputTensor, _MutableInputTensor as MutableInputTensor
from max.gpu.host import DeviceContext

from .cpu import lr_project, qlr_apply, to_f32
from .gpu import launch_apply, launch_fused, launch_project
from .gpu_decode import XP_PARTS
from .gpu_tiles import P_SPLIT


def _check_parts[target: StaticString](parts: Int) raises:
    """The graph's t must hold as many partial sums as this target writes."""
    var expected = 1 if target == "cpu" else P_SPLIT
    if parts != expected:
        raise Error("t has ", parts, " partial sums, the ", target, " kernels use ", expected)


@extensibility.register("caldera_qlr_fused")
struct QLRFused[bq: Int, gq: Int, bl: Int, gl: Int, br: Int, gr: Int]:
    """`sync` (int64 (2,), zeros when created, then owned by the caller) orders the GPU launch's two phases;
    `t` (P, s, k) float32 is scratch for x·Rᵀ, `xp` for the prepared activations and `partials` (float32,
    gpu.SPLIT_VALUES values on the GPU, else none) for split K's partial sums (outputs the graph discards)."""

    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[rank=2, ...],
        t: OutputTensor[dtype=DType.float32, rank=3, ...],
        xp: OutputTensor[dtype=y.dtype, rank=3, ...],
        partials: OutputTensor[dtype=DType.float32, rank=1, ...],
        x: InputTensor[dtype=y.dtype, rank=2, ...],
        q_codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        q_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        l_data: InputTensor[dtype=DType.uint8, rank=2, ...],
        l_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        r_data: InputTensor[dtype=DType.uint8, rank=2, ...],
        r_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        bias: InputTensor[dtype=DType.float32, rank=1, ...],
        sync: MutableInputTensor[dtype=DType.int64, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var s, n, m, k = x.dim_size(0), x.dim_size(1), q_codes.dim_size(0), r_data.dim_size(0)
        var has_bias = bias.dim_size(0) > 0
        _check_parts[target](t.dim_size(0))
        comptime if target == "cpu":
            var xf = to_f32(x.unsafe_ptr(), s * n)
            if k > 0:
                lr_project[Self.br, Self.gr](
                    t.unsafe_ptr(), xf.unsafe_ptr(), r_data.unsafe_ptr(), r_scales.unsafe_ptr(), s, n, k
                )
            qlr_apply[Self.bq, Self.gq, Self.bl, Self.gl](
                y.unsafe_ptr(), xf.unsafe_ptr(), t.unsafe_ptr(), q_codes.unsafe_ptr(), q_scales.unsafe_ptr(),
                l_data.unsafe_ptr(), l_scales.unsafe_ptr(), bias.unsafe_ptr(), s, m, n, k, has_bias,
            )
        else:
            launch_fused[Self.bq, Self.gq, Self.bl, Self.gl, Self.br, Self.gr](
                y.unsafe_ptr(), t.unsafe_ptr(), xp.unsafe_ptr(), partials.unsafe_ptr(), x.unsafe_ptr(),
                q_codes.unsafe_ptr(), q_scales.unsafe_ptr(), l_data.unsafe_ptr(), l_scales.unsafe_ptr(),
                r_data.unsafe_ptr(), r_scales.unsafe_ptr(), bias.unsafe_ptr(), sync.unsafe_ptr(), s, m, n, k, has_bias,
                xp.dim_size(0) == XP_PARTS, partials.dim_size(0), ctx,
            )


@extensibility.register("caldera_lr_project")
struct LRProject[br: Int, gr: Int]:
    @staticmethod
    def execute[
        target: StaticString
    ](
        t: OutputTensor[dtype=DType.float32, rank=3, ...],
        xp: OutputTensor[rank=3, ...],
        x: InputTensor[dtype=xp.dtype, rank=2, ...],
        r_data: InputTensor[dtype=DType.uint8, rank=2, ...],
        r_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var s, n, k = x.dim_size(0), x.dim_size(1), r_data.dim_size(0)
        _check_parts[target](t.dim_size(0))
        if k == 0:
            return
        comptime if target == "cpu":
            var xf = to_f32(x.unsafe_ptr(), s * n)
            lr_project[Self.br, Self.gr](t.unsafe_ptr(), xf.unsafe_ptr(), r_data.unsafe_ptr(), r_scales.unsafe_ptr(), s, n, k)
        else:
            launch_project[Self.br, Self.gr](
                t.unsafe_ptr(), xp.unsafe_ptr(), x.unsafe_ptr(), r_data.unsafe_ptr(), r_scales.unsafe_ptr(), s, n, k,
                xp.dim_size(0) == XP_PARTS, ctx,
            )


@extensibility.register("caldera_qlr_apply")
struct QLRApply[bq: Int, gq: Int, bl: Int, gl: Int]:
    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[rank=2, ...],
        x: InputTensor[dtype=y.dtype, rank=2, ...],
        t: InputTensor[dtype=DType.float32, rank=3, ...],
        xp: InputTensor[dtype=y.dtype, rank=3, ...],
        q_codes: InputTensor[dtype=DType.uint8, rank=2, ...],
        q_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        l_data: InputTensor[dtype=DType.uint8, rank=2, ...],
        l_scales: InputTensor[dtype=DType.float16, rank=2, ...],
        bias: InputTensor[dtype=DType.float32, rank=1, ...],
        ctx: DeviceContext,
    ) raises:
        var s, n, m, k = x.dim_size(0), x.dim_size(1), q_codes.dim_size(0), t.dim_size(2)
        var has_bias = bias.dim_size(0) > 0
        _check_parts[target](t.dim_size(0))
        comptime if target == "cpu":
            var xf = to_f32(x.unsafe_ptr(), s * n)
            qlr_apply[Self.bq, Self.gq, Self.bl, Self.gl](
                y.unsafe_ptr(), xf.unsafe_ptr(), t.unsafe_ptr(), q_codes.unsafe_ptr(), q_scales.unsafe_ptr(),
                l_data.unsafe_ptr(), l_scales.unsafe_ptr(), bias.unsafe_ptr(), s, m, n, k, has_bias,
            )
        else:
            launch_apply[Self.bq, Self.gq, Self.bl, Self.gl](
                y.unsafe_ptr(), x.unsafe_ptr(), xp.unsafe_ptr(), t.unsafe_ptr(), q_codes.unsafe_ptr(),
                q_scales.unsafe_ptr(), l_data.unsafe_ptr(), l_scales.unsafe_ptr(), bias.unsafe_ptr(), s, m, n, k,
                has_bias, xp.dim_size(0) == XP_PARTS, ctx,
            )
