"""The packed on-disk format, version 1 (docs/FORMAT.md): one linear's tensors and header metadata.

Writer: ``linear_tensors`` + ``linear_metadata`` per linear, ``incoherence_blocks`` once per file, and
``file_metadata`` for the safetensors header. Reader: ``read_file_metadata`` then ``read_linear`` per
linear, which validates every tensor (name, dtype, shape) and raises ``FormatError`` naming the first bad one.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from caldera.config import SUPPORTED_BITS
from caldera.core.decompose import Decomposition, Outliers
from caldera.core.incoherence import IncoherenceTransform, restore_weight, split_pow2
from caldera.core.quantize import QuantizedTensor, num_groups
from caldera.io.packing import pack_codes, pack_signs, packed_cols, unpack_codes, unpack_signs

FORMAT_VERSION = 1
VERSION_KEY = "caldera.format_version"  # header key: the format version, as a decimal string
LINEAR_KEY = "caldera.linear."  # header key prefix: + <prefix> -> the linear's JSON metadata
BLOCK_KEY = "incoherence.block."  # tensor name prefix: + <q> -> the shared orthogonal block (q, q) float32
ORTHOGONALITY_TOL = 1e-4  # max |BᵀB - I| accepted for a stored block
_PARTS = ("q", "l", "r")
OUTLIER_INDEX, OUTLIER_VALUE = "outlier_index", "outlier_value"  # suffixes of the kept weights (protect)
_KNOWN = tuple(f"{p}{s}" for p in _PARTS for s in ("", ".codes", ".scales", ".zeros"))
_KNOWN += ("su", "sv", OUTLIER_INDEX, OUTLIER_VALUE)


class FormatError(ValueError):
    """A packed file that does not follow the format; the one-line message names the tensor or key."""


# --- writing ---------------------------------------------------------------------------------------------------


def _part_meta(t: QuantizedTensor | None) -> dict[str, Any] | None:
    if t is None:
        return None
    if t.bits == 16:
        return {"bits": 16, "group_size": None, "zero_point": False}
    return {"bits": t.bits, "group_size": t.group_size, "zero_point": t.zeros is not None}


def linear_metadata(dec: Decomposition) -> dict[str, Any]:
    """The linear's JSON-able header entry: version, shape, rank, per-part bits/groups/zero points, incoherence, and
    the number of kept weights (``outliers``, only when there are any)."""
    m, n = dec.shape
    return {
        "format_version": FORMAT_VERSION,
        "shape": [m, n],
        "rank": dec.rank,
        "q": _part_meta(dec.q),
        "l": _part_meta(dec.l),
        "r": _part_meta(dec.r),
        "incoherence": dec.u_in is not None,
        "seed_out": None if dec.u_out is None else dec.u_out.seed,  # informational: su/sv are authoritative
        "seed_in": None if dec.u_in is None else dec.u_in.seed,
    } | ({"outliers": dec.outliers.index.numel()} if dec.outliers is not None else {})


def _host(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t on the CPU in ``dtype``, contiguous; a meta tensor (a layout without values) stays on the meta device."""
    return t.to("meta" if t.is_meta else "cpu", dtype).contiguous()


def part_tensors(name: str, t: QuantizedTensor) -> dict[str, torch.Tensor]:
    """The stored tensors of one part (``name`` = PREFIX.q, .l or .r) on the CPU: packed codes, scales, zeros."""
    if t.bits == 16:
        return {name: _host(t.codes, torch.float16)}
    if t.bits not in SUPPORTED_BITS:
        raise FormatError(f"tensor {name}: {t.bits}-bit codes are not supported")
    out = {
        f"{name}.codes": _host(pack_codes(t.codes, t.bits), torch.uint8),
        f"{name}.scales": _host(t.scales, torch.float16),
    }
    if t.zeros is not None:
        out[f"{name}.zeros"] = _host(t.zeros, torch.uint8)
    return out


def linear_tensors(prefix: str, dec: Decomposition, bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one linear, on the CPU: packed Q (and L, R), sign bits, bias (fp16 kept, else fp32).

    A ``layout`` decomposition (meta-device parts) gives the same names, dtypes and shapes without values:
    what ``caldera plan`` counts the bytes of."""
    if dec.q.bits == 16:
        raise FormatError(f"tensor {prefix}.q: Q must be quantized (bits < 16)")
    out = part_tensors(f"{prefix}.q", dec.q)
    if dec.l is not None:
        out |= part_tensors(f"{prefix}.l", dec.l) | part_tensors(f"{prefix}.r", dec.r)
    if dec.u_in is not None:
        out[f"{prefix}.su"] = pack_signs(dec.u_out.signs).cpu()
        out[f"{prefix}.sv"] = pack_signs(dec.u_in.signs).cpu()
    if dec.outliers is not None:
        out[f"{prefix}.{OUTLIER_INDEX}"] = _host(dec.outliers.index, torch.int32)
        out[f"{prefix}.{OUTLIER_VALUE}"] = _host(dec.outliers.value, torch.float16)
    if bias is not None:
        if tuple(bias.shape) != (dec.shape[0],):
            raise FormatError(f"tensor {prefix}.bias: shape {tuple(bias.shape)}, expected ({dec.shape[0]},)")
        out[f"{prefix}.bias"] = _host(bias.detach(), torch.float16 if bias.dtype == torch.float16 else torch.float32)
    return out


def incoherence_blocks(decs: Iterable[Decomposition]) -> dict[str, torch.Tensor]:
    """``incoherence.block.<q>`` float32 (q, q) for every odd factor q > 1 of the transformed widths."""
    out = {}
    for dec in decs:
        for t in () if dec.u_in is None else (dec.u_out, dec.u_in):
            if t.q > 1:
                out.setdefault(f"{BLOCK_KEY}{t.q}", t.block.to("cpu", torch.float32).contiguous())
    return out


def file_metadata(metas: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The safetensors ``__metadata__`` (str -> str) for linears {prefix: linear_metadata(dec)}."""
    out = {VERSION_KEY: str(FORMAT_VERSION)}
    for prefix, meta in metas.items():
        out[LINEAR_KEY + prefix] = json.dumps(meta, sort_keys=True)
    return out


# --- reading ---------------------------------------------------------------------------------------------------


def _check_version(version: Any, where: str) -> None:
    if version != FORMAT_VERSION:
        raise FormatError(f"{where}: format version {version!r} is not supported (expected {FORMAT_VERSION})")


def read_file_metadata(header: Mapping[str, str] | None) -> dict[str, dict[str, Any]]:
    """{prefix: linear metadata} from a safetensors header, after checking the format version."""
    if not header or VERSION_KEY not in header:
        raise FormatError(f"header: no {VERSION_KEY} key, not a packed CALDERA file")
    version = int(header[VERSION_KEY]) if header[VERSION_KEY].isdigit() else header[VERSION_KEY]
    _check_version(version, f"header {VERSION_KEY}")
    out = {}
    for key, value in header.items():
        if key.startswith(LINEAR_KEY):
            try:
                out[key[len(LINEAR_KEY) :]] = json.loads(value)
            except json.JSONDecodeError as e:
                raise FormatError(f"header {key}: invalid JSON ({e})") from None
    return out


def _get(tensors: Mapping[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if name not in tensors:
        raise FormatError(f"missing tensor {name}")
    t = tensors[name]
    if t.dtype != dtype:
        raise FormatError(f"tensor {name}: dtype {t.dtype}, expected {dtype}")
    if tuple(t.shape) != shape:
        raise FormatError(f"tensor {name}: shape {tuple(t.shape)}, expected {shape}")
    return t


def _check_part_meta(prefix: str, part: str, meta: Any) -> None:
    where = f"{prefix} metadata {part!r}"
    if not isinstance(meta, dict) or not {"bits", "group_size", "zero_point"} <= set(meta):
        raise FormatError(f"{where}: expected an object with bits, group_size, zero_point, got {meta!r}")
    bits, group = meta["bits"], meta["group_size"]
    if bits not in SUPPORTED_BITS or (part == "q" and bits == 16):
        raise FormatError(f"{where}: bits={bits!r} is not supported")
    if bits < 16 and not (isinstance(group, int) and group >= 1):
        raise FormatError(f"{where}: group_size={group!r} must be an integer >= 1")


def _read_part(
    tensors: Mapping[str, torch.Tensor], name: str, meta: dict[str, Any], rows: int, cols: int
) -> QuantizedTensor:
    bits = meta["bits"]
    if bits == 16:
        return QuantizedTensor(_get(tensors, name, torch.float16, (rows, cols)), None, None, 16, cols)
    group = meta["group_size"]
    ngroups = num_groups(cols, group)
    packed = _get(tensors, f"{name}.codes", torch.uint8, (rows, packed_cols(cols, bits)))
    scales = _get(tensors, f"{name}.scales", torch.float16, (rows, ngroups))
    if not torch.isfinite(scales).all():
        raise FormatError(f"tensor {name}.scales: contains NaN or Inf")
    zeros = None
    if meta["zero_point"]:
        zeros = _get(tensors, f"{name}.zeros", torch.uint8, (rows, ngroups))
        if zeros.numel() and int(zeros.max()) >= 2**bits:
            raise FormatError(f"tensor {name}.zeros: zero point {int(zeros.max())} beyond the {bits}-bit range")
    return QuantizedTensor(unpack_codes(packed, bits, cols), scales, zeros, bits, group)


def _expected(meta: dict[str, Any]) -> set[str]:
    """Suffixes (after ``<prefix>.``) of the tensors the metadata calls for, bias aside."""
    out = set()
    for part in _PARTS:
        pm = meta[part]
        if pm is not None:
            suffixes = ("",) if pm["bits"] == 16 else (".codes", ".scales") + ((".zeros",) if pm["zero_point"] else ())
            out |= {part + s for s in suffixes}
    out |= {OUTLIER_INDEX, OUTLIER_VALUE} if meta.get("outliers") else set()
    return out | ({"su", "sv"} if meta["incoherence"] else set())


def _check_meta(prefix: str, meta: Mapping[str, Any]) -> tuple[int, int, int]:
    if not isinstance(meta, Mapping):
        raise FormatError(f"{prefix} metadata: expected an object, got {type(meta).__name__}")
    _check_version(meta.get("format_version"), f"{prefix} metadata")
    missing = sorted({"shape", "rank", "incoherence", *_PARTS} - set(meta))
    if missing:
        raise FormatError(f"{prefix} metadata: missing key(s) {', '.join(missing)}")
    shape, rank = meta["shape"], meta["rank"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(d, int) and d >= 1 for d in shape)):
        raise FormatError(f"{prefix} metadata: shape={shape!r} must be [out, in], positive integers")
    if not (isinstance(rank, int) and 0 <= rank <= min(shape)):
        raise FormatError(f"{prefix} metadata: rank={rank!r} must be an integer in [0, {min(shape)}]")
    for part in _PARTS:
        want_null = part != "q" and rank == 0
        if (meta[part] is None) != want_null:
            raise FormatError(f"{prefix} metadata: {part!r} must be {'null' if want_null else 'set'} at rank {rank}")
        if meta[part] is not None:
            _check_part_meta(prefix, part, meta[part])
    k = meta.get("outliers", 0)
    if not (isinstance(k, int) and 0 <= k <= shape[0] * shape[1]):
        raise FormatError(f"{prefix} metadata: outliers={k!r} must be an integer in [0, {shape[0] * shape[1]}]")
    return shape[0], shape[1], rank


def _read_block(tensors: Mapping[str, torch.Tensor], n: int) -> torch.Tensor | None:
    q = split_pow2(n)[1]
    if q == 1:
        return None
    name = f"{BLOCK_KEY}{q}"
    block = _get(tensors, name, torch.float32, (q, q))
    err = (block.double().T @ block.double() - torch.eye(q, dtype=torch.float64)).abs().max().item()
    if not err <= ORTHOGONALITY_TOL:
        raise FormatError(f"tensor {name}: not orthogonal (max |BᵀB - I| = {err:.2e})")
    return block


def read_linear(tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> PackedLinear:
    """One linear from a file's tensors (including the shared blocks) and its metadata; validates everything."""
    m, n, rank = _check_meta(prefix, meta)
    present = {s for s in _KNOWN if f"{prefix}.{s}" in tensors}
    unexpected = sorted(present - _expected(meta))
    if unexpected:
        raise FormatError(f"unexpected tensor {prefix}.{unexpected[0]}: the metadata does not call for it")
    q = _read_part(tensors, f"{prefix}.q", meta["q"], m, n)
    left = right = None
    if rank:
        left = _read_part(tensors, f"{prefix}.l", meta["l"], m, rank)
        right = _read_part(tensors, f"{prefix}.r", meta["r"], rank, n)
    signs = blocks = (None, None)
    if meta["incoherence"]:
        su = _get(tensors, f"{prefix}.su", torch.uint8, (-(-m // 8),))
        sv = _get(tensors, f"{prefix}.sv", torch.uint8, (-(-n // 8),))
        signs = (unpack_signs(su, m), unpack_signs(sv, n))
        blocks = (_read_block(tensors, m), _read_block(tensors, n))
    bias = tensors.get(f"{prefix}.bias")
    if bias is not None:
        dtype = torch.float16 if bias.dtype == torch.float16 else torch.float32
        bias = _get(tensors, f"{prefix}.bias", dtype, (m,))
    outliers = _read_outliers(tensors, prefix, meta)
    return PackedLinear((m, n), q, left, right, *signs, *blocks, bias, dict(meta), outliers)


def _read_outliers(tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> Outliers | None:
    k = meta.get("outliers", 0)
    if not k:
        return None
    index = _get(tensors, f"{prefix}.{OUTLIER_INDEX}", torch.int32, (k,))
    value = _get(tensors, f"{prefix}.{OUTLIER_VALUE}", torch.float16, (k,))
    m, n = meta["shape"]
    if not (bool((index[1:] > index[:-1]).all()) and int(index[0]) >= 0 and int(index[-1]) < m * n):
        raise FormatError(f"tensor {prefix}.{OUTLIER_INDEX}: positions must ascend strictly within [0, {m * n})")
    if not torch.isfinite(value).all():
        raise FormatError(f"tensor {prefix}.{OUTLIER_VALUE}: contains NaN or Inf")
    return Outliers(index, value)


# --- the linear as read ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class PackedLinear:
    """A linear as stored: Q, L, R (codes unpacked) in the transformed domain, signs and blocks of U_out, U_in."""

    shape: tuple[int, int]
    q: QuantizedTensor
    l: QuantizedTensor | None  # noqa: E741 (the paper's name)
    r: QuantizedTensor | None
    signs_out: torch.Tensor | None  # ±1 float32 (out,)
    signs_in: torch.Tensor | None  # ±1 float32 (in,)
    block_out: torch.Tensor | None  # float32 (q_out, q_out), None when q_out = 1 or no incoherence
    block_in: torch.Tensor | None
    bias: torch.Tensor | None  # fp16 or fp32 (out,)
    meta: dict[str, Any]
    outliers: Outliers | None = None  # kept weights, original domain

    @property
    def rank(self) -> int:
        return 0 if self.l is None else self.l.shape[1]

    def transformed_weight(self) -> torch.Tensor:
        """dequant(Q) + dequant(L) dequant(R), float32 (out, in), in the transformed domain."""
        w = self.q.dequantize()
        if self.l is not None:
            w = w + self.l.dequantize() @ self.r.dequantize()
        return w

    def dense_weight(self) -> torch.Tensor:
        """The effective weight in the original domain, U_outᵀ (Q + L R) U_in + S (kept weights), float32 (out, in)."""
        w = self.transformed_weight()
        m, n = w.shape
        if self.signs_in is not None:
            u_out = IncoherenceTransform(m, 0, self.signs_out, self.block_out)  # the stored signs and blocks
            u_in = IncoherenceTransform(n, 0, self.signs_in, self.block_in)
            w = restore_weight(w, u_out, u_in)  # U_outᵀ W̃ U_in
        return w if self.outliers is None else w + self.outliers.dense((m, n))

    def nbytes(self) -> int:
        """Bytes of this linear's own tensors: codes, scales, zeros, L, R, sign bits, outliers (not bias, not shared
        blocks)."""
        n = self.q.nbytes()
        if self.l is not None:
            n += self.l.nbytes() + self.r.nbytes()
        if self.signs_in is not None:
            n += -(-self.shape[0] // 8) + -(-self.shape[1] // 8)
        return n + (0 if self.outliers is None else self.outliers.nbytes())
