"""GPU kernels, the wide launch (s > SMALL_S): a block's 128 rows × 64 tokens over a range of K steps, each step's
activation tile staged in shared memory, multiplied by wgmma (2- and 4-bit codes, bf16) or mma.sync."""

from std.math import ceildiv
from std.memory import AddressSpace
from std.sys import inlined_assembly

from max.gpu import barrier, lane_id, thread_idx
from max.gpu.primitives.grid_controls import wait_on_dependent_grids
from max.gpu.memory import async_copy, async_copy_commit_group, async_copy_wait_group
from max.gpu.compute.mma import (
    wgmma_async,
    wgmma_commit_group_sync,
    wgmma_fence_aligned,
    wgmma_wait_group_sync,
    WGMMADescriptor,
)

from .gpu_codes import code_pair, magic_word
from .gpu_tiles import (
    B_SHARED,
    NT_WIDE,
    THREADS,
    X_ROW,
    ZERO,
    b_words,
    chunk_cols,
    load_step,
    load_t8,
    load_x8,
    masked_pair,
    mma_step,
    row_scales,
    step_cols,
)

comptime X_WORDS = 32 * 256
"""Wide launch: 32-bit words of one staged activation step (64 tokens × 256 columns of 16-bit values); with wgmma
(`uses_wgmma`) a natural tile of 64 rows of X_ROW words follows (`wg_issue_x`)."""
comptime WG_SLICE_BYTES = 2048
"""Wide launch with wgmma: one k16 slice of a staged step, 64 tokens × 16 logical k in the canonical K-major layout
without swizzle: core matrices of 8 tokens × 8 k (16 bytes a token), the two along k 128 bytes apart (the
descriptor's leading byte offset), token groups 256 bytes apart (its stride byte offset)."""
comptime RING_SLOTS = 3
"""Wide launch reading x in B-tile order (`wg_ring_part`): staged steps in shared memory, `tile_words` each; the
copies of a step are issued two steps ahead."""


@always_inline
def slice_bytes(nt: Int) -> Int:
    """Bytes of one k16 slice of a staged step of 8·nt tokens (WG_SLICE_BYTES at NT_WIDE): token groups 256 bytes
    apart."""
    return 256 * nt


@always_inline
def tile_words(nt: Int) -> Int:
    """32-bit words of one staged step of 8·nt tokens × 256 columns of 16-bit values (X_WORDS at NT_WIDE)."""
    return 1024 * nt


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
            (src.unsafe_offset(i * pass_bytes) if inside else x.unsafe_bitcast[UInt8]()).unsafe_address_space_cast[
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
    (`wg_issue_x`, `wg_fill_unit`): block blk of each of the step's 4 chunks q, natural pairs, at words 8q to 8q + 7."""
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
    var magic = magic_word[dtype](s)
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
        wg_multiply[bits, nt=NT_WIDE](acc, cur, desc, magic)
        cur = nxt


@always_inline
def shifted_pair[
    bits: Int, dtype: DType, j: Int
](
    word: UInt32,
    magic: UInt32,
    scales: Tuple[SIMD[dtype, 2], SIMD[dtype, 2], SIMD[dtype, 2]],
    shift: SIMD[dtype, 2],
) -> SIMD[dtype, 2]:
    """Columns (j, j + 16/bits) of a word of codes dequantized as `decode_pair` does, with the same bits, but with the
    exponent bits `magic` in a register (`magic_word`), so that the mask is LOP3's immediate: 2-bit codes as
    `code_pair`'s 2^7 + 4^p·c (p = j mod 3; the shifts 0, 6, 12 shared by a word's 8 pairs), then
    (v − 2^7)·scale/4^p + shift, where `scales` holds scale/4^p for p = 0, 1, 2 (exact: powers of two apart);
    4-bit codes as 2^7 + c, then (v − 2^7)·scale + shift."""
    comptime if bits == 2:
        var v = code_pair[dtype, j](word, magic)
        return (v - SIMD[dtype, 2](128.0)).fma(scales[j % 3], shift)
    var v = masked_pair[bits, dtype](word, j, magic)
    return (v - SIMD[dtype, 2](128.0)).fma(scales[0], shift)


@always_inline
def wg_multiply[
    bits: Int, dtype: DType, nt: Int
](
    mut acc: SIMD[DType.float32, 4 * nt],
    cur: Tuple[SIMD[DType.uint32, 4], SIMD[DType.uint32, 4], Float16, Float16],
    desc: WGMMADescriptor[dtype],
    magic: UInt32,
):
    """Adds to acc the warpgroup's dequantized K step (`load_step`'s chunk of each lane, as mma.sync A fragments) times
    the staged B tile of 8·nt tokens at `desc` (`slice_bytes` per k16 slice): 16 (2-bit) or 8 (4-bit) wgmmas
    m64n(8·nt)k16 in 4 commit groups, each group's A registers free again once the next is issued; returns with all of
    them done. The codes decode by `shifted_pair` (`magic`: `magic_word`)."""
    comptime mmas = chunk_cols[bits]() // 16
    var sa, sha, sb, shb = row_scales[bits, dtype](cur[2], cur[3])
    comptime quarter, sixteenth = SIMD[dtype, 2](0.25), SIMD[dtype, 2](0.0625)
    var qa, qb = (sa, sa * quarter, sa * sixteenth), (sb, sb * quarter, sb * sixteenth)
    comptime for blk in range(4):
        wgmma_fence_aligned()  # A fragments written by ordinary instructions
        comptime for h in range(mmas):
            var wa, wb = cur[0][blk], cur[1][blk]  # the fragment: [row g lo, row g+8 lo, row g hi, row g+8 hi]
            var lo = shifted_pair[bits, dtype, 2 * h](wa, magic, qa, sha).join(
                shifted_pair[bits, dtype, 2 * h](wb, magic, qb, shb)
            )
            var hi = shifted_pair[bits, dtype, 2 * h + 1](wa, magic, qa, sha).join(
                shifted_pair[bits, dtype, 2 * h + 1](wb, magic, qb, shb)
            )
            var a = lo.join(hi)
            acc = wgmma_async[64, 8 * nt, 16, a_type=dtype, b_type=dtype](
                a, desc + (blk * mmas + h) * slice_bytes(nt), acc
            )
        wgmma_commit_group_sync()
        wgmma_wait_group_sync[1]()  # the previous block's A fragments are free again
    wgmma_wait_group_sync[0]()


@always_inline
def tile_col[bits: Int](pos: Int) -> Int:
    """The column (inside its K step) of position `pos` of a step in B-tile order: position 16·i + k is logical k of
    k16 slice i = blk·mmas + h, which `wg_stage_store` fills from chunk q = (k % 8) / 2, columns
    blk·block_cols + 2h + k / 8 (+ block_cols / 2 for odd k)."""
    comptime mmas = chunk_cols[bits]() // 16
    comptime block_cols = chunk_cols[bits]() // 4
    var i, k = pos // 16, pos % 16
    var blk, h = i // mmas, i % mmas
    return (k % 8) // 2 * chunk_cols[bits]() + blk * block_cols + 2 * h + k // 8 + (k % 2) * (block_cols // 2)


@always_inline
def tile_row_cols[bits: Int](n: Int) -> Int:
    """Columns of a row of x in B-tile order (`permute_x`): n rounded up to whole K steps."""
    return ceildiv(n, step_cols[bits]()) * step_cols[bits]()


@always_inline
def tiles_values[bits: Int](s: Int, n: Int) -> Int:
    """Values of x in B-tile order (`permute_x`): every group of 8 tokens (the last one zero-padded) × whole steps."""
    return ceildiv(s, 8) * 8 * tile_row_cols[bits](n)


@always_inline
def permute_x[
    bits: Int, dtype: DType, value: def(Int, Int) capturing -> Scalar[dtype]
](xt: Pointer[mut=True, Scalar[dtype], _], s: Int, n: Int, tg: Int, r: Int):
    """Piece r (8 values, 16 bytes) of token group tg of xt, the (s, n) matrix `value(token, col)` (x, or t's summed
    partials) as the wide launch's staged tiles hold it: per group of 8 tokens and K step a contiguous image of the
    tile's rows for those tokens, piece j = 16·i + 8·half + t being token 8·tg + t's logical k 8·half … 8·half + 7 of
    k16 slice i (`tile_col`); zeros past n and s. Pieces of a group: tile_row_cols(n) (r past that: nothing)."""
    comptime cols = step_cols[bits]()
    var row = tile_row_cols[bits](n)
    if r >= row:
        return
    var step, j = r // cols, r % cols
    var token = 8 * tg + j % 8
    var pos0 = (j // 16) * 16 + (j // 8) % 2 * 8
    var v = SIMD[dtype, 8](0)
    if token < s:
        comptime for e in range(8):
            var col = step * cols + tile_col[bits](pos0 + e)
            if col < n:
                v[e] = value(token, col)
    xt.unsafe_store[alignment=16]((tg * row + r) * 8, v)


@always_inline
def wg_issue_tile[
    bits: Int, dtype: DType, nt: Int
](
    xt: Pointer[Scalar[dtype], _],
    s: Int,
    row: Int,
    tok0: Int,
    step: Int,
    tile: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """Block-wide: start copying K step `step` of tokens tok0 … tok0 + 8·nt - 1 from xt (`permute_x`, groups of `row`
    pieces) into the staged tile `tile` (`wg_stage_store`'s layout, `slice_bytes` a slice; groups past s as
    zeros), then commit. Warp w copies token groups w, w + 8, …, 512 contiguous bytes a copy instruction; 8 lanes
    fill 128 contiguous bytes of a slice."""
    comptime cols = step_cols[bits]()
    comptime copies = cols * 8 * 2 // 16 // 32  # 16-byte pieces a lane and group: 8 (2-bit) or 4 (4-bit)
    var lane, w = Int(lane_id()), Int(thread_idx.x) // 32
    comptime for u in range(nt // 8):
        var tg = tok0 // 8 + w + 8 * u
        var inside = 8 * tg < s
        var src = xt.unsafe_offset((tg * row + step * cols) * 8).unsafe_bitcast[UInt8]()
        var dst = tile.unsafe_bitcast[UInt8]().unsafe_offset(
            (w + 8 * u) * 256 + (lane // 8) % 2 * 128 + (lane % 8) * 16
        )
        comptime for it in range(copies):
            var j = lane + 32 * it
            async_copy[16, fill=ZERO](
                (src.unsafe_offset(16 * j) if inside else xt.unsafe_bitcast[UInt8]()).unsafe_address_space_cast[
                    AddressSpace.GLOBAL
                ](),
                dst.unsafe_offset((j // 16) * slice_bytes(nt)),
                src_size=Int32(16 if inside else 0),
            )
    async_copy_commit_group()


@always_inline
def wg_ring_part[
    bits: Int, group: Int, dtype: DType, nt: Int
](
    mut acc: SIMD[DType.float32, 4 * nt],
    data: Pointer[UInt8, _],
    scales: Pointer[Float16, _],
    nrows: Int,
    row0: Int,
    ncols: Int,
    first: Int,
    last: Int,
    xt: Pointer[Scalar[dtype], _],
    s: Int,
    tok0: Int,
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
):
    """`wg_part` over K steps first … last - 1 with x already in B-tile order in xt (`permute_x`, written by the
    previous launch: waited for here, after the first codes are requested): the steps' tiles of 8·nt tokens go by
    cp.async straight into a ring of RING_SLOTS staged tiles, two steps ahead, so a step needs one barrier and no
    permute."""
    comptime cols = step_cols[bits]()
    if first >= last:
        return
    var row = tile_row_cols[bits](ncols)
    var lane = Int(lane_id())
    var ra = row0 + lane // 4
    var q0 = (lane % 4) * chunk_cols[bits]()
    var cur = load_step[bits, group](data, scales, ra, nrows, ncols, first * cols + q0)
    var magic = magic_word[dtype](s)
    wait_on_dependent_grids()  # xt is the previous launch's output
    var desc = WGMMADescriptor.create[256 // 16, 128 // 16](xs.unsafe_bitcast[Scalar[dtype]]())
    comptime for ahead in range(RING_SLOTS - 1):
        if first + ahead < last:
            wg_issue_tile[bits, nt=nt](xt, s, row, tok0, first + ahead, xs.unsafe_offset(ahead * tile_words(nt)))
    for i in range(last - first):
        if i + 1 < last - first:  # this thread's copies of step i have landed (the wait takes an immediate)
            async_copy_wait_group(1)
        else:
            async_copy_wait_group(0)
        fence_proxy_async()
        barrier()  # every thread's copies of step i have landed; every wgmma of step i - 1 is done
        var nxt = cur
        if i + 2 < last - first:
            var slot = xs.unsafe_offset((i + 2) % RING_SLOTS * tile_words(nt))
            wg_issue_tile[bits, nt=nt](xt, s, row, tok0, first + i + 2, slot)
        if i + 1 < last - first:
            nxt = load_step[bits, group](data, scales, ra, nrows, ncols, (first + i + 1) * cols + q0)
        wg_multiply[bits, nt=nt](acc, cur, desc + i % RING_SLOTS * (tile_words(nt) * 4), magic)
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
            acc, cur[0], cur[1], cur[2], cur[3], step * cols + q * chunk, x, t_parts, s, ncols, tok0, xs
        )
        cur = nxt
