"""GPU kernels, decode: one warp's K step of 2- and 4-bit codes, word q of each chunk per quad lane, so that each chunk's
mmas stay inside one quantization group and the scale is applied once per chunk (`decode_step`)."""

from std.math import ceildiv
from std.memory import AddressSpace, bitcast

from max.gpu import lane_id
from max.gpu.compute.mma import mma

from .gpu_tiles import b_words, chunk_cols, chunks_per_group, half2, load_x8, masked_pair, step_group

comptime SX_WORDS = 16
"""Words of a ring slot's sx (with `xp`, after the tokens' rows): per chunk of the step, the mma C fragment that
starts its sum (`prepare_x`)."""


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
    comptime magic = UInt32(0x43004300) if dtype == DType.bfloat16 else UInt32(0x64006400)
    return masked_pair[bits, dtype](word, j, magic)


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
    bits: Int, dtype: DType, b_shared: Bool, xp: Bool = False, wt: Int = 1
](
    mut acc: SIMD[DType.float32, 4 * wt],
    words: SIMD[DType.uint32, 8 * wt],
    sc: SIMD[DType.float32, 8 * wt],
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
    `wt` row tiles: tile u's words and scales at [8u, 8u + 8), its sums at acc[4u : 4u + 4]; each chunk's activations
    are loaded once for all of them.
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
        var sx = SIMD[DType.float32, 4](0)
        comptime if xp:  # the chunk's −sx as the C fragment the mmas start from
            sx = bitcast[DType.float32, 4](xw.unsafe_load[width=4, alignment=16](s * xrow + 4 * j))
        var tx = SIMD[DType.float32, 4](0)
        comptime for u in range(wt):
            var wa, wb = words[8 * u + j], words[8 * u + 4 + j]
            var tmp = sx
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
                    comptime if u == 0:  # Σx: the same for every tile
                        mma(tx, ones, b, tx)
            var scale = SIMD[DType.float32, 4](sc[8 * u + j], sc[8 * u + j], sc[8 * u + 4 + j], sc[8 * u + 4 + j])
            var part = acc.slice[4, offset = 4 * u]()
            comptime if xp:
                part += scale * tmp
            else:
                part += scale * (tmp - (base + offset) * tx)
            acc = acc.insert[offset = 4 * u](part)
