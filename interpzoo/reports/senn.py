"""SENN report figures: per-class relevances of test samples, concept prototypes, reconstructions.

Alvarez-Melis & Jaakkola, NeurIPS 2018, Fig. 2/3: an explanation is the pair (concepts h(x),
relevances theta(x)), and each learned concept is grounded by the training samples that activate it
most (the reference ``concept_grid``). :func:`senn_report` writes them with the confusion matrix.
Classes are labelled with :func:`~interpzoo.reports.common.class_display_names`; with ``part_scores``
each learned concept's row prints its normalised part score from the scorecard.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from interpzoo.models.lit_base import batch_input
from interpzoo.reports.common import (
    class_display_names,
    confusion_matrix_figure,
    part_score_label,
    part_scores_list,
    save_figure,
)

__all__ = [
    "concept_prototypes_figure",
    "reconstruction_figure",
    "relevance_figure",
    "senn_report",
    "top_activating",
]

_NAME, _SHORT = 24, 12  # characters of a class name in titles / in the narrow per-class panels


def senn_report(
    module: Any, datamodule: Any, out_dir: Path, part_scores: Sequence[float] | None = None
) -> list[Path]:
    """Confusion matrix, ``senn_relevances.png``, and for learned concepts ``senn_concept_prototypes.png``
    and (with a decoder) ``senn_reconstructions.png``, in ``out_dir``. ``part_scores``: optional
    normalised part score per learned concept ``(k,)``."""
    out_dir = Path(out_dir)
    cfg = module.report_cfg
    paths = [confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png")]
    paths.append(relevance_figure(module, datamodule, out_dir / "senn_relevances.png", cfg["samples"]))
    if not module.net.uses_input_concepts:
        paths.append(
            concept_prototypes_figure(
                module,
                datamodule,
                out_dir / "senn_concept_prototypes.png",
                cfg["top_k"],
                part_scores=part_scores,
            )
        )
    if getattr(module.net.conceptizer, "has_decoder", False):
        paths.append(reconstruction_figure(module, datamodule, out_dir / "senn_reconstructions.png"))
    return paths


def _image_for_display(img: torch.Tensor) -> tuple[Any, str | None]:
    """``(C, H, W)`` in ``[0, 1]`` to something ``imshow`` takes, and its colour map."""
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        return img[0].numpy(), "gray"
    return img[:3].permute(1, 2, 0).numpy(), None


def _pick_test_samples(datamodule: Any, n: int) -> dict[str, torch.Tensor]:
    """The first test sample of each class (then further ones), deterministic."""
    ds = datamodule.test_set
    chosen, seen = [], set()
    for i in range(len(ds)):
        y = int(ds[i]["label"])
        if y not in seen:
            seen.add(y)
            chosen.append(i)
        if len(chosen) >= n:
            break
    for i in range(len(ds)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return torch.utils.data.default_collate([ds[i] for i in sorted(chosen)])


@torch.no_grad()
def relevance_figure(module: Any, datamodule: Any, path: Path, num_samples: int = 6) -> Path:
    """Per-class relevances theta(x) of a few test samples (one column per sample).

    Rows: the input (image, or the largest raw feature values of a table row), the relevance of
    every concept for every class (heat map, predicted class outlined) and the contributions
    ``theta_{i,y} h_i`` to the predicted class ``y`` (they sum to its logit). For input concepts
    of images, one relevance map per class instead (one row per sample).
    """
    net = module.net
    info = module.data_info
    class_names = class_display_names(net.num_classes, datamodule, info)
    concept_names = [s[:20] for s in net.concept_names(info.get("feature_names"))]
    batch = _pick_test_samples(datamodule, num_samples)
    x = batch_input(batch).to(module.device)
    was_training = net.training
    net.eval()
    ex = net.explain(x)
    net.train(was_training)
    n, k, n_cls = ex["relevances"].shape
    titles = []
    for r in range(n):
        y_true, y_pred = int(batch["label"][r]), int(ex["prediction"][r])
        p = float(ex["probabilities"][r, y_pred])
        titles.append(f"true {class_names[y_true][:_NAME]}\npred {class_names[y_pred][:_NAME]} ({p:.2f})")

    if not net.tabular and net.uses_input_concepts:
        d, shape = net.conceptizer.num_inputs, net.input_shape
        fig = Figure(figsize=(1.5 * (1 + n_cls), 1.7 * n))
        axes = fig.subplots(n, 1 + n_cls, squeeze=False)
        for r in range(n):
            img, cmap = _image_for_display(batch_input(batch)[r])
            axes[r][0].imshow(img, cmap=cmap)
            axes[r][0].set_title(titles[r], fontsize=6)
            axes[r][0].axis("off")
            theta = ex["relevances"][r].cpu()
            vmax = float(theta[:d].abs().max()) or 1.0
            for c in range(n_cls):
                ax = axes[r][1 + c]
                ax.imshow(theta[:d, c].view(*shape).mean(0).numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                star = " *" if c == int(ex["prediction"][r]) else ""
                ax.set_title(f"theta[{class_names[c][:_SHORT]}]{star}", fontsize=6)
                ax.axis("off")
        fig.suptitle("SENN relevance of every pixel for every class (red +, blue -; * predicted)", fontsize=8)
        fig.tight_layout()
        return save_figure(fig, path)

    image_row = not net.tabular
    rows = 3 if image_row else 2
    panel_h = max(1.6, 0.16 * k + 0.8)
    heights = ([1.4] if image_row else []) + [panel_h, panel_h]
    fig = Figure(figsize=(1.2 + (0.3 * n_cls + 1.6) * n, sum(heights) + 0.8))
    axes = fig.subplots(rows, n, squeeze=False, gridspec_kw={"height_ratios": heights})
    fs = 5 if k > 12 else 6
    for r in range(n):
        col = [axes[i][r] for i in range(rows)]
        y_pred = int(ex["prediction"][r])
        if image_row:
            img, cmap = _image_for_display(batch_input(batch)[r])
            col[0].imshow(img, cmap=cmap)
            col[0].axis("off")
        theta = ex["relevances"][r].cpu()
        ax = col[-2]
        vmax = float(theta.abs().max()) or 1.0
        ax.imshow(theta.numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto")
        ax.set_xticks(range(n_cls), [c[:_NAME] for c in class_names], rotation=90, fontsize=fs)
        ax.set_yticks(range(k), concept_names if r == 0 else [""] * k, fontsize=fs)
        ax.add_patch(Rectangle((y_pred - 0.5, -0.5), 1, k, fill=False, edgecolor="black", lw=1.2))
        col[0].set_title(titles[r], fontsize=6)
        ax = col[-1]
        contrib = ex["contributions"][r].cpu()
        ax.barh(
            range(k), contrib.numpy(), color=["tab:red" if v > 0 else "tab:blue" for v in contrib.tolist()]
        )
        ax.set_ylim(k - 0.5, -0.5)
        ax.set_yticks(range(k), concept_names if r == 0 else [""] * k, fontsize=fs)
        ax.axvline(0, color="black", lw=0.5)
        ax.tick_params(axis="x", labelsize=fs)
        ax.set_xlabel(f"theta_i,y * h_i  (y = {class_names[y_pred][:_NAME]})", fontsize=fs)
    fig.suptitle(
        "SENN explanations of test samples: relevance theta per concept and class (top), "
        "contributions to the prediction (bottom)",
        fontsize=7,
    )
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def top_activating(
    module: Any, datamodule: Any, top_k: int = 8, max_samples: int = 5000
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(k, top_k)`` into the push (un-augmented training) set of the samples that activate
    each concept most, and their activations ``(k, top_k)``."""
    net = module.net
    loader = datamodule.subset_dataloader("push", range(len(datamodule.push_set)), batch_size=256)
    was_training = net.training
    net.eval()
    hs, seen = [], 0
    for batch in loader:
        hs.append(net(batch_input(batch).to(module.device)).concepts.cpu())
        seen += hs[-1].shape[0]
        if seen >= max_samples:
            break
    net.train(was_training)
    h = torch.cat(hs)
    vals, idx = h.topk(min(top_k, h.shape[0]), dim=0)
    return idx.T, vals.T


def concept_prototypes_figure(
    module: Any,
    datamodule: Any,
    path: Path,
    top_k: int = 8,
    part_scores: Sequence[float] | None = None,
) -> Path:
    """Grid of the training samples that activate each learned concept most (one row per concept).

    For tables, each row shows the standardised features of the top samples instead. ``part_scores``:
    optional normalised part score per concept ``(k,)``, printed as ``part 0.83`` in the row's first panel
    title (image data) or next to the concept's row label (tables).
    """
    net = module.net
    idx, vals = top_activating(module, datamodule, top_k)
    parts = part_scores_list(part_scores, idx.shape[0], "concepts")
    ds = datamodule.push_set
    k, t = idx.shape
    if net.tabular:
        names = module.data_info.get("feature_names") or [f"x{i}" for i in range(net.input_shape[0])]
        fig = Figure(figsize=(max(4, 0.25 * len(names)), 1.2 * k + 1))
        axes = fig.subplots(k, 1, squeeze=False)
        for i in range(k):
            feats = torch.stack([ds[int(j)]["features"] for j in idx[i]])
            z = net.normalize(feats.to(module.device)).cpu()
            ax = axes[i][0]
            ax.imshow(z.numpy(), cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto")
            ax.set_yticks([])
            ax.set_ylabel(f"c{i}" + (f"\n{part_score_label(parts, i)}" if parts else ""), fontsize=7)
            ax.set_xticks(
                range(len(names)), [n[:12] for n in names], rotation=90, fontsize=5
            ) if i == k - 1 else ax.set_xticks([])
        fig.suptitle("top activating training samples per concept (standardised features)", fontsize=8)
    else:
        fig = Figure(figsize=(1.1 * t, 1.2 * k + 0.5))
        axes = fig.subplots(k, t, squeeze=False)
        for i in range(k):
            for j in range(t):
                item = ds[int(idx[i, j])]
                img, cmap = _image_for_display(item["image"])
                ax = axes[i][j]
                ax.imshow(img, cmap=cmap)
                ax.set_xticks([])
                ax.set_yticks([])
                title = f"{float(vals[i, j]):.2f}"
                if j == 0 and parts is not None:
                    title = f"{part_score_label(parts, i)}\nact {title}"
                ax.set_title(title, fontsize=6)
                if j == 0:
                    ax.set_ylabel(f"concept {i}", fontsize=7)
        fig.suptitle("training samples that activate each concept most", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


@torch.no_grad()
def reconstruction_figure(module: Any, datamodule: Any, path: Path, n: int = 8) -> Path:
    """Test images and the concept autoencoder's reconstructions (de-normalised)."""
    net = module.net
    batch = _pick_test_samples(datamodule, n)
    x = batch_input(batch).to(module.device)
    was_training = net.training
    net.eval()
    out = net(x)
    net.train(was_training)
    recon = out.reconstruction
    norm = net.normalize
    if hasattr(norm, "std"):
        shape = (1, -1) + (1,) * (recon.dim() - 2)
        recon = recon * norm.std.view(shape) + norm.mean.view(shape)
    if net.tabular:
        fig = Figure(figsize=(6, 3))
        ax = fig.subplots(1, 1)
        ax.plot(out.reconstruction_target[0].cpu().numpy(), "o-", label="input (standardised)")
        ax.plot(out.reconstruction[0].cpu().numpy(), "x--", label="reconstruction")
        ax.legend(fontsize=7)
    else:
        m = x.shape[0]
        fig = Figure(figsize=(1.1 * m, 2.4))
        axes = fig.subplots(2, m, squeeze=False)
        for j in range(m):
            for r, t in enumerate((x[j], recon[j])):
                img, cmap = _image_for_display(t)
                axes[r][j].imshow(img, cmap=cmap)
                axes[r][j].axis("off")
        axes[0][0].set_title("input", fontsize=7, loc="left")
        axes[1][0].set_title("reconstruction", fontsize=7, loc="left")
    fig.tight_layout()
    return save_figure(fig, path)
