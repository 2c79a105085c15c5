"""Denoising and code-sparsity metrics of the soft autoencoder. Tensors in, numbers out.

* PSNR = 10·log10(MAX² / MSE) and SSIM (Wang, Bovik, Sheikh & Simoncelli, IEEE TIP 13(4), 2004, Eq. 13
  with the 11×11 Gaussian window, σ = 1.5, and K1 = 0.01, K2 = 0.03 of Sec. III-C), via torchmetrics;
* code sparsity = fraction of code entries with ``|z| ≤ eps`` (``eps = 0``: the exact zeros of a soft
  threshold);
* Hoyer sparsity (Hoyer, JMLR 2004) ``H(z) = (√n − ‖z‖₁/‖z‖₂) / (√n − 1)`` in ``[0, 1]``, per sample
  over the whole code of a stage; all-zero codes are excluded and counted separately;
* population Hoyer sparsity: ``H`` per unit (channel) over all samples and positions, averaged over
  the units that are ever active;
* dead units = fraction of channels never active over the evaluated set.

Everything is a sum over batches, so :class:`CodeStatistics` reduces exactly under DDP. The report figures
(denoising examples, thresholds, filters) are in :mod:`interpzoo.reports.soft_autoencoder`.
"""

from __future__ import annotations

import math

import torch
from torchmetrics import Metric
from torchmetrics.functional.image import (
    peak_signal_noise_ratio,
    structural_similarity_index_measure,
)


# -- functional ---------------------------------------------------------------------------------------
def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR in dB over the whole batch (global MSE), ``inf`` when ``pred == target``."""
    return peak_signal_noise_ratio(pred, target, data_range=data_range)


def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Mean SSIM of ``(B, C, H, W)`` images (11×11 Gaussian window, σ = 1.5; needs ``H, W ≥ 11``).

    torchmetrics reflect-pads the borders and averages the SSIM map over the whole image (Wang et al.'s
    reference code averages over the valid interior only), so values differ slightly from that code.
    """
    if min(pred.shape[-2:]) < 11:
        raise ValueError(
            f"SSIM uses an 11x11 window; images {tuple(pred.shape[-2:])} are too small "
            "(resize to at least 11x11, e.g. data.image_size=32)"
        )
    return structural_similarity_index_measure(pred, target, data_range=data_range, kernel_size=11, sigma=1.5)


def code_sparsity(z: torch.Tensor, eps: float = 0.0) -> float:
    """Fraction of entries of ``z`` with ``|z| ≤ eps`` (1 − the L0 active fraction ρ₀)."""
    return float((z.abs() <= eps).float().mean())


def hoyer_sparsity(z: torch.Tensor) -> torch.Tensor:
    """Per-sample Hoyer sparsity of ``(B, ...)`` codes, ``(B,)``; NaN for all-zero codes.

    ``H(z) = (√n − ‖z‖₁/‖z‖₂) / (√n − 1)``: 1 for a single non-zero entry, 0 when all ``|z_i|`` are equal.
    """
    flat = z.detach().flatten(1).double()
    n = flat.shape[1]
    if n < 2:
        raise ValueError(f"Hoyer sparsity needs codes with >= 2 entries per sample, got {n}")
    l1, l2 = flat.abs().sum(1), flat.norm(dim=1)
    h = (math.sqrt(n) - l1 / l2) / (math.sqrt(n) - 1)
    return torch.where(l2 > 0, h, torch.full_like(h, float("nan")))


def dead_units(z: torch.Tensor, eps: float = 0.0) -> float:
    """Fraction of channels (dimension 1) of ``(B, C, ...)`` codes never above ``eps`` in the batch."""
    active = (z.abs() > eps).transpose(0, 1).flatten(1).any(1)
    return float((~active).float().mean())


# -- DDP-reducible metric -------------------------------------------------------------------------
class CodeStatistics(Metric):
    """Sparsity statistics of one code stage ``(B, C, ...)``, accumulated as sums (exact under DDP).

    ``compute()`` returns ``{"code_sparsity", "hoyer_sparsity", "hoyer_population", "dead_units",
    "all_zero_codes"}`` (see the module docstring; ``all_zero_codes`` is the fraction of samples whose
    whole code is zero, which Hoyer sparsity excludes).

    Args:
        num_channels: ``C``.
        eps: ``|z| ≤ eps`` counts as zero.
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, num_channels: int, eps: float = 0.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_channels = int(num_channels)
        self.eps = float(eps)
        long = {"dtype": torch.long}
        self.add_state("zeros", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("hoyer_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("hoyer_count", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("samples", torch.tensor(0, **long), dist_reduce_fx="sum")
        self.add_state("unit_active", torch.zeros(self.num_channels, **long), dist_reduce_fx="sum")
        self.add_state("unit_l1", torch.zeros(self.num_channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unit_l2sq", torch.zeros(self.num_channels, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("unit_entries", torch.tensor(0, **long), dist_reduce_fx="sum")

    def update(self, z: torch.Tensor) -> None:
        if z.dim() < 2 or z.shape[1] != self.num_channels:
            raise ValueError(f"expected codes (B, {self.num_channels}, ...), got {tuple(z.shape)}")
        z = z.detach()
        active = z.abs() > self.eps
        self.zeros += (~active).sum()
        self.total += active.numel()
        h = hoyer_sparsity(torch.where(active, z, torch.zeros_like(z)))
        valid = ~torch.isnan(h)
        self.hoyer_sum += h[valid].sum()
        self.hoyer_count += valid.sum()
        self.samples += z.shape[0]
        per_unit = z.transpose(0, 1).flatten(1).double()  # (C, B * H * W)
        self.unit_active += active.transpose(0, 1).flatten(1).sum(1)
        self.unit_l1 += per_unit.abs().sum(1)
        self.unit_l2sq += per_unit.pow(2).sum(1)
        self.unit_entries += per_unit.shape[1]

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.unit_entries.double()
        live = self.unit_l2sq > 0
        h_unit = (n.sqrt() - self.unit_l1[live] / self.unit_l2sq[live].sqrt()) / (n.sqrt() - 1).clamp(
            min=1e-12
        )
        nan = torch.tensor(float("nan"), dtype=torch.float64, device=n.device)
        return {
            "code_sparsity": (self.zeros.double() / self.total.clamp(min=1)).float(),
            "hoyer_sparsity": (self.hoyer_sum / self.hoyer_count if self.hoyer_count > 0 else nan).float(),
            "hoyer_population": (h_unit.mean() if live.any() else nan).float(),
            "dead_units": (self.unit_active == 0).double().mean().float(),
            "all_zero_codes": (
                (self.samples - self.hoyer_count).double() / self.samples.clamp(min=1)
            ).float(),
        }
