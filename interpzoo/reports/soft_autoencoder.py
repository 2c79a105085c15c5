"""Report figures of the soft autoencoder (Fan, Li, Teng & Wang, "Soft autoencoder and its wavelet
adaptation interpretation", IEEE Trans. Computational Imaging 2020: an encoder of soft-threshold units read
as a learned wavelet shrinkage).

:func:`soft_autoencoder_report` writes ``denoising_examples.png`` (noisy / denoised / clean test images with
PSNR), ``thresholds.png`` (learned thresholds per stage, soft stages only) and ``first_layer_filters.png``
(with ``part_scores``, each filter panel prints its normalised part score from the scorecard).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from interpzoo.metrics.soft_autoencoder import psnr
from interpzoo.models.lit_base import batch_input
from interpzoo.reports.common import part_scores_list, save_figure, with_part_score

__all__ = [
    "denoise_examples",
    "denoising_figure",
    "filters_figure",
    "soft_autoencoder_report",
    "thresholds_figure",
]


def soft_autoencoder_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """Noisy/denoised/clean examples, learned thresholds per stage and first-layer filters, in ``out_dir``.

    ``part_scores``: optional normalised part score per first-layer filter ``(C_out,)``.
    """
    out_dir = Path(out_dir)
    paths = [
        denoising_figure(
            denoise_examples(module, datamodule, module.report_examples),
            out_dir / "denoising_examples.png",
            noise_std=module.noise_std,
        )
    ]
    thresholds = module.net.thresholds()
    if thresholds:
        paths.append(thresholds_figure(thresholds, out_dir / "thresholds.png", noise_std=module.noise_std))
    first = module.net.backbone.stages[0].conv.weight.detach().cpu()
    paths.append(filters_figure(first, out_dir / "first_layer_filters.png", part_scores=part_scores))
    return paths


@torch.no_grad()
def denoise_examples(module: Any, datamodule: Any, n: int) -> dict[str, torch.Tensor]:
    """``{"noisy", "denoised", "clean"}`` ``(n, C, H, W)`` for the first ``n`` test images, with the module's
    seeded evaluation noise (:meth:`~interpzoo.models.lit_base.ReconstructionModule.add_noise`)."""
    datamodule.setup("test")
    m = min(n, len(datamodule.test_set))
    batch = next(iter(datamodule.subset_dataloader("test", range(m), batch_size=n)))
    clean = batch_input(batch).to(module.device)
    index = batch.get("index", torch.arange(clean.shape[0]))
    noisy = module.add_noise(clean, index, "test")
    was_training = module.training
    module.eval()
    try:
        denoised = module(noisy).reconstruction.clamp(0, 1)
    finally:
        module.train(was_training)
    return {"noisy": noisy.cpu(), "denoised": denoised.cpu(), "clean": clean.cpu()}


def _show(ax: Axes, img: torch.Tensor) -> None:
    img = img.clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def denoising_figure(examples: dict[str, torch.Tensor], path: Path, noise_std: float | None = None) -> Path:
    """Rows noisy / denoised / clean of ``(n, C, H, W)`` images in ``[0, 1]``, with per-image PSNR."""
    rows = ("noisy", "denoised", "clean")
    n = examples["clean"].shape[0]
    fig = Figure(figsize=(1.3 * n + 0.8, 4.4))
    axes = fig.subplots(3, n, squeeze=False)
    for j in range(n):
        clean = examples["clean"][j : j + 1]
        for i, row in enumerate(rows):
            img = examples[row][j]
            _show(axes[i, j], img)
            if row != "clean":
                axes[i, j].set_title(f"{float(psnr(img[None].clamp(0, 1), clean)):.1f} dB", fontsize=7)
        for i, row in enumerate(rows):
            if j == 0:
                axes[i, 0].set_ylabel(row)
    title = "test images: PSNR against the clean image"
    if noise_std is not None:
        title += f" (noise sigma = {255 * noise_std:.0f}/255)"
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, tight=True)


def thresholds_figure(
    thresholds: dict[str, torch.Tensor], path: Path, noise_std: float | None = None
) -> Path:
    """Learned soft thresholds ``b`` per channel (sorted), one panel per encoder stage."""
    k = len(thresholds)
    fig = Figure(figsize=(3.2 * k, 2.8))
    axes = fig.subplots(1, k, squeeze=False)
    for ax, (name, b) in zip(axes[0], thresholds.items()):
        values = b.detach().cpu().float().sort(descending=True).values.numpy()
        ax.bar(range(len(values)), values, color="tab:blue")
        ax.axhline(float(values.mean()), color="tab:red", lw=1, label=f"mean {values.mean():.3f}")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("channel (sorted)")
        ax.legend(fontsize=7)
    axes[0, 0].set_ylabel("threshold b (code units)")
    if noise_std is not None:
        fig.suptitle(
            f"learned soft thresholds, trained at noise sigma = {255 * noise_std:.0f}/255", fontsize=9
        )
    return save_figure(fig, path, tight=True)


def filters_figure(
    weight: torch.Tensor, path: Path, max_filters: int = 64, part_scores: Sequence[float] | None = None
) -> Path:
    """First-layer analysis filters ``(C_out, C_in, k, k)`` (grey: symmetric colour map; RGB: min-max).

    ``part_scores``: optional normalised part score per filter ``(C_out,)``, printed as ``part 0.83`` under
    the filter's index in its panel title.
    """
    scores = part_scores_list(part_scores, weight.shape[0], "filters")
    w = weight.detach().cpu().float()[:max_filters]
    n = w.shape[0]
    cols = min(n, 8)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(1.0 * cols + 0.4, 1.0 * rows + 0.6))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i in range(n):
        ax = axes.flat[i]
        f = w[i]
        if f.shape[0] == 3:
            f = (f - f.min()) / (f.max() - f.min()).clamp(min=1e-12)
            ax.imshow(f.permute(1, 2, 0).numpy(), interpolation="nearest")
        else:
            m = float(f.abs().max()) or 1.0
            ax.imshow(f.mean(0).numpy(), cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
        ax.set_title(with_part_score(str(i), scores, i), fontsize=6)
    fig.suptitle("first encoder layer filters", fontsize=9)
    return save_figure(fig, path, tight=True)
