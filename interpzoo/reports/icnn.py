"""Report figure of interpretable CNN part filters (Zhang, Wu & Zhu, "Interpretable convolutional neural
networks", CVPR 2018, Fig. 1 and Sec. 4.2: a part filter fires on one object part).

:func:`icnn_report` writes ``part_filters.png`` (top images, heatmaps and inferred parts of a sample of
filters) and, in the multi-category setting, the confusion matrix. Heatmaps are contour lines over the
image's own colours (:func:`~interpzoo.reports.common.overlay_heat`), filters are labelled with the class
they serve by its display name, and with ``part_scores`` each filter row prints its normalised part score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.metrics.icnn import inferred_positions
from interpzoo.reports.common import (
    class_display_names,
    confusion_matrix_figure,
    overlay_heat,
    part_score_label,
    part_scores_list,
    save_figure,
    wrap_label,
)

__all__ = ["icnn_report", "part_filter_figure"]


def icnn_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """``part_filters.png`` of :class:`~interpzoo.models.lit_icnn.ICNNModule`'s evaluation layer on a fixed
    test subset (``metrics.report_samples`` images, ``metrics.report_filters`` filters), and the confusion
    matrix in ``mode: multi``; in ``out_dir``. ``part_scores``: optional normalised part score per filter
    of the evaluation layer ``(C,)``."""
    out_dir = Path(out_dir)
    figures: list[Path] = []
    if module.mode == "multi":
        figures.append(confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png"))
    dataset = getattr(datamodule, "test_set", None)
    if dataset is None or len(dataset) == 0:
        return figures
    idx = fixed_subset_indices(len(dataset), int(module.metric_cfg["report_samples"]), 0)
    data = module.collect_part_maps(datamodule.subset_dataloader("test", idx, batch_size=64))
    fc = module.net.assignments[module.eval_layer].filter_class.tolist()
    k = int(module.data_info.get("num_classes") or 0)
    names = class_display_names(k, datamodule, module.data_info) if k else []
    if module.mode == "single":
        t = module.target_class
        target = names[t] if 0 <= t < len(names) else str(t)
        labels = [f"{target} vs rest"] * len(fc)
    else:
        labels = [names[c] if 0 <= c < len(names) else f"class {c}" for c in fc]
    figures.append(
        part_filter_figure(
            data["image"],
            data["maps"],
            out_dir / "part_filters.png",
            num_filters=int(module.metric_cfg["report_filters"]),
            filter_names=labels,
            part_scores=part_scores,
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
    part_scores: Sequence[float] | None = None,
) -> Path:
    """For a sample of filters, their top-activating images with the heatmap and inferred part.

    Rows are filters (the ``num_filters`` with the strongest top activations, evenly spread over the
    ranking, unless ``filters`` is given); each cell shows an image in its own colours, the filter's
    bilinearly upsampled map as contour lines (scaled by the row's strongest activation, so weak images
    get fewer lines; :func:`~interpzoo.reports.common.overlay_heat`), and a cross at the inferred part
    position (:func:`interpzoo.metrics.icnn.inferred_positions`). Cell titles are the filter's score on
    that image.

    Args:
        images: ``(N, 3 or 1, H, W)`` in ``[0, 1]``; features: ``(N, C, h, w)`` maps of the layer.
        filter_names: optional label per filter (e.g. its category).
        part_scores: optional normalised part score per filter ``(C,)`` (from the scorecard), printed as
            ``part 0.83`` in the title of the first panel of the filter's row.
    """
    n, c = features.shape[:2]
    scores = part_scores_list(part_scores, c, "filters")
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
            overlay_heat(ax, images[i], features[i, f], vmin=0.0, vmax=vmax)
            x, y = pos[i, f].tolist()
            ax.plot([x], [y], marker="+", color="white", markersize=12, markeredgewidth=2)
            ax.set_xticks([])
            ax.set_yticks([])
            if col == 0:
                label = f"filter {f}" + (f"\n{wrap_label(filter_names[f], 18)}" if filter_names else "")
                ax.set_ylabel(label, fontsize=7)
            title = f"{float(score[i, f]):.2f}"
            if col == 0 and scores is not None:
                title = f"{part_score_label(scores, f)}\nact {title}"
            ax.set_title(title, fontsize=6)
    fig.suptitle("part filters: top images, activation (contours), inferred part (+)", fontsize=9)
    return save_figure(fig, path, tight=True)
