"""GPU kernels, decode: each warp's cp.async ring of its next K steps' codes, scales and (few tokens) activations in
shared memory, and the K loop that runs on it (`ring_warp`)."""

from std.math import ceildiv
from std.memory import AddressSpace

from max.gpu import lane_id, warp_id
from max.gpu.memory import async_copy, async_copy_commit_group, async_copy_wait_group
from max.gpu.sync import syncwarp

from .gpu_tiles import B_T, WARPS, X_ROW, ZERO, chunk_cols, chunks_per_group, step_cols, step_group, step_scale_bytes
from .gpu_codes import SX_WORDS, decode_step

comptime RING = 4
"""Decode: K steps of codes (and their scales) in flight per warp, copied into shared memory (cp.async); a power of
two (slots are step indices masked by RING - 1)."""
comptime RING_ROW = 20
"""Words of one row's slot: 64 code bytes padded to 80, so a warp's word reads hit 32 distinct banks."""
comptime RING_WORDS = RING * 16 * (RING_ROW + 2)
"""Shared words of one warp's ring without activations: RING slots of 16 rows × (80 code bytes + 8 scale bytes)."""
comptime RING_X_TOKENS = 2
"""Decode with at most this many tokens: each ring slot also holds the step's activations (x of the Q and R parts)."""
comptime ISSUE_ALL = 0
comptime ISSUE_CODES = 1
comptime ISSUE_X = 2
"""What `ring_issue` copies of a K step: everything, the codes and scales only, or the activations only."""


@always_inline
def ring_x_tokens(s: Int) -> Int:
    """Tokens whose activations travel in the decode ring (all of them, or none)."""
    return s if s <= RING_X_TOKENS else 0


@always_inline
def x_slot_words(s: Int) -> Int:
    """Words of one ring slot's activations for s tokens: the tokens' rows and sx (none without `ring_x_tokens`)."""
    return ring_x_tokens(s) * X_ROW + (SX_WORDS if ring_x_tokens(s) > 0 else 0)


@always_inline
def ring_words[x_slots: Bool = True, wt: Int = 1](s: Int) -> Int:
    """Shared words of one warp's decode ring for s tokens: codes and scales, then (`x_slots`) the activations; or,
    without activations, one RING_WORDS ring for each of the warp's `wt` row tiles."""
    comptime assert wt == 1 or not x_slots, "a warp holds two row tiles only where its ring carries no activations"
    comptime if x_slots:
        return RING_WORDS + RING * x_slot_words(s)
    return wt * RING_WORDS


@always_inline
def t_row(k: Int) -> Int:
    """Words of one token's t = Σ_p t_parts[p] in shared memory (decode): k 16-bit values, zeros up to whole K steps
    of any width, and 16 bytes of padding."""
    return ceildiv(k, 256) * 128 + 4


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
        async_copy[16, fill=ZERO](src.unsafe_address_space_cast[AddressSpace.GLOBAL](), dst, src_size=size)
        async_copy[16, fill=ZERO](
            src.unsafe_offset(8 * row_bytes).unsafe_address_space_cast[AddressSpace.GLOBAL](),
            dst.unsafe_offset(8 * RING_ROW * 4),
            src_size=size
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
                ssrc.unsafe_bitcast[UInt8]().unsafe_address_space_cast[AddressSpace.GLOBAL](),
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
                    (xl.unsafe_offset(col) if inside else x)
                    .unsafe_bitcast[UInt8]()
                    .unsafe_address_space_cast[AddressSpace.GLOBAL](),
                    xw.unsafe_offset(t * X_ROW + 4 * lane).unsafe_bitcast[UInt8](),
                    src_size=Int32(16 if inside else 0),
                )
        comptime if xp:
            if lane < 4:  # sx starts at xp's part 1: 16 bytes per chunk, a step has 4
                var sx = x.unsafe_offset(s * ncols).unsafe_bitcast[Float32]().unsafe_offset(4 * lane)
                var inside_sx = whole or lane < chunks
                async_copy[16, fill=ZERO](
                    (sx.unsafe_offset(Int(st * 16)) if inside_sx else sx)
                    .unsafe_bitcast[UInt8]()
                    .unsafe_address_space_cast[AddressSpace.GLOBAL](),
                    xw.unsafe_offset(s * X_ROW + 4 * lane).unsafe_bitcast[UInt8](),
                    src_size=Int32(16 if inside_sx else 0),
                )


@always_inline
def ring_copy[
    bits: Int, group: Int, dtype: DType, x_ring: Bool, xp: Bool, part: Int = ISSUE_ALL, wt: Int = 1
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
    """`ring_issue` for each of the warp's `wt` row tiles (tile u: rows from row0 + 16u, its ring RING_WORDS words
    after tile u - 1's), built twice: for a step of 4 whole chunks (every step but a row's last: no bounds computed
    per copy) and for the rest."""
    comptime for u in range(wt):
        var tile_ring, tile_row0 = ring.unsafe_offset(u * RING_WORDS), row0 + 16 * u
        if step < ncols // step_cols[bits]():  # warp-uniform (the division is loop-invariant)
            ring_issue[bits, group, dtype, x_ring, xp, part, True](
                data, scales, x, tile_row0, ncols, step, slot, tile_ring, s
            )
        else:
            ring_issue[bits, group, dtype, x_ring, xp, part, False](
                data, scales, x, tile_row0, ncols, step, slot, tile_ring, s
            )


@always_inline
def warp_ring[
    x_slots: Bool = True, wt: Int = 1
](xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED], s: Int) -> type_of(xs):
    """This warp's decode ring in the block's shared memory (after the cross-warp sums; `ring_words`)."""
    return xs.unsafe_offset(WARPS * 128 + Int(warp_id()) * ring_words[x_slots, wt](s))


@always_inline
def warp_steps[bits: Int](ncols: Int, step0: Int, stride: Int) -> Int:
    """K steps step0, step0 + stride, … of a row of ncols columns (32-bit division: the 64-bit one is a call of
    about 70 instructions on the GPU)."""
    var nsteps = ceildiv(ncols, step_cols[bits]())
    return Int((UInt32(nsteps - step0) + UInt32(stride - 1)) // UInt32(stride)) if step0 < nsteps else 0


@always_inline
def ring_prefetch[
    bits: Int, group: Int, dtype: DType, x_slots: Bool = True, wt: Int = 1
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
    first of `ring_warp`'s groups completes them), before the activations they meet are ready (x is not read).
    `x_slots`, `wt`: the rings' layout (`ring_words`; tile u of the warp's `wt` starts at row0 + 16u)."""
    var ring = warp_ring[x_slots, wt](xs, s)
    var mine = warp_steps[bits](ncols, step0, stride)
    syncwarp()  # every lane is done with the slots (an earlier `ring_warp`)
    comptime for i in range(RING - 1):
        if i < mine:
            ring_copy[bits, group, dtype, False, False, ISSUE_CODES, wt](
                data, scales, x, row0, ncols, step0 + i * stride, i, ring, s
            )


@always_inline
def ring_warp[
    bits: Int, group: Int, dtype: DType, b_src: Int, x_ring: Bool, xp: Bool, local_x: Bool = False, wt: Int = 1
](
    mut acc: SIMD[DType.float32, 4 * wt],
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
    local_at: Int = 0,
):
    """`decode_warp` for tiles that `ring_fits`: each K step's codes and scales (and with `x_ring` its activations)
    reach shared memory by cp.async RING - 1 steps ahead of their use, so a warp keeps RING - 1 KB of codes in
    flight without holding registers. With `xp`, x is xp (`prepare_x`), or with `local_x` (and no `x_ring`) the
    block's own prepared slots from word local_at of xs on (`prepare_x_local`); `local_x` rings hold no activation
    slots (`ring_words`), for B_T too. With `ahead`, the first steps' codes are already on their way
    (`ring_prefetch`). `wt` = 2 (`local_x` only): the warp holds rows row0 + 16u of two tiles u, each with a ring of
    its own, acc[4u : 4u + 4] theirs; both tiles' mmas meet the same activation loads."""
    var ring = warp_ring[not local_x, wt](xs, s)
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words[not local_x, wt](s))  # t, for B_T (`sum_t`)
    comptime cpg = chunks_per_group[bits, group]()
    var mine = warp_steps[bits](ncols, step0, stride)
    var lane = Int(lane_id())
    var g, q = lane // 4, lane % 4
    var scale_halves = ring.unsafe_offset(RING * 16 * RING_ROW).unsafe_bitcast[Float16]()
    syncwarp()  # the ring's previous reads (an earlier call) are done
    comptime for i in range(RING - 1):
        if i < mine:
            if ahead:
                ring_copy[bits, group, dtype, x_ring, xp, ISSUE_X, wt](
                    data, scales, x, row0, ncols, step0 + i * stride, i, ring, s
                )
            else:
                ring_copy[bits, group, dtype, x_ring, xp, wt=wt](
                    data, scales, x, row0, ncols, step0 + i * stride, i, ring, s
                )
        async_copy_commit_group()
    var ahead_step = step0 + (RING - 1) * stride  # the step issued in iteration i
    for i in range(mine):
        syncwarp()  # every lane is done with the slot refilled next
        if i + RING - 1 < mine:
            ring_copy[bits, group, dtype, x_ring, xp, wt=wt](
                data, scales, x, row0, ncols, ahead_step, (i + RING - 1) & (RING - 1), ring, s
            )
        ahead_step += stride
        async_copy_commit_group()
        async_copy_wait_group(RING - 1)  # step i's group is complete
        syncwarp()
        var slot = i & (RING - 1)
        var words = SIMD[DType.uint32, 8 * wt](0)
        var sc = SIMD[DType.float32, 8 * wt](0)
        comptime for u in range(wt):
            comptime for r in range(2):
                var base = u * RING_WORDS + (slot * 16 + g + 8 * r) * RING_ROW + q
                var sbase = 2 * u * RING_WORDS + (slot * 16 + g + 8 * r) * 4  # (in halves)
                comptime for j in range(4):
                    words[8 * u + 4 * r + j] = ring[unsafe_offset=base + 4 * j]
                    sc[8 * u + 4 * r + j] = scale_halves[unsafe_offset=sbase + j // cpg].cast[DType.float32]()
        var step = step0 + i * stride
        comptime if b_src == B_T:
            var tw = ts.unsafe_offset(step * (step_cols[bits]() // 2))
            decode_step[bits, dtype, True, wt=wt](acc, words, sc, ncols, step, x, s, tw, t_row(ncols))
        elif local_x:
            var xw = xs.unsafe_offset(local_at + step * x_slot_words(s))
            decode_step[bits, dtype, True, True, wt](acc, words, sc, ncols, step, x, s, xw, X_ROW)
        else:
            var xw = ring.unsafe_offset(RING_WORDS + slot * x_slot_words(s))
            decode_step[bits, dtype, x_ring, xp, wt](acc, words, sc, ncols, step, x, s, xw, X_ROW)
