"""GPU kernels, shared pieces: launch constants, the packed rows' and activations' loads, and the A and B operands of
the tensor-core multiplies (mma.sync m16n8k16 fragments; the wide launch's wgmma takes the same A fragments).
The layout and its reasons: gpu.mojo's docstring and kernels_mojo/README.md."""

from std.math import ceildiv
from std.memory import AddressSpace, bitcast
from std.sys import inlined_assembly

from max.gpu import lane_id
from max.gpu.compute.mma import mma

comptime WARPS = 8
comptime THREADS = 32 * WARPS
comptime P_SPLIT = 8
"""Partial sums of t = x·Rᵀ: t_parts is (P_SPLIT, s, k) float32."""
comptime SMALL_S = 8
"""Token counts up to this use the decode launch (one 8-token mma tile)."""
comptime NT_WIDE = 8
"""8-token tiles per pass of the wide launch (64 tokens)."""
comptime X_ROW = 132
"""Words of one token's activations in a ring slot: a step's 256 16-bit values (2-bit codes; 4-bit use 128), padded
by 16 bytes so that two tokens' rows start in different banks."""
comptime ZERO = Scalar[DType.uint8](0)
"""The fill of cp.async: with it, the bytes past `src_size` are zeroed (without it `src_size` is ignored)."""
comptime B_X = 0
comptime B_T = 1
comptime B_SHARED = 2
"""Where `mma_step` reads the B operand: x or t_parts in global memory, or the staged shared tile."""


@always_inline
def chunk_cols[bits: Int]() -> Int:
    """Columns in one thread's 16-byte chunk."""
    return 128 // bits


@always_inline
def step_cols[bits: Int]() -> Int:
    """Columns of one K step (4 chunks side by side)."""
    return 4 * chunk_cols[bits]()


@always_inline
def chunks_per_group[bits: Int, group: Int]() -> Int:
    """16-byte chunks in one quantization group (a power of two on the GPU: `max_graph._check_part`)."""
    return group // chunk_cols[bits]()


@always_inline
def step_scale_bytes[bits: Int, group: Int]() -> Int:
    """Bytes of one row's scales for one K step (4 chunks): 8, 4 or 2; 0 when a group spans several steps."""
    comptime cpg = chunks_per_group[bits, group]()
    return 2 * (4 // cpg) if cpg <= 4 else 0


@always_inline
def step_group[bits: Int, group: Int](step: Int) -> Int:
    """The group of K step `step`'s first chunk."""
    comptime cpg = chunks_per_group[bits, group]()
    return step * (4 // cpg) if cpg <= 4 else step // (cpg // 4)


@always_inline
def load16(row: Pointer[UInt8, _], byte0: Int, row_bytes: Int, valid: Bool, aligned: Bool) -> SIMD[DType.uint32, 4]:
    """Bytes [byte0, byte0 + 16) of a packed row as 4 words; zeros past the row's end or for a missing row."""
    if not valid or byte0 >= row_bytes:
        return 0
    if aligned and byte0 + 16 <= row_bytes:
        return bitcast[DType.uint32, 4](row.unsafe_load[width=16, alignment=16](byte0))
    return load16_edge(row, byte0, row_bytes)


@no_inline
def load16_edge(row: Pointer[UInt8, _], byte0: Int, row_bytes: Int) -> SIMD[DType.uint32, 4]:
    """`load16` for an unaligned row or the row's last bytes, byte by byte (out of line: rare, and kept small)."""
    var v = SIMD[DType.uint8, 16](0)
    comptime for i in range(16):
        if byte0 + i < row_bytes:
            v[i] = row[unsafe_offset=byte0 + i]
    return bitcast[DType.uint32, 4](v)


@always_inline
def load_x8[
    dtype: DType
](x: Pointer[Scalar[dtype], _], token: Int, col: Int, s: Int, ncols: Int, aligned: Bool) -> SIMD[DType.uint32, 4]:
    """Activations x[token, col : col + 8] as 4 words of pairs; zeros past the row or for a missing token."""
    if token >= s or col >= ncols:
        return 0
    var base = token * ncols + col
    if aligned and col + 8 <= ncols:
        return bitcast[DType.uint32, 4](x.unsafe_load[width=8, alignment=16](base))
    return load_x8_edge[dtype](x, base, ncols - col)


@no_inline
def load_x8_edge[dtype: DType](x: Pointer[Scalar[dtype], _], base: Int, avail: Int) -> SIMD[DType.uint32, 4]:
    """`load_x8` for unaligned rows or a row's end: the first min(8, avail) values from x[base], zeros after."""
    var v = SIMD[dtype, 8](0)
    comptime for i in range(8):
        if i < avail:
            v[i] = x[unsafe_offset=base + i]
    return bitcast[DType.uint32, 4](v)


@always_inline
def load_t8[
    dtype: DType
](t_parts: Pointer[Float32, _], token: Int, col: Int, s: Int, k: Int) -> SIMD[DType.uint32, 4]:
    """Σ_p t_parts[p, token, col : col + 8] rounded to `dtype`, as 4 words of pairs; zeros out of range."""
    if token >= s or col >= k:
        return 0
    if k % 4 != 0 or col + 8 > k:
        return load_t8_edge[dtype](t_parts, token, col, s, k)
    var total = SIMD[DType.float32, 8](0)
    comptime for p in range(P_SPLIT):
        total += t_parts.unsafe_load[width=8, alignment=16]((p * s + token) * k + col)
    return bitcast[DType.uint32, 4](total.cast[dtype]())


@no_inline
def load_t8_edge[dtype: DType](t_parts: Pointer[Float32, _], token: Int, col: Int, s: Int, k: Int) -> SIMD[DType.uint32, 4]:
    """`load_t8` for unaligned t or the last columns, value by value (out of line)."""
    var total = SIMD[DType.float32, 8](0)
    for p in range(P_SPLIT):
        comptime for i in range(8):
            if col + i < k:
                total[i] += t_parts[unsafe_offset=(p * s + token) * k + col + i]
    return bitcast[DType.uint32, 4](total.cast[dtype]())


@always_inline
def prmt[selector: UInt32](a: UInt32, b: UInt32) -> UInt32:
    """PTX prmt.b32: the bytes of (b, a) picked by the 4 nibbles of `selector` (one instruction; the shift-and-mask
    form compiles to two)."""
    return inlined_assembly["prmt.b32 $0, $1, $2, $3;", UInt32, constraints="=r,r,r,n", has_side_effect=False](
        a, b, selector
    )


@always_inline
def pair_lo(a: UInt32, b: UInt32) -> UInt32:
    """The low halves of a and b as one word."""
    return prmt[0x5410](a, b)


@always_inline
def pair_hi(a: UInt32, b: UInt32) -> UInt32:
    """The high halves of a and b as one word."""
    return prmt[0x7632](a, b)


@always_inline
def half2[dtype: DType](word: UInt32) -> SIMD[dtype, 2]:
    return bitcast[dtype, 2](word)


@always_inline
def masked_pair[bits: Int, dtype: DType](word: UInt32, j: Int, magic: UInt32) -> SIMD[dtype, 2]:
    """Columns (j, j + 16/bits) of a word of codes as 2^e + code (exact), the exponent bits `magic` OR'd in (a
    constant, or a register from `magic_word` so that the mask is LOP3's immediate)."""
    comptime mask = UInt32((1 << bits) - 1) * 0x10001
    return half2[dtype](((word >> UInt32(bits * j)) & mask) | magic)


@always_inline
def decode_pair[
    bits: Int, dtype: DType
](word: UInt32, j: Int, scale: SIMD[dtype, 2], shift: SIMD[dtype, 2]) -> SIMD[dtype, 2]:
    """Columns (j, j + 16/bits) of a word of codes, dequantized: (code - offset)·scale = code·scale + shift."""
    comptime magic = UInt32(0x43004300) if dtype == DType.bfloat16 else UInt32(0x64006400)
    comptime base = 128.0 if dtype == DType.bfloat16 else 1024.0
    var v = masked_pair[bits, dtype](word, j, magic)
    return (v - SIMD[dtype, 2](base)).fma(scale, shift)


@always_inline
def fp16_pair[dtype: DType](word: UInt32) -> SIMD[dtype, 2]:
    """A word of two stored fp16 values, as `dtype`."""
    return bitcast[DType.float16, 2](word).cast[dtype]()


@always_inline
def load_step[
    bits: Int, group: Int
](
    data: Pointer[UInt8, _], scales: Pointer[Float16, _], ra: Int, nrows: Int, ncols: Int, col0: Int
) -> Tuple[SIMD[DType.uint32, 4], SIMD[DType.uint32, 4], Float16, Float16]:
    """One lane's chunk at column col0 of rows ra and ra + 8: 16 code bytes of each and their two scales (scalars:
    packing them into one register here would wait for the loads)."""
    var rb = ra + 8
    var row_bytes = ceildiv(ncols * bits, 8)
    var aligned = row_bytes % 16 == 0
    var pa = data.unsafe_offset(ra * row_bytes)
    var pb = data.unsafe_offset(rb * row_bytes)
    var wa = load16(pa, col0 * bits // 8, row_bytes, ra < nrows, aligned)
    var wb = load16(pb, col0 * bits // 8, row_bytes, rb < nrows, aligned)
    var sa, sb = Float16(0), Float16(0)
    comptime if bits < 16:
        var groups = ceildiv(ncols, group)
        var gi = col0 // group
        if gi < groups and ra < nrows:
            sa = scales[unsafe_offset=ra * groups + gi]
        if gi < groups and rb < nrows:
            sb = scales[unsafe_offset=rb * groups + gi]
    return (wa, wb, sa, sb)


@always_inline
def mma_step[
    bits: Int, NT: Int, dtype: DType, b_src: Int
](
    mut acc: SIMD[DType.float32, 4 * NT],
    wa: SIMD[DType.uint32, 4],
    wb: SIMD[DType.uint32, 4],
    scale_a: Float16,
    scale_b: Float16,
    col0: Int,
    x: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    ncols: Int,
    tok0: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """Acc += the lane's dequantized chunk (rows g, g + 8; columns col0 …) times B, for token tiles tok0 + 8·nt.

    B: x (s, ncols) (B_X), the float32 partial sums t_parts (P_SPLIT, s, ncols) (B_T), or the staged tile xs
    (B_SHARED, `stage_store`). acc[4·nt : 4·nt + 4] is the mma C fragment of token tile nt: rows (g, g + 8) ×
    tokens (2q, 2q + 1).
    """
    comptime assert bits == 2 or bits == 4 or bits == 16, "GPU parts are 2-, 4-bit or fp16"
    comptime words = 1 if bits == 16 else 4  # word blocks per chunk (fp16: the chunk is one block)
    comptime block_cols = chunk_cols[bits]() // words  # 16 (2-bit), 8 (4-bit or fp16)
    comptime mmas = block_cols // 4  # per block: 4, 2, 2
    var lane = Int(lane_id())
    var g = lane // 4
    var sa, sha, sb, shb = row_scales[bits, dtype](scale_a, scale_b)
    var x_aligned = ncols % 8 == 0
    comptime for blk in range(words):
        comptime if b_src == B_SHARED:  # one A fragment live at a time, its B fragments one 8-byte load each
            comptime for h in range(mmas):
                var a = a_operand[bits, dtype](wa, wb, blk, h, sa, sha, sb, shb)
                comptime for nt in range(NT):
                    if nt * 8 < s - tok0:  # warp-uniform: skip tiles past the last token
                        var d = acc.slice[4, offset = 4 * nt]()
                        var b = xs.unsafe_load[width=2, alignment=8]((((blk * mmas + h) * 8 + nt) * 32 + lane) * 2)
                        mma(d, a, bitcast[dtype, 4](b), d)
                        acc = acc.insert[offset = 4 * nt](d)
        else:
            var a_frag = SIMD[dtype, 8 * mmas](0)
            comptime for h in range(mmas):
                a_frag = a_frag.insert[offset = 8 * h](a_operand[bits, dtype](wa, wb, blk, h, sa, sha, sb, shb))
            var col = col0 + blk * block_cols
            comptime for nt in range(NT):
                if nt * 8 < s - tok0:
                    var d = acc.slice[4, offset = 4 * nt]()
                    var token = tok0 + nt * 8 + g
                    var n0: SIMD[DType.uint32, 4]
                    var n1 = SIMD[DType.uint32, 4](0)
                    comptime if b_src == B_T:
                        n0 = load_t8[dtype](t_parts, token, col, s, ncols)
                        comptime if block_cols == 16:
                            n1 = load_t8[dtype](t_parts, token, col + 8, s, ncols)
                    else:
                        n0 = load_x8[dtype](x, token, col, s, ncols, x_aligned)
                        comptime if block_cols == 16:
                            n1 = load_x8[dtype](x, token, col + 8, s, ncols, x_aligned)
                    var nat = n0.join(n1)  # words of natural column pairs (0,1), (2,3), ...
                    comptime for h in range(mmas):
                        var b = b_words[bits](nat, h)
                        mma(d, a_frag.slice[8, offset = 8 * h](), bitcast[dtype, 4](b), d)
                    acc = acc.insert[offset = 4 * nt](d)


@always_inline
def row_scales[bits: Int, dtype: DType](scale_a: Float16, scale_b: Float16) -> Tuple[
    SIMD[dtype, 2], SIMD[dtype, 2], SIMD[dtype, 2], SIMD[dtype, 2]
]:
    """A chunk's scales of rows g and g + 8 (`load_step`) as `a_operand` takes them: (scale, −offset·scale) of row g,
    then of row g + 8, each in both halves."""
    comptime offset = Float32((1 << bits) - 1) / 2
    var sa, sb = SIMD[dtype, 2](scale_a.cast[dtype]()), SIMD[dtype, 2](scale_b.cast[dtype]())
    return (sa, sa * Scalar[dtype](-offset), sb, sb * Scalar[dtype](-offset))


@always_inline
def a_operand[
    bits: Int, dtype: DType
](
    wa: SIMD[DType.uint32, 4],
    wb: SIMD[DType.uint32, 4],
    blk: Int,
    h: Int,
    sa: SIMD[dtype, 2],
    sha: SIMD[dtype, 2],
    sb: SIMD[dtype, 2],
    shb: SIMD[dtype, 2],
) -> SIMD[dtype, 8]:
    """The A fragment of mma h of word block blk: [row g lo, row g+8 lo, row g hi, row g+8 hi] (dequantized)."""
    comptime if bits == 16:
        return (fp16_pair[dtype](wa[2 * h]).join(fp16_pair[dtype](wb[2 * h]))).join(
            fp16_pair[dtype](wa[2 * h + 1]).join(fp16_pair[dtype](wb[2 * h + 1]))
        )
    return (
        decode_pair[bits, dtype](wa[blk], 2 * h, sa, sha).join(decode_pair[bits, dtype](wb[blk], 2 * h, sb, shb))
    ).join(
        decode_pair[bits, dtype](wa[blk], 2 * h + 1, sa, sha).join(decode_pair[bits, dtype](wb[blk], 2 * h + 1, sb, shb))
    )


@always_inline
def b_words[bits: Int](nat: SIMD[DType.uint32, 8], h: Int) -> SIMD[DType.uint32, 2]:
    """The B fragment words of mma h of a block from its natural column pairs: the chunk's column order."""
    comptime if bits == 16:
        return SIMD[DType.uint32, 2](nat[2 * h], nat[2 * h + 1])
    comptime d2 = chunk_cols[bits]() // 16  # word distance between columns j and j + block_cols/2: 4 or 2
    return SIMD[DType.uint32, 2](pair_lo(nat[h], nat[h + d2]), pair_hi(nat[h], nat[h + d2]))


@always_inline
def segment(nsteps: Int, parts: Int, i: Int) -> Tuple[Int, Int]:
    """Steps [first, last) of part i when nsteps K steps are cut into `parts` contiguous ranges."""
    var per = ceildiv(nsteps, parts)
    return (min(i * per, nsteps), min((i + 1) * per, nsteps))


@always_inline
def fragment_coords(lane: Int, i: Int) -> Tuple[Int, Int]:
    """(row in tile, token in tile) of accumulator element i of a C fragment held by `lane`."""
    var g, q = lane // 4, lane % 4
    return (g + 8 * (i // 2), 2 * q + i % 2)


@always_inline
def wide_coords(lane: Int, e: Int, row0: Int, tok0: Int) -> Tuple[Int, Int]:
    """(row, token) of element e of a wide accumulator (a C fragment per 8 tokens) held by `lane`: the warp's 16 rows
    from row0, the tokens from tok0."""
    var rc = fragment_coords(lane, e % 4)
    return (row0 + rc[0], tok0 + 8 * (e // 4) + rc[1])
