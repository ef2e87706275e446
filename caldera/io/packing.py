"""Bit packing of quantization codes and incoherence signs (docs/FORMAT.md, "Packing rule").

One rule for every width b: each row is a little-endian bit stream, the code of column c occupying
bits [b·c, b·c + b) of the row, i.e. bit k of the stream is bit k % 8 of byte k // 8. A row takes
ceil(cols·b / 8) bytes; the bits after the last code are 0. For b = 2, 4, 8 a code never crosses a
byte (column 4j + t of a 2-bit row sits in bits 2t..2t+1 of byte j); for b = 3 a group of 8 columns
fills 3 bytes, read as the 24-bit little-endian word b0 | b1 << 8 | b2 << 16 holding column 8j + t in
bits 3t..3t+2. Signs are the 1-bit case: bit i is 1 for -1.
"""

from __future__ import annotations

import math

import torch

PACKED_BITS = (1, 2, 3, 4, 8)
"""Widths pack_codes handles: 1 for sign bits, the quantizer's 2, 3, 4, 8."""


def _word(bits: int) -> tuple[int, int]:
    """(codes, bytes) per word: the smallest whole number of codes that fills whole bytes."""
    if bits not in PACKED_BITS:
        raise ValueError(f"bits={bits} cannot be packed; choose one of {PACKED_BITS}")
    word_bits = math.lcm(bits, 8)  # 8 or 24: fits an int32
    return word_bits // bits, word_bits // 8


def _word_dtype(nbytes: int) -> torch.dtype:
    """Bytes are assembled in place when a word is one byte (b = 1, 2, 4, 8), else in an int32 (b = 3: 24 bits)."""
    return torch.uint8 if nbytes == 1 else torch.int32


def packed_cols(cols: int, bits: int) -> int:
    """Bytes per packed row of ``cols`` codes: ceil(cols·bits / 8)."""
    return -(-cols * bits // 8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes (rows, cols) in [0, 2^bits) -> uint8 (rows, ceil(cols·bits/8)), same device (meta too)."""
    per, nbytes = _word(bits)
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be a 2-D uint8 tensor, got {codes.dtype} of shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if codes.numel() and not codes.is_meta and int(codes.max()) >= 2**bits:  # meta: a layout without values
        raise ValueError(f"codes reach {int(codes.max())}, beyond the {bits}-bit range [0, {2**bits - 1}]")
    words = -(-cols // per)
    grouped = torch.nn.functional.pad(codes, (0, words * per - cols)).reshape(rows, words, per)  # (rows, W, per)
    dtype = _word_dtype(nbytes)
    word = torch.zeros(rows, words, dtype=dtype, device=codes.device)
    for t in range(per):  # positions within a word (at most 8), each a whole-tensor operation
        word |= grouped[:, :, t].to(dtype) << (bits * t)
    if nbytes == 1:
        return word[:, : packed_cols(cols, bits)].contiguous()
    out = torch.empty(rows, words, nbytes, dtype=torch.uint8, device=codes.device)
    for k in range(nbytes):
        out[:, :, k] = ((word >> (8 * k)) & 0xFF).to(torch.uint8)
    return out.view(rows, words * nbytes)[:, : packed_cols(cols, bits)].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_codes``: uint8 (rows, ceil(cols·bits/8)) -> uint8 codes (rows, cols)."""
    per, nbytes = _word(bits)
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise ValueError(f"packed must be a 2-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    rows = packed.shape[0]
    if packed.shape[1] != packed_cols(cols, bits):
        raise ValueError(
            f"packed rows have {packed.shape[1]} bytes; {cols} codes of {bits} bits need {packed_cols(cols, bits)}"
        )
    words = -(-cols // per)
    grouped = torch.nn.functional.pad(packed, (0, words * nbytes - packed.shape[1])).reshape(rows, words, nbytes)
    dtype = _word_dtype(nbytes)
    word = grouped[:, :, 0].to(dtype)
    for k in range(1, nbytes):
        word |= grouped[:, :, k].to(dtype) << (8 * k)
    out = torch.empty(rows, words, per, dtype=torch.uint8, device=packed.device)
    mask = 2**bits - 1
    for t in range(per):
        out[:, :, t] = ((word >> (bits * t)) & mask).to(torch.uint8)
    return out.view(rows, words * per)[:, :cols].contiguous()


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """±1 (n,) of any float dtype -> uint8 (ceil(n/8),): bit i % 8 of byte i // 8 is 1 where signs[i] = -1."""
    if signs.ndim != 1:
        raise ValueError(f"signs must be 1-D, got shape {tuple(signs.shape)}")
    negative = signs < 0
    if not torch.all(negative | (signs == 1)):
        raise ValueError("signs must be exactly +1 or -1")
    return pack_codes(negative.to(torch.uint8).unsqueeze(0), 1).squeeze(0)


def unpack_signs(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (ceil(n/8),) -> ±1 (n,) in ``dtype``: the inverse of ``pack_signs``."""
    if packed.ndim != 1:
        raise ValueError(f"packed signs must be 1-D, got shape {tuple(packed.shape)}")
    bits = unpack_codes(packed.unsqueeze(0), 1, n).squeeze(0)
    return 1 - 2 * bits.to(dtype)
