"""Report figure of interpretable CNN part filters (Zhang, Wu & Zhu, "Interpretable convolutional neural
networks", CVPR 2018, Fig. 1 and Sec. 4.2: a part filter fires on one object part).

:func:`icnn_report` writes ``part_filters.png`` (top images, heatmaps and inferred parts of a sample of
filters) and, in the multi-category setting, the confusion matrix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.metrics.icnn import inferred_positions
from interpzoo.reports.common import confusion_matrix_figure, save_figure

__all__ = ["icnn_report", "part_filter_figure"]


def icnn_report(module: Any, datamodule: Any, out_dir: Path) -> list[Path]:
    """``part_filters.png`` of :class:`~interpzoo.models.lit_icnn.ICNNModule`'s evaluation layer on a fixed
    test subset (``metrics.report_samples`` images, ``metrics.report_filters`` filters), and the confusion
    matrix in ``mode: multi``; in ``out_dir``."""
    out_dir = Path(out_dir)
    figures: list[Path] = []
    if module.mode == "multi":
        figures.append(confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png"))
    dataset = getattr(datamodule, "test_set", None)
    if dataset is None or len(dataset) == 0:
        return figures
    idx = fixed_subset_indices(len(dataset), int(module.metric_cfg["report_samples"]), 0)
    data = module.collect_part_maps(datamodule.subset_dataloader("test", idx, batch_size=64))
    names = module.data_info.get("class_names") or []
    fc = module.net.assignments[module.eval_layer].filter_class.tolist()
    if module.mode == "single":
        t = module.target_class
        target = names[t] if t < len(names) else str(t)
        labels = [f"{target} vs rest"] * len(fc)
    else:
        labels = [str(names[c]) if c < len(names) else f"class {c}" for c in fc]
    figures.append(
        part_filter_figure(
            data["image"],
            data["maps"],
            out_dir / "part_filters.png",
            num_filters=int(module.metric_cfg["report_filters"]),
            filter_names=labels,
        )
    )
    return figures


def part_filter_figure(
    images: torch.Tensor,
    features: torch.Tensor,
    path: Path,
    filters: list[int] | None = None,
    num_filters: int = 8,
    top_k: int = 6,
    filter_names: list[str] | None = None,
) -> Path:
    """For a sample of filters, their top-activating images with the heatmap and inferred part.

    Rows are filters (the ``num_filters`` with the strongest top activations, evenly spread over the
    ranking, unless ``filters`` is given); each cell shows an image, the filter's upsampled map as a
    heatmap, and a cross at the inferred part position
    (:func:`interpzoo.metrics.icnn.inferred_positions`).

    Args:
        images: ``(N, 3 or 1, H, W)`` in ``[0, 1]``; features: ``(N, C, h, w)`` maps of the layer.
        filter_names: optional label per filter (e.g. its category).
    """
    n, c = features.shape[:2]
    H, W = images.shape[-2:]
    score, pos = inferred_positions(features, (H, W))
    top_k = min(top_k, n)
    if filters is None:
        strength = score.topk(top_k, dim=0).values.mean(0)
        ranked = strength.argsort(descending=True)
        ranked = ranked[strength[ranked] > 0] if (strength > 0).any() else ranked
        pick = torch.linspace(0, len(ranked) - 1, min(num_filters, len(ranked))).round().long()
        filters = ranked[pick].tolist()
    fig = Figure(figsize=(1.6 * top_k, 1.7 * len(filters)))
    axes = fig.subplots(len(filters), top_k, squeeze=False)
    for r, f in enumerate(filters):
        order = score[:, f].argsort(descending=True)[:top_k]
        vmax = float(features[order, f].max().clamp(min=1e-8))
        for col, i in enumerate(order.tolist()):
            ax = axes[r][col]
            img = images[i].float().clamp(0, 1)
            ax.imshow(
                img.permute(1, 2, 0).squeeze(-1).cpu().numpy(), cmap="gray" if img.shape[0] == 1 else None
            )
            heat = F.interpolate(
                features[i : i + 1, f : f + 1].float(), size=(H, W), mode="bilinear", align_corners=False
            )
            ax.imshow(heat[0, 0].cpu().numpy(), cmap="jet", alpha=0.45, vmin=0, vmax=vmax)
            x, y = pos[i, f].tolist()
            ax.plot([x], [y], marker="+", color="white", markersize=12, markeredgewidth=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                label = f"filter {f}" + (f"\n{filter_names[f]}" if filter_names else "")
                ax.set_ylabel(label, fontsize=7)
            ax.set_title(f"{float(score[i, f]):.2f}", fontsize=6)
    fig.suptitle("part filters: top images, heatmap, inferred part (+)", fontsize=9)
    return save_figure(fig, path, tight=True)
