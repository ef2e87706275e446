"""The CALDERA loop: W (m, n) ≈ Q + L·R against the layer-input Hessian H (n, n).

    min ||(W - Q - L R) H^½||_F   with Q at BQ bits (group-wise), L (m, k) at BL bits, R (k, n) at BR bits.

Rounds alternate Q = LDLQ(W - L R) and (L, R) = weighted low rank of W - Q, for ``iters`` rounds,
keeping the iterate with the least activation-aware error. With incoherence, the whole problem is
solved for W̃ = U_out W U_inᵀ and H̃ = U_in H U_inᵀ; ``Decomposition.dense`` undoes the transforms.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time

import torch

from caldera.config import ConfigError, DecomposeConfig, Method, QuantConfig
from caldera.core.incoherence import IncoherenceTransform, restore_weight, transform_hessian, transform_weight
from caldera.core.ldlq import check_hessian, damped_factors, damping_shift, ldlq
from caldera.core.lowrank import quantized_lowrank
from caldera.core.metrics import act_err, fro_err
from caldera.core.quantize import QuantizedTensor, quantize


@dataclasses.dataclass
class Outliers:
    """Weights kept exactly: Ŵ = Ŵ₀ + S, S zero except at ``index`` (flat i·n + j, original domain), where it holds
    W − Ŵ₀ (Ŵ₀ the Q + L·R approximation), so Ŵ equals W there up to fp16 rounding of the difference."""

    index: torch.Tensor  # int32 (k,), ascending
    value: torch.Tensor  # fp16 (k,)

    def dense(self, shape: tuple[int, int]) -> torch.Tensor:
        """S (m, n) float32."""
        s = torch.zeros(shape[0] * shape[1], device=self.value.device)
        return s.index_put_((self.index.long(),), self.value.float()).view(shape)

    def nbytes(self) -> int:
        return self.index.numel() * 4 + self.value.numel() * 2


def protected_count(m: int, n: int, fraction: float) -> int:
    """How many of an (m, n) matrix's weights ``protect=fraction`` keeps exactly (at least one when on)."""
    return 0 if fraction == 0 else max(1, math.ceil(fraction * m * n))


def protected_positions(w: torch.Tensor, h_diag: torch.Tensor, fraction: float) -> torch.Tensor:
    """Flat positions (int64, ascending) of the ``fraction`` most important weights of w (m, n): importance
    w_ij² · H_jj, the output error their loss would cause on the calibration inputs."""
    k = protected_count(*w.shape, fraction)
    importance = (w.float().square() * h_diag.to(w.device, torch.float32)).view(-1)
    return importance.topk(k).indices.sort().values


@dataclasses.dataclass
class Decomposition:
    """Q (m, n), optional L (m, k) and R (k, n), all in the transformed domain when u_out/u_in are set."""

    q: QuantizedTensor
    l: QuantizedTensor | None  # noqa: E741 (the paper's name)
    r: QuantizedTensor | None
    u_out: IncoherenceTransform | None
    u_in: IncoherenceTransform | None
    act_err: float  # sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ)) of the kept iterate
    fro_err: float
    history: list[float]  # act_err of every round; act_err is their minimum
    seconds: float
    damping: float  # damping actually used (raised if H was not positive definite)
    outliers: Outliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape

    @property
    def rank(self) -> int:
        return 0 if self.l is None else self.l.shape[1]

    def transformed(self) -> torch.Tensor:
        """Q + L R in the transformed domain, float32 (m, n)."""
        w = self.q.dequantize()
        if self.l is not None:
            w = w + self.l.dequantize() @ self.r.dequantize()
        return w

    def dense(self) -> torch.Tensor:
        """The approximation of the original W, float32 (m, n)."""
        w = self.transformed()
        w = w if self.u_in is None else restore_weight(w, self.u_out, self.u_in)
        return w if self.outliers is None else w + self.outliers.dense(self.shape)

    def nbytes(self) -> int:
        """Every stored byte: codes, scales, zero points, L, R, incoherence signs and outliers."""
        n = self.q.nbytes() + (0 if self.outliers is None else self.outliers.nbytes())
        if self.l is not None:
            n += self.l.nbytes() + self.r.nbytes()
        if self.u_in is not None:
            n += -(-self.u_out.n // 8) + -(-self.u_in.n // 8)  # one sign bit per dimension, per side
        return n

    def bits_per_weight(self) -> float:
        m, n = self.shape
        return 8 * self.nbytes() / (m * n)


def transforms_for(m: int, n: int, seed: int) -> tuple[IncoherenceTransform, IncoherenceTransform]:
    """The (out, in) incoherence transforms a matrix decomposed with this seed uses."""
    return IncoherenceTransform(m, 2 * seed), IncoherenceTransform(n, 2 * seed + 1)


def layout(shape: tuple[int, int], cfg: DecomposeConfig) -> Decomposition:
    """What ``decompose`` returns for an (m, n) matrix under ``cfg``, without values: Q (and L (m, k), R (k, n))
    quantized by the same quantizer from meta-device tensors, so their dtypes and shapes are the stored ones, and
    the real incoherence transforms. For byte counts (``nbytes``) and the writer's tensor layout; no arithmetic."""
    m, n = shape
    if cfg.rank > min(m, n):
        raise ConfigError(f"rank={cfg.rank} exceeds min(m, n)={min(m, n)} for a {tuple(shape)} matrix")
    q = _quantized_layout(m, n, cfg.q_quant())
    left = right = None
    if cfg.rank:
        left, right = _quantized_layout(m, cfg.rank, cfg.l_quant()), _quantized_layout(cfg.rank, n, cfg.r_quant())
    u_out, u_in = transforms_for(m, n, cfg.seed) if cfg.incoherence else (None, None)
    k = protected_count(m, n, cfg.protect)
    meta = (torch.empty(k, dtype=torch.int32, device="meta"), torch.empty(k, dtype=torch.float16, device="meta"))
    outliers = Outliers(*meta) if k else None
    return Decomposition(q, left, right, u_out, u_in, math.nan, math.nan, [], 0.0, cfg.damping, outliers)


@functools.lru_cache(maxsize=1024)
def _quantized_layout(rows: int, cols: int, cfg: QuantConfig) -> QuantizedTensor:
    """``quantize`` of a meta (rows, cols) tensor: the stored parts' dtypes and shapes. The clip search only picks
    among scales of one shape, so it is left out (meta tensors run through slow reference kernels)."""
    return quantize(torch.empty(rows, cols, device="meta"), dataclasses.replace(cfg, clip_search=False))


def _check(w: torch.Tensor, h: torch.Tensor | None, cfg: DecomposeConfig) -> None:
    if w.ndim != 2:
        raise ConfigError(f"weight must be 2-D, got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ConfigError("weight contains NaN or Inf")
    if cfg.rank > min(w.shape):
        raise ConfigError(f"rank={cfg.rank} exceeds min(m, n)={min(w.shape)} for a {tuple(w.shape)} matrix")
    if h is None and cfg.method is not Method.RTN:
        raise ConfigError(f"method {cfg.method.value} needs a Hessian")
    if h is not None:
        if tuple(h.shape) != (w.shape[1], w.shape[1]):
            raise ConfigError(f"Hessian has shape {tuple(h.shape)}, expected ({w.shape[1]}, {w.shape[1]})")
        check_hessian(h)


def decompose(w: torch.Tensor, h: torch.Tensor | None, cfg: DecomposeConfig) -> Decomposition:
    """Decompose w (m, n) against h (n, n) = E[x xᵀ] on w's device. RTN ignores h (may be None).

    h may live elsewhere (e.g. on the CPU): only one transformed float32 copy is made on w's device.
    """
    _check(w, h, cfg)
    start = time.perf_counter()
    wf = w.float()
    m, n = wf.shape
    h = torch.eye(n, device=w.device) if h is None else h
    protected = None
    if cfg.protect:  # decompose W with its most important weights zeroed; they are restored exactly after
        original, protected = wf, protected_positions(wf, h.diagonal(), cfg.protect)
        wf = wf.clone().view(-1).index_fill_(0, protected, 0.0).view(m, n)
    u_out = u_in = None
    if cfg.incoherence:
        u_out, u_in = transforms_for(m, n, cfg.seed)
        wf, hf = transform_weight(wf, u_out, u_in), transform_hessian(h, u_in, w.device, torch.float32)
    else:
        hf = h.to(w.device, torch.float32)
    if cfg.method is Method.RTN:
        q, lam = quantize(wf, cfg.q_quant()), 0.0
        err = act_err(wf, q.dequantize(), hf)
        (q, left, right, err), history = (q, None, None, err), [err]
    else:
        (q, left, right, err), history, lam = _alternate(wf, hf, cfg)
    dec = Decomposition(q, left, right, u_out, u_in, err, 0.0, history, 0.0, lam)
    dec.fro_err = fro_err(wf, dec.transformed())  # transforms are orthogonal: same in either domain
    if protected is not None:
        _restore_outliers(dec, original, protected, hf)
    dec.seconds = time.perf_counter() - start
    return dec


def _restore_outliers(dec: Decomposition, w: torch.Tensor, protected: torch.Tensor, hf: torch.Tensor) -> None:
    """Set ``dec.outliers`` so that Ŵ = W at ``protected``, and its errors to those of the final Ŵ against w."""
    m, n = w.shape
    base = dec.dense()  # Ŵ₀, before the outliers are set
    dec.outliers = Outliers(protected.int(), (w.view(-1)[protected] - base.reshape(-1)[protected]).half())
    kept = dec.outliers.dense((m, n))
    if dec.u_in is None:
        target, approx = w, base + kept
    else:  # errors in the transformed domain, where hf lives: the outliers' share transformed as well
        target = transform_weight(w, dec.u_out, dec.u_in)
        approx = dec.transformed() + transform_weight(kept, dec.u_out, dec.u_in)
    dec.act_err, dec.fro_err = act_err(target, approx, hf), fro_err(target, approx)


def _alternate(w: torch.Tensor, h: torch.Tensor, cfg: DecomposeConfig):
    """Rounds of Q = LDLQ(W - LR), then (L, R) = lowrank(W - Q): (best (Q, L, R, err), history, damping).

    ``history`` holds every round's activation-aware error; the best round is kept (plain alternation
    is not monotone: a later round may be worse, and a later one better again).
    """
    u, lam = damped_factors(h, cfg.damping)
    shift = damping_shift(h, lam)
    gen = torch.Generator().manual_seed(cfg.seed)
    best, history = None, []
    lr = torch.zeros_like(w)
    for _ in range(cfg.iters if cfg.rank else 1):
        q = ldlq(w - lr, u, cfg.q_quant(), cfg.block_size)
        qd = q.dequantize()
        left = right = None
        if cfg.rank:
            left, right, _ = quantized_lowrank(
                w - qd, h, shift, u, cfg.rank, cfg.l_quant(), cfg.r_quant(), cfg.lr_iters, cfg.randomized_svd, gen
            )
            lr = left.dequantize() @ right.dequantize()
        history.append(act_err(w, qd + lr, h))
        if best is None or history[-1] < best[3]:
            best = (q, left, right, history[-1])
    return best, history, lam
