"""Sensitivity of one matrix: how its activation-aware error falls with the rank of L·R and the bits of Q.

Probe: Q₀ = LDLQ(W) at the probe bits (with incoherence), E = W - Q₀. The rank-k part of CALDERA removes at most
the top k directions of E H^½, so the predicted squared error at rank k is the tail Σ_{i>k} σᵢ² of E H^½'s
singular values; each extra bit of Q divides the quantization error energy by ~4 (uniform grid, incoherent
weights). ``error_curve`` turns that into absolute squared errors tr(Δ H Δᵀ) per (bq, rank) option.
"""

from __future__ import annotations

import dataclasses

import torch

from caldera.config import DecomposeConfig
from caldera.core.decompose import transforms_for
from caldera.core.incoherence import transform_hessian, transform_weight
from caldera.core.ldlq import damped_factors, ldlq


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """Probe results of one matrix W (m, n) against H (n, n)."""

    energy: float  # tr(W H Wᵀ): the output energy relative errors are measured against
    hessian_trace: float  # tr(H)
    probe_bits: int
    spectrum: tuple[float, ...]  # σᵢ² of (W - Q₀) H^½, descending; their sum is the probe's squared error

    def sq_error(self, bq: int, rank: int) -> float:
        """Predicted tr(Δ H Δᵀ) with Q at ``bq`` bits and L·R of rank ``rank`` (ranks past the probed ones count
        as the last probed rank)."""
        tail = sum(self.spectrum[min(rank, len(self.spectrum) - 1) :])
        return tail * 4.0 ** (self.probe_bits - bq)

    def rel_error(self, bq: int, rank: int) -> float:
        """Predicted activation-aware error sqrt(tr(Δ H Δᵀ) / tr(W H Wᵀ))."""
        return (self.sq_error(bq, rank) / self.energy) ** 0.5 if self.energy > 0 else 0.0


def probe(w: torch.Tensor, h: torch.Tensor, cfg: DecomposeConfig, max_rank: int) -> Sensitivity:
    """Sensitivity of w (m, n) against h (n, n) with Q at cfg.bq bits, cfg's group size, damping and seed; the
    spectrum keeps the top ``max_rank`` values plus the rest's sum as one last entry."""
    wf = w.float()
    m, n = wf.shape
    hf = h.to(w.device, torch.float32)
    energy = float(torch.sum((wf @ hf) * wf).double())
    u_out, u_in = transforms_for(m, n, cfg.seed)
    wt, ht = transform_weight(wf, u_out, u_in), transform_hessian(hf, u_in, w.device, torch.float32)
    u, _ = damped_factors(ht, cfg.damping)
    err = wt - ldlq(wt, u, cfg.q_quant(), cfg.block_size).dequantize()  # (m, n)
    evals, evecs = torch.linalg.eigh(ht.double())  # H^½ of the undamped H: the error the decomposition reports
    root = (evecs * evals.clamp(min=0).sqrt()) @ evecs.T
    s2 = torch.linalg.svdvals(err.double() @ root).square()
    k = min(max_rank, s2.numel())
    spectrum = (*s2[:k].tolist(), float(s2[k:].sum()))
    return Sensitivity(energy, float(torch.diagonal(hf).sum()), cfg.bq, spectrum)
