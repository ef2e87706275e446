"""`caldera_axis_matmul`: a small dense float32 matrix applied along the middle axis of a 3-D tensor.

    y[a, i, c] = Σ_j M[i, j] · x[a, j, c]        x, y (A, f, C) in the activations' dtype, M (f, f) float32

Float32 accumulation. The incoherence transforms of docs/FORMAT.md §6 in a MAX graph are one such call per
Kronecker factor of U = (B ⊗ H_a ⊗ H_b)·diag(s) on reshaped views of the activations (f ≤ a few hundred: a
Hadamard factor or the odd block B); caldera/runtime/max_layer.py builds them.
"""

import extensibility
from extensibility import InputTensor, OutputTensor
from std.math import ceildiv

from max.algorithm import sync_parallelize
from max.gpu import block_idx, thread_idx
from max.gpu.host import DeviceContext
from max.runtime.asyncrt import parallelism_level

comptime THREADS = 256


def axis_matmul_cpu[
    dtype: DType
](y: Pointer[mut=True, Scalar[dtype], _], x: Pointer[Scalar[dtype], _], m: Pointer[Float32, _], a: Int, f: Int, c: Int) raises:
    """Parallel over the A·f output rows of length C; each row a float32 sum of f scaled input rows."""
    var rows = a * f
    var items = min(rows, 4 * parallelism_level(None))

    def work(item: Int) {imm}:
        var acc = List[Float32](length=c, fill=0)
        for row in range(item * rows // items, (item + 1) * rows // items):
            var base, i = (row // f) * f * c, row % f
            for e in range(c):
                acc[e] = 0
            for j in range(f):
                var w = m[unsafe_offset=i * f + j]
                var src = x.unsafe_offset(base + j * c)
                for e in range(c):
                    acc[e] += w * src[unsafe_offset=e].cast[DType.float32]()
            var dst = y.unsafe_offset(row * c)
            for e in range(c):
                dst[unsafe_offset=e] = acc[e].cast[dtype]()

    if rows > 0:
        sync_parallelize(work, items)


def axis_matmul_gpu[
    dtype: DType
](
    y: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    m: Pointer[Float32, _],
    a: Int,
    f: Int,
    c: Int,
    ctx: DeviceContext,
) raises:
    """One thread per output element (coalesced along C), f multiply-adds each."""
    var total = a * f * c

    @__parameter
    def kernel(total_: Int64, f_: Int64, c_: Int64):
        var idx = Int(block_idx.x) * THREADS + Int(thread_idx.x)
        var f, c = Int(f_), Int(c_)
        if idx >= Int(total_):
            return
        var e, i = idx % c, (idx // c) % f
        var src = x.unsafe_offset((idx // (c * f)) * f * c + e)
        var acc = Float32(0)
        for j in range(f):
            acc += m[unsafe_offset=i * f + j] * src[unsafe_offset=j * c].cast[DType.float32]()
        y[unsafe_offset=idx] = acc.cast[dtype]()

    if total > 0:
        ctx.enqueue_function[kernel](
            Int64(total), Int64(f), Int64(c), grid_dim=ceildiv(total, THREADS), block_dim=THREADS
        )


@extensibility.register("caldera_axis_matmul")
struct AxisMatmul:
    @staticmethod
    def execute[
        target: StaticString
    ](
        y: OutputTensor[rank=3, ...],
        x: InputTensor[dtype=y.dtype, rank=3, ...],
        m: InputTensor[dtype=DType.float32, rank=2, ...],
        ctx: DeviceContext,
    ) raises:
        var a, f, c = x.dim_size(0), x.dim_size(1), x.dim_size(2)
        if m.dim_size(0) != f or m.dim_size(1) != f:
            raise Error("M is ", m.dim_size(0), "×", m.dim_size(1), ", the axis has ", f, " entries")
        comptime if target == "cpu":
            axis_matmul_cpu(y.unsafe_ptr(), x.unsafe_ptr(), m.unsafe_ptr(), a, f, c)
        else:
            axis_matmul_gpu(y.unsafe_ptr(), x.unsafe_ptr(), m.unsafe_ptr(), a, f, c, ctx)
