"""GPU kernels, decode (s ≤ SMALL_S): a 16-row tile's K loop (`decode_warp`), the block's cross-warp sums, and what
stage 1 prepares for stage 2 (`prepare_x`, `sum_t`)."""

from std.math import ceildiv
from std.memory import AddressSpace, bitcast

from max.gpu import barrier, lane_id, thread_idx, warp_id
from max.gpu.primitives import warp

from .gpu_tiles import (
    B_T,
    B_X,
    P_SPLIT,
    THREADS,
    WARPS,
    X_ROW,
    b_words,
    chunk_cols,
    fragment_coords,
    half2,
    load_step,
    mma_step,
    step_cols,
)
from .gpu_codes import decode_codes, decode_step
from .gpu_ring import ring_fits, ring_warp, ring_words, ring_x_tokens, t_row, x_slot_words

comptime XP_PARTS = 2
"""Decode with 2-bit Q: stage 1 prepares x for stage 2 in xp (XP_PARTS, s, n) of the activations' dtype
(`prepare_x`): part 0 the prepared x, part 1 from its start the negated chunk sums sx (`sx_floats`(n)) float32."""


@always_inline
def decode_warp[
    bits: Int, group: Int, dtype: DType, b_src: Int, all_ring: Bool, xp: Bool = False, local_x: Bool = False
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
    local_at: Int = 0,
):
    """Decode: acc += W[row0 : row0 + 16, K steps step0, step0 + stride, …] · B[0 : 8]ᵀ.

    B: x (B_X), or t (B_T) summed into shared memory by `sum_t` (from t_parts for 16-bit parts). With `all_ring`
    every tile takes the ring (`all_ring`: the kernel then holds no code for the others, and fewer registers); with
    `xp`, x is xp (`prepare_x`), or with `local_x` the block's own prepared copy from word local_at of xs on
    (`prepare_x_local`). `ahead`: `ring_prefetch` has requested the first steps' codes (the tile takes the ring; B_X
    with s ≤ RING_X_TOKENS, or B_T).
    """
    comptime cols = step_cols[bits]()
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words[not local_x](s))
    var q, ra = Int(lane_id()) % 4, row0 + Int(lane_id()) // 4
    var nsteps = ceildiv(ncols, cols)
    comptime if bits == 16:
        for step in range(step0, nsteps, stride):
            var col0 = step * cols + q * chunk_cols[bits]()
            var c = load_step[bits, group](data, scales, ra, nrows, ncols, col0)
            mma_step[bits, 1, dtype, b_src](acc, c[0], c[1], c[2], c[3], col0, x, t_parts, s, ncols, 0, xs)
    else:
        comptime if xp and b_src == B_X:
            ring_warp[bits, group, dtype, b_src, not local_x, True, local_x, wt=1](
                acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead, local_at
            )
            return
        comptime if not all_ring:
            if not ring_fits[bits, group](nrows, row0, ncols):  # warp-uniform
                for step in range(step0, nsteps, stride):
                    var c = decode_codes[bits, group](data, scales, ra, nrows, ncols, step)
                    comptime if b_src == B_T:
                        var tw = ts.unsafe_offset(step * (step_cols[bits]() // 2))
                        decode_step[bits, dtype, True, wt=1](acc, c[0], c[1], ncols, step, x, s, tw, t_row(ncols))
                    else:
                        decode_step[bits, dtype, False, wt=1](acc, c[0], c[1], ncols, step, x, s, xs, 0)
                return
        comptime if b_src == B_X:
            if ring_x_tokens(s) > 0:
                ring_warp[bits, group, dtype, b_src, True, False, wt=1](
                    acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead
                )
                return
        ring_warp[bits, group, dtype, b_src, False, False, local_x, wt=1](
            acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead
        )


@always_inline
def decode_warp_tiles[
    bits: Int,
    group: Int,
    dtype: DType,
    b_src: Int,
    all_ring: Bool,
    xp: Bool,
    local_x: Bool,
    wt: Int,
](
    mut acc: SIMD[DType.float32, 4 * wt],
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
    local_at: Int = 0,
):
    """`decode_warp` for the wt row tiles at row0 + 16u, acc[4u : 4u + 4] tile u's. wt = 2 (`all_ring` and `local_x`):
    2- and 4-bit codes in one K loop over both tiles (`ring_warp`), so that each activation load and the loop's
    bookkeeping serve both; fp16 codes one tile after the other."""
    comptime if wt > 1 and bits < 16:
        comptime assert all_ring and local_x, "a warp holds two row tiles only in the local-x kernel"
        ring_warp[bits, group, dtype, b_src, False, xp and b_src == B_X, True, wt](
            acc, data, scales, row0, ncols, step0, stride, x, s, xs, ahead, local_at
        )
        return
    comptime for u in range(wt):
        var part = acc.slice[4, offset = 4 * u]()
        decode_warp[bits, group, dtype, b_src, all_ring, xp, local_x](
            part, data, scales, nrows, row0 + 16 * u, ncols, step0, stride, x, t_parts, s, xs, ahead, local_at
        )
        acc = acc.insert[offset = 4 * u](part)


@always_inline
def reduce_warps[
    wt: Int = 1
](
    acc: SIMD[DType.float32, 4 * wt],
    red: Pointer[mut=True, Float32, _, address_space=AddressSpace.SHARED],
    tiles: Int = 1,
) -> Tuple[Bool, SIMD[DType.float32, wt], Int, Int]:
    """Decode: the block's `tiles` 16×8 C fragments, each summed over the WARPS·wt / tiles consecutive warps that
    hold it (acc[4u : 4u + 4] a warp's tile u of wt), one round per u; (holder, the value of each of its wt tiles,
    row of the first in the block's 16·tiles rows (tile u's is 16u below), token) for threads < 128·tiles / wt."""
    var per = WARPS * wt // tiles
    var tid = Int(thread_idx.x)
    var w, lane = Int(warp_id()), Int(lane_id())
    var holder = tid < 128 * (tiles // wt)
    var grp, e = tid // 128, tid % 128
    var values = SIMD[DType.float32, wt](0)
    comptime for u in range(wt):
        comptime if u > 0:
            barrier()  # the previous round's sums are read
        comptime for i in range(4):
            red[unsafe_offset=(w * 32 + lane) * 4 + i] = acc[4 * u + i]
        barrier()
        if holder:
            var total = Float32(0)
            for ww in range(per):
                total += red[unsafe_offset=(grp * per + ww) * 128 + e]
            values[u] = total
    var rc = fragment_coords(e // 4, e % 4)
    return (holder, values, 16 * wt * grp + rc[0], rc[1])


@always_inline
def sx_floats(n: Int) -> Int:
    """Floats of sx: 4 per 64-column chunk, padded to whole K steps (4 chunks)."""
    return ceildiv(n, 256) * 16


@always_inline
def prepared_unit[dtype: DType](x: Pointer[Scalar[dtype], _], at: Int) -> Tuple[SIMD[DType.uint32, 8], Float32]:
    """16 columns of one token's x from value `at` on (16-value aligned), prepared for `code_pair`: each 16 columns in
    the order of `b_words[2]`'s words (columns 2h + e, 2h + e + 8 in word 2h + e), divided by 4^((2h + e) mod 3); and
    their share of the chunk sum Σ (2^e·x' + 1.5·x) (`prepare_x`)."""
    comptime base = Float32(128.0) if dtype == DType.bfloat16 else Float32(1024.0)
    var nat = bitcast[DType.uint32, 8](x.unsafe_load[width=16, alignment=16](at))
    var out = SIMD[DType.uint32, 8](0)
    var total = Float32(0)
    comptime for h in range(4):
        var pair = b_words[2](nat, h)
        comptime for e in range(2):
            var v = half2[dtype](pair[e])
            var scaled = v * Scalar[dtype](1.0 / Float64(1 << (2 * ((2 * h + e) % 3))))
            var vf, sf = v.cast[DType.float32](), scaled.cast[DType.float32]()
            total += base * (sf[0] + sf[1]) + 1.5 * (vf[0] + vf[1])
            out[2 * h + e] = bitcast[DType.uint32, 1](scaled)[0]
    return (out, total)


@always_inline
def quad_sum(v: Float32) -> Float32:
    """The sum of v over this lane's group of 4 consecutive lanes (one 64-column chunk of `prepared_unit`s)."""
    var total = v + warp.shuffle_xor(v, 1)
    return total + warp.shuffle_xor(total, 2)


@always_inline
def prepare_x[
    dtype: DType
](x: Pointer[Scalar[dtype], _], xp: Pointer[mut=True, Scalar[dtype], _], s: Int, n: Int, bid: Int, blocks: Int):
    """Stage 1's share of xp (`prepares_x`), block `bid` of `blocks`: part 0 (s, n) is x prepared for `code_pair`
    (`prepared_unit`); sx (`sx_floats`) float32 holds per 64-column chunk −Σ (2^e·x' + 1.5·x) of tokens (0, 1, 0,
    1) (token 1 is token 0 where s = 1): the C fragment that `decode_step` starts the chunk's mmas from, whose
    columns 2q, 2q + 1 are tokens 0 and 1 in lane q = 0 (the other lanes' columns are never written). Warp 0 of the
    block takes 32·16 columns at a time, four consecutive lanes a chunk."""
    var units = s * n // 16
    var sx = xp.unsafe_offset(s * n).unsafe_bitcast[Float32]()
    var lane = Int(lane_id())
    if warp_id() != 0:
        return
    for batch in range(bid, ceildiv(units, 32), blocks):  # warp-uniform: shuffles below
        var u = 32 * batch + lane
        var total = Float32(0)
        if u < units:
            var unit = prepared_unit(x, 16 * u)
            total = unit[1]
            xp.unsafe_store[alignment=16](16 * u, bitcast[dtype, 16](unit[0]))
        total = quad_sum(total)
        if u < units and lane % 4 == 0:
            var token, chunk = u // (n // 16), (u % (n // 16)) // 4
            comptime for e in range(4):
                if min(e % 2, s - 1) == token:
                    sx[unsafe_offset=4 * chunk + e] = -total


@always_inline
def prepare_x_local[
    dtype: DType
](
    x: Pointer[Scalar[dtype], _],
    xl: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED],
    s: Int,
    n: Int,
):
    """Block-wide, decode: what `prepare_x` writes, into shared memory at xl as the ring's activation slots hold it,
    one slot (`x_slot_words`) per K step of 256 columns: the step's token rows X_ROW words apart, then its sx; zeros
    past n up to whole steps (the ring's zero fill). Ends with a barrier."""
    var row_units = ceildiv(n, 256) * 16  # 16-column units of a token, whole steps
    var slot = x_slot_words(s)
    var lane = Int(lane_id())
    for batch in range(Int(warp_id()), ceildiv(s * row_units, 32), WARPS):  # warp-uniform: shuffles below
        var u = 32 * batch + lane
        var token, col = u // row_units, (u % row_units) * 16
        var at = (col // 256) * slot
        var total = Float32(0)
        if token < s:
            var words = SIMD[DType.uint32, 8](0)
            if col < n:
                var unit = prepared_unit(x, token * n + col)
                words, total = unit[0], unit[1]
            xl.unsafe_store[alignment=16](at + token * X_ROW + (col % 256) // 2, words)
        total = quad_sum(total)
        if token < s and lane % 4 == 0:
            var sx = xl.unsafe_offset(at + s * X_ROW + (col % 256) // 16).unsafe_bitcast[Float32]()
            comptime for e in range(4):
                if min(e % 2, s - 1) == token:
                    sx[unsafe_offset=e] = -total
    barrier()


@always_inline
def sum_t[
    dtype: DType, x_slots: Bool = True, wt: Int = 1
](t_parts: Pointer[Float32, _], s: Int, k: Int, xs: Pointer[mut=True, UInt32, _, address_space=AddressSpace.SHARED]):
    """Decode, block-wide: t = Σ_p t_parts[p] (s, k) rounded to `dtype` into shared memory after the rings (of
    `ring_words[x_slots, wt]`), each token's row `t_row(k)` words long and zero past k, for `decode_warp`'s B_T."""
    var ts = xs.unsafe_offset(WARPS * 128 + WARPS * ring_words[x_slots, wt](s)).unsafe_bitcast[Scalar[dtype]]()
    var row = 2 * t_row(k)
    for e in range(Int(thread_idx.x), s * row, THREADS):
        var token, c = e // row, e % row
        var total = Float32(0)
        if c < k:
            for p in range(P_SPLIT):
                total += t_parts[unsafe_offset=(p * s + token) * k + c]
        ts[unsafe_offset=e] = total.cast[dtype]()
    barrier()
