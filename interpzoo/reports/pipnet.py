"""PIP-Net report figures (Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive Prototypes
for Interpretable Image Classification", CVPR 2023): the prototypes and the sparse scoring-sheet reasoning.

:func:`pipnet_report` writes the confusion matrix and two figures (PNG):

* :func:`prototype_gallery`: one row per used prototype (a non-zero column of ``relu(W)``), the images of the
  training split where it is most present (the paper's Fig. 1/5 visualise a prototype by its top image
  patches, reference ``visualize_topk``), each with the prototype's patch-softmax map ``z_d`` as contour
  lines over the image's own colours (:func:`~interpzoo.reports.common.overlay_heat`, no ``jet`` wash) and
  the box of its strongest latent cell; the row says which classes the prototype serves (with the weight)
  and, when the scorecard ran, the prototype's normalised part score.
* :func:`explanation_figure`: PIP-Net's local explanation of a few test images (Sec. 3.1, Fig. 1): the image
  with the patch of every present prototype of the predicted class, one panel per top prototype (map and
  box, ``presence x weight = score``), and the bar chart of the scores, which sum to the logit.

Classes are labelled with :func:`~interpzoo.reports.common.class_display_names` (``"c3: green circle
head"`` on PartShapes), never by index alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from interpzoo.models.pipnet import PIPNet, draw_pipnet_explanation
from interpzoo.reports.common import (
    class_display_names,
    confusion_matrix_figure,
    overlay_heat,
    part_scores_list,
    save_figure,
    with_part_score,
    wrap_label,
)

__all__ = ["explanation_figure", "pipnet_report", "prototype_gallery", "top_images"]


def pipnet_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """``confusion_matrix.png``, ``prototype_gallery.png`` and ``local_explanation.png`` in ``out_dir``.

    ``part_scores``: optional normalised part score per prototype ``(D,)`` (the scorecard's
    ``unit_part_scores``), printed in the prototype panels.
    """
    out_dir = Path(out_dir)
    return [
        confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png"),
        prototype_gallery(module.net, datamodule, out_dir / "prototype_gallery.png", part_scores=part_scores),
        explanation_figure(
            module.net, datamodule, out_dir / "local_explanation.png", part_scores=part_scores
        ),
    ]


def _fit_title(fig: Figure) -> Figure:
    """``tight_layout`` that keeps the top 0.45 in free for the suptitle (plain ``tight_layout`` overlaps it)."""
    fig.tight_layout(rect=(0.0, 0.0, 1.0, 1.0 - 0.45 / fig.get_figheight()))
    return fig


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


def _patch_box(ax: Any, box: Sequence[float], color: str = "yellow") -> None:
    x0, y0, x1, y1 = (float(v) for v in box)
    # drawn above the contours, thick enough to read on a 4 x 4 px cell
    ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.8, zorder=5))


def _classes_served(net: PIPNet, d: int, names: Sequence[str], width: int = 30) -> str:
    w = net.class_weights[:, d].detach().cpu()
    order = [int(c) for c in w.argsort(descending=True) if w[c] > 0]
    return "\n".join(wrap_label(f"{names[c]} (w {float(w[c]):.2g})", width) for c in order[:3]) + (
        f"\n+{len(order) - 3} more" if len(order) > 3 else ""
    )


@torch.no_grad()
def top_images(
    net: PIPNet,
    dataset: Any,
    prototypes: Sequence[int],
    k: int = 4,
    max_images: int = 400,
    batch_size: int = 100,
) -> dict[int, list[int]]:
    """``{d: indices}``: the ``k`` images of ``dataset`` (its first ``max_images``) where prototype ``d`` is
    most present (largest ``max_{hw} z_{hw,d}``), best first."""
    n = min(len(dataset), int(max_images))
    pres = []
    dev = _device(net)
    for lo in range(0, n, batch_size):
        x = torch.stack([dataset[i]["image"] for i in range(lo, min(n, lo + batch_size))]).to(dev)
        pres.append(net(x).presence_raw.float().cpu())
    p = torch.cat(pres) if pres else torch.zeros(0, net.num_prototypes)
    kk = min(int(k), p.shape[0])
    return {int(d): p[:, int(d)].topk(kk).indices.tolist() for d in prototypes}


def _used_prototypes(net: PIPNet, max_prototypes: int) -> list[int]:
    """Prototypes with a positive class weight, by decreasing total weight (the most relied on first)."""
    w = net.class_weights.detach().cpu()  # (K, D)
    total = w.sum(0)
    order = total.argsort(descending=True)
    return [int(d) for d in order if total[d] > 0][: int(max_prototypes)]


def _train_set(datamodule: Any) -> Any:
    datamodule.setup("fit")
    ds = getattr(datamodule, "push_set", None) or getattr(datamodule, "train_set", None)
    if ds is None:
        raise RuntimeError("the datamodule has no train_set to draw the prototypes' top images from")
    return ds


@torch.no_grad()
def prototype_gallery(
    net: PIPNet,
    datamodule: Any,
    path: Path,
    max_prototypes: int = 16,
    images_per_prototype: int = 4,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """Each used prototype's top training images with its map (contours) and strongest patch; returns ``path``.

    Args:
        max_prototypes: rows (the prototypes with the largest total class weight first).
        images_per_prototype: top images per row.
        part_scores: optional normalised part score of every prototype ``(D,)`` (indexed by prototype
            number), printed in the row's first panel.
    """
    scores = part_scores_list(part_scores, net.num_prototypes, "prototypes")
    was = net.training
    net.eval()
    try:
        names = class_display_names(net.num_classes, datamodule, getattr(net, "data_config", None))
        protos = _used_prototypes(net, max_prototypes)
        ncols = max(1, int(images_per_prototype))
        fig = Figure(figsize=(1.35 * ncols + 2.0, 1.45 * max(1, len(protos)) + 0.6))
        # column 0 holds the prototype's text (classes served, part score); the images follow
        axes = fig.subplots(
            max(1, len(protos)), ncols + 1, squeeze=False, gridspec_kw={"width_ratios": [1.5] + [1.0] * ncols}
        )
        for ax in axes.flat:
            ax.axis("off")
        if not protos:
            fig.suptitle("no prototype has a positive class weight: the scoring sheet is empty", fontsize=9)
        else:
            ds = _train_set(datamodule)
            tops = top_images(net, ds, protos, ncols)
            dev = _device(net)
            for r, d in enumerate(protos):
                idx = tops[d]
                if not idx:
                    continue
                x = torch.stack([ds[i]["image"] for i in idx]).to(dev)
                out = net(x)
                maps = out.prototype_maps[:, d].float().cpu()
                flat = maps.flatten(1).argmax(1)
                loc = torch.stack([flat // maps.shape[2], flat % maps.shape[2]], 1)
                boxes = net.patch_boxes(loc, x.shape[2:])
                for c, i in enumerate(idx):
                    ax = axes[r, c + 1]
                    ax.axis("on")
                    overlay_heat(ax, x[c], maps[c])
                    _patch_box(ax, boxes[c].tolist())
                    ax.set_title(f"img {i}: p={float(out.presence_raw[c, d]):.2f}", fontsize=6)
                label = f"p{d} serves\n{_classes_served(net, d, names)}"
                axes[r, 0].text(
                    0.98,
                    0.5,
                    with_part_score(label, scores, d),
                    fontsize=6,
                    ha="right",
                    va="center",
                    transform=axes[r, 0].transAxes,
                )
            title = "PIP-Net prototypes: top training images, map z_d (contours), strongest patch (yellow)"
            fig.suptitle(wrap_label(title, max(30, int(fig.get_figwidth() / 0.065))), fontsize=8)
        save_figure(_fit_title(fig), path, dpi=110)
    finally:
        net.train(was)
    return path


@torch.no_grad()
def explanation_figure(
    net: PIPNet,
    datamodule: Any,
    path: Path,
    n_images: int = 4,
    top_k: int = 3,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """PIP-Net's sparse explanation of the first ``n_images`` test images; returns ``path``.

    Per image: the image with the patch of each present prototype of the predicted class, one panel per top
    prototype (its map as contours, its patch, ``p x w = score``) and the bar chart of all the scores (their
    sum is the logit). ``part_scores``: optional normalised part score of every prototype ``(D,)``.
    """
    scores = part_scores_list(part_scores, net.num_prototypes, "prototypes")
    was = net.training
    net.eval()
    try:
        datamodule.setup("test")
        test = datamodule.test_set
        n = max(1, min(int(n_images), len(test)))
        items = [test[i] for i in range(n)]
        x = torch.stack([it["image"] for it in items]).to(_device(net))
        labels = [int(it["label"]) for it in items]
        ex = net.explain(x)
        maps = net(x).prototype_maps.float().cpu()
        names = class_display_names(net.num_classes, datamodule, getattr(net, "data_config", None))
        k = max(1, int(top_k))
        fig = Figure(figsize=(1.9 * (k + 1) + 3.0, 2.0 * n + 0.4))
        axes = fig.subplots(n, k + 2, squeeze=False, gridspec_kw={"width_ratios": [1.0] * (k + 1) + [1.6]})
        for i in range(n):
            e = ex[i]
            draw_pipnet_explanation(
                e, axes[i, 0], ex.images[i], class_names=names, part_scores=scores, top_k=k
            )
            axes[i, 0].set_title(
                f"true {wrap_label(names[labels[i]], 30)}\npred {wrap_label(names[e.target], 30)}\n"
                f"logit {e.logit:.3g} = sum of {e.size} scores",
                fontsize=6,
            )
            for t in range(k):
                ax = axes[i, 1 + t]
                if t >= e.size:
                    ax.axis("off")
                    continue
                d = int(e.prototypes[t])
                overlay_heat(ax, ex.images[i], maps[i, d])
                _patch_box(ax, e.boxes[t].tolist(), color=f"C{t % 10}")
                ax.set_title(
                    with_part_score(
                        f"p{d}: {float(e.presence[t]):.2f} x {float(e.weights[t]):.2g} = {float(e.scores[t]):.2g}",
                        scores,
                        d,
                    ),
                    fontsize=6,
                )
            draw_pipnet_explanation(e, axes[i, k + 1], None, class_names=names, part_scores=scores, top_k=8)
            # the full title is in column 0; a short one keeps the chart's title inside the figure
            axes[i, k + 1].set_title(f"scores p x w (sum {e.logit:.3g} = logit)", fontsize=6)
            axes[i, k + 1].tick_params(labelsize=5)
        fig.suptitle(
            "PIP-Net local explanation: present prototypes of the predicted class, score = presence x weight "
            "(the scores sum to the logit)",
            fontsize=8,
        )
        save_figure(_fit_title(fig), path, dpi=110)
    finally:
        net.train(was)
    return path
