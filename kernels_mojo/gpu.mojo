"""GPU implementation (NVIDIA, built for sm_90a): tensor-core MMA with the packed weights as the A operand.

A warp owns 16 weight rows and accumulates acc (16 rows × 8·NT tokens) += W_tile · X_tileᵀ with mma.sync
m16n8k16 (bf16 or fp16 operands, float32 accumulators). Lane 4g + q reads 16 bytes (one vector load) of rows g and
g + 8 per K step: a chunk of 128/bits consecutive columns inside one quantization group, so one scale per row and
chunk. The mma's logical k indices are mapped onto the chunk's columns in the order in which a shift, a mask and an
OR with the exponent bits of 2^7 (bf16) or 2^10 (fp16) turn two codes of a 32-bit word into one bf16x2/f16x2
register: columns (j, j + 16/bits). The activations (B operand) are paired to the same order by byte permutes,
or at decode with 2-bit Q arrive so ordered from stage 1 (`prepare_x`, read with `code_pair`'s one-LOP3 decode).
The weights are read as docs/FORMAT.md stores them. K steps cover 4 chunks (256 columns at 2 bits, 128 at 4, 32 at
16).

Launch shapes:
    s ≤ SMALL_S (decode)  block = one or two 16-row tiles (`decode_tiles`), each tile's 8 or 4 warps take every 8th
                          or 4th K step, each with a cp.async ring of its next steps' codes, scales and
                          (s ≤ RING_X_TOKENS) activations in shared memory; partial sums meet in shared memory.
                          Stage 2 is launched dependent on stage 1 (programmatic dependent launch): its first codes
                          are requested while stage 1 still runs
    larger s              block = 8 row tiles (a warp each, 128 rows) × 64 tokens over all K steps: the block
                          stages each step's activation tile in shared memory already permuted into mma B
                          fragments (one 8-byte load per lane and mma, the tile read from global memory once per
                          block instead of once per warp), the next step's codes in flight meanwhile. With 2- and
                          4-bit codes and bf16 activations (`uses_wgmma`) the two warpgroups multiply by wgmma
                          m64n64k16 instead: A the same dequantized registers, B the step's tile in the canonical
                          K-major layout (`wg_part`), x's next step on its way by cp.async
The low-rank term runs the same routines twice: t = x·Rᵀ (P_SPLIT partial sums over K steps), then t·Lᵀ appended
to the K loop of x·Qᵀ (the wide launch sums the partials while reading t; at decode each block sums them once into
shared memory, `sum_t`).
"""

from std.math import ceildiv
from std.atomic import Atomic, Ordering, fence
from std.memory import AddressSpace, bitcast, stack_allocation
from std.sys import inlined_assembly

from max.gpu import barrier, block_idx, grid_dim, lane_id, thread_idx, warp_id
from max.gpu.memory import async_copy, async_copy_commit_group, async_copy_wait_group, external_memory
from max.gpu.primitives import warp
from max.gpu.primitives.grid_controls import PDLLevel, launch_dependent_grids, pdl_launch_attributes, wait_on_dependent_grids
from max.gpu.sync import syncwarp
from max.gpu.compute.mma import (
    WGMMADescriptor,
    mma,
    wgmma_async,
    wgmma_commit_group_sync,
    wgmma_fence_aligned,
    wgmma_wait_group_sync,
)
from max.gpu.host import DeviceContext, FuncAttribute

comptime WARPS = 8
comptime THREADS = 32 * WARPS
comptime P_SPLIT = 8
"""Partial sums of t = x·Rᵀ: t_parts is (P_SPLIT, s, k) float32."""
comptime SMALL_S = 8
"""Token counts up to this use the decode launch (one 8-token mma tile)."""
comptime NT_WIDE = 8
"""8-token tiles per pass of the wide launch (64 tokens)."""
comptime X_WORDS = 32 * 256
"""Wide launch: 32-bit words of one staged activation step (64 tokens × 256 columns of 16-bit values); with wgmma
(`uses_wgmma`) a natural tile of 64 rows of X_ROW words follows (`wg_issue_x`)."""
comptime WG_SLICE_BYTES = 2048
"""Wide launch with wgmma: one k16 slice of a staged step, 64 tokens × 16 logical k in the canonical K-major layout
without swizzle: core matrices of 8 tokens × 8 k (16 bytes a token), the two along k 128 bytes apart (the
descriptor's leading byte offset), token groups 256 bytes apart (its stride byte offset)."""
comptime SMS = 132
"""Streaming multiprocessors of the H100 SXM the tile rule was measured on (`decode_tiles`)."""
comptime RING = 4
"""Decode: K steps of codes (and their scales) in flight per warp, copied into shared memory (cp.async); a power of
two (slots are step indices masked by RING - 1)."""
comptime RING_ROW = 20
"""Words of one row's slot: 64 code bytes padded to 80, so a warp's word reads hit 32 distinct banks."""
comptime RING_WORDS = RING * 16 * (RING_ROW + 2)
"""Shared words of one warp's ring without activations: RING slots of 16 rows × (80 code bytes + 8 scale bytes)."""
comptime RING_X_TOKENS = 2
"""Decode with at most this many tokens: each ring slot also holds the step's activations (x of the Q and R parts)."""
comptime X_ROW = 132
"""Words of one token's activations in a ring slot: a step's 256 16-bit values (2-bit codes; 4-bit use 128), padded
by 16 bytes so that two tokens' rows start in different banks."""
comptime XP_PARTS = 2
"""Decode with 2-bit Q: stage 1 prepares x for stage 2 in xp (XP_PARTS, s, n) of the activations' dtype
(`prepare_x`): part 0 the prepared x, part 1 from its start the negated chunk sums sx (`sx_floats`(n)) float32."""
comptime SX_WORDS = 16
"""Words of a ring slot's sx (with `xp`, after the tokens' rows): per chunk of the step, the mma C fragment that
starts its sum (`prepare_x`)."""
comptime ZERO = Scalar[DType.uint8](0)
"""cp.async's fill: with it, the bytes past `src_size` are zeroed (without it `src_size` is ignored)."""
comptime ISSUE_ALL = 0
comptime ISSUE_CODES = 1
comptime ISSUE_X = 2
"""What `ring_issue` copies of a K step: everything, the codes and scales only, or the activations only."""
comptime B_X = 0
comptime B_T = 1
comptime B_SHARED = 2
"""Where `mma_step` reads the B operand: x or t_parts in global memory, or the staged shared tile."""


@always_inline
def ring_x_tokens(s: Int) -> Int:
    """Tokens whose activations travel in the decode ring (all of them, or none)."""
    return s if s <= RING_X_TOKENS else 0


@always_inline
def x_slot_words(s: Int) -> Int:
    """Words of one ring slot's activations for s tokens: the tokens' rows and sx (none without `ring_x_tokens`)."""
    return ring_x_tokens(s) * X_ROW + (SX_WORDS if ring_x_tokens(s) > 0 else 0)


@always_inline
def ring_words(s: Int) -> Int:
    """Shared words of one warp's decode ring for s tokens: codes and scales, then the activations."""
    return RING_WORDS + RING * x_slot_words(s)


@always_inline
def t_row(k: Int) -> Int:
    """Words of one token's t = Σ_p t_parts[p] in shared memory (decode): k 16-bit values, zeros up to whole K steps
    of any width, and 16 bytes of padding."""
    return ceildiv(k, 256) * 128 + 4


@always_inline
def shared_bytes(s: Int, k: Int) -> Int:
    """Dynamic shared memory of a launch: the wide tile, or at decode the cross-warp sums, each warp's ring and t."""
    if s > SMALL_S:
        return (X_WORDS + 64 * X_ROW) * 4
    return (WARPS * 128 + WARPS * ring_words(s) + s * t_row(k)) * 4


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
def decode_pair[
    bits: Int, dtype: DType
](word: UInt32, j: Int, scale: SIMD[dtype, 2], shift: SIMD[dtype, 2]) -> SIMD[dtype, 2]:
    """Columns (j, j + 16/bits) of a word of codes, dequantized: (code - offset)·scale = code·scale + shift."""
    comptime mask = UInt32((1 << bits) - 1) * 0x10001
    comptime magic = UInt32(0x43004300) if dtype == DType.bfloat16 else UInt32(0x64006400)
    comptime base = 128.0 if dtype == DType.bfloat16 else 1024.0
    var v = half2[dtype](((word >> UInt32(bits * j)) & mask) | magic)  # 2^e + code, exact
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
) -> Tuple[SIMD[DType.uint32, 4], SIMD[DType.uint32, 4], SIMD[DType.float16, 2]]:
    """One lane's chunk at column col0 of rows ra and ra + 8: 16 code bytes of each and their two scales."""
    var rb = ra + 8
    var row_bytes = ceildiv(ncols * bits, 8)
    var aligned = row_bytes % 16 == 0
    var pa = data.unsafe_offset(ra * row_bytes)
    var pb = data.unsafe_offset(rb * row_bytes)
    var wa = load16(pa, col0 * bits // 8, row_bytes, ra < nrows, aligned)
    var wb = load16(pb, col0 * bits // 8, row_bytes, rb < nrows, aligned)
    var sc = SIMD[DType.float16, 2](0)
    comptime if bits < 16:
        var groups = ceildiv(ncols, group)
        var gi = col0 // group
        if gi < groups and ra < nrows:
            sc[0] = scales[unsafe_offset=ra * groups + gi]
        if gi < groups and rb < nrows:
            sc[1] = scales[unsafe_offset=rb * groups + gi]
    return (wa, wb, sc)


@always_inline
def mma_step[
    bits: Int, NT: Int, dtype: DType, b_src: Int
](
    mut acc: SIMD[DType.float32, 4 * NT],
    wa: SIMD[DType.uint32, 4],
    wb: SIMD[DType.uint32, 4],
    sc: SIMD[DType.float16, 2],
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
    comptime offset = Float32((1 << bits) - 1) / 2
    comptime words = 1 if bits == 16 else 4  # word blocks per chunk (fp16: the chunk is one block)
    comptime block_cols = chunk_cols[bits]() // words  # 16 (2-bit), 8 (4-bit or fp16)
    comptime mmas = block_cols // 4  # per block: 4, 2, 2
    var lane = Int(lane_id())
    var g = lane // 4
    var sa, sb = SIMD[dtype, 2](sc[0].cast[dtype]()), SIMD[dtype, 2](sc[1].cast[dtype]())
    var sha, shb = sa * Scalar[dtype](-offset), sb * Scalar[dtype](-offset)
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
def load_word(row: Pointer[UInt8, _], byte0: Int, row_bytes: Int, valid: Bool, aligned: Bool) -> UInt32:
    """Bytes [byte0, byte0 + 4) of a packed row as one word; zeros past the row's end or for a missing row."""
    if not valid or byte0 >= row_bytes:
        return 0
    if aligned and byte0 + 4 <= row_bytes:
        return bitcast[DType.uint32, 1](row.unsafe_load[width=4, alignment=4](byte0))[0]
    return load_word_edge(row, byte0, row_bytes)


@no_inline
def load_word_edge(row: Pointer[UInt8, _], byte0: Int, row_bytes: Int) -> UInt32:
    """`load_word` for an unaligned row or the row's last bytes, byte by byte (out of line)."""
    var v = SIMD[DType.uint8, 4](0)
    comptime for i in range(4):
        if byte0 + i < row_bytes:
            v[i] = row[unsafe_offset=byte0 + i]
    return bitcast[DType.uint32, 1](v)[0]


@always_inline
def raw_pair[bits: Int, dtype: DType](word: UInt32, j: Int) -> SIMD[dtype, 2]:
    """Columns (j, j + 16/bits) of a word of codes as 2^e + code (exact): 128 + c (bf16) or 1024 + c (fp16)."""
    comptime mask = UInt32((1 << bits) - 1) * 0x10001
    comptime magic = UInt32(0x43004300) if dtype == DType.bfloat16 else UInt32(0x64006400)
    return half2[dtype](((word >> UInt32(bits * j)) & mask) | magic)


@always_inline
def code_pair[dtype: DType, i: Int](word: UInt32, magic: UInt32) -> SIMD[dtype, 2]:
    """2-bit codes of columns (i, i + 8) of a word (i < 8) as 2^e + 4^p·c with p = i mod 3: one AND-OR (LOP3) after
    one of the shifts 0, 6, 12 that a word's 8 pairs share (c·4^p stays inside the mantissa). The prepared activations
    are divided by 4^p (`prepare_x`), so the products are 2^e·x/4^p + c·x. `magic`: `magic_word`."""
    comptime mask = UInt32(0x00030003 << (2 * (i % 3)))
    return half2[dtype](((word >> UInt32(6 * (i // 3))) & mask) | magic)


@always_inline
def magic_word[dtype: DType](s: Int) -> UInt32:
    """The exponent bits of 2^e (2^7 bf16, 2^10 fp16) in both halves, OR'd with s >> 40 (zero, but the compiler cannot
    know): a constant would become LOP3's one immediate and push the masks into registers, rematerialized at every use;
    a runtime value stays in one register and leaves the immediate to the mask."""
    comptime magic = UInt32(0x43004300) if dtype == DType.bfloat16 else UInt32(0x64006400)
    return magic | UInt32(s >> 40)


@always_inline
def decode_codes[
    bits: Int, group: Int
](data: Pointer[UInt8, _], scales: Pointer[Float16, _], ra: Int, nrows: Int, ncols: Int, step: Int) -> Tuple[
    SIMD[DType.uint32, 8], SIMD[DType.float32, 8]
]:
    """Decode, 2- or 4-bit codes: word q of each of K step `step`'s 4 chunks in rows ra (lanes 0-3 of the result)
    and ra + 8 (4-7), and the chunks' scales (zero for a missing row or chunk).

    A step inside the row on aligned rows takes 8 word loads and 8 scale loads with no branches, so they are all in
    flight at once; other steps go word by word (`load_word`).
    """
    comptime chunk = chunk_cols[bits]()
    var q = Int(lane_id()) % 4
    var row_bytes = ceildiv(ncols * bits, 8)
    var groups = ceildiv(ncols, group)
    comptime cpg = chunks_per_group[bits, group]()
    if (4 * step + 4) * chunk <= ncols and row_bytes % 4 == 0:  # warp-uniform
        var words = SIMD[DType.uint32, 8](0)
        var sc = SIMD[DType.float32, 8](0)
        comptime for r in range(2):
            var row = ra + 8 * r
            var safe = min(row, nrows - 1)  # a missing row reads the last one; its scales become zero
            var p = data.unsafe_offset(safe * row_bytes + step * 64 + 4 * q)  # a step is 64 bytes of a row
            var sp = scales.unsafe_offset(safe * groups + step_group[bits, group](step))
            comptime for j in range(4):
                words[4 * r + j] = bitcast[DType.uint32, 1](p.unsafe_load[width=4, alignment=4](16 * j))[0]
                var scale = sp[unsafe_offset = j // cpg if cpg <= 4 else 0].cast[DType.float32]()
                sc[4 * r + j] = scale if row < nrows else Float32(0)
        return (words, sc)
    return decode_codes_edge[bits, group](data, scales, ra, nrows, ncols, step)


@no_inline
def decode_codes_edge[
    bits: Int, group: Int
](data: Pointer[UInt8, _], scales: Pointer[Float16, _], ra: Int, nrows: Int, ncols: Int, step: Int) -> Tuple[
    SIMD[DType.uint32, 8], SIMD[DType.float32, 8]
]:
    """`decode_codes` for the row's last step or unaligned rows, word by word (out of line)."""
    comptime chunk = chunk_cols[bits]()
    var q = Int(lane_id()) % 4
    var row_bytes = ceildiv(ncols * bits, 8)
    var groups = ceildiv(ncols, group)
    var words = SIMD[DType.uint32, 8](0)
    var sc = SIMD[DType.float32, 8](0)
    comptime for r in range(2):
        var row = ra + 8 * r
        var p = data.unsafe_offset(row * row_bytes)
        comptime for j in range(4):
            var col0 = (4 * step + j) * chunk
            words[4 * r + j] = load_word(p, col0 * bits // 8 + 4 * q, row_bytes, row < nrows, row_bytes % 4 == 0)
            if row < nrows and col0 < ncols:
                sc[4 * r + j] = scales[unsafe_offset=row * groups + col0 // group].cast[DType.float32]()
    return (words, sc)


@always_inline
def decode_step[
    bits: Int, dtype: DType, b_shared: Bool, xp: Bool = False
](
    mut acc: SIMD[DType.float32, 4],
    words: SIMD[DType.uint32, 8],
    sc: SIMD[DType.float32, 8],
    ncols: Int,
    step: Int,
    x: Pointer[Scalar[dtype], _],
    s: Int,
    xw: Pointer[UInt32, _, address_space=AddressSpace.SHARED],
    xrow: Int,
):
    """Decode, 2- or 4-bit codes: acc += W[rows g, g + 8; K step `step`] · B[tokens 0 … 7]ᵀ (`decode_codes` parts).

    The quad's four lanes hold word q of the same chunk, so each chunk's mmas stay inside one quantization group:
    they multiply the raw values 2^e + c (no per-weight arithmetic past the extraction), an mma with an all-ones A
    gives Σx over the chunk's columns, and acc += scale·(Σ(2^e + c)x − (2^e + offset)·Σx). B: with `b_shared`, the
    step's 16-bit values in shared memory from word xw on, token rows xrow words apart (the ring's activations or
    t); otherwise x in global memory. With `xp` (2-bit, the ring's activations prepared by `prepare_x`): the words
    are B fragments already, A comes from `code_pair`, and the SX_WORDS after the s token rows hold each chunk's
    −sx as a C fragment that its mmas start from, so acc += scale·(−sx + Σ A·B) without the all-ones mma.
    """
    comptime chunk = chunk_cols[bits]()  # 64 or 32 columns, inside one group
    comptime mmas = chunk // 16  # per chunk: 4 or 2 (two per 16/bits columns of a word)
    comptime base = Float32(128.0) if dtype == DType.bfloat16 else Float32(1024.0)
    comptime offset = Float32((1 << bits) - 1) / 2
    comptime assert not xp or (bits == 2 and b_shared), "prepared activations are for 2-bit codes, from the ring"
    var lane = Int(lane_id())
    var q, token = lane % 4, lane // 4
    var ones = SIMD[dtype, 8](1)
    # a token past s reads row s - 1: its products land only in outputs that are never written
    var fast = (4 * step + 4) * chunk <= ncols and ncols % 8 == 0  # warp-uniform: a whole, aligned step of x
    var xr = x.unsafe_offset(min(token, s - 1) * ncols)
    var xt = min(token, s - 1) * xrow
    var magic = magic_word[dtype](s)
    comptime for j in range(4):
        var col = (4 * step + j) * chunk + q * (chunk // 4)
        var n0: SIMD[DType.uint32, 4]
        var n1 = SIMD[DType.uint32, 4](0)
        comptime if b_shared:
            var w0 = xt + (j * chunk + q * (chunk // 4)) // 2
            n0 = xw.unsafe_load[width=4, alignment=16](w0)
            comptime if chunk == 64:
                n1 = xw.unsafe_load[width=4, alignment=16](w0 + 4)
        else:
            if fast:
                n0 = bitcast[DType.uint32, 4](xr.unsafe_load[width=8, alignment=16](col))
                comptime if chunk == 64:
                    n1 = bitcast[DType.uint32, 4](xr.unsafe_load[width=8, alignment=16](col + 8))
            else:
                n0 = load_x8[dtype](x, token, col, s, ncols, ncols % 8 == 0)
                comptime if chunk == 64:
                    n1 = load_x8[dtype](x, token, col + 8, s, ncols, ncols % 8 == 0)
        var nat = n0.join(n1)
        var wa, wb = words[j], words[4 + j]
        var tmp = SIMD[DType.float32, 4](0)
        comptime if xp:  # the chunk's −sx as the C fragment the mmas start from
            tmp = bitcast[DType.float32, 4](xw.unsafe_load[width=4, alignment=16](s * xrow + 4 * j))
        var tx = SIMD[DType.float32, 4](0)
        comptime for h in range(mmas):
            comptime if xp:
                var a = (code_pair[dtype, 2 * h](wa, magic).join(code_pair[dtype, 2 * h](wb, magic))).join(
                    code_pair[dtype, 2 * h + 1](wa, magic).join(code_pair[dtype, 2 * h + 1](wb, magic))
                )
                mma(tmp, a, bitcast[dtype, 4](nat.slice[2, offset = 2 * h]()), tmp)
            else:
                var a = (raw_pair[bits, dtype](wa, 2 * h).join(raw_pair[bits, dtype](wb, 2 * h))).join(
                    raw_pair[bits, dtype](wa, 2 * h + 1).join(raw_pair[bits, dtype](wb, 2 * h + 1))
                )
                var b = bitcast[dtype, 4](b_words[bits](nat, h))
                mma(tmp, a, b, tmp)
                mma(tx, ones, b, tx)
        var scale = SIMD[DType.float32, 4](sc[j], sc[j], sc[4 + j], sc[4 + j])
        comptime if xp:
            acc += scale * tmp
        else:
            acc += scale * (tmp - (base + offset) * tx)


@always_inline
def ring_fits[bits: Int, group: Int](nrows: Int, row0: Int, ncols: Int) -> Bool:
    """Whether a decode tile takes the shared-memory ring: 16 whole rows of whole 16-byte chunks (a last K step of
    fewer than 4 is zero-filled), a step's scales of a row 4 or 8 bytes, copied in 4-byte pieces (an even number
    of groups per row keeps them aligned)."""
    comptime sbytes = step_scale_bytes[bits, group]()
    var groups = ceildiv(ncols, group)
    return sbytes >= 4 and row0 + 16 <= nrows and ncols % chunk_cols[bits]() == 0 and groups % 2 == 0


@always_inline
def ring_issue[
    bits: Int, group: Int, dtype: DType, x_ring: Bool, xp: Bool, part: Int = ISSUE_ALL, whole: Bool = False
](
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    x: Pointer[Scalar[dtype], _],
    row0: Int,
    ncols: Int,
    step: Int,
    slot: Int,
    ring: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    s: Int,
):
    """Start copying K step `step` of a 16-row tile (codes and scales) into ring slot `slot`; with `x_ring`, also the
    step's columns of the s tokens' activations (token t at word slot·`x_slot_words`(s) + t·X_ROW of the ring's
    activation area); with `xp`, x is xp's part 0 and the SX_WORDS after the tokens' rows get the step's sx. Whatever lies past the row's
    end (a last step of fewer than 4 chunks) arrives as zeros: cp.async with a source size of 0. `part`: all of
    it, or only the codes and scales (`ISSUE_CODES`) or only the activations (`ISSUE_X`). `whole`: the caller
    knows the step has all 4 chunks (`ring_copy`), so no size or bound is computed."""
    comptime sbytes = step_scale_bytes[bits, group]()
    comptime chunk = chunk_cols[bits]()
    var lane = Int(lane_id())
    var g, q = lane // 4, lane % 4
    var row_bytes, groups = ceildiv(ncols * bits, 8), ceildiv(ncols, group)
    var chunks = 4 if whole else ncols // chunk - 4 * step  # of this step, if under 4
    var st = UInt32(step)  # step-dependent offsets in 32 bits (one wide multiply-add each), bases in 64
    var row = data.unsafe_offset((row0 + g) * row_bytes + 16 * q)
    var src = row.unsafe_offset(Int(st * 64)) if whole or q < chunks else row
    var dst = ring.unsafe_bitcast[UInt8]().unsafe_offset(((slot * 16 + g) * RING_ROW + 4 * q) * 4)
    var size = Int32(16 if whole or q < chunks else 0)
    comptime if part != ISSUE_X:
        async_copy[16, fill=ZERO](src.address_space_cast[AddressSpace.GLOBAL](), dst, src_size=size)
        async_copy[16, fill=ZERO](
            src.unsafe_offset(8 * row_bytes).address_space_cast[AddressSpace.GLOBAL](), dst.unsafe_offset(8 * RING_ROW * 4), src_size=size
        )
    comptime if sbytes >= 4 and part != ISSUE_X:  # (`ring_fits` takes no other tile)
        comptime per_row = sbytes // 4  # 4-byte pieces: lanes q < 2·per_row of the quad copy one each
        if q < 2 * per_row:
            var r, piece = q // per_row, q % per_row
            var first = step_group[bits, group](step) + 2 * piece  # the piece's first group
            var valid = 2 if whole else min(max(groups - first, 0), 2)
            var scale_words = ring.unsafe_offset(RING * 16 * RING_ROW)
            var ssrc = scales.unsafe_offset((row0 + g + 8 * r) * groups + 2 * piece)
            ssrc = ssrc.unsafe_offset(Int(UInt32(step_group[bits, group](step)))) if valid > 0 else scales
            async_copy[4, fill=ZERO](
                ssrc.unsafe_bitcast[UInt8]().address_space_cast[AddressSpace.GLOBAL](),
                scale_words.unsafe_offset((slot * 16 + g + 8 * r) * 2 + piece).unsafe_bitcast[UInt8](),
                src_size=Int32(2 * valid),
            )
    comptime if x_ring and part != ISSUE_CODES:
        comptime pieces = step_cols[bits]() // 8  # 16-byte pieces of one token's step: 32 or 16
        var xw = ring.unsafe_offset(RING_WORDS + slot * x_slot_words(s))
        var col = Int(st * UInt32(step_cols[bits]()))
        var inside = whole or col + 8 * lane < ncols
        comptime for t in range(RING_X_TOKENS):
            if t < s and lane < pieces:
                var xl = x.unsafe_offset(t * ncols + 8 * lane)
                async_copy[16, fill=ZERO](
                    (xl.unsafe_offset(col) if inside else x).unsafe_bitcast[UInt8]().address_space_cast[AddressSpace.GLOBAL](),
                    xw.unsafe_offset(t * X_ROW + 4 * lane).unsafe_bitcast[UInt8](),
                    src_size=Int32(16 if inside else 0),
                )
        comptime if xp:
            if lane < 4:  # sx starts at xp's part 1: 16 bytes per chunk, a step has 4
                var sx = x.unsafe_offset(s * ncols).unsafe_bitcast[Float32]().unsafe_offset(4 * lane)
                var inside_sx = whole or lane < chunks
                async_copy[16, fill=ZERO](
                    (sx.unsafe_offset(Int(st * 16)) if inside_sx else sx).unsafe_bitcast[UInt8]().address_space_cast[AddressSpace.GLOBAL](),
                    xw.unsafe_offset(s * X_ROW + 4 * lane).unsafe_bitcast[UInt8](),
                    src_size=Int32(16 if inside_sx else 0),
                )


@always_inline
def ring_copy[
    bits: Int, group: Int, dtype: DType, x_ring: Bool, xp: Bool, part: Int = ISSUE_ALL
](
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    x: Pointer[Scalar[dtype], _],
    row0: Int,
    ncols: Int,
    step: Int,
    slot: Int,
    ring: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    s: Int,
):
    """`ring_issue`, built twice: for a step of 4 whole chunks (every step but a row's last: no bounds computed
    per copy) and for the rest."""
    if step < ncols // step_cols[bits]():  # warp-uniform (the division is loop-invariant)
        ring_issue[bits, group, dtype, x_ring, xp, part, True](data, scales, x, row0, ncols, step, slot, ring, s)
    else:
        ring_issue[bits, group, dtype, x_ring, xp, part, False](data, scales, x, row0, ncols, step, slot, ring, s)


@always_inline
def warp_ring(xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED], s: Int) -> type_of(xs):
    """This warp's decode ring in the block's shared memory (after the cross-warp sums)."""
    return xs.unsafe_offset(WARPS * 128 + Int(warp_id()) * ring_words(s))


@always_inline
def warp_steps[bits: Int](ncols: Int, step0: Int, stride: Int) -> Int:
    """K steps step0, step0 + stride, … of a row of ncols columns."""
    var nsteps = ceildiv(ncols, step_cols[bits]())
    return ceildiv(nsteps - step0, stride) if step0 < nsteps else 0


@always_inline
def ring_prefetch[
    bits: Int, group: Int, dtype: DType
](
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    x: Pointer[Scalar[dtype], _],
    row0: Int,
    ncols: Int,
    step0: Int,
    stride: Int,
    s: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """Start copying the codes and scales of this warp's first RING - 1 K steps into its ring (uncommitted: the
    first of `ring_warp`'s groups completes them), before the activations they meet are ready (x is not read)."""
    var ring = warp_ring(xs, s)
    var mine = warp_steps[bits](ncols, step0, stride)
    comptime for i in range(RING - 1):
        if i < mine:
            ring_copy[bits, group, dtype, False, False, ISSUE_CODES](
                data, scales, x, row0, ncols, step0 + i * stride, i, ring, s
            )


@always_inline
def ring_warp[
    bits: Int, group: Int, dtype: DType, b_src: Int, x_ring: Bool, xp: Bool
](
    mut acc: SIMD[DType.float32, 4],
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    row0: Int,
    ncols: Int,
    step0: Int,
    stride: Int,
    x: Pointer[Scalar[dtype], _],
    s: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    ahead: Bool,
):
    """`decode_warp` for tiles that `ring_fits`: each K step's codes and scales (and with `x_ring` its activations)
    reach shared memory by cp.async RING - 1 steps ahead of their use, so a warp keeps RING - 1 KB of codes in
    flight without holding registers. With `xp`, x is xp (`prepare_x`). With `ahead`, the first steps' codes are
    already on their way (`ring_prefetch`)."""
    var ring = warp_ring(xs, s)
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words(s))  # t, for B_T (`sum_t`)
    comptime cpg = chunks_per_group[bits, group]()
    var mine = warp_steps[bits](ncols, step0, stride)
    var lane = Int(lane_id())
    var g, q = lane // 4, lane % 4
    var scale_halves = ring.unsafe_offset(RING * 16 * RING_ROW).unsafe_bitcast[Float16]()
    syncwarp()  # the ring's previous reads (an earlier call) are done
    comptime for i in range(RING - 1):
        if i < mine:
            if ahead:
                ring_copy[bits, group, dtype, x_ring, xp, ISSUE_X](data, scales, x, row0, ncols, step0 + i * stride, i, ring, s)
            else:
                ring_copy[bits, group, dtype, x_ring, xp](data, scales, x, row0, ncols, step0 + i * stride, i, ring, s)
        async_copy_commit_group()
    var ahead_step = step0 + (RING - 1) * stride  # the step issued in iteration i
    for i in range(mine):
        syncwarp()  # every lane is done with the slot refilled next
        if i + RING - 1 < mine:
            ring_copy[bits, group, dtype, x_ring, xp](
                data, scales, x, row0, ncols, ahead_step, (i + RING - 1) & (RING - 1), ring, s
            )
        ahead_step += stride
        async_copy_commit_group()
        async_copy_wait_group(RING - 1)  # step i's group is complete
        syncwarp()
        var slot = i & (RING - 1)
        var words = SIMD[DType.uint32, 8](0)
        var sc = SIMD[DType.float32, 8](0)
        comptime for r in range(2):
            var base = (slot * 16 + g + 8 * r) * RING_ROW + q
            comptime for j in range(4):
                words[4 * r + j] = ring[base + 4 * j]
                sc[4 * r + j] = scale_halves[unsafe_offset=(slot * 16 + g + 8 * r) * 4 + j // cpg].cast[DType.float32]()
        var step = step0 + i * stride
        comptime if b_src == B_T:
            var tw = ts.unsafe_offset(step * (step_cols[bits]() // 2))
            decode_step[bits, dtype, True](acc, words, sc, ncols, step, x, s, tw, t_row(ncols))
        else:
            var xw = ring.unsafe_offset(RING_WORDS + slot * x_slot_words(s))
            decode_step[bits, dtype, x_ring, xp](acc, words, sc, ncols, step, x, s, xw, X_ROW)


@always_inline
def decode_warp[
    bits: Int, group: Int, dtype: DType, b_src: Int, all_ring: Bool, xp: Bool = False
](
    mut acc: SIMD[DType.float32, 4],
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    nrows: Int,
    row0: Int,
    ncols: Int,
    step0: Int,
    stride: Int,
    x: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    ahead: Bool = False,
):
    """Decode: acc += W[row0 : row0 + 16, K steps step0, step0 + stride, …] · B[0 : 8]ᵀ.

    B: x (B_X), or t (B_T) summed into shared memory by `sum_t` (from t_parts for 16-bit parts). With `all_ring`
    every tile takes the ring (`all_ring`: the kernel then holds no code for the others, and fewer registers); with
    `xp`, x is xp (`prepare_x`). `ahead`: `ring_prefetch` has requested the first steps' codes (the tile takes the
    ring and B_X has s ≤ RING_X_TOKENS).
    """
    comptime cols = step_cols[bits]()
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words(s))
    var q, ra = Int(lane_id()) % 4, row0 + Int(lane_id()) // 4
    var nsteps = ceildiv(ncols, cols)
    comptime if bits == 16:
        for step in range(step0, nsteps, stride):
            var col0 = step * cols + q * chunk_cols[bits]()
            var c = load_step[bits, group](data, scales, ra, nrows, ncols, col0)
            mma_step[bits, 1, dtype, b_src](acc, c[0], c[1], c[2], col0, x, t_parts, s, ncols, 0, xs)
    else:
        comptime if xp and b_src == B_X:
            ring_warp[bits, group, dtype, b_src, True, True](acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead)
            return
        comptime if not all_ring:
            if not ring_fits[bits, group](nrows, row0, ncols):  # warp-uniform
                for step in range(step0, nsteps, stride):
                    var c = decode_codes[bits, group](data, scales, ra, nrows, ncols, step)
                    comptime if b_src == B_T:
                        var tw = ts.unsafe_offset(step * (step_cols[bits]() // 2))
                        decode_step[bits, dtype, True](acc, c[0], c[1], ncols, step, x, s, tw, t_row(ncols))
                    else:
                        decode_step[bits, dtype, False](acc, c[0], c[1], ncols, step, x, s, xs, 0)
                return
        comptime if b_src == B_X:
            if ring_x_tokens(s) > 0:
                ring_warp[bits, group, dtype, b_src, True, False](acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead)
                return
        ring_warp[bits, group, dtype, b_src, False, False](acc, data, scales, row0, ncols, step0, stride, x, s, xs, False)


@always_inline
def block_pairs[
    bits: Int, dtype: DType, from_t: Bool
](x: Pointer[Scalar[dtype], _], t_parts: Pointer[Float32, _], s: Int, ncols: Int, token: Int, col: Int) -> SIMD[
    DType.uint32, 8
]:
    """The activations (x, or Σ_p t_parts[p] rounded to `dtype`) of one word block, columns col … col + block_cols of
    `token`, as natural column pairs (0, 1), (2, 3), …; zeros past the row or for a missing token."""
    comptime block_cols = chunk_cols[bits]() // (1 if bits == 16 else 4)
    var n0: SIMD[DType.uint32, 4]
    var n1 = SIMD[DType.uint32, 4](0)
    comptime if from_t:
        n0 = load_t8[dtype](t_parts, token, col, s, ncols)
        comptime if block_cols == 16:
            n1 = load_t8[dtype](t_parts, token, col + 8, s, ncols)
    else:
        n0 = load_x8[dtype](x, token, col, s, ncols, ncols % 8 == 0)
        comptime if block_cols == 16:
            n1 = load_x8[dtype](x, token, col + 8, s, ncols, ncols % 8 == 0)
    return n0.join(n1)


@always_inline
def stage_load[
    bits: Int, dtype: DType, from_t: Bool
](
    x: Pointer[Scalar[dtype], _], t_parts: Pointer[Float32, _], s: Int, ncols: Int, tok0: Int, step: Int
) -> SIMD[DType.uint32, 32]:
    """Wide launch: this thread's units of the activation tile of one K step, as natural column pairs.

    A unit is (token tile nt, lane g·4 + q, word block blk): token tok0 + 8·nt + g, the block_cols columns of block
    blk in chunk q; unit u = thread + THREADS·i has q = u % 4, g = u / 4 % 8, nt = u / 32 % 8, blk = i.
    """
    comptime words = 1 if bits == 16 else 4
    comptime block_cols = chunk_cols[bits]() // words
    var tid = Int(thread_idx.x)
    var q, g, nt = tid % 4, (tid // 4) % 8, (tid // 32) % 8
    var token = tok0 + nt * 8 + g
    var out = SIMD[DType.uint32, 32](0)
    comptime for blk in range(words):
        var col = step * step_cols[bits]() + q * chunk_cols[bits]() + blk * block_cols
        out = out.insert[offset = 8 * blk](block_pairs[bits, dtype, from_t](x, t_parts, s, ncols, token, col))
    return out


@always_inline
def stage_store[bits: Int](nat: SIMD[DType.uint32, 32], xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED]):
    """This thread's units (`stage_load`) as B fragments: words [((blk·mmas + h)·8 + nt)·32 + lane]·2 + {0, 1}."""
    comptime words = 1 if bits == 16 else 4
    comptime mmas = chunk_cols[bits]() // words // 4
    var tid = Int(thread_idx.x)
    var slot, nt = tid % 32, (tid // 32) % 8
    comptime for blk in range(words):
        var w = nat.slice[8, offset = 8 * blk]()
        comptime for h in range(mmas):
            xs.unsafe_store[alignment=8]((((blk * mmas + h) * 8 + nt) * 32 + slot) * 2, b_words[bits](w, h))


@always_inline
def uses_wgmma[bits: Int, dtype: DType]() -> Bool:
    """Whether the wide launch multiplies with wgmma (sm_90a, A from registers: bf16 only in MAX 26.7) rather than
    mma.sync: 2- and 4-bit codes with bf16 activations."""
    return bits < 16 and dtype == DType.bfloat16


@always_inline
def wg_stage_store[bits: Int](nat: SIMD[DType.uint32, 32], xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED]):
    """This thread's unit (`wg_shared_units`) into the step's wgmma B tiles: slice blk·mmas + h holds
    64 tokens × the 16 logical k of mma (blk, h) (`b_words`: chunk q's pair words land at k 2q, 2q + 1 and
    2q + 8, 2q + 9), in the canonical K-major layout without swizzle (WG_SLICE_BYTES): token t's 16 bytes of
    k 0-7 at (t / 8)·256 + (t % 8)·16, of k 8-15 128 bytes further."""
    comptime mmas = chunk_cols[bits]() // 16
    var tid = Int(thread_idx.x)
    var t, blk = tid % 64, tid // 64
    var row = ((t // 8) * 256 + (t % 8) * 16) // 4
    comptime for h in range(mmas):
        var lo, hi = SIMD[DType.uint32, 4](0), SIMD[DType.uint32, 4](0)
        comptime for q in range(4):
            var b = b_words[bits](nat.slice[8, offset = 8 * q](), h)
            lo[q], hi[q] = b[0], b[1]
        var slice = xs.unsafe_offset((blk * mmas + h) * (WG_SLICE_BYTES // 4) + row)
        slice.unsafe_store[alignment=16](0, lo)
        slice.unsafe_store[alignment=16](32, hi)


@always_inline
def fence_proxy_async():
    """Make this thread's shared-memory stores visible to the tensor cores' reads (wgmma's async proxy)."""
    inlined_assembly["fence.proxy.async.shared::cta;", NoneType, constraints="", has_side_effect=True]()


@always_inline
def wg_issue_x[
    bits: Int, dtype: DType
](
    x: Pointer[Scalar[dtype], _],
    s: Int,
    ncols: Int,
    tok0: Int,
    step: Int,
    nat: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """Block-wide: start copying K step `step`'s activations of tokens tok0 … tok0 + 63 into the natural tile `nat`
    (token t's step columns at word t·X_ROW, 16 bytes a copy, consecutive threads along a token's row; tokens past s
    and columns past ncols arrive as zeros). Needs 16-byte aligned rows (ncols % 8 == 0)."""
    comptime pieces = step_cols[bits]() // 8  # 16-byte pieces of one token's step: 32 or 16
    comptime rows = THREADS // pieces  # tokens per pass of the block
    var tid = Int(thread_idx.x)
    var t0, piece = tid // pieces, tid % pieces
    var col = step * step_cols[bits]() + 8 * piece
    var src = x.unsafe_offset((tok0 + t0) * ncols + col).unsafe_bitcast[UInt8]()
    var dst = nat.unsafe_offset(t0 * X_ROW + 4 * piece).unsafe_bitcast[UInt8]()
    var pass_bytes = rows * ncols * 2
    comptime for i in range(64 // rows):
        var inside = tok0 + t0 + rows * i < s and col < ncols
        async_copy[16, fill=ZERO](
            (src.unsafe_offset(i * pass_bytes) if inside else x.unsafe_bitcast[UInt8]()).address_space_cast[
                AddressSpace.GLOBAL
            ](),
            dst.unsafe_offset(i * rows * X_ROW * 4),
            src_size=Int32(16 if inside else 0),
        )
    async_copy_commit_group()


@always_inline
def wg_fill_unit[
    bits: Int, dtype: DType, from_t: Bool
](
    x: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    ncols: Int,
    tok0: Int,
    step: Int,
    nat: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """This thread's unit of K step `step` (x, or Σ_p t_parts[p] rounded to `dtype`) written into the natural tile
    where `wg_shared_units` reads it, one chunk at a time (the partial sums of one chunk in flight, not four)."""
    comptime block_cols = chunk_cols[bits]() // 4
    var tid = Int(thread_idx.x)
    var t, blk = tid % 64, tid // 64
    for q in range(4):
        var col = q * chunk_cols[bits]() + blk * block_cols
        var pairs = block_pairs[bits, dtype, from_t](x, t_parts, s, ncols, tok0 + t, step * step_cols[bits]() + col)
        var w = nat.unsafe_offset(t * X_ROW + col // 2)
        w.unsafe_store[alignment=16](0, pairs.slice[4]())
        comptime if block_cols == 16:
            w.unsafe_store[alignment=16](4, pairs.slice[4, offset=4]())


@always_inline
def wg_shared_units[bits: Int](nat: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED]) -> SIMD[DType.uint32, 32]:
    """This thread's unit, (token t = thread % 64, word block blk = thread / 64), read from the natural tile
    (`wg_issue_x`, `wg_fill_unit`): block blk of each of the step's 4 chunks q, natural pairs, at words 8q …"""
    comptime block_cols = chunk_cols[bits]() // 4
    var tid = Int(thread_idx.x)
    var t, blk = tid % 64, tid // 64
    var out = SIMD[DType.uint32, 32](0)
    comptime for q in range(4):
        var w = nat.unsafe_offset(t * X_ROW + (q * chunk_cols[bits]() + blk * block_cols) // 2)
        var n0 = w.unsafe_load[width=4, alignment=16](0)
        var n1 = SIMD[DType.uint32, 4](0)
        comptime if block_cols == 16:
            n1 = w.unsafe_load[width=4, alignment=16](4)
        out = out.insert[offset = 8 * q](n0.join(n1))
    return out


@always_inline
def wg_part[
    bits: Int, group: Int, dtype: DType, from_t: Bool
](
    mut acc: SIMD[DType.float32, 4 * NT_WIDE],
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    nrows: Int,
    row0: Int,
    ncols: Int,
    first: Int,
    last: Int,
    x: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    tok0: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """`wide_part` with wgmma m64n64k16: each warpgroup (warps 4i … 4i + 3, 64 consecutive rows) multiplies its
    dequantized codes (registers: the mma.sync A fragments) by the step's B tile in shared memory (`wg_stage_store`,
    X_WORDS words). x's next step is copied meanwhile by cp.async into a natural tile after it (`wg_issue_x`), and
    permuted into the B tile by the threads at the start of its step; t (and x with unaligned rows) is read into
    registers at the start of its step instead. acc is the wgmma accumulator of the warp's 16 rows × 64 tokens,
    laid out as `mma_step`'s."""
    comptime cols = step_cols[bits]()
    comptime chunk = chunk_cols[bits]()
    comptime mmas = chunk // 16
    comptime offset = Float32((1 << bits) - 1) / 2
    if first >= last:
        return
    var lane = Int(lane_id())
    var g, q = lane // 4, lane % 4
    var ra = row0 + g
    var nat_tile = xs.unsafe_offset(X_WORDS)
    var copies = not from_t and ncols % 8 == 0  # block-uniform
    if copies:
        wg_issue_x[bits](x, s, ncols, tok0, first, nat_tile)
    var cur = load_step[bits, group](data, scales, ra, nrows, ncols, first * cols + q * chunk)
    # the descriptor's offsets in 16-byte units (MAX 26.7's `create` stores them as given): SBO 256 B, LBO 128 B
    var desc = WGMMADescriptor.create[256 // 16, 128 // 16](xs.unsafe_bitcast[Scalar[dtype]]())
    for step in range(first, last):
        if copies:
            async_copy_wait_group(0)
        barrier()  # every warp's wgmmas of the last step are done (and every thread's copies have landed)
        if not copies:
            wg_fill_unit[bits, dtype, from_t](x, t_parts, s, ncols, tok0, step, nat_tile)
        wg_stage_store[bits](wg_shared_units[bits](nat_tile), xs)
        fence_proxy_async()
        barrier()  # the B tile is complete, the natural tile free
        var nxt = cur
        if step + 1 < last:
            if copies:
                wg_issue_x[bits](x, s, ncols, tok0, step + 1, nat_tile)
            nxt = load_step[bits, group](data, scales, ra, nrows, ncols, (step + 1) * cols + q * chunk)
        var sa, sb = SIMD[dtype, 2](cur[2][0].cast[dtype]()), SIMD[dtype, 2](cur[2][1].cast[dtype]())
        var sha, shb = sa * Scalar[dtype](-offset), sb * Scalar[dtype](-offset)
        comptime for blk in range(4):
            wgmma_fence_aligned()  # A fragments written by ordinary instructions
            comptime for h in range(mmas):
                var a = a_operand[bits, dtype](cur[0], cur[1], blk, h, sa, sha, sb, shb)
                acc = wgmma_async[64, 8 * NT_WIDE, 16, a_type=dtype, b_type=dtype](
                    a, desc + (blk * mmas + h) * WG_SLICE_BYTES, acc
                )
            wgmma_commit_group_sync()
            wgmma_wait_group_sync[1]()  # the previous block's A fragments are free again
        wgmma_wait_group_sync[0]()
        cur = nxt


@always_inline
def wide_part[
    bits: Int, group: Int, dtype: DType, from_t: Bool
](
    mut acc: SIMD[DType.float32, 4 * NT_WIDE],
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    nrows: Int,
    row0: Int,
    ncols: Int,
    first: Int,
    last: Int,
    x: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    tok0: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """Wide launch (block-wide, steps block-uniform): acc += W[row0 : row0 + 16, steps first … last) · B[tok0 …]ᵀ.

    Each step's activation tile goes through shared memory (`stage_store`); the next step's codes and activations
    are loaded while the warps run the current one.
    """
    comptime if uses_wgmma[bits, dtype]():
        wg_part[bits, group, dtype, from_t](acc, data, scales, nrows, row0, ncols, first, last, x, t_parts, s, tok0, xs)
        return
    comptime cols = step_cols[bits]()
    comptime chunk = chunk_cols[bits]()
    if first >= last:
        return
    var lane = Int(lane_id())
    var g, q = lane // 4, lane % 4
    var ra = row0 + g
    var nat = stage_load[bits, dtype, from_t](x, t_parts, s, ncols, tok0, first)
    var cur = load_step[bits, group](data, scales, ra, nrows, ncols, first * cols + q * chunk)
    for step in range(first, last):
        barrier()  # every warp is done with the previous tile
        stage_store[bits](nat, xs)
        barrier()
        var nxt = cur
        if step + 1 < last:
            nat = stage_load[bits, dtype, from_t](x, t_parts, s, ncols, tok0, step + 1)
            nxt = load_step[bits, group](data, scales, ra, nrows, ncols, (step + 1) * cols + q * chunk)
        mma_step[bits, NT_WIDE, dtype, B_SHARED](
            acc, cur[0], cur[1], cur[2], step * cols + q * chunk, x, t_parts, s, ncols, tok0, xs
        )
        cur = nxt


@always_inline
def fragment_coords(lane: Int, i: Int) -> Tuple[Int, Int]:
    """(row in tile, token in tile) of accumulator element i of a C fragment held by `lane`."""
    var g, q = lane // 4, lane % 4
    return (g + 8 * (i // 2), 2 * q + i % 2)


@always_inline
def reduce_warps(
    acc: SIMD[DType.float32, 4], red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED], tiles: Int = 1
) -> Tuple[Bool, Float32, Int, Int]:
    """Decode: `tiles` 16×8 C fragments, each summed over its WARPS / tiles consecutive warps; (holder, value, row in
    the block's 16·tiles rows, token) for threads < 128·tiles."""
    var per = WARPS // tiles
    var tid = Int(thread_idx.x)
    var w, lane = Int(warp_id()), Int(lane_id())
    comptime for i in range(4):
        red[unsafe_offset=(w * 32 + lane) * 4 + i] = acc[i]
    barrier()
    if tid >= 128 * tiles:
        return (False, Float32(0), 0, 0)
    var tile, e = tid // 128, tid % 128
    var total = Float32(0)
    for ww in range(per):
        total += red[unsafe_offset=(tile * per + ww) * 128 + e]
    var rc = fragment_coords(e // 4, e % 4)
    return (True, total, 16 * tile + rc[0], rc[1])


@always_inline
def passes(s: Int) -> Int:
    """Token passes of the wide launch."""
    return ceildiv(s, 8 * NT_WIDE)


@always_inline
def project_blocks(s: Int, k: Int) -> Int:
    """Blocks of stage 1 (a 1-D grid)."""
    if s <= SMALL_S:
        return ceildiv(k, 16) * P_SPLIT
    return ceildiv(k, 16 * WARPS) * passes(s) * P_SPLIT


@always_inline
def decode_tiles(m: Int) -> Int:
    """16-row tiles per block of stage 2 at decode: two where there are enough (m ≥ 32·SMS rows; H100, 8192 and
    29568 rows: 1-5 µs faster than one, four slower), else one."""
    return 2 if m >= 32 * SMS else 1


@always_inline
def apply_blocks(s: Int, m: Int) -> Int:
    """Blocks of stage 2 (a 1-D grid)."""
    if s <= SMALL_S:
        return ceildiv(m, 16 * decode_tiles(m))
    return ceildiv(m, 16 * WARPS) * passes(s)


@always_inline
def project_block[
    dtype: DType, //, br: Int, gr: Int, wide: Bool
](
    bid: Int,
    red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    t_parts: Pointer[mut=True, Float32, _],
    x: Pointer[Scalar[dtype], _],
    r_data: Pointer[UInt8, _],
    r_scales: Pointer[Float16, _],
    xp: Pointer[mut=True, Scalar[dtype], _],
    prep: Bool,
    s: Int,
    n: Int,
    k: Int,
):
    """Block `bid` of stage 1: its rows of t_parts[p], the partial sum over K segment p; with `prep`, its share of
    xp (`prepare_x`)."""
    var w, lane = Int(warp_id()), Int(lane_id())
    var p = bid % P_SPLIT
    comptime if not wide:  # one 16-row tile per block, its warps taking every (P_SPLIT·WARPS)-th K step
        var rt = bid // P_SPLIT
        var ahead = False
        comptime if br < 16:  # R's first codes on their way while warp 0 prepares x
            ahead = prep and ring_fits[br, gr](k, 16 * rt, n)
            if ahead:
                ring_prefetch[br, gr](r_data, r_scales, x, 16 * rt, n, p * WARPS + w, WARPS * P_SPLIT, s, xs)
        if prep:
            prepare_x(x, xp, s, n, bid, project_blocks(s, k))
        var acc = SIMD[DType.float32, 4](0)
        decode_warp[br, gr, dtype, B_X, False](
            acc, r_data, r_scales, k, 16 * rt, n, p * WARPS + w, WARPS * P_SPLIT, x, t_parts, s, xs, ahead
        )
        var r = reduce_warps(acc, red)
        var row = 16 * rt + r[2]
        if r[0] and row < k and r[3] < s:
            t_parts[unsafe_offset=(p * s + r[3]) * k + row] = r[1]
    else:
        var rest = bid // P_SPLIT
        var tok0 = (rest % passes(s)) * 8 * NT_WIDE
        var rt = (rest // passes(s)) * WARPS + w
        var seg = segment(ceildiv(n, step_cols[br]()), P_SPLIT, p)
        var acc = SIMD[DType.float32, 4 * NT_WIDE](0)
        wide_part[br, gr, dtype, False](acc, r_data, r_scales, k, 16 * rt, n, seg[0], seg[1], x, t_parts, s, tok0, xs)
        comptime for e in range(4 * NT_WIDE):
            var rc = fragment_coords(lane, e % 4)
            var row, token = 16 * rt + rc[0], tok0 + 8 * (e // 4) + rc[1]
            if row < k and token < s:
                t_parts[unsafe_offset=(p * s + token) * k + row] = acc[e]


@always_inline
def all_ring[bq: Int, gq: Int, bl: Int, gl: Int](m: Int, n: Int, k: Int) -> Bool:
    """Whether every decode tile of stage 2 takes the ring (`ring_fits`), Q's and L's (or L is fp16, or absent)."""
    var l_fits = k == 0 or bl == 16 or ring_fits[bl, gl](m, 0, k)
    return bq < 16 and m % 16 == 0 and ring_fits[bq, gq](m, 0, n) and l_fits


@always_inline
def xp_fits[bq: Int, gq: Int, bl: Int, gl: Int](s: Int, m: Int, n: Int, k: Int, room: Bool) -> Bool:
    """Whether stage 2 reads the activations that stage 1 prepared (`prepare_x`): room for them (the graph gives
    xp XP_PARTS rows for 2-bit Q on the GPU), few tokens, a low-rank part (stage 1 runs) and every tile in the ring."""
    return bq == 2 and prepares_x(s, n, k, room) and all_ring[bq, gq, bl, gl](m, n, k)


@always_inline
def prepares_x(s: Int, n: Int, k: Int, room: Bool) -> Bool:
    """Whether stage 1 writes xp: `xp_fits` less what stage 1 does not know (it holds for every Q of n columns)."""
    return room and 0 < s and s <= RING_X_TOKENS and k > 0 and n % 64 == 0


@always_inline
def sx_floats(n: Int) -> Int:
    """Floats of sx: 4 per 64-column chunk, padded to whole K steps (4 chunks)."""
    return ceildiv(n, 256) * 16


@always_inline
def prepare_x[
    dtype: DType
](x: Pointer[Scalar[dtype], _], xp: Pointer[mut=True, Scalar[dtype], _], s: Int, n: Int, bid: Int, blocks: Int):
    """Stage 1's share of xp (`prepares_x`), block `bid` of `blocks`: part 0 (s, n) is x with each 16 columns in the
    order of `b_words[2]`'s words (columns 2h + e, 2h + e + 8 in word 2h + e), divided by 4^((2h + e) mod 3) as
    `code_pair` needs; sx (`sx_floats`) float32 holds per 64-column chunk −Σ (2^e·x' + 1.5·x) of tokens (0, 1, 0, 1)
    (token 1 is token 0 where s = 1): the C fragment that `decode_step` starts the chunk's mmas from, whose columns
    2q, 2q + 1 are tokens 0 and 1 in lane q = 0 (the other lanes' columns are never written). Warp 0 of the block
    takes 32·16 columns at a time, four consecutive lanes a chunk."""
    comptime base = Float32(128.0) if dtype == DType.bfloat16 else Float32(1024.0)
    var units = s * n // 16
    var sx = xp.unsafe_offset(s * n).unsafe_bitcast[Float32]()
    var lane = Int(lane_id())
    if warp_id() != 0:
        return
    for batch in range(bid, ceildiv(units, 32), blocks):  # warp-uniform: shuffles below
        var u = 32 * batch + lane
        var total = Float32(0)
        if u < units:
            var nat = bitcast[DType.uint32, 8](x.unsafe_load[width=16, alignment=16](16 * u))
            var out = SIMD[DType.uint32, 8](0)
            comptime for h in range(4):
                var pair = b_words[2](nat, h)
                comptime for e in range(2):
                    var v = half2[dtype](pair[e])
                    var scaled = v * Scalar[dtype](1.0 / Float64(1 << (2 * ((2 * h + e) % 3))))
                    var vf, sf = v.cast[DType.float32](), scaled.cast[DType.float32]()
                    total += base * (sf[0] + sf[1]) + 1.5 * (vf[0] + vf[1])
                    out[2 * h + e] = bitcast[DType.uint32, 1](scaled)[0]
            xp.unsafe_store[alignment=16](16 * u, bitcast[dtype, 16](out))
        total += warp.shuffle_xor(total, 1)
        total += warp.shuffle_xor(total, 2)
        if u < units and lane % 4 == 0:
            var token, chunk = u // (n // 16), (u % (n // 16)) // 4
            comptime for e in range(4):
                if min(e % 2, s - 1) == token:
                    sx[unsafe_offset=4 * chunk + e] = -total


@always_inline
def sum_t[
    dtype: DType
](t_parts: Pointer[Float32, _], s: Int, k: Int, xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED]):
    """Decode, block-wide: t = Σ_p t_parts[p] (s, k) rounded to `dtype` into shared memory after the rings, each
    token's row `t_row(k)` words long and zero past k, for `decode_warp`'s B_T."""
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words(s)).unsafe_bitcast[Scalar[dtype]]()
    var row = 2 * t_row(k)
    for e in range(Int(thread_idx.x), s * row, THREADS):
        var token, c = e // row, e % row
        var total = Float32(0)
        if c < k:
            for p in range(P_SPLIT):
                total += t_parts[unsafe_offset=(p * s + token) * k + c]
        ts[e] = total.cast[dtype]()
    barrier()


@always_inline
def prefetch_span(p: Pointer[UInt8, _], first: Int, last: Int):
    """Block-wide: ask L2 for bytes [first, last) of p (PTX prefetch.global.L2, a 128-byte line per thread and
    pass); nothing waits for it."""
    for off in range((first // 128 + Int(thread_idx.x)) * 128, last, THREADS * 128):
        inlined_assembly["prefetch.global.L2 [$0];", NoneType, constraints="l", has_side_effect=True](
            p.unsafe_offset(off)
        )


@always_inline
def wait_for(sync: Pointer[Int64, _], count: Int):
    """Block-wide: wait until sync[0] (stage-1 blocks done) reaches `count`, then see their writes."""
    if thread_idx.x == 0:
        while Atomic[Int64, scope="device"].load[ordering=Ordering.ACQUIRE](sync) < Int64(count):
            pass
    barrier()


@always_inline
def apply_block[
    dtype: DType,
    //,
    bq: Int,
    gq: Int,
    bl: Int,
    gl: Int,
    wide: Bool,
    fused: Bool,
    rings: Bool,
    use_xp: Bool,
](
    bid: Int,
    red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    y: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    xp: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
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
    sync: Pointer[Int64, _],
    wait_count: Int,
):
    """Block `bid` of stage 2: its rows of y = x·Qᵀ + t·Lᵀ (+ b); with `fused` (one launch, s > SMALL_S), t is ready
    once sync[0] = wait_count;
    `rings` and `use_xp` where `all_ring` and `xp_fits` say so (`decode_warp`). At decode, launched dependent on
    stage 1 (programmatic dependent launch): Q's first codes are requested while stage 1 runs; xp, t and y wait
    for its end. (Waiting for xp alone, counted per stage-1 block, measured slower: 26.8-28.0 µs against
    22.9-24.3 on 8192², H100.)"""
    var w, lane = Int(warp_id()), Int(lane_id())
    comptime if not wide:  # `decode_tiles` 16-row tiles per block, each with WARPS / tiles warps taking every
        # (WARPS / tiles)-th K step of Q, then of L (a tile past m, in the last block, is skipped)
        var tiles = decode_tiles(m)
        var per = WARPS // tiles
        var row0, ws = 16 * (bid * tiles + w // per), w % per
        var acc = SIMD[DType.float32, 4](0)
        if k > 0:  # the block's rows of L (and their scales) on their way to L2 while Q is read
            var r0, r1 = 16 * tiles * bid, min(16 * tiles * (bid + 1), m)
            var lrb = ceildiv(k * bl, 8)
            prefetch_span(l_data, r0 * lrb, r1 * lrb)
            comptime if bl < 16:
                var lsb = ceildiv(k, gl) * 2
                prefetch_span(l_scales.unsafe_bitcast[UInt8](), r0 * lsb, r1 * lsb)
        comptime if use_xp:
            if row0 < m:
                ring_prefetch[bq, gq](q_codes, q_scales, xp, row0, n, ws, per, s, xs)
            wait_on_dependent_grids()
            if row0 < m:
                decode_warp[bq, gq, dtype, B_X, True, True](
                    acc, q_codes, q_scales, m, row0, n, ws, per, xp, t_parts, s, xs, ahead=True
                )
        else:
            if row0 < m or not rings:
                decode_warp[bq, gq, dtype, B_X, rings](acc, q_codes, q_scales, m, row0, n, ws, per, x, t_parts, s, xs)
        wait_on_dependent_grids()  # t, and y's memory, belong to stage 1 until it ends
        if k > 0:
            sum_t[dtype](t_parts, s, k, xs)
            if row0 < m or not rings:
                decode_warp[bl, gl, dtype, B_T, rings](acc, l_data, l_scales, m, row0, k, ws, per, x, t_parts, s, xs)
        var r = reduce_warps(acc, red, tiles)
        var row = 16 * tiles * bid + r[2]
        if r[0] and row < m and r[3] < s:
            var b = bias[unsafe_offset=row] if has_bias else Float32(0)
            y[unsafe_offset=r[3] * m + row] = (r[1] + b).cast[dtype]()
    else:
        var rt, tok0 = (bid // passes(s)) * WARPS + w, (bid % passes(s)) * 8 * NT_WIDE
        var q_steps, l_steps = ceildiv(n, step_cols[bq]()), ceildiv(k, step_cols[bl]())
        var acc = SIMD[DType.float32, 4 * NT_WIDE](0)
        wide_part[bq, gq, dtype, False](acc, q_codes, q_scales, m, 16 * rt, n, 0, q_steps, x, t_parts, s, tok0, xs)
        if k > 0:
            comptime if fused:
                wait_for(sync, wait_count)
            wide_part[bl, gl, dtype, True](acc, l_data, l_scales, m, 16 * rt, k, 0, l_steps, x, t_parts, s, tok0, xs)
        comptime for e in range(4 * NT_WIDE):
            var rc = fragment_coords(lane, e % 4)
            var row, token = 16 * rt + rc[0], tok0 + 8 * (e // 4) + rc[1]
            if row < m and token < s:
                var b = bias[unsafe_offset=row] if has_bias else Float32(0)
                y[unsafe_offset=token * m + row] = (acc[e] + b).cast[dtype]()


def launch_project[
    dtype: DType, //, br: Int, gr: Int
](
    t_parts: Pointer[mut=True, Float32, _],
    xp: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    r_data: Pointer[UInt8, _],
    r_scales: Pointer[Float16, _],
    s: Int,
    n: Int,
    k: Int,
    xp_room: Bool,
    ctx: DeviceContext,
) raises:
    """Stage 1: t_parts (P_SPLIT, s, k) float32, partial sums of x (s, n) · dequant(R)ᵀ over K segments; xp
    (`prepares_x`, where `xp_room`). At decode its blocks let the next launch (stage 2) start at once
    (programmatic dependent launch)."""
    comptime assert dtype == DType.bfloat16 or dtype == DType.float16, "GPU activations are bf16 or fp16"

    @__parameter
    def kernel[wide: Bool]():  # (captures arguments only: a captured local `var` is read through a host address)
        comptime if not wide:
            launch_dependent_grids()
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        var prep = prepares_x(s, n, k, xp_room)
        project_block[br, gr, wide](
            Int(block_idx.x), xs.unsafe_bitcast[Float32](), xs, t_parts, x, r_data, r_scales, xp, prep, s, n,
            k,
        )

    var smem = shared_bytes(s, k)
    var attr = FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))  # over 48 KB needs the opt-in
    if s <= SMALL_S:
        ctx.enqueue_function[kernel[False]](
            grid_dim=project_blocks(s, k), block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
        )
    else:
        ctx.enqueue_function[kernel[True]](
            grid_dim=project_blocks(s, k), block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
        )


def launch_apply[
    dtype: DType, //, bq: Int, gq: Int, bl: Int, gl: Int
](
    y: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    xp: Pointer[Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
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
    xp_room: Bool,
    ctx: DeviceContext,
) raises:
    """Stage 2: y (s, m) = x·dequant(Q)ᵀ + (Σ_p t_parts[p])·dequant(L)ᵀ (+ bias), one K loop over Q then L; Q's
    activations from xp where `xp_fits`. At decode it is launched dependent on the previous launch, stage 1
    (programmatic dependent launch): it starts while stage 1 runs and waits for it only where it must."""
    comptime assert dtype == DType.bfloat16 or dtype == DType.float16, "GPU activations are bf16 or fp16"

    @__parameter
    def kernel[wide: Bool, rings: Bool, use_xp: Bool]():
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        apply_block[bq, gq, bl, gl, wide, False, rings, use_xp](
            Int(block_idx.x), xs.unsafe_bitcast[Float32](), xs, y, x, xp, t_parts, q_codes, q_scales, l_data,
            l_scales, bias, s, m, n, k, has_bias, stack_allocation[1, Int64](), 0,  # no stage-1 blocks to wait for
        )

    var smem = shared_bytes(s, k)
    var attr = FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))  # over 48 KB needs the opt-in
    var blocks = apply_blocks(s, m)
    # launched dependent on the previous launch only when that is stage 1 (k > 0): everything read before the waits
    # (codes, scales, x) was then complete before stage 1 started
    var after_stage1 = 1 if k > 0 else 0
    if s > SMALL_S:
        ctx.enqueue_function[kernel[True, False, False]](
            grid_dim=blocks, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
        )
        return
    comptime if bq == 2:
        if xp_fits[bq, gq, bl, gl](s, m, n, k, xp_room):
            ctx.enqueue_function[kernel[False, True, True]](
                grid_dim=blocks, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
                attributes=pdl_launch_attributes(PDLLevel(after_stage1)),  # xp_fits: stage 1 ran (k > 0)
            )
            return
    if all_ring[bq, gq, bl, gl](m, n, k):
        ctx.enqueue_function[kernel[False, True, False]](
            grid_dim=blocks, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
            attributes=pdl_launch_attributes(PDLLevel(after_stage1)),
        )
        return
    ctx.enqueue_function[kernel[False, False, False]](
        grid_dim=blocks, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
        attributes=pdl_launch_attributes(PDLLevel(1)),
    )


def launch_fused[
    dtype: DType, //, bq: Int, gq: Int, bl: Int, gl: Int, br: Int, gr: Int
](
    y: Pointer[mut=True, Scalar[dtype], _],
    t_parts: Pointer[mut=True, Float32, _],
    xp: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    q_codes: Pointer[UInt8, _],
    q_scales: Pointer[Float16, _],
    l_data: Pointer[UInt8, _],
    l_scales: Pointer[Float16, _],
    r_data: Pointer[UInt8, _],
    r_scales: Pointer[Float16, _],
    bias: Pointer[Float32, _],
    sync: Pointer[mut=True, Int64, _],
    s: Int,
    m: Int,
    n: Int,
    k: Int,
    has_bias: Bool,
    xp_room: Bool,
    ctx: DeviceContext,
) raises:
    """The fused op y = x·Qᵀ + (x·Rᵀ)·Lᵀ (+ b). At decode: stage 1 (with a low-rank part), then stage 2 launched
    dependent on it (they share xp, the prepared activations, where `xp_room`: a second scratch output). Larger s:
    one launch. Chosen by measurement (H100, Qwen2-72B shapes, runbook/03-bench-kernel.md): one launch was faster
    on every shape at s = 128; at decode two launches were, on every shape once stage 2 started while stage 1 runs
    (m = 1024: 10.8-16.1 µs against 12.6-16.9 in one launch; the one-launch kernel holds both stages' registers).

    One launch: blocks [0, P) compute t's partial sums, blocks [P, P + A) compute y and wait. t_parts
    (P_SPLIT, s, k) is the op's second output, a scratch buffer that the graph discards. Stage-1 blocks have the
    lower indices, so they are dispatched first and never wait: no deadlock whatever the grid size. They count
    themselves in sync[0]; stage-2 blocks read t after sync[0] = P (acquire). Every block then counts itself in
    sync[1], and the last one resets both counters for the next launch.
    """
    comptime assert dtype == DType.bfloat16 or dtype == DType.float16, "GPU activations are bf16 or fp16"
    if s <= SMALL_S:
        if k > 0:
            launch_project[br, gr](t_parts, xp, x, r_data, r_scales, s, n, k, xp_room, ctx)
        launch_apply[bq, gq, bl, gl](
            y, x, xp, t_parts, q_codes, q_scales, l_data, l_scales, bias, s, m, n, k, has_bias, xp_room, ctx
        )
        return
    var n_project = project_blocks(s, k) if k > 0 else 0
    var total = n_project + apply_blocks(s, m)

    # sizes are kernel arguments: a captured device graph allows 16 captured values per kernel
    @__parameter
    def kernel(s_: Int64, m_: Int64, n_: Int64, k_: Int64, has_bias_: Int64, n_project_: Int64):
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        var red = xs.unsafe_bitcast[Float32]()
        var bid = Int(block_idx.x)
        var s, m, n, k, np = Int(s_), Int(m_), Int(n_), Int(k_), Int(n_project_)
        if bid < np:
            project_block[br, gr, True](bid, red, xs, t_parts, x, r_data, r_scales, xp, False, s, n, k)
            barrier()
            if thread_idx.x == 0:
                fence[Ordering.RELEASE, scope="device"]()
                _ = Atomic[Int64, scope="device"].fetch_add[ordering=Ordering.RELEASE](sync, 1)
        else:
            apply_block[bq, gq, bl, gl, True, True, False, False](
                bid - np, red, xs, y, x, xp, t_parts, q_codes, q_scales, l_data, l_scales, bias, s, m, n, k,
                has_bias_ != 0, sync, np,
            )
        if thread_idx.x == 0:
            var done = sync.unsafe_offset(1)
            var arrived = Atomic[Int64, scope="device"].fetch_add[ordering=Ordering.ACQUIRE_RELEASE](done, 1)
            if arrived == Int64(grid_dim.x) - 1:
                Atomic[Int64, scope="device"].store(sync, 0)
                Atomic[Int64, scope="device"].store(done, 0)

    var smem = shared_bytes(s, k)
    var attr = FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))  # over 48 KB needs the opt-in
    ctx.enqueue_function[kernel](
        Int64(s), Int64(m), Int64(n), Int64(k), Int64(has_bias), Int64(n_project), grid_dim=total, block_dim=THREADS,
        shared_mem_bytes=smem, func_attribute=attr,
    )
