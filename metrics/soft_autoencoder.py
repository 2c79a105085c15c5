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


# -- thresholds against the noise level (the scorecard, :mod:`interpzoo.scorecard.soft_autoencoder`) --------
# Under the shrinkage reading of the soft autoencoder (Fan, Li, Teng & Wang, IEEE TCI 2020, Sec. I and III: the
# encoder is "a learned cascaded wavelet shrinkage system"), a stage-1 unit k with linear filter w_k sees white
# pixel noise of std sigma as code noise of std sigma_k = sigma * ||w_k||_2, and its soft threshold b_k should
# sit a few sigma_k above zero: the universal threshold b_k = sigma_k * sqrt(2 log n) of Donoho & Johnstone,
# "Ideal spatial adaptation by wavelet shrinkage", Biometrika 81(3), 1994, Sec. 2.2 (VisuShrink), removes
# pure noise with probability -> 1 as n grows.
def code_noise_std(weight: torch.Tensor, sigma: float, input_std: torch.Tensor | float = 1.0) -> torch.Tensor:
    """Code-space noise std ``sigma * ||w_k / s||_2`` of each output channel of a bias-free convolution.

    White noise of std ``sigma`` per pixel, divided by the input normalisation ``s`` (per input channel),
    filtered by ``w_k``, has std ``sigma * sqrt(sum_{c, i, j} (w_kcij / s_c)^2)`` away from the borders.

    Shape:
        ``weight`` ``(C_out, C_in, kh, kw)``, ``input_std`` scalar or ``(C_in,)`` to ``(C_out,)``.
    """
    s = torch.as_tensor(input_std, dtype=weight.dtype, device=weight.device).reshape(1, -1, 1, 1)
    return float(sigma) * (weight.detach() / s).flatten(1).norm(dim=1)


def universal_factor(num_coefficients: int) -> float:
    """``sqrt(2 log n)``: the universal threshold in units of the noise std (Donoho & Johnstone 1994)."""
    return math.sqrt(2.0 * math.log(max(int(num_coefficients), 2)))


def noise_rejection(u_noisy: torch.Tensor, u_clean: torch.Tensor, threshold: torch.Tensor) -> float:
    """Share of the code entries that the clean input leaves silent and that stay silent with noise added.

    ``P(S_b(u_clean + noise) = 0 | S_b(u_clean) = 0)`` over all (image, unit, position) entries, from the
    pre-activation codes of the same images without and with noise (e.g. background only, then background
    plus noise: the noise alone must not switch a unit on). For zero-mean Gaussian code noise of std
    ``sigma_k`` on a silent zero code this is ``erf(b_k / (sigma_k sqrt 2))``.

    Shape:
        ``u_noisy``, ``u_clean`` ``(B, C, H, W)``, ``threshold`` ``(C,)``; NaN if no entry is silent.
    """
    b = threshold.to(u_clean).view(1, -1, 1, 1)
    silent = u_clean.abs() <= b
    if not silent.any():
        return float("nan")
    return float((u_noisy.abs() <= b)[silent].double().mean())


def signal_retention(u_noisy: torch.Tensor, signal: torch.Tensor, threshold: torch.Tensor) -> float:
    """Share of the parts' code energy that lands on entries the soft threshold keeps on the noisy input.

    ``sum signal^2 1[|u_noisy| > b] / sum signal^2`` where ``signal`` is the parts' own contribution to the
    code (the code of the clean image minus the code of the same image with the parts removed: the filter is
    linear) and ``u_noisy`` the code of the noisy image. Threshold 0 keeps everything (1).

    Shape:
        ``u_noisy``, ``signal`` ``(B, C, H, W)``, ``threshold`` ``(C,)``; NaN for zero signal.
    """
    b = threshold.to(u_noisy).view(1, -1, 1, 1)
    energy = signal.double().pow(2)
    total = energy.sum()
    if total <= 0:
        return float("nan")
    return float((energy * (u_noisy.abs() > b).double()).sum() / total)


def threshold_tracking(threshold: torch.Tensor, noise_std: torch.Tensor) -> float:
    """Pearson correlation over units of the thresholds ``b_k`` and their code noise ``sigma_k``.

    1 when every threshold is the same multiple of its unit's noise (the universal rule); about 0 when the
    thresholds ignore the noise. NaN when either is constant across units (nothing to track).

    Shape:
        ``(C,)`` and ``(C,)``.
    """
    b, s = threshold.detach().double().flatten(), noise_std.detach().double().flatten()
    b0, s0 = b - b.mean(), s - s.mean()
    den = b0.norm() * s0.norm()
    if den <= 1e-12 * max(float(b.norm() * s.norm()), 1e-300):
        return float("nan")
    return float((b0 @ s0) / den)
