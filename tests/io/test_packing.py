"""Code and sign packing: bit-exact against a per-element reference, the documented bit order, bad input."""

import pytest
import torch

from caldera.io.packing import pack_codes, pack_signs, packed_cols, unpack_codes, unpack_signs

WIDTHS = (1, 2, 3, 5, 7, 8, 9, 13, 31, 64, 97)


def pack_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """docs/FORMAT.md literally: bit k of column c's code is bit (b·c + k) of the row's little-endian bit stream."""
    rows, cols = codes.shape
    out = [[0] * packed_cols(cols, bits) for _ in range(rows)]
    for i in range(rows):
        for c in range(cols):
            code = int(codes[i, c])
            for k in range(bits):
                pos = bits * c + k
                out[i][pos // 8] |= ((code >> k) & 1) << (pos % 8)
    return torch.tensor(out, dtype=torch.uint8).reshape(rows, packed_cols(cols, bits))


def random_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, (rows, cols), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("cols", WIDTHS)
def test_pack_matches_reference_and_round_trips(bits, cols):
    codes = random_codes(3, cols, bits, seed=bits * 1000 + cols)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, -(-cols * bits // 8))
    assert torch.equal(packed, pack_reference(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_all_ones_fill_exactly_the_used_bits():
    """The padding after the last code is 0: 5 three-bit codes of 7 use 15 bits of 2 bytes."""
    packed = pack_codes(torch.full((1, 5), 7, dtype=torch.uint8), 3)
    assert packed.tolist() == [[0xFF, 0x7F]]


@pytest.mark.parametrize(
    ("codes", "bits", "expected"),
    [
        ([1, 2, 3, 0], 2, [0b00111001]),  # column 4j + t in bits 2t..2t+1: 57
        ([1, 2, 3, 0, 3], 2, [57, 3]),  # ragged: the fifth code starts byte 1
        ([0x3, 0xA, 0xF], 4, [0xA3, 0x0F]),  # column 2j in the low nibble
        ([0, 200, 255], 8, [0, 200, 255]),
        ([0, 0, 7], 3, [0b11000000, 0b00000001]),  # column 2 straddles bytes 0 and 1
        ([1, 2, 3, 4, 5, 6, 7, 0], 3, [209, 88, 31]),  # the 24-bit word 0x1F58D1
    ],
)
def test_documented_bit_order(codes, bits, expected):
    packed = pack_codes(torch.tensor([codes], dtype=torch.uint8), bits)
    assert packed.tolist() == [expected]


def test_three_bit_decodes_with_24_bit_words():
    """The GPU rule: bytes 3j..3j+2 form w = b0 | b1 << 8 | b2 << 16; column 8j + t is (w >> 3t) & 7."""
    codes = random_codes(4, 64, 3, seed=7)
    packed = pack_codes(codes, 3).to(torch.int32).view(4, 8, 3)
    word = packed[..., 0] | packed[..., 1] << 8 | packed[..., 2] << 16  # (4, 8)
    decoded = torch.stack([(word >> (3 * t)) & 7 for t in range(8)], dim=-1).reshape(4, 64)
    assert torch.equal(decoded.to(torch.uint8), codes)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 80, 97])
def test_signs_round_trip(n):
    g = torch.Generator().manual_seed(n)
    signs = torch.randint(0, 2, (n,), generator=g).double() * 2 - 1
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-n // 8),)
    assert torch.equal(packed, pack_reference((signs < 0).to(torch.uint8).unsqueeze(0), 1).squeeze(0))
    assert torch.equal(unpack_signs(packed, n, torch.float64), signs)


def test_sign_bit_order():
    """Bit i % 8 of byte i // 8 is 1 for -1."""
    signs = torch.tensor([1.0, -1, -1, 1, 1, 1, 1, 1, -1])
    assert pack_signs(signs).tolist() == [0b00000110, 0b00000001]


def test_bad_input():
    with pytest.raises(ValueError, match="beyond the 2-bit range"):
        pack_codes(torch.tensor([[4]], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="2-D uint8"):
        pack_codes(torch.tensor([[1]], dtype=torch.int32), 2)
    with pytest.raises(ValueError, match="cannot be packed"):
        pack_codes(torch.tensor([[1]], dtype=torch.uint8), 5)
    with pytest.raises(ValueError, match="need 3"):
        unpack_codes(torch.zeros(2, 2, dtype=torch.uint8), 3, 8)
    with pytest.raises(ValueError, match="exactly"):
        pack_signs(torch.tensor([1.0, 0.0]))
