"""Unfused PyTorch modules over the packed tensors of docs/FORMAT.md: the reference every faster path is checked by.

    CompressedLinear     y = x Ŵᵀ + b,  Ŵ = U_outᵀ (dequant(Q) + dequant(L) dequant(R)) U_in + S
                         computed as x̃ = U_in x;  ỹ = x̃ dequant(Q)ᵀ + (x̃ dequant(R)ᵀ) dequant(L)ᵀ;
                         y = U_outᵀ ỹ + S x + b  (S: the weights kept exactly, sparse, often absent)
    CompressedEmbedding  row t of dequant(Q) for token t (only the looked-up rows are dequantized)

The modules keep the codes packed (uint8) and dequantize on every call, in the activations' dtype, on their
device (CPU or CUDA). fp16 scales, fp16 factors and the float32 incoherence blocks are stored as integer views,
so ``model.to(torch.bfloat16)`` moves them but never rounds them; signs (±1) and the bias follow the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from caldera.core.incoherence import IncoherenceTransform
from caldera.core.quantize import QuantizedTensor, dequantize
from caldera.io.packed_format import read_linear
from caldera.io.packing import unpack_codes

_INT_VIEW = {torch.float16: torch.int16, torch.float32: torch.int32}


def _frozen(t: torch.Tensor) -> torch.Tensor:
    """A float16/float32 tensor as an integer view that dtype casts leave alone."""
    return t.contiguous().view(_INT_VIEW[t.dtype])


def _thawed(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return t.view({v: k for k, v in _INT_VIEW.items()}[t.dtype]).to(dtype)


class PackedMatrix(nn.Module):
    """One stored part (Q, L or R) of shape (rows, cols): packed codes + fp16 scales (+ zero points), or fp16."""

    def __init__(self, part: QuantizedTensor, packed: Mapping[str, torch.Tensor], name: str) -> None:
        """``part`` as read (for the shape and settings), ``packed[name + '.codes' ...]`` the stored tensors."""
        super().__init__()
        self.rows, self.cols = part.shape
        self.bits, self.group_size = part.bits, part.group_size
        if self.bits == 16:
            self.register_buffer("weight", _frozen(packed[name]))
            return
        self.register_buffer("codes", packed[f"{name}.codes"].contiguous())
        self.register_buffer("scales", _frozen(packed[f"{name}.scales"]))
        self.register_buffer("zeros", packed[f"{name}.zeros"].contiguous() if part.zeros is not None else None)

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, cols) in ``dtype``; with ``rows`` (int64 (r,)) only those rows, (r, cols)."""
        pick = (lambda t: t) if rows is None else (lambda t: t.index_select(0, rows))
        if self.bits == 16:
            return _thawed(pick(self.weight), dtype)
        codes = unpack_codes(pick(self.codes), self.bits, self.cols)
        zeros = None if self.zeros is None else pick(self.zeros)
        w = dequantize(codes, _thawed(pick(self.scales), torch.float32), zeros, self.bits, self.group_size)
        return w.to(dtype)

    def unpacked(self) -> QuantizedTensor:
        """The stored part with its codes unpacked (uint8 (rows, cols); fp16 values at 16 bits)."""
        if self.bits == 16:
            return QuantizedTensor(_thawed(self.weight, torch.float16), None, None, 16, self.group_size)
        codes = unpack_codes(self.codes, self.bits, self.cols)
        return QuantizedTensor(codes, _thawed(self.scales, torch.float16), self.zeros, self.bits, self.group_size)

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers(recurse=False))

    def extra_repr(self) -> str:
        return f"{self.rows}×{self.cols}, {self.bits} bits" + ("" if self.bits == 16 else f", group {self.group_size}")


class CompressedLinear(nn.Module):
    """A linear (in_features -> out_features) stored as packed Q (+ L, R) with incoherence transforms."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> None:
        """From a file's tensors (shared blocks included) and the linear's metadata; FormatError if invalid."""
        super().__init__()
        linear = read_linear(tensors, prefix, meta)  # validates every tensor
        self.out_features, self.in_features = linear.shape
        self.rank = linear.rank
        self.q = PackedMatrix(linear.q, tensors, f"{prefix}.q")
        self.l = PackedMatrix(linear.l, tensors, f"{prefix}.l") if linear.rank else None
        self.r = PackedMatrix(linear.r, tensors, f"{prefix}.r") if linear.rank else None
        self.incoherence = linear.signs_in is not None
        sides = (("out", linear.signs_out, linear.block_out), ("in", linear.signs_in, linear.block_in))
        for side, signs, block in sides:
            self.register_buffer(f"signs_{side}", signs)  # ±1 float32, or None
            self.register_buffer(f"block_{side}", None if block is None else _frozen(block))
        self.register_buffer("bias", linear.bias)
        self.register_buffer("dense", None)  # Ŵ, only after materialize()
        kept = linear.outliers  # weights kept exactly: y += S x, S sparse (rows, cols, values)
        n = self.in_features
        self.register_buffer("outlier_rows", None if kept is None else (kept.index.long() // n))
        self.register_buffer("outlier_cols", None if kept is None else (kept.index.long() % n))
        self.register_buffer("outlier_values", None if kept is None else _frozen(kept.value))

    def _transform(self, side: str, dtype: torch.dtype) -> IncoherenceTransform:
        signs, block = getattr(self, f"signs_{side}"), getattr(self, f"block_{side}")
        n = self.out_features if side == "out" else self.in_features
        return IncoherenceTransform(n, 0, signs.to(dtype), None if block is None else _thawed(block, dtype))

    def transformed_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequant(Q) + dequant(L) dequant(R), (out, in) in ``dtype``, in the transformed domain."""
        w = self.q.dequantize(dtype)
        return w if self.l is None else w + self.l.dequantize(dtype) @ self.r.dequantize(dtype)

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Ŵ (out, in) in ``dtype``: the dense matrix this module multiplies by."""
        w = self.transformed_weight(dtype)
        if self.incoherence:
            w = self._transform("out", dtype).inverse(self._transform("in", dtype).inverse(w).T).T
        if self.outlier_rows is not None:
            kept = _thawed(self.outlier_values, dtype)
            w = w.index_put((self.outlier_rows, self.outlier_cols), kept, accumulate=True)
        return w

    def outlier_term(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y + S x for the kept weights S (original domain), x (..., in), y (..., out); y itself without any."""
        if self.outlier_rows is None:
            return y
        contrib = x[..., self.outlier_cols] * _thawed(self.outlier_values, x.dtype)  # (..., k)
        return y.index_add(-1, self.outlier_rows, contrib)

    def materialize(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep Ŵ dense from now on: forward becomes one dense matmul with the same output (to rounding) at the
        dense model's speed and memory. For evaluating small models on the CPU; the packed tensors stay."""
        self.dense = self.dense_weight(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> y (..., out) in x's dtype: dequantize Q, one dense matmul, plus (x̃ Rᵀ) Lᵀ."""
        dtype = x.dtype
        if self.dense is not None:
            return nn.functional.linear(x, self.dense.to(dtype), None if self.bias is None else self.bias.to(dtype))
        xt = self._transform("in", dtype).forward(x) if self.incoherence else x  # x̃ = U_in x (per row)
        y = nn.functional.linear(xt, self.q.dequantize(dtype))
        if self.l is not None:
            y = y + nn.functional.linear(nn.functional.linear(xt, self.r.dequantize(dtype)), self.l.dequantize(dtype))
        if self.incoherence:
            y = self._transform("out", dtype).inverse(y)  # y = U_outᵀ ỹ (per row)
        y = self.outlier_term(x, y)
        return y if self.bias is None else y + self.bias.to(dtype)

    def nbytes(self) -> int:
        """Bytes of the stored parts (codes, scales, zeros, factors): what the layer costs in memory, bias aside."""
        parts = [p for p in (self.q, self.l, self.r) if p is not None]
        signs = -(-self.out_features // 8) + -(-self.in_features // 8) if self.incoherence else 0
        kept = 0 if self.outlier_rows is None else self.outlier_rows.numel() * 6  # int32 position + fp16 value
        return sum(p.nbytes() for p in parts) + signs + kept

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, incoherence={self.incoherence}"


class CompressedEmbedding(nn.Module):
    """Token embeddings stored as a packed rank-0 entry (``caldera export --embed-bits 8|4``)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], prefix: str, meta: Mapping[str, Any]) -> None:
        super().__init__()
        if meta.get("rank") != 0 or meta.get("incoherence"):
            raise ValueError(f"{prefix}: a packed embedding must have rank 0 and no incoherence")
        linear = read_linear(tensors, prefix, meta)
        self.num_embeddings, self.embedding_dim = linear.shape
        self.q = PackedMatrix(linear.q, tensors, f"{prefix}.q")
        self.dtype = torch.float32  # of the looked-up rows; set by the loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (...) int64 -> (..., dim) in ``self.dtype``."""
        rows = self.q.dequantize(self.dtype, rows=ids.reshape(-1))
        return rows.reshape(*ids.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole dequantized table (vocab, dim); built on each access."""
        return self.q.dequantize(self.dtype)

    def nbytes(self) -> int:
        return self.q.nbytes()

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"
