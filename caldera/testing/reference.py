"""Slow, obvious reference implementations in numpy, for tests only.

Each one follows the textbook definition with loops and dense matrices, so that the fast torch code in
``caldera.core`` can be checked against it: the quantizer grid bit-exactly (float32, the same operations),
the incoherence transform as an explicit dense matrix, LDLQ column by column in float64 without lazy blocks,
and the weighted low-rank optimum from an SVD.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg

from caldera.config import QuantConfig

FP16_TINY = np.float32(2.0**-14)
FP16_MAX = np.float32(65504.0)


def _qmax(bits: int) -> int:
    return 2**bits - 1


def _fp16_scale(s: np.float32, pow2: bool) -> np.float32:
    """A float32 scale clamped to [2^-14, 65504], optionally rounded up to a power of two, stored as fp16."""
    s = max(np.float32(s), FP16_TINY)
    if pow2:
        s = np.float32(2.0 ** np.ceil(np.log2(np.float64(s))))
    return np.float32(np.float16(min(s, FP16_MAX)))


def group_scale(group: np.ndarray, bits: int, zero_point: bool, ratio: float = 1.0, pow2: bool = False):
    """(scale, zero) of one group (1-D float32): max-abs / ((2^b - 1) / 2), or (max - min) / (2^b - 1) with
    zero = round(-min / scale), the range [min(x, 0), max(x, 0)] shrunk by ``ratio``. zero is None when symmetric."""
    qmax = _qmax(bits)
    group = group.astype(np.float32)
    if zero_point:
        lo = np.float32(min(group.min(), np.float32(0)))
        hi = np.float32(max(group.max(), np.float32(0)))
        scale = _fp16_scale(np.float32(np.float32(hi - lo) * np.float32(ratio)) / np.float32(qmax), pow2)
        zero = int(np.clip(np.rint(np.float32(-lo * np.float32(ratio)) / scale), 0, qmax))
        return scale, zero
    amax = np.float32(np.abs(group).max())
    return _fp16_scale(np.float32(amax * np.float32(ratio)) / np.float32(qmax / 2), pow2), None


def group_sq_err(group: np.ndarray, scale: np.float32, zero: int | None, bits: int) -> float:
    """Squared round-to-nearest error of one group (1-D) on the grid (scale, zero), in float64."""
    qmax = _qmax(bits)
    off = qmax / 2 if zero is None else zero
    codes = np.clip(np.rint(group.astype(np.float64) / np.float64(scale) + off), 0, qmax)
    return float(np.sum(((codes - off) * np.float64(scale) - group) ** 2))


def fit_scales(w: np.ndarray, cfg: QuantConfig, ratios: tuple[float, ...] = (1.0,)):
    """Scales float32 (rows, ngroups) and zeros int (rows, ngroups) or None, one group at a time.

    With several ``ratios`` each group takes the one with the least squared error (first one on ties).
    """
    rows, cols = w.shape
    gs = cfg.group_size
    ng = -(-cols // gs)
    scales = np.zeros((rows, ng), dtype=np.float32)
    zeros = np.zeros((rows, ng), dtype=np.int64) if cfg.zero_point else None
    for i in range(rows):
        for gi in range(ng):
            group = w[i, gi * gs : (gi + 1) * gs].astype(np.float32)
            best = None
            for ratio in ratios:
                s, z = group_scale(group, cfg.bits, cfg.zero_point, ratio, cfg.pow2_scales)
                err = group_sq_err(group, s, z, cfg.bits)
                if best is None or err < best[0]:
                    best = (err, s, z)
            scales[i, gi] = best[1]
            if zeros is not None:
                zeros[i, gi] = best[2]
    return scales, zeros


def quantize_codes(w: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group_size: int):
    """Codes (rows, cols) int64, one element at a time: clamp(round_half_even(w / scale + offset), 0, 2^b - 1),
    offset = zero, or (2^b - 1) / 2 without zero points; float32 arithmetic as in the torch code."""
    qmax = _qmax(bits)
    rows, cols = w.shape
    codes = np.zeros((rows, cols), dtype=np.int64)
    for i in range(rows):
        for j in range(cols):
            gi = j // group_size
            off = np.float32(qmax / 2) if zeros is None else np.float32(zeros[i, gi])
            x = np.float32(np.float32(w[i, j]) / np.float32(scales[i, gi])) + off
            codes[i, j] = int(min(max(np.rint(x), 0), qmax))
    return codes


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, bits: int, group_size: int):
    """float64 (rows, cols): (code - offset) · scale, element by element."""
    qmax = _qmax(bits)
    out = np.zeros(codes.shape, dtype=np.float64)
    for i in range(codes.shape[0]):
        for j in range(codes.shape[1]):
            gi = j // group_size
            off = qmax / 2 if zeros is None else float(zeros[i, gi])
            out[i, j] = (float(codes[i, j]) - off) * float(scales[i, gi])
    return out


def incoherence_matrix(signs: np.ndarray, block: np.ndarray) -> np.ndarray:
    """Dense U = (B ⊗ H) · diag(s) float64 (n, n): H the normalised Hadamard matrix of size n / q, B (q, q)."""
    n, q = len(signs), block.shape[0]
    p2 = n // q
    had = scipy.linalg.hadamard(p2).astype(np.float64) / np.sqrt(p2)
    return np.kron(np.asarray(block, dtype=np.float64), had) @ np.diag(np.asarray(signs, dtype=np.float64))


def damp(h: np.ndarray, damping: float) -> np.ndarray:
    """H + damping · mean(diag) · I in float64, after setting non-positive diagonal entries to 1."""
    h = np.array(h, dtype=np.float64)
    d = np.diag(h).copy()
    d[d <= 0] = 1.0
    np.fill_diagonal(h, d + damping * d.mean())
    return h


def ldlq(w: np.ndarray, h: np.ndarray, cfg: QuantConfig, ratios: tuple[float, ...] = (1.0,)):
    """Textbook LDLQ / GPTQ in float64: one column at a time, no lazy blocks.

    U is the upper Cholesky factor of H⁻¹ (UᵀU = H⁻¹). For each column j: at a group start, fit the group's
    scales on the current (error-corrected) columns; round column j; e = (w_j - q_j) / U[j, j];
    W[:, j+1:] -= e U[j, j+1:]. Returns (codes, scales, zeros) as ``fit_scales`` and ``quantize_codes``.
    """
    work = np.array(w, dtype=np.float64)
    m, n = work.shape
    gs, qmax = cfg.group_size, _qmax(cfg.bits)
    u = np.linalg.cholesky(np.linalg.inv(np.asarray(h, dtype=np.float64))).T
    ng = -(-n // gs)
    codes = np.zeros((m, n), dtype=np.int64)
    scales = np.zeros((m, ng), dtype=np.float32)
    zeros = np.zeros((m, ng), dtype=np.int64) if cfg.zero_point else None
    for j in range(n):
        gi = j // gs
        if j % gs == 0:
            s, z = fit_scales(work[:, j : j + gs].astype(np.float32), cfg, ratios)
            scales[:, gi] = s[:, 0]
            if zeros is not None:
                zeros[:, gi] = z[:, 0]
        scale = scales[:, gi].astype(np.float64)
        off = qmax / 2 if zeros is None else zeros[:, gi].astype(np.float64)
        codes[:, j] = np.clip(np.rint(work[:, j] / scale + off), 0, qmax)
        err = (work[:, j] - (codes[:, j] - off) * scale) / u[j, j]
        work[:, j + 1 :] -= np.outer(err, u[j, j + 1 :])
    return codes, scales, zeros


def weighted_sq_err(a: np.ndarray, approx: np.ndarray, h: np.ndarray) -> float:
    """tr((A - Â) H (A - Â)ᵀ) in float64, from the difference itself."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(approx, dtype=np.float64)
    return float(np.trace(d @ np.asarray(h, dtype=np.float64) @ d.T))


def optimal_weighted_sq_err(a: np.ndarray, h: np.ndarray, k: int) -> float:
    """min over rank-k M of tr((A - M) H (A - M)ᵀ): the sum of the squared trailing singular values of A C,
    H = C Cᵀ (Eckart-Young after the change of variables M C)."""
    c = np.linalg.cholesky(np.asarray(h, dtype=np.float64))
    s = np.linalg.svd(np.asarray(a, dtype=np.float64) @ c, compute_uv=False)
    return float(np.sum(s[k:] ** 2))


def act_err(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    """sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ)), Δ = W - Ŵ, in float64."""
    w = np.asarray(w, dtype=np.float64)
    return float(np.sqrt(weighted_sq_err(w, w_hat, h) / weighted_sq_err(w, np.zeros_like(w), h)))
