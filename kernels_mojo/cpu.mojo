"""CPU implementation: rows decoded to float32 scratch, vectorized dot products, parallel over output rows.

Shapes: x (s, n) activations, Q (m, n), L (m, k), R (k, n) stored as docs/FORMAT.md parts, t (s, k) float32.
"""

from std.math import ceildiv
from std.sys.info import simd_width_of

from max.algorithm import sync_parallelize
from max.runtime.asyncrt import parallelism_level

comptime F32_WIDTH = simd_width_of[DType.float32]()
comptime CODE_BYTES = 16
"""Packed bytes decoded per vector step."""


@always_inline
def code_offset[bits: Int]() -> Float32:
    """The symmetric grid's zero level (2^b - 1)/2 (docs/FORMAT.md §5)."""
    return Float32((1 << bits) - 1) / 2


@always_inline
def unpack_bytes[bits: Int](v: SIMD[DType.uint8, CODE_BYTES]) -> SIMD[DType.uint8, CODE_BYTES * (8 // bits)]:
    """The codes of CODE_BYTES packed bytes in column order (low bits first, docs/FORMAT.md §4)."""
    comptime per = 8 // bits
    comptime if bits == 8:
        return rebind[SIMD[DType.uint8, CODE_BYTES * per]](v)
    elif bits == 4:
        return rebind[SIMD[DType.uint8, CODE_BYTES * per]]((v & 15).interleave(v >> 4))
    else:
        comptime assert bits == 2, "packed widths are 2, 4, 8"
        var even = (v & 3).interleave((v >> 4) & 3)  # columns 4j, 4j + 2
        var odd = ((v >> 2) & 3).interleave(v >> 6)  # columns 4j + 1, 4j + 3
        return rebind[SIMD[DType.uint8, CODE_BYTES * per]](even.interleave(odd))


def decode_row[
    bits: Int, group: Int
](
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    cols: Int,
    dst: Pointer[mut=True, Float32, _],
):
    """One stored row of `cols` values into `dst` (float32): (code - offset)·scale, or the fp16 values (bits 16).
    """
    comptime if bits == 16:
        var values = data.unsafe_bitcast[Float16]()
        for c in range(cols):
            dst[unsafe_offset=c] = values[unsafe_offset=c].cast[DType.float32]()
    else:
        comptime per = 8 // bits
        comptime step = CODE_BYTES * per
        comptime mask = UInt8((1 << bits) - 1)
        var c = 0
        while c + step <= cols:
            var codes = unpack_bytes[bits](data.unsafe_load[width=CODE_BYTES](c // per))
            dst.unsafe_store(c, codes.cast[DType.float32]() - code_offset[bits]())
            c += step
        while c < cols:
            var code = (data[unsafe_offset=c // per] >> UInt8(bits * (c % per))) & mask
            dst[unsafe_offset=c] = code.cast[DType.float32]() - code_offset[bits]()
            c += 1
        for g in range(ceildiv(cols, group)):
            var scale = scales[unsafe_offset=g].cast[DType.float32]()
            var lo = g * group
            var hi = min(lo + group, cols)
            var i = lo
            while i + F32_WIDTH <= hi:
                dst.unsafe_store(i, dst.unsafe_load[width=F32_WIDTH](i) * scale)
                i += F32_WIDTH
            while i < hi:
                dst[unsafe_offset=i] = dst[unsafe_offset=i] * scale
                i += 1


@always_inline
def dot(a: Pointer[Float32, _], b: Pointer[Float32, _], n: Int) -> Float32:
    """Σ a[i]·b[i] over n float32 values, four vector accumulators."""
    comptime w = F32_WIDTH
    var acc0 = SIMD[DType.float32, w](0)
    var acc1 = SIMD[DType.float32, w](0)
    var acc2 = SIMD[DType.float32, w](0)
    var acc3 = SIMD[DType.float32, w](0)
    var i = 0
    while i + 4 * w <= n:
        acc0 += a.unsafe_load[width=w](i) * b.unsafe_load[width=w](i)
        acc1 += a.unsafe_load[width=w](i + w) * b.unsafe_load[width=w](i + w)
        acc2 += a.unsafe_load[width=w](i + 2 * w) * b.unsafe_load[width=w](i + 2 * w)
        acc3 += a.unsafe_load[width=w](i + 3 * w) * b.unsafe_load[width=w](i + 3 * w)
        i += 4 * w
    while i + w <= n:
        acc0 += a.unsafe_load[width=w](i) * b.unsafe_load[width=w](i)
        i += w
    var total = ((acc0 + acc1) + (acc2 + acc3)).reduce_add()
    while i < n:
        total += a[unsafe_offset=i] * b[unsafe_offset=i]
        i += 1
    return total


def to_f32[
    dtype: DType
](src: Pointer[Scalar[dtype], _], count: Int) -> List[Float32]:
    """A float32 copy of `count` values."""
    var out = List[Float32](length=count, fill=0)
    for i in range(count):
        out[i] = src[unsafe_offset=i].cast[DType.float32]()
    return out^


def _chunks(rows: Int) -> Int:
    """Work items for `rows` rows: a few per worker thread, so uneven rows balance."""
    return min(rows, 4 * parallelism_level(None))


def lr_project[
    br: Int, gr: Int
](
    t: Pointer[mut=True, Float32, _],
    x: Pointer[Float32, _],
    r_data: Pointer[UInt8, _],
    r_scales: Pointer[Float16, _],
    s: Int,
    n: Int,
    k: Int,
) raises:
    """Stage 1: t (s, k) = x (s, n) · dequant(R)ᵀ with R (k, n); parallel over rows of R."""
    var row_bytes = ceildiv(n * br, 8)
    var row_groups = ceildiv(n, gr) if br < 16 else 0
    var items = _chunks(k)

    def work(item: Int) {imm}:
        var buf = List[Float32](length=n, fill=0)
        for j in range(item * k // items, (item + 1) * k // items):
            decode_row[br, gr](r_data.unsafe_offset(j * row_bytes), r_scales.unsafe_offset(j * row_groups), n, buf.unsafe_ptr())
            for i in range(s):
                t[unsafe_offset=i * k + j] = dot(x.unsafe_offset(i * n), buf.unsafe_ptr(), n)

    sync_parallelize(work, items)


def qlr_apply[
    dtype: DType, //, bq: Int, gq: Int, bl: Int, gl: Int
](
    y: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Float32, _],
    t: Pointer[Float32, _],
    q_codes: Pointer[UInt8, _],
    q_scales: Pointer[Float16, _],
    l_data: Pointer[UInt8, _],
    l_scales: Pointer[Float16, _],
    bias: Pointer[Float32, _],
    s: Int,
    m: Int,
    n: Int,
    k: Int,
    has_bias: Bool,
) raises:
    """Stage 2: y (s, m) = x (s, n) · dequant(Q)ᵀ + t (s, k) · dequant(L)ᵀ (+ bias (m,)); parallel over rows."""
    var q_row_bytes = ceildiv(n * bq, 8)
    var q_row_groups = ceildiv(n, gq)
    var l_row_bytes = ceildiv(k * bl, 8)
    var l_row_groups = ceildiv(k, gl) if bl < 16 else 0
    var items = _chunks(m)

    def work(item: Int) {imm}:
        var qbuf = List[Float32](length=n, fill=0)
        var lbuf = List[Float32](length=max(k, 1), fill=0)
        for row in range(item * m // items, (item + 1) * m // items):
            decode_row[bq, gq](q_codes.unsafe_offset(row * q_row_bytes), q_scales.unsafe_offset(row * q_row_groups), n, qbuf.unsafe_ptr())
            if k > 0:
                decode_row[bl, gl](l_data.unsafe_offset(row * l_row_bytes), l_scales.unsafe_offset(row * l_row_groups), k, lbuf.unsafe_ptr())
            var b = bias[unsafe_offset=row] if has_bias else Float32(0)
            for i in range(s):
                var acc = dot(x.unsafe_offset(i * n), qbuf.unsafe_ptr(), n) + b
                if k > 0:
                    acc += dot(t.unsafe_offset(i * k), lbuf.unsafe_ptr(), k)
                y[unsafe_offset=i * m + row] = acc.cast[dtype]()

    sync_parallelize(work, items)
