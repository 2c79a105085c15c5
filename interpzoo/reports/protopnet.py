"""ProtoPNet report figures (Chen et al., "This looks like that: deep learning for interpretable image
recognition", NeurIPS 2019): prototype visualisation after push and the "this looks like that" reasoning.

:func:`protopnet_report` writes the confusion matrix and two figures (PNG):

* :func:`prototype_gallery`: one row per class, one panel per prototype: its source training image (the
  image push projected it onto), the bicubically upsampled self-activation map as contour lines over the
  image's own colours (:func:`~interpzoo.reports.common.overlay_heat`; the reference ``push.py`` blends a
  ``jet`` map, which hides the part colours PartShapes classes differ by), the 95th-percentile
  high-activation box (solid) and the receptive-field box of the latent patch (dashed). Reference
  ``push.py`` saves the same three views as separate files.
* :func:`explanation_figure`: for a few test images, the top prototypes of the predicted class by
  contribution ``W[c, j] * s_j``: where on the test image each prototype is active (heatmap + box), next
  to the prototype's source patch, with similarity, weight and contribution (reference ``local_analysis.py``).

Classes are labelled with :func:`~interpzoo.reports.common.class_display_names` (``"c3: green circle
head"`` on PartShapes); with ``part_scores`` (one normalised part score per prototype, from the
ground-truth scorecard) every prototype panel prints ``part 0.83`` in its title.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from interpzoo.layers.protopnet import upsample_maps
from interpzoo.models.protopnet import ProtoPNet
from interpzoo.reports.common import (
    class_display_names,
    confusion_matrix_figure,
    overlay_heat,
    part_scores_list,
    save_figure,
    with_part_score,
    wrap_label,
)

__all__ = ["explanation_figure", "protopnet_report", "prototype_gallery"]


def protopnet_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """``confusion_matrix.png``, ``prototype_gallery.png`` and ``this_looks_like_that.png`` in ``out_dir``.

    ``part_scores``: optional normalised part score per prototype ``(P,)``, printed in the prototype panels.
    """
    out_dir = Path(out_dir)
    return [
        confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png"),
        prototype_gallery(module.net, datamodule, out_dir / "prototype_gallery.png", part_scores=part_scores),
        explanation_figure(
            module.net, datamodule, out_dir / "this_looks_like_that.png", part_scores=part_scores
        ),
    ]


def _draw(
    ax: Any, img: torch.Tensor, heat: torch.Tensor | None = None, box: Any = None, rf_box: Any = None
) -> None:
    """``img`` ``(C, H, W)`` in its own colours, ``heat`` ``(H, W)`` as contour lines, and the boxes."""
    overlay_heat(ax, img, heat)
    for b, style in ((rf_box, "--"), (box, "-")):
        if b is None:
            continue
        x0, y0, x1, y1 = (float(v) for v in b)
        if x1 <= x0 or y1 <= y0:
            continue
        ax.add_patch(
            Rectangle(
                (x0 - 0.5, y0 - 0.5),
                x1 - x0,
                y1 - y0,
                fill=False,
                lw=1.2,
                ls=style,
                ec="yellow" if style == "-" else "cyan",
            )
        )
    ax.set_xticks([])
    ax.set_yticks([])


def _push_set(datamodule: Any) -> Any:
    datamodule.setup("fit")
    ds = getattr(datamodule, "push_set", None) or getattr(datamodule, "train_set", None)
    if ds is None:
        raise RuntimeError("the datamodule has no push_set/train_set to draw prototype sources from")
    return ds


def _device(net: torch.nn.Module) -> torch.device:
    return next(net.parameters()).device


@torch.no_grad()
def _source_views(
    net: ProtoPNet, dataset: Any, protos: list[int]
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{j: (source image, upsampled self-activation map)}`` for pushed prototypes."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    dev = _device(net)
    for j in protos:
        src = int(net.push_source_index[j])
        if src < 0:
            continue
        img = dataset[src]["image"]
        maps = net(img.unsqueeze(0).to(dev)).similarity_maps[0, j]
        out[j] = (img, upsample_maps(maps.unsqueeze(0), img.shape[1:])[0].cpu())
    return out


@torch.no_grad()
def prototype_gallery(
    net: ProtoPNet,
    datamodule: Any,
    path: Path,
    max_prototypes: int = 100,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """Draw every (active) prototype's source image with heatmap and boxes; returns ``path``.

    Args:
        part_scores: optional normalised part score of every prototype ``(P,)`` (indexed by prototype, not
            by panel), printed as ``part 0.83`` in the prototype's panel title.
    """
    scores = part_scores_list(part_scores, net.num_prototypes, "prototypes")
    was = net.training
    net.eval()
    classes = net.prototype_classes.cpu()
    active = (net.prototype_mask > 0).cpu()
    names = class_display_names(net.num_classes, datamodule, getattr(net, "data_config", None))
    rows: list[list[int]] = []
    total = 0
    for c in range(net.num_classes):
        js = [int(j) for j in (classes == c).nonzero().flatten() if active[j]]
        if not js:
            continue
        if total + len(js) > max_prototypes:
            break
        rows.append(js)
        total += len(js)
    ncols = max((len(r) for r in rows), default=1)
    fig = Figure(figsize=(1.3 * ncols + 0.8, 1.4 * max(1, len(rows)) + 0.6))
    axes = fig.subplots(max(1, len(rows)), ncols, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    if not net.pushed:
        fig.suptitle("prototypes not projected yet (no push ran): no source images to show", fontsize=9)
    else:
        views = _source_views(net, _push_set(datamodule), [j for r in rows for j in r])
        for ri, js in enumerate(rows):
            for ci, j in enumerate(js):
                ax = axes[ri, ci]
                ax.axis("on")
                if j not in views:
                    ax.set_title(with_part_score(f"p{j}: no source", scores, j), fontsize=6)
                    ax.set_xticks([])
                    ax.set_yticks([])
                    continue
                img, heat = views[j]
                _draw(ax, img, heat, net.push_act_box[j].tolist(), net.push_rf_box[j].tolist())
                ax.set_title(
                    with_part_score(f"p{j} (img {int(net.push_source_index[j])})", scores, j), fontsize=6
                )
            axes[ri, 0].set_ylabel(wrap_label(names[int(classes[js[0]])], 16), fontsize=6)
        title = (
            "prototype gallery: source image, self-activation (contours), high-activation box (yellow), "
            "receptive field (cyan)"
        )
        # a one-column gallery is ~2 in wide: wrap the title to the figure (~0.06 in per character at 8 pt)
        fig.suptitle(wrap_label(title, max(30, int(fig.get_figwidth() / 0.065))), fontsize=8)
    save_figure(fig, path, dpi=110, tight=True)
    net.train(was)
    return path


@torch.no_grad()
def explanation_figure(
    net: ProtoPNet,
    datamodule: Any,
    path: Path,
    n_images: int = 4,
    top_k: int = 3,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """ "This looks like that" for the first ``n_images`` test images; returns ``path``.

    ``part_scores``: optional normalised part score of every prototype ``(P,)``, printed in the title of
    each prototype's source panel.
    """
    scores = part_scores_list(part_scores, net.num_prototypes, "prototypes")
    was = net.training
    net.eval()
    datamodule.setup("test")
    test = datamodule.test_set
    n = min(n_images, len(test))
    items = [test[i] for i in range(n)]
    x = torch.stack([it["image"] for it in items]).to(_device(net))
    labels = [int(it["label"]) for it in items]
    expl = net.explain(x, top_k=top_k)
    out = net(x)
    names = class_display_names(net.num_classes, datamodule, getattr(net, "data_config", None))
    sources = (
        _source_views(net, _push_set(datamodule), sorted({int(j) for e in expl for j in e.prototypes}))
        if net.pushed
        else {}
    )
    k = len(expl[0].prototypes) if expl else 0
    fig = Figure(figsize=(1.6 * (1 + 2 * k), 1.9 * n + 0.4))
    axes = fig.subplots(n, 1 + 2 * k, squeeze=False)
    for i, e in enumerate(expl):
        _draw(axes[i, 0], x[i])
        axes[i, 0].set_title(
            f"true {wrap_label(names[labels[i]], 40)}\npred {wrap_label(names[e.target], 40)}", fontsize=6
        )
        for t in range(k):
            j = int(e.prototypes[t])
            heat = upsample_maps(out.similarity_maps[i, j].unsqueeze(0), x.shape[2:])[0]
            a_test, a_src = axes[i, 1 + 2 * t], axes[i, 2 + 2 * t]
            _draw(a_test, x[i], heat, e.boxes[t].tolist())
            a_test.set_title(
                f"s={float(e.similarities[t]):.2f} w={float(e.weights[t]):.2f}\n"
                f"contrib {float(e.contributions[t]):.2f}",
                fontsize=6,
            )
            if j in sources:
                img, sheat = sources[j]
                _draw(a_src, img, sheat, net.push_act_box[j].tolist())
                a_src.set_title(
                    with_part_score(
                        f"looks like p{j}\n({wrap_label(names[int(e.prototype_classes[t])], 40)})", scores, j
                    ),
                    fontsize=6,
                )
            else:
                a_src.axis("off")
                a_src.set_title(with_part_score(f"p{j} (not pushed)", scores, j), fontsize=6)
    fig.suptitle(
        "this looks like that: top prototypes of the predicted class (logit = sum of contributions)",
        fontsize=8,
    )
    save_figure(fig, path, dpi=110, tight=True)
    net.train(was)
    return path
