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
                          Where stage 2 has many blocks (`warp_tiles`), four tiles, each warp two of them
                          (sharing their activation loads), 4 warps on each pair. Stage 2 is launched dependent on
                          stage 1 (programmatic dependent launch): its first codes are requested while stage 1 still
                          runs
    larger s              block = 8 row tiles (a warp each, 128 rows) × 64 tokens over all K steps: the block
                          stages each step's activation tile in shared memory already permuted into mma B
                          fragments (one 8-byte load per lane and mma, the tile read from global memory once per
                          block instead of once per warp), the next step's codes in flight meanwhile. With 2- and
                          4-bit codes and bf16 activations (`uses_wgmma`) the two warpgroups multiply by wgmma
                          m64n64k16 instead: A the same dequantized registers, B the step's tile in the canonical
                          K-major layout (`wg_part`), x's next step on its way by cp.async; in the one-launch
                          op with 2-bit Q, x comes already in that order from a launch before it (`tiles_x`)
The low-rank term runs the same routines twice: t = x·Rᵀ (P_SPLIT partial sums over K steps), then t·Lᵀ appended
to the K loop of x·Qᵀ (in the one-launch op with staged tiles the stage-1 blocks of each token pass sum them into
xp, `reduce_t`; else the wide launch sums them while reading t; at decode each block sums them once into shared
memory, `sum_t`).
"""

from std.math import ceildiv
from std.atomic import Atomic, fence, Ordering
from std.memory import AddressSpace, stack_allocation
from std.sys import inlined_assembly

from max.gpu import barrier, block_idx, grid_dim, lane_id, thread_idx, warp_id
from max.gpu.memory import external_memory
from max.gpu.primitives.grid_controls import (
    launch_dependent_grids,
    pdl_launch_attributes,
    PDLLevel,
    wait_on_dependent_grids,
)
from max.gpu.host import DeviceContext, FuncAttribute

from .gpu_tiles import B_T, B_X, NT_WIDE, P_SPLIT, SMALL_S, THREADS, WARPS, X_ROW, segment, step_cols, wide_coords
from .gpu_ring import RING_X_TOKENS, ring_fits, ring_prefetch, ring_words, t_row, x_slot_words
from .gpu_decode import XP_PARTS, decode_warp, decode_warp_tiles, prepare_x, prepare_x_local, reduce_warps, sum_t
from .gpu_wide import (
    RING_SLOTS,
    X_WORDS,
    permute_x,
    tile_row_cols,
    tile_words,
    tiles_values,
    uses_wgmma,
    wg_ring_part,
    wide_part,
)

comptime SMS = 132
"""Streaming multiprocessors of the H100 SXM the tile rules were measured on (`decode_tiles`, `k_splits`)."""
comptime LOCAL_X_BYTES = 112 * 1024
"""Decode: most shared memory of a stage-2 block that prepares its own activations (`local_x_fits`), so that two
blocks share an SM (228 KB on the H100)."""
comptime MAX_SPLITS = 8
"""Most K splits of a wide tile (`k_splits`)."""
comptime LONG_SPLIT_STEPS = 32
"""Fewest of Q's K steps in each K split of a 128-token tile (`k_splits`). Measured on the H100 at seq 128: splits
of 16 steps (8192 columns at 2 bits, 3 splits) lost to unsplit 64-token tiles (74.4 against 72.0 µs on 8192²),
splits of 39 steps (29568 columns) won (191.7 against 210.0 on 8192×29568): a split's partial sums cost its tiles'
float32 values written and read again."""
comptime SPLIT_VALUES = 3 << 20
"""Float32 values of the one-launch op's split-K scratch (`split_at`, `k_splits`): 3 splits of 128 tokens × 8192
rows. The graph gives the op a scratch output of this size on the GPU (max_graph.py's SPLIT_VALUES_GPU)."""


@always_inline
def shared_bytes(s: Int, k: Int, nt: Int = NT_WIDE, x_slots: Bool = True, wt: Int = 1) -> Int:
    """Dynamic shared memory of a launch: the wide tile and its natural copy, or the ring of tiles of 8·nt tokens
    (`wg_ring_part`), or at decode the cross-warp sums, each warp's ring (with activation slots: `x_slots`; else
    one per row tile of the warp's `wt`: `ring_words`) and t."""
    if s > SMALL_S:
        return max(X_WORDS + 64 * X_ROW, RING_SLOTS * tile_words(nt)) * 4
    var ring = ring_words[True](s) if x_slots else wt * ring_words[False](s)
    return (WARPS * 128 + WARPS * ring + s * t_row(k)) * 4


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
def decode_tiles(m: Int, wt: Int = 1) -> Int:
    """16-row tiles per block of stage 2 at decode: two where there are enough (m ≥ 32·SMS rows; H100, 8192 and
    29568 rows: 1-5 µs faster than one, four slower), else one; twice that where each warp holds wt = 2
    (`warp_tiles`)."""
    return (2 if m >= 32 * SMS else 1) * wt


@always_inline
def apply_blocks(s: Int, m: Int, nt: Int = NT_WIDE, wt: Int = 1) -> Int:
    """Blocks of stage 2 (a 1-D grid): at decode `decode_tiles` row tiles each (wt: `warp_tiles`), past SMALL_S its
    wide tiles of 8·nt tokens (`tile_nt`)."""
    if s <= SMALL_S:
        return ceildiv(m, 16 * decode_tiles(m, wt))
    return ceildiv(m, 16 * WARPS) * ceildiv(s, 8 * nt)


@always_inline
def project_block[
    dtype: DType, //, br: Int, gr: Int, wide: Bool, rings: Bool = False
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
    xp (`prepare_x`); `rings`: every tile of R takes the ring at decode (`decode_warp`'s all_ring)."""
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
        decode_warp[br, gr, dtype, B_X, rings](
            acc, r_data, r_scales, k, 16 * rt, n, p * WARPS + w, WARPS * P_SPLIT, x, t_parts, s, xs, ahead
        )
        var r = reduce_warps[1](acc, red)
        var row = 16 * rt + r[2]
        if r[0] and row < k and r[3] < s:
            t_parts[unsafe_offset=(p * s + r[3]) * k + row] = r[1][0]
    else:  # pass-major: a token pass's blocks are consecutive (`pass_blocks`)
        var rest = bid // P_SPLIT
        var row_blocks = ceildiv(k, 16 * WARPS)
        var tok0 = (rest // row_blocks) * 8 * NT_WIDE
        var rt = (rest % row_blocks) * WARPS + w
        var seg = segment(ceildiv(n, step_cols[br]()), P_SPLIT, p)
        var acc = SIMD[DType.float32, 4 * NT_WIDE](0)
        wide_part[br, gr, dtype, False](acc, r_data, r_scales, k, 16 * rt, n, seg[0], seg[1], x, t_parts, s, tok0, xs)
        comptime for e in range(4 * NT_WIDE):
            var row, token = wide_coords(lane, e, 16 * rt, tok0)
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
    return bq == 2 and uses_prepared_x(s, n, k, room) and all_ring[bq, gq, bl, gl](m, n, k)


@always_inline
def prepares_x(s: Int, n: Int, k: Int, room: Bool) -> Bool:
    """Whether stage 1 writes xp: `xp_fits` less what stage 1 does not know (it holds for every Q of n columns), and
    stage 2's blocks do not prepare their own (`local_x_fits`)."""
    return uses_prepared_x(s, n, k, room) and not local_x_fits(s, n, k)


@always_inline
def uses_prepared_x(s: Int, n: Int, k: Int, room: Bool) -> Bool:
    """Whether stage 2 may read prepared activations (`prepare_x`, from stage 1 or its own): `xp_fits` less what
    stage 1 does not know."""
    return room and 0 < s and s <= RING_X_TOKENS and k > 0 and n % 64 == 0


@always_inline
def local_x_words(s: Int, n: Int) -> Int:
    """Shared words of a decode block's own prepared activations (`prepare_x_local`): a ring slot per K step."""
    return ceildiv(n, 256) * x_slot_words(s)


@always_inline
def local_x_bytes(s: Int, n: Int, k: Int, wt: Int = 1) -> Int:
    """Shared memory of a decode stage-2 block that prepares its own activations, its warps holding `wt` row tiles."""
    return shared_bytes(s, k, x_slots=False, wt=wt) + 4 * local_x_words(s, n)


@always_inline
def local_x_fits(s: Int, n: Int, k: Int) -> Bool:
    """Whether each stage-2 block prepares its own activations in shared memory (`prepare_x_local`) where the
    prepared ones are read, instead of waiting for stage 1's xp: with them a block stays within LOCAL_X_BYTES. Q's
    loop then runs while stage 1 does."""
    return local_x_bytes(s, n, k) <= LOCAL_X_BYTES


@always_inline
def warp_tiles(s: Int, m: Int, n: Int, k: Int) -> Int:
    """Row tiles per warp of a decode stage-2 block that prepares its own activations: two where the blocks of 64 rows
    (two pairs of tiles, 4 warps each) are at least two an SM, m is whole blocks and both tiles' rings still fit
    LOCAL_X_BYTES (n = 8192 at one token), so that every activation load and the loop's bookkeeping serve twice the
    mmas; else one. H100, seq 1: 29568×8192 49.5-51.3 µs against 51.7-54.2; at 8192 rows (128 such blocks, one an
    SM) 27.0 against 19.0-19.2, and a pair on all 8 warps of a 32-row block 22.7-23.4 (runbook step 03)."""
    var fits = m % 64 == 0 and local_x_bytes(s, n, k, 2) <= LOCAL_X_BYTES
    return 2 if m >= 2 * 64 * SMS and fits else 1


@always_inline
def tiles_x[bq: Int, bl: Int, dtype: DType](s: Int, n: Int, k: Int, room: Bool) -> Bool:
    """Whether the one-launch op reads Q's activations in staged-tile order (`wg_ring_part`) from xp, where
    `launch_permute` writes them first (and t after them, where L takes wgmma: `reduce_t`): wgmma, room in xp's
    XP_PARTS·s·n values for both and the pass counters (`counters_at`), and a token pass's stage-1 blocks all on the
    SMs at once (they wait for each other: `launch_fused`)."""
    var used = counters_at[bq, bl](s, n, k) + passes(s) * 4
    return uses_wgmma[bq, dtype]() and room and s > SMALL_S and used <= XP_PARTS * s * n and pass_blocks(k) <= SMS


@always_inline
def pass_blocks(k: Int) -> Int:
    """Stage-1 blocks of one token pass in the wide launch (consecutive: `project_block`): every row block of t × its
    P_SPLIT K segments."""
    return ceildiv(k, 16 * WARPS) * P_SPLIT


@always_inline
def counters_at[bq: Int, bl: Int](s: Int, n: Int, k: Int) -> Int:
    """Where in xp (in values; 16-byte aligned) the one-launch op's int64 counters, one per token pass, follow x's and
    t's staged tiles (`tiles_x`); `launch_permute` zeroes them."""
    return tiles_values[bq](s, n) + tiles_values[bl](s, k)


@always_inline
def k_splits[
    bq: Int, bl: Int, dtype: DType
](s: Int, m: Int, n: Int, k: Int, room: Bool, split_room: Int, nt: Int) -> Int:
    """K splits of the one-launch op's wide tiles of nt token groups, where their float32 partial sums (whole tiles:
    `split_at`) fit in the split scratch of split_room values and the tile counters in xp (`counters_at`), at most
    MAX_SPLITS: with NT_WIDE, as many as the SMs take beside the tiles and stage 1 (at least 4 of Q's K steps each);
    with 2·NT_WIDE, where the tiles are fewer than the SMs, as many as fill them with the stage-1 blocks where each
    split keeps LONG_SPLIT_STEPS of Q's K steps. 1 without `tiles_x`."""
    if not tiles_x[bq, bl, dtype](s, n, k, room):
        return 1
    if counters_at[bq, bl](s, n, k) + (passes(s) + apply_blocks(s, m)) * 4 > XP_PARTS * s * n:
        return 1  # (`launch_fused` zeroes a counter per tile of NT_WIDE tokens)
    var tiles = apply_blocks(s, m, nt)
    var stage1 = project_blocks(s, k) if k > 0 else 0
    var steps = ceildiv(n, step_cols[bq]())
    var most: Int
    if nt == NT_WIDE:
        most = min((SMS - stage1) // tiles, steps // 4)
    else:
        most = min(ceildiv(SMS + stage1, tiles) if tiles < SMS else 1, steps // LONG_SPLIT_STEPS)
    return max(1, min(MAX_SPLITS, most, split_room // (tiles * split_values(nt))))


@always_inline
def tile_nt[bq: Int, bl: Int, dtype: DType](s: Int, m: Int, n: Int, k: Int, room: Bool, split_room: Int) -> Int:
    """Token groups of 8 in a tile of the one-launch op: 2·NT_WIDE (128 tokens, wgmma m64n128k16: each dequantized
    K step serves twice the tokens) where there are more than NT_WIDE groups, Q's and L's K loops both take the
    staged-tile ring (`tiles_x`, t from xp), and such tiles either fill the SMs or K is long enough to split them
    (`k_splits`); else NT_WIDE."""
    comptime wide = 2 * NT_WIDE
    if s <= 8 * NT_WIDE or not tiles_x[bq, bl, dtype](s, n, k, room) or not uses_wgmma[bl, dtype]():
        return NT_WIDE
    if apply_blocks(s, m, wide) >= SMS or k_splits[bq, bl, dtype](s, m, n, k, room, split_room, wide) > 1:
        return wide
    return NT_WIDE


@always_inline
def reduce_t[
    bl: Int, dtype: DType
](
    xt: Pointer[mut=True, Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    s: Int,
    k: Int,
    tpass: Int,
    share: Int,
    shares: Int,
    sums: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
):
    """Block-wide: share `share` of `shares` of token pass `tpass` (8·NT_WIDE tokens) of xt = Σ_p t_parts[p] (s, k)
    rounded to `dtype`, in the staged-tile order of `bl`-bit codes (`permute_x`); the partials are added in p order.
    The share is every shares-th (8-token group, K step) of the pass: its 8 × step_cols sums are first added up in
    `sums` (shared, 8·step_cols float32) from 16-byte loads of t_parts (a warp reads 512 contiguous bytes of a
    partial), then permuted from there. Ends with a barrier."""
    comptime cols = step_cols[bl]()
    comptime quads = cols // 4  # 16-byte pieces of a token's step in t_parts
    var row = tile_row_cols[bl](k)
    var groups = min(NT_WIDE, ceildiv(s, 8) - NT_WIDE * tpass)
    var steps = row // cols
    var tid = Int(thread_idx.x)
    for unit in range(share, groups * steps, shares):  # block-uniform
        var tg, step = NT_WIDE * tpass + unit // steps, unit % steps
        for e in range(tid, 8 * quads, THREADS):
            var token, col = 8 * tg + e // quads, step * cols + 4 * (e % quads)
            var total = SIMD[DType.float32, 4](0)
            if token < s and col + 4 <= k and k % 4 == 0:
                comptime for p in range(P_SPLIT):
                    total += t_parts.unsafe_load[width=4, alignment=16]((p * s + token) * k + col)
            elif token < s:
                comptime for p in range(P_SPLIT):
                    comptime for i in range(4):
                        if col + i < k:
                            total[i] += t_parts[unsafe_offset=(p * s + token) * k + col + i]
            sums.unsafe_store[alignment=16](4 * e, total)
        barrier()

        @__parameter
        def t_value(token: Int, col: Int) -> Scalar[dtype]:
            return sums[unsafe_offset=(token - 8 * tg) * cols + col - step * cols].cast[dtype]()

        for j in range(tid, cols, THREADS):
            permute_x[bl, dtype, t_value](xt, s, k, tg, step * cols + j)
        barrier()  # `sums` is free again


@always_inline
def prefetch_span(p: Pointer[UInt8, _], first: Int, last: Int):
    """Block-wide: ask L2 for bytes [first, last) of p (PTX prefetch.global.L2, a 128-byte line per thread and
    pass); nothing waits for it."""
    for off in range((first // 128 + Int(thread_idx.x)) * 128, last, THREADS * 128):
        inlined_assembly["prefetch.global.L2 [$0];", NoneType, constraints="l", has_side_effect=True](
            p.unsafe_offset(off)
        )


@always_inline
def split_values(nt: Int) -> Int:
    """Float32 values of one K split's partial sums of a wide tile of nt token groups (128 rows × 8·nt tokens)."""
    return THREADS * 4 * nt


@always_inline
def split_at(tile: Int, sp: Int, splits: Int, nt: Int, j: Int) -> Int:
    """Float offset in the split scratch of this thread's piece j (acc[4j : 4j + 4]) of K split sp's partial sums
    of wide tile `tile` (of `splits` each): the split's region of `split_values(nt)` holds them in the accumulators'
    order, thread t's piece j at (j·THREADS + t)·4, so that a warp's piece j is 512 contiguous bytes."""
    return (tile * splits + sp) * split_values(nt) + 4 * (j * THREADS + Int(thread_idx.x))


@always_inline
def arrive(
    counter: Pointer[mut=True, Int64, _],
    last: Int,
    red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
) -> Bool:
    """Block-wide: add one to counter[0] once this block's writes are visible device-wide (release; acquire too, so
    the last to arrive sees the others' writes); whether the count before was `last`, on every thread."""
    barrier()
    if thread_idx.x == 0:
        fence[Ordering.RELEASE, scope="device"]()
        var before = Atomic[Int64, scope="device"].fetch_add[ordering=Ordering.ACQUIRE_RELEASE](counter, 1)
        red[unsafe_offset=0] = Float32(1 if before == Int64(last) else 0)
    barrier()
    return red[unsafe_offset=0] != 0


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
    local_x: Bool = False,
    wt: Int = 1,
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
    once wait_count is reached by the block's pass counter where L reads t from xp (`counters_at`), else by sync[0];
    `rings` and `use_xp` where `all_ring` and `xp_fits` say so (`decode_warp`); in the wide
    launch `use_xp` where `tiles_x` says so (Q's K loop from xp in staged-tile order, written by the previous launch,
    and L's from t in that order where L takes wgmma). At decode, launched dependent on stage 1 (programmatic dependent
    launch): Q's first codes are requested while stage 1 runs; xp, t and y wait for its end. (Waiting for xp alone,
    counted per stage-1 block, measured slower: 26.8-28.0 µs against 22.9-24.3 on 8192², H100.) `wt` = 2 (`local_x`,
    `warp_tiles`): each warp holds two of the block's tiles (4 warps on each pair)."""
    var w = Int(warp_id())
    comptime if not wide:  # `decode_tiles` 16-row tiles per block, each group of wt tiles with WARPS·wt / tiles
        # warps taking every (WARPS·wt / tiles)-th K step of Q, then of L (a tile past m, in the last block, is skipped)
        var tiles = decode_tiles(m, wt)
        var per = WARPS * wt // tiles
        var row0, ws = 16 * (bid * tiles + wt * (w // per)), w % per
        var acc = SIMD[DType.float32, 4 * wt](0)
        if k > 0:  # the block's rows of L (and their scales) on their way to L2 while Q is read
            var r0, r1 = 16 * tiles * bid, min(16 * tiles * (bid + 1), m)
            var lrb = ceildiv(k * bl, 8)
            prefetch_span(l_data, r0 * lrb, r1 * lrb)
            comptime if bl < 16:
                var lsb = ceildiv(k, gl) * 2
                prefetch_span(l_scales.unsafe_bitcast[UInt8](), r0 * lsb, r1 * lsb)
        comptime if use_xp:
            if row0 < m:
                ring_prefetch[bq, gq, x_slots = not local_x, wt=wt](q_codes, q_scales, xp, row0, n, ws, per, s, xs)
            var local_at = shared_bytes(s, k, x_slots=False, wt=wt) // 4  # (`local_x`: after the rings and t)
            comptime if local_x:  # x itself is complete before stage 1 starts
                prepare_x_local(x, xs.unsafe_offset(local_at), s, n)
            else:
                wait_on_dependent_grids()
            if row0 < m:
                decode_warp_tiles[bq, gq, dtype, B_X, True, True, local_x, wt](
                    acc, q_codes, q_scales, m, row0, n, ws, per, xp, t_parts, s, xs, ahead=True, local_at=local_at
                )
            comptime if bl < 16:  # L's first codes on their way while stage 1 ends (they do not depend on it)
                if k > 0 and row0 < m:
                    ring_prefetch[bl, gl, x_slots = not local_x, wt=wt](l_data, l_scales, xp, row0, k, ws, per, s, xs)
        else:
            if row0 < m or not rings:
                decode_warp_tiles[bq, gq, dtype, B_X, rings, False, False, wt](
                    acc, q_codes, q_scales, m, row0, n, ws, per, x, t_parts, s, xs
                )
        wait_on_dependent_grids()  # t, and y's memory, belong to stage 1 until it ends
        if k > 0:
            sum_t[dtype, not local_x, wt](t_parts, s, k, xs)
            if row0 < m or not rings:
                decode_warp_tiles[bl, gl, dtype, B_T, rings, False, local_x, wt](
                    acc, l_data, l_scales, m, row0, k, ws, per, x, t_parts, s, xs, ahead=use_xp and bl < 16
                )
        var r = reduce_warps[wt](acc, red, tiles)
        if r[0] and r[3] < s:
            comptime for u in range(wt):
                var row = 16 * tiles * bid + r[2] + 16 * u
                if row < m:
                    var b = bias[unsafe_offset=row] if has_bias else Float32(0)
                    y[unsafe_offset=r[3] * m + row] = (r[1][u] + b).cast[dtype]()
    else:
        wide_block[bq, gq, bl, gl, False, False, False, NT_WIDE](
            bid, 0, 1, red, xs, y, x, stack_allocation[1, Scalar[dtype]](), t_parts, stack_allocation[1, Float32](),
            q_codes, q_scales, l_data, l_scales, bias, s, m, n, k, has_bias, sync, 0,
        )


@always_inline
def wide_block[
    dtype: DType, //, bq: Int, gq: Int, bl: Int, gl: Int, fused: Bool, use_xp: Bool, split: Bool, nt: Int
](
    tile: Int,
    sp: Int,
    splits: Int,
    red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
    xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    y: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    xp: Pointer[mut=True, Scalar[dtype], _],
    t_parts: Pointer[Float32, _],
    partials: Pointer[mut=True, Float32, _],
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
    """Wide launch: tile `tile` (128 rows × 8·nt tokens) of y = x·Qᵀ + t·Lᵀ (+ b), from K split sp of `splits`: Q's
    steps cut into `splits` ranges, L's loop in the last one. With `use_xp` (`tiles_x`) Q's activations, and t where
    L takes wgmma, come in staged-tile order from xp; with splits > 1 (`k_splits`, one launch only) each split leaves
    its float32 partial sums in `partials` (`split_at`) and the last of the tile's splits to finish adds them up in
    split order (the same bits whatever the order of finishing) and writes y. With `fused`, t is ready once the
    tile's pass counter (where L takes wgmma: `launch_fused`), else sync[0], reaches wait_count."""
    comptime assert nt == NT_WIDE or (use_xp and fused), "wider tiles only in the ring (`tile_nt`)"
    var w, lane = Int(warp_id()), Int(lane_id())
    var tile_passes = ceildiv(s, 8 * nt)
    var rt, tok0 = (tile // tile_passes) * WARPS + w, (tile % tile_passes) * 8 * nt
    var q_steps, l_steps = ceildiv(n, step_cols[bq]()), ceildiv(k, step_cols[bl]())
    var seg = segment(q_steps, splits, sp)
    var acc = SIMD[DType.float32, 4 * nt](0)
    comptime if use_xp and uses_wgmma[bq, dtype]():
        wg_ring_part[bq, gq, nt=nt](acc, q_codes, q_scales, m, 16 * rt, n, seg[0], seg[1], xp, s, tok0, xs)
    else:
        comptime assert nt == NT_WIDE
        var narrow = rebind[SIMD[DType.float32, 4 * NT_WIDE]](acc)
        wide_part[bq, gq, dtype, False](
            narrow, q_codes, q_scales, m, 16 * rt, n, seg[0], seg[1], x, t_parts, s, tok0, xs
        )
        acc = rebind[SIMD[DType.float32, 4 * nt]](narrow)
    if k > 0 and sp == splits - 1:
        comptime if fused and use_xp and uses_wgmma[bl, dtype]():  # t in staged-tile order after Q's (`reduce_t`)
            var counters = xp.unsafe_offset(counters_at[bq, bl](s, n, k)).unsafe_bitcast[Int64]()
            comptime for u in range(nt // NT_WIDE):  # the tile's token passes of stage 1
                var p = tok0 // (8 * NT_WIDE) + u
                if p < passes(s):
                    wait_for(counters.unsafe_offset(p), wait_count)
            var xt = xp.unsafe_offset(tiles_values[bq](s, n))
            wg_ring_part[bl, gl, nt=nt](acc, l_data, l_scales, m, 16 * rt, k, 0, l_steps, xt, s, tok0, xs)
        else:
            comptime if fused:
                wait_for(sync, wait_count)
            comptime assert nt == NT_WIDE
            var narrow = rebind[SIMD[DType.float32, 4 * NT_WIDE]](acc)
            wide_part[bl, gl, dtype, True](narrow, l_data, l_scales, m, 16 * rt, k, 0, l_steps, x, t_parts, s, tok0, xs)
            acc = rebind[SIMD[DType.float32, 4 * nt]](narrow)
    comptime if split:  # (only with tiles: `k_splits`)
        if splits > 1:
            wait_on_dependent_grids()  # the counters are zeroed by the permute launch (an empty range never waited)
            comptime for j in range(nt):
                partials.unsafe_store[alignment=16](split_at(tile, sp, splits, nt, j), acc.slice[4, offset = 4 * j]())
            var counters = xp.unsafe_offset(counters_at[bq, bl](s, n, k)).unsafe_bitcast[Int64]()
            var counter = counters.unsafe_offset(passes(s) + tile)
            if not arrive(counter, splits - 1, red):  # only the tile's last split goes on
                return
            acc = 0
            for p in range(splits):
                comptime for j in range(nt):
                    var part = partials.unsafe_load[width=4, alignment=16](split_at(tile, p, splits, nt, j))
                    acc = acc.insert[offset = 4 * j](acc.slice[4, offset = 4 * j]() + part)
    comptime for e in range(4 * nt):
        var row, token = wide_coords(lane, e, 16 * rt, tok0)
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
    def kernel[wide: Bool, rings: Bool]():  # (captures arguments only: a captured local `var` is read through a
        # host address)
        comptime if not wide:
            launch_dependent_grids()
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        var prep = prepares_x(s, n, k, xp_room)
        project_block[br, gr, wide, rings](
            Int(block_idx.x), xs.unsafe_bitcast[Float32](), xs, t_parts, x, r_data, r_scales, xp, prep, s, n,
            k,
        )

    var smem = shared_bytes(s, k)
    var attr = FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))  # over 48 KB needs the opt-in
    comptime if br < 16:  # every tile of R in the ring: the kernel holds no register path (fewer registers)
        if s <= SMALL_S and k % 16 == 0 and ring_fits[br, gr](k, 0, n):
            ctx.enqueue_function[kernel[False, True]](
                grid_dim=project_blocks(s, k), block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
            )
            return
    if s <= SMALL_S:
        ctx.enqueue_function[kernel[False, False]](
            grid_dim=project_blocks(s, k), block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
        )
    else:
        ctx.enqueue_function[kernel[True, False]](
            grid_dim=project_blocks(s, k), block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr
        )


def launch_permute[
    dtype: DType, //, bits: Int
](
    xt: Pointer[mut=True, Scalar[dtype], _],
    x: Pointer[Scalar[dtype], _],
    s: Int,
    n: Int,
    zero_at: Int,
    zeros: Int,
    ctx: DeviceContext,
) raises:
    """Writes xt = x (s, n) in the staged-tile order of `bits`-bit codes (`permute_x`), one thread per 16 bytes, a row
    of blocks per group of 8 tokens; block (0, 0) also zeroes `zeros` int64 from value `zero_at` of xt on. Lets the
    next launch start at once: it waits before it reads xt or the counters (programmatic dependent launch)."""

    @__parameter
    def kernel():
        launch_dependent_grids()
        if block_idx.x == 0 and block_idx.y == 0:
            var counters = xt.unsafe_offset(zero_at).unsafe_bitcast[Int64]()
            for i in range(Int(thread_idx.x), zeros, THREADS):
                counters[unsafe_offset=i] = 0

        @__parameter
        def x_value(token: Int, col: Int) -> Scalar[dtype]:
            return x[unsafe_offset=token * n + col]

        var tg, piece = Int(block_idx.y), Int(block_idx.x) * THREADS + Int(thread_idx.x)
        permute_x[bits, dtype, x_value](xt, s, n, tg, piece)

    ctx.enqueue_function[kernel](
        grid_dim=(ceildiv(tile_row_cols[bits](n), THREADS), ceildiv(s, 8)), block_dim=THREADS
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
    def kernel[wide: Bool, rings: Bool, use_xp: Bool, local_x: Bool = False, wt: Int = 1]():
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        apply_block[bq, gq, bl, gl, wide, False, rings, use_xp, local_x, wt](
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
        if xp_fits[bq, gq, bl, gl](s, m, n, k, xp_room):  # (stage 1 ran: k > 0)
            if local_x_fits(s, n, k):
                var wt = warp_tiles(s, m, n, k)
                var local_smem = local_x_bytes(s, n, k, wt)

                @__parameter
                def launch_local[wt: Int]() raises:
                    ctx.enqueue_function[kernel[False, True, True, True, wt]](
                        grid_dim=apply_blocks(s, m, wt=wt), block_dim=THREADS, shared_mem_bytes=local_smem,
                        func_attribute=FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(local_smem)),
                        attributes=pdl_launch_attributes(PDLLevel(after_stage1)),
                    )

                if wt == 2:
                    launch_local[2]()
                else:
                    launch_local[1]()
            else:
                ctx.enqueue_function[kernel[False, True, True]](
                    grid_dim=blocks, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
                    attributes=pdl_launch_attributes(PDLLevel(after_stage1)),
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
    partials: Pointer[mut=True, Float32, _],
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
    split_room: Int,
    ctx: DeviceContext,
) raises:
    """The fused op y = x·Qᵀ + (x·Rᵀ)·Lᵀ (+ b). At decode: stage 1 (with a low-rank part), then stage 2 launched
    dependent on it (they share xp, the prepared activations, where `xp_room`: a second scratch output). Larger s: one
    launch, after `launch_permute` where `tiles_x` (dependent on it: only Q's K loop waits for xp); then the last
    stage-1 block to finish also sums t's partials into xp in staged-tile order (`reduce_t`) for L's loop. Chosen by
    measurement (H100, Qwen2-72B shapes, runbook/03-bench-kernel.md): one launch was faster on every shape at s = 128;
    at decode two launches were, on every shape once stage 2 started while stage 1 runs (m = 1024: 10.8-16.1 µs against
    12.6-16.9 in one launch; the one-launch kernel holds both stages' registers).

    One launch: blocks [0, P) compute t's partial sums, blocks [P, P + A) compute y and wait. t_parts (P_SPLIT, s, k) is
    the op's second output, a scratch buffer that the graph discards. Stage-1 blocks have the lower indices, so they are
    dispatched first and never wait for a stage-2 block: no deadlock whatever the grid size. Where t goes to xp in
    staged-tile order, the `pass_blocks` stage-1 blocks of a token pass (consecutive, all on the SMs at once:
    `tiles_x`) count themselves in their pass's counter, wait for each other, each sum a share of the pass's t into
    xp (`reduce_t`) and count themselves again; stage-2 blocks read their pass's t once its counter has counted every
    stage-1 block twice (acquire). Else stage-1 blocks count themselves in sync[0], and stage-2 blocks read t after
    sync[0] = P. Every block then counts itself in sync[1], and the last one resets both for the next launch.
    (Before, the last stage-1 block summed all of t alone: 8192², seq 128, H100, about a third of the stage-2 blocks'
    time was spent waiting for it.)"""
    comptime assert dtype == DType.bfloat16 or dtype == DType.float16, "GPU activations are bf16 or fp16"
    if s <= SMALL_S:
        if k > 0:
            launch_project[br, gr](t_parts, xp, x, r_data, r_scales, s, n, k, xp_room, ctx)
        launch_apply[bq, gq, bl, gl](
            y, x, xp, t_parts, q_codes, q_scales, l_data, l_scales, bias, s, m, n, k, has_bias, xp_room, ctx
        )
        return
    var n_project = project_blocks(s, k) if k > 0 else 0
    var nt = tile_nt[bq, bl, dtype](s, m, n, k, xp_room, split_room)
    var splits = k_splits[bq, bl, dtype](s, m, n, k, xp_room, split_room, nt)
    var total = n_project + apply_blocks(s, m, nt) * splits

    # sizes are kernel arguments: a captured device graph allows 16 captured values per kernel
    @__parameter
    def kernel[use_xp: Bool, split: Bool, nt: Int](
        s_: Int64, m_: Int64, n_: Int64, k_: Int64, has_bias_: Int64, n_project_: Int64, splits_: Int64
    ):
        var xs = external_memory[UInt32, address_space=AddressSpace.SHARED, alignment=16]()
        var red = xs.unsafe_bitcast[Float32]()
        var bid = Int(block_idx.x)
        var s, m, n, k, np = Int(s_), Int(m_), Int(n_), Int(k_), Int(n_project_)
        var splits = 1  # a constant where the launch has no splits: that kernel compiles as without split K
        comptime if split:
            splits = Int(splits_)
        comptime t_tiles = use_xp and uses_wgmma[bl, dtype]()
        var group = pass_blocks(k)
        if bid < np:
            project_block[br, gr, True](bid, red, xs, t_parts, x, r_data, r_scales, xp, False, s, n, k)
            comptime if t_tiles:  # the pass's blocks sum its t partials together, once all are in
                var counters = xp.unsafe_offset(counters_at[bq, bl](s, n, k)).unsafe_bitcast[Int64]()
                var counter = counters.unsafe_offset(bid // group)
                wait_on_dependent_grids()  # the counters are zeroed by the permute launch
                _ = arrive(counter, -1, red)
                wait_for(counter, group)
                var xt = xp.unsafe_offset(tiles_values[bq](s, n))
                reduce_t[bl](xt, t_parts, s, k, bid // group, bid % group, group, red.unsafe_offset(4))
                _ = arrive(counter, -1, red)
            else:
                _ = arrive(sync, -1, red)
        else:  # a tile's splits side by side; with t_tiles, t of the tile's token pass is ready once its stage-1
            # blocks arrived twice
            var a = bid - np
            wide_block[bq, gq, bl, gl, True, use_xp, split, nt](
                a // splits, a % splits, splits, red, xs, y, x, xp, t_parts, partials, q_codes, q_scales, l_data,
                l_scales, bias, s, m, n, k, has_bias_ != 0, sync, 2 * group if t_tiles else np,
            )
        if thread_idx.x == 0:
            var done = sync.unsafe_offset(1)
            var arrived = Atomic[Int64, scope="device"].fetch_add[ordering=Ordering.ACQUIRE_RELEASE](done, 1)
            if arrived == Int64(grid_dim.x) - 1:
                Atomic[Int64, scope="device"].store(sync, 0)
                Atomic[Int64, scope="device"].store(done, 0)

    var smem = shared_bytes(s, k, nt)
    var attr = FuncAttribute.MAX_DYNAMIC_SHARED_SIZE_BYTES(UInt32(smem))  # over 48 KB needs the opt-in
    if tiles_x[bq, bl, dtype](s, n, k, xp_room):
        var zeros = passes(s) + (apply_blocks(s, m) if splits > 1 else 0)  # pass counters, tile counters
        launch_permute[bq](xp, x, s, n, counters_at[bq, bl](s, n, k), zeros, ctx)

        @__parameter
        def launch_tiles[nt: Int, split: Bool]() raises:
            ctx.enqueue_function[kernel[True, split, nt]](
                Int64(s), Int64(m), Int64(n), Int64(k), Int64(has_bias), Int64(n_project), Int64(splits),
                grid_dim=total, block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
                attributes=pdl_launch_attributes(PDLLevel(1)),
            )

        @__parameter
        def launch_width[nt: Int]() raises:
            if splits > 1:
                launch_tiles[nt, True]()
            else:
                launch_tiles[nt, False]()

        comptime if uses_wgmma[bq, dtype]() and uses_wgmma[bl, dtype]():  # (else nt is NT_WIDE: `tile_nt`)
            if nt != NT_WIDE:
                launch_width[2 * NT_WIDE]()
                return
        launch_width[NT_WIDE]()
        return
    ctx.enqueue_function[kernel[False, False, NT_WIDE]](
        Int64(s), Int64(m), Int64(n), Int64(k), Int64(has_bias), Int64(n_project), Int64(1), grid_dim=total,
        block_dim=THREADS, shared_mem_bytes=smem, func_attribute=attr,
    )
