"""Packed format v1: decompose -> tensors -> safetensors file -> PackedLinear, the documented forward, bad files."""

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from caldera.config import DecomposeConfig
from caldera.core.decompose import decompose
from caldera.io.packed_format import (
    FormatError,
    file_metadata,
    incoherence_blocks,
    linear_metadata,
    linear_tensors,
    read_file_metadata,
    read_linear,
)
from caldera.testing import lowrank_plus_noise, random_spd_hessian
from caldera.testing.format_reference import doc_decode, doc_transform

M, N = 80, 96  # 2^4·5 and 2^5·3: both transforms use an odd block
PREFIX = "model.layers.3.self_attn.q_proj"
FAST = {"iters": 2, "lr_iters": 1}
CONFIGS = {
    "rank0-plain": DecomposeConfig(rank=0, bq=2, incoherence=False, **FAST),
    "rank0-had-zeros": DecomposeConfig(rank=0, bq=4, group_size=32, zero_point=True, **FAST),
    "rank8-4bit-lr": DecomposeConfig(bq=2, rank=8, bl=4, br=4, group_size=32, lr_group_size=6, **FAST),
    "rank8-16bit-lr-zeros": DecomposeConfig(bq=3, rank=8, bl=16, br=16, zero_point=True, incoherence=False, **FAST),
    "rank8-mixed-ragged": DecomposeConfig(bq=3, rank=8, bl=8, br=3, group_size=40, lr_group_size=5, **FAST),
}


@pytest.fixture(scope="module")
def decs():
    w, h = lowrank_plus_noise(M, N, 8, seed=0, noise=0.3), random_spd_hessian(N, seed=1)
    return {name: decompose(w, h, cfg) for name, cfg in CONFIGS.items()}


def write_read(tmp_path, dec, bias=None):
    """Save one linear (plus blocks and header) with safetensors and read it back: (PackedLinear, tensors, header)."""
    path = tmp_path / "packed.safetensors"
    save_file(
        linear_tensors(PREFIX, dec, bias) | incoherence_blocks([dec]),
        path,
        metadata=file_metadata({PREFIX: linear_metadata(dec)}),
    )
    with safe_open(path, "pt") as f:
        header = f.metadata()
    tensors = load_file(path)
    return read_linear(tensors, PREFIX, read_file_metadata(header)[PREFIX]), tensors, header


def stored_bytes(tensors) -> int:
    """Bytes of one linear's own tensors: everything but the bias and the shared blocks."""
    return sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(PREFIX) and "bias" not in k)


@pytest.mark.parametrize("name", CONFIGS)
def test_round_trip_through_safetensors(tmp_path, decs, name):
    dec = decs[name]
    packed, tensors, _ = write_read(tmp_path, dec)
    expected = dec.dense()
    assert (packed.dense_weight() - expected).norm() <= 1e-6 * expected.norm()
    for mine, theirs in ((packed.q, dec.q), (packed.l, dec.l), (packed.r, dec.r)):
        assert (mine is None) == (theirs is None)
        if mine is not None:
            assert torch.equal(mine.codes, theirs.codes) and mine.bits == theirs.bits
            assert (mine.zeros is None) == (theirs.zeros is None)
    assert packed.nbytes() == dec.nbytes() == stored_bytes(tensors)


def test_layout_and_metadata(tmp_path, decs):
    dec = decs["rank8-mixed-ragged"]
    _, tensors, header = write_read(tmp_path, dec)
    layout = {k: (t.dtype, tuple(t.shape)) for k, t in tensors.items()}
    assert layout == {
        f"{PREFIX}.q.codes": (torch.uint8, (M, math.ceil(N * 3 / 8))),
        f"{PREFIX}.q.scales": (torch.float16, (M, 3)),  # 96 columns in groups of 40
        f"{PREFIX}.l.codes": (torch.uint8, (M, 8)),
        f"{PREFIX}.l.scales": (torch.float16, (M, 2)),  # rank 8 in groups of 5
        f"{PREFIX}.r.codes": (torch.uint8, (8, math.ceil(N * 3 / 8))),
        f"{PREFIX}.r.scales": (torch.float16, (8, 20)),
        f"{PREFIX}.su": (torch.uint8, (M // 8,)),
        f"{PREFIX}.sv": (torch.uint8, (N // 8,)),
        "incoherence.block.5": (torch.float32, (5, 5)),
        "incoherence.block.3": (torch.float32, (3, 3)),
    }
    assert header["caldera.format_version"] == "1"
    meta = json.loads(header[f"caldera.linear.{PREFIX}"])
    assert meta == {
        "format_version": 1,
        "shape": [M, N],
        "rank": 8,
        "q": {"bits": 3, "group_size": 40, "zero_point": False},
        "l": {"bits": 8, "group_size": 5, "zero_point": False},
        "r": {"bits": 3, "group_size": 5, "zero_point": False},
        "incoherence": True,
        "seed_out": dec.u_out.seed,
        "seed_in": dec.u_in.seed,
    }


@pytest.mark.parametrize("name", ["rank8-mixed-ragged", "rank0-had-zeros", "rank8-16bit-lr-zeros"])
def test_documented_forward(tmp_path, decs, name):
    """y = U_outᵀ ((U_in x) · (Q + L R)ᵀ) + b, built only from the tensors and the text of FORMAT.md."""
    dec = decs[name]
    bias = torch.linspace(-1, 1, M)
    packed, t, header = write_read(tmp_path, dec, bias)
    meta = json.loads(header[f"caldera.linear.{PREFIX}"])
    x = torch.randn(5, N, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    parts = {
        p: doc_decode(t, f"{PREFIX}.{p}", meta[p]["bits"], meta[p]["group_size"], rows, cols, meta[p]["zero_point"])
        for p, rows, cols in (("q", M, N), ("l", M, 8), ("r", 8, N))
        if meta[p] is not None
    }
    w_t = parts["q"] + (parts["l"] @ parts["r"] if "l" in parts else 0)  # (M, N), transformed domain
    if meta["incoherence"]:
        u_out, u_in = doc_transform(t, f"{PREFIX}.su", M), doc_transform(t, f"{PREFIX}.sv", N)
        y = ((x @ u_in.T) @ w_t.T) @ u_out  # rows: x̃ = U_in x, ỹ = W̃ x̃, y = U_outᵀ ỹ
    else:
        y = x @ w_t.T
    y = y + t[f"{PREFIX}.bias"].double()
    reference = x.float() @ packed.dense_weight().T + packed.bias
    assert torch.allclose(y.float(), reference, rtol=1e-4, atol=1e-5 * reference.abs().max().item())


def test_bias_dtypes(tmp_path, decs):
    dec = decs["rank0-plain"]
    for given, stored in ((torch.float16, torch.float16), (torch.bfloat16, torch.float32), (torch.float32, None)):
        bias = torch.randn(M).to(given)
        packed, tensors, _ = write_read(tmp_path, dec, bias)
        assert tensors[f"{PREFIX}.bias"].dtype == (stored or given)
        assert torch.equal(packed.bias.float(), bias.float())
    with pytest.raises(FormatError, match=rf"tensor {PREFIX}\.bias: shape"):
        linear_tensors(PREFIX, dec, torch.zeros(M + 1))


def test_blocks_only_for_odd_factors(decs):
    w, h = lowrank_plus_noise(64, 128, 4, seed=2), random_spd_hessian(128, seed=3)
    pow2 = decompose(w, h, DecomposeConfig(rank=0, bq=2, **FAST))
    assert incoherence_blocks([pow2]) == {}
    assert incoherence_blocks([decs["rank0-plain"]]) == {}
    assert set(incoherence_blocks([pow2, decs["rank8-4bit-lr"], decs["rank0-had-zeros"]])) == {
        "incoherence.block.5",
        "incoherence.block.3",
    }


def test_ragged_widths_count_their_sign_bytes():
    """Sign vectors are packed separately: ceil(out/8) + ceil(in/8) bytes, which nbytes() counts."""
    w, h = lowrank_plus_noise(20, 36, 4, seed=4), random_spd_hessian(36, seed=5)
    dec = decompose(w, h, DecomposeConfig(rank=4, bq=2, bl=4, br=4, group_size=16, lr_group_size=4, **FAST))
    tensors = linear_tensors(PREFIX, dec) | incoherence_blocks([dec])
    packed = read_linear(tensors, PREFIX, linear_metadata(dec))
    assert tensors[f"{PREFIX}.su"].shape == (3,) and tensors[f"{PREFIX}.sv"].shape == (5,)
    assert packed.nbytes() == stored_bytes(tensors)
    assert (packed.dense_weight() - dec.dense()).norm() <= 1e-6 * dec.dense().norm()


def corrupt(tensors, meta, key, value):
    tensors, meta = dict(tensors), json.loads(json.dumps(meta))
    if key.startswith("meta:"):
        meta[key[5:]] = value
    elif value is None:
        del tensors[key]
    else:
        tensors[key] = value(tensors[key]) if callable(value) else value
    return tensors, meta


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (f"{PREFIX}.q.scales", None, rf"missing tensor {PREFIX}\.q\.scales"),
        (f"{PREFIX}.l.scales", lambda t: t.float(), rf"tensor {PREFIX}\.l\.scales: dtype torch\.float32, expected"),
        (
            f"{PREFIX}.q.codes",
            lambda t: t[:, :-1],
            rf"{PREFIX}\.q\.codes: shape \(80, 23\), expected \(80, 24\)",
        ),
        (f"{PREFIX}.sv", lambda t: t[:-1], rf"tensor {PREFIX}\.sv: shape"),
        (f"{PREFIX}.q.zeros", torch.zeros(M, 2, dtype=torch.uint8), rf"unexpected tensor {PREFIX}\.q\.zeros"),
        (f"{PREFIX}.q.scales", lambda t: t.index_fill(1, torch.tensor([0]), float("inf")), "NaN or Inf"),
        ("incoherence.block.3", None, r"missing tensor incoherence\.block\.3"),
        ("incoherence.block.5", lambda t: 2 * t, r"tensor incoherence\.block\.5: not orthogonal"),
        ("meta:format_version", 2, "format version 2 is not supported"),
        ("meta:rank", 0, "'l' must be null at rank 0"),
        ("meta:q", {"bits": 5, "group_size": 64, "zero_point": False}, "bits=5 is not supported"),
        ("meta:shape", [M], "must be \\[out, in\\]"),
    ],
    ids=[
        "missing",
        "dtype",
        "shape",
        "signs-length",
        "unexpected",
        "inf-scale",
        "missing-block",
        "non-orthogonal-block",
        "version",
        "rank-vs-parts",
        "bits",
        "meta-shape",
    ],
)
def test_corrupted_linear(decs, key, value, message):
    dec = decs["rank8-4bit-lr"]
    tensors, meta = corrupt(linear_tensors(PREFIX, dec) | incoherence_blocks([dec]), linear_metadata(dec), key, value)
    with pytest.raises(FormatError, match=message) as err:
        read_linear(tensors, PREFIX, meta)
    assert "\n" not in str(err.value)


def test_zero_points_out_of_range(decs):
    dec = decs["rank0-had-zeros"]
    tensors = linear_tensors(PREFIX, dec) | incoherence_blocks([dec])
    tensors[f"{PREFIX}.q.zeros"] = torch.full_like(tensors[f"{PREFIX}.q.zeros"], 16)
    with pytest.raises(FormatError, match=rf"tensor {PREFIX}\.q\.zeros: zero point 16 beyond the 4-bit range"):
        read_linear(tensors, PREFIX, linear_metadata(dec))


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "not a packed CALDERA file"),
        ({"format": "pt"}, "not a packed CALDERA file"),
        ({"caldera.format_version": "2"}, "format version 2 is not supported"),
        ({"caldera.format_version": "1", f"caldera.linear.{PREFIX}": "{"}, "invalid JSON"),
    ],
)
def test_bad_header(header, message):
    with pytest.raises(FormatError, match=message):
        read_file_metadata(header)
