"""Report figures of concept whitening (Chen, Bei & Rudin, "Concept whitening for interpretable image
recognition", *Nature Machine Intelligence* 2020): the top-activating images per concept axis and the
correlation of the latent space before and after whitening (reference ``plot_concept_top50`` and
``plot_correlation``).

:func:`concept_whitening_report` writes the confusion matrix and, when the model has concepts,
``cw_top_images.png`` and ``cw_correlation.png``. Rows are labelled with the concept names; with
``part_scores`` each axis row prints its normalised part score from the scorecard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from interpzoo.models.concept_whitening import forward_until
from interpzoo.reports.common import (
    confusion_matrix_figure,
    part_score_label,
    part_scores_list,
    save_figure,
    wrap_label,
)

__all__ = ["concept_whitening_report", "correlation_heatmap_figure", "top_activating_figure"]


def concept_whitening_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """Confusion matrix; top-``report_top_k`` test images per concept axis out of the first
    ``report_samples`` test images; correlation of the whitened layer against the matched BN model (or,
    without one, against the layer's own input) on up to 256 of them. In ``out_dir``. ``part_scores``:
    optional normalised part score per concept axis ``(k,)``, printed in the top-images rows."""
    out_dir = Path(out_dir)
    figures = [confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png")]
    if not module.concept_names:
        return figures
    net = module.net
    images, scores = [], []
    n = 0
    was_training = net.training
    net.eval()
    with torch.no_grad():
        for batch in datamodule.test_dataloader():
            x = batch["image"].to(module.device)
            scores.append(net(x).concept_activations.cpu())
            images.append(batch["image"])
            n += x.shape[0]
            if n >= module.hparams.report_samples:
                break
        figures.append(
            top_activating_figure(
                torch.cat(images),
                torch.cat(scores),
                module.concept_names,
                out_dir / "cw_top_images.png",
                k=module.hparams.report_top_k,
                part_scores=part_scores,
            )
        )
        x = torch.cat(images)[: min(n, 256)].to(module.device)
        cw_pix = _pixels(net(x).whitened)
        if module.reference is not None:
            ref = module.reference.to(module.device).eval()
            bn_pix = _pixels(forward_until(ref, f"backbone.body.{net.whitened_names[0]}", x))
            bn_title = "matched BN model"
        else:  # correlation is invariant to BatchNorm's per-channel affine map: its input shows the same
            bn_pix = _pixels(forward_until(net, net.cw_layer, x, capture="input"))
            bn_title = "before whitening (this model)"
    net.train(was_training)
    figures.append(
        correlation_heatmap_figure(bn_pix, cw_pix, out_dir / "cw_correlation.png", left_title=bn_title)
    )
    return figures


def _pixels(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B * H * W, C)`` per-pixel channel vectors (CPU, float64)."""
    return z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().cpu()


def top_activating_figure(
    images: torch.Tensor,
    scores: torch.Tensor,
    concept_names: list[str],
    path: Path,
    k: int = 8,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """Per concept axis (row), the ``k`` images with the highest score ``phi(z_j)``.

    The reference ``plot_concept_top50`` shows 50 per axis on the Places365 validation set.

    Args:
        images: ``(N, C, H, W)`` in ``[0, 1]``.
        scores: ``(N, K)`` axis scores.
        concept_names: ``K`` names; each row is labelled with its axis's concept name.
        part_scores: optional normalised part score per axis ``(K,)``, printed as ``part 0.83`` in the
            title of the row's first panel.
    """
    n_concepts = len(concept_names)
    parts = part_scores_list(part_scores, n_concepts, "axes")
    k = min(k, images.shape[0])
    fig = Figure(figsize=(1.3 * k + 1.2, 1.4 * n_concepts + 0.3))
    axes = fig.subplots(n_concepts, k, squeeze=False)
    for j, name in enumerate(concept_names):
        top = scores[:, j].argsort(descending=True)[:k]
        for col, idx in enumerate(top.tolist()):
            ax = axes[j, col]
            img = images[idx].detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
            ax.imshow(
                img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray" if img.shape[-1] == 1 else None
            )
            ax.set_xticks([])
            ax.set_yticks([])
            title = f"{float(scores[idx, j]):.2f}"
            if col == 0 and parts is not None:
                title = f"{part_score_label(parts, j)}\nact {title}"
            ax.set_title(title, fontsize=7)
            if col == 0:
                ax.set_ylabel(wrap_label(name, 16), fontsize=7)
    fig.suptitle("top-activating test images per concept axis", fontsize=9)
    return save_figure(fig, path, tight=True)


def _abs_corr(pixels: torch.Tensor) -> np.ndarray:
    p = pixels.double()
    p = p - p.mean(0, keepdim=True)
    cov = p.T @ p / max(1, p.shape[0] - 1)
    sd = cov.diagonal().clamp(min=1e-12).sqrt()
    return (cov / torch.outer(sd, sd)).abs().cpu().numpy()


def correlation_heatmap_figure(
    bn_pixels: torch.Tensor, cw_pixels: torch.Tensor, path: Path, left_title: str = "BN model"
) -> Path:
    """Absolute correlation of per-pixel channel vectors ``(N, C)``: BN model (left) vs whitened layer.

    After concept whitening the matrix should be close to the identity (reference ``plot_correlation``).
    """
    left, right = _abs_corr(bn_pixels), _abs_corr(cw_pixels)
    fig = Figure(figsize=(9, 4.2))
    axes = fig.subplots(1, 2)
    for ax, mat, title in ((axes[0], left, left_title), (axes[1], right, "concept whitening")):
        im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
        off = mat[~np.eye(mat.shape[0], dtype=bool)]
        ax.set_title(f"{title}\nmean off-diagonal |corr| {off.mean():.3f}", fontsize=9)
        ax.set_xlabel("channel / axis")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return save_figure(fig, path)
