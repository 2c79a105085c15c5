"""Report figures of the concept bottleneck model (Koh et al., "Concept Bottleneck Models", ICML 2020).

:func:`cbm_report` writes, next to the confusion matrix:

* ``cbm_intervention.png``: test-time intervention efficacy (paper Sec. 5, Fig. 4): task accuracy against
  the number of concepts replaced by their true values, one line per order (random, averaged over seeds;
  uncertainty, ``|p - 0.5|`` smallest first), with the accuracy of ``f`` on the true concepts (dashed, the
  curve's ceiling) and the accuracy without intervention (dotted);
* ``cbm_explanations.png``: a few test images, each with its predicted concepts (names, probabilities,
  the true value where the data has it, wrong predictions marked) and, for a linear ``f``, each concept's
  contribution ``W[y, j] * c_j`` to the predicted class ``y`` (paper Sec. 4: ``f`` is linear on CUB);
* ``cbm_concept_auc.png``: the test ROC AUC of every concept, labelled with its name (paper Table 2 reports
  concept accuracy; AUC does not depend on a threshold and is what the run logs).

Classes are labelled with :func:`~interpzoo.reports.common.class_display_names` and concepts with the
bottleneck's names; images are shown with their own colours. The figure functions take plain tensors, so
they also draw curves and explanations computed elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from interpzoo.metrics.cbm import concept_aucs, intervention_curve
from interpzoo.models.lit_base import batch_input
from interpzoo.reports.common import (
    class_display_names,
    confusion_matrix_figure,
    image_array,
    save_figure,
    wrap_label,
)

__all__ = [
    "cbm_report",
    "collect_test",
    "concept_auc_figure",
    "concept_explanations_figure",
    "intervention_figure",
    "pick_samples",
]

_ORDER_STYLE = {"random": ("tab:blue", "o"), "uncertainty": ("tab:orange", "s")}


def cbm_report(
    module: Any,
    datamodule: Any,
    out_dir: Path,
    num_samples: int = 6,
    top_k: int = 10,
    max_batches: int | None = None,
) -> list[Path]:
    """Confusion matrix, ``cbm_intervention.png``, ``cbm_explanations.png`` and ``cbm_concept_auc.png``.

    The intervention curve is the module's last test curve (:attr:`CBMModule.intervention_curves`), or
    its validation curve, or (neither recorded, e.g. ``test=false``) computed here on the test split with
    the module's orders and seeds. The reference lines, the explained images and the AUCs come from one
    pass over the test split (``max_batches`` caps it; ``None``: all of it).

    Args:
        module: a trained :class:`~interpzoo.models.lit_cbm.CBMModule`.
        datamodule: its datamodule (test split with ``concepts``).
        out_dir: folder of the figures.
        num_samples: test images explained (the first of each true class, then the next ones).
        top_k: concepts listed per image (the largest ``|contribution|``, or the most confident for an
            MLP ``f``), plus any concept predicted wrongly among the rest, up to ``2 * top_k`` in all.
    """
    out_dir = Path(out_dir)
    net = module.net
    paths = [confusion_matrix_figure(module, datamodule, out_dir / "confusion_matrix.png")]
    ev = collect_test(module, datamodule, max_batches)
    if ev["labels"].numel() == 0:
        return paths
    class_names = class_display_names(int(net.num_classes), datamodule, module.data_info)
    concept_names = list(module.concept_names)
    # f runs where the network is (a GPU after training); dropout in f off for the measurements
    dev = module.device
    probs = torch.sigmoid(ev["concept_logits"]).to(dev)
    predicted = net.to_bottleneck(ev["concept_logits"].to(dev))
    y = ev["labels"].to(dev)
    have_targets = net.bottleneck == "sigmoid" or bool(torch.isfinite(net.concept_low).all())

    if have_targets:
        targets = net.intervention_values(ev["concepts"].to(dev))
        was_training = net.training
        net.eval()
        with torch.no_grad():
            plain_acc = float((net.predict_from_concepts(predicted).argmax(1) == y).float().mean())
            true_acc = float((net.predict_from_concepts(targets).argmax(1) == y).float().mean())
            curves, stage = _recorded_curves(module, net.n_concepts)
            if curves is None:
                stage = "test"
                cfg = getattr(module, "intervention_cfg", {})
                counts = list(range(net.n_concepts + 1))
                curves = {"counts": [float(n) for n in counts]}
                for order in cfg.get("orders", ["random", "uncertainty"]):
                    curve = intervention_curve(
                        net.predict_from_concepts,
                        predicted,
                        targets,
                        y,
                        counts,
                        order,
                        probs=probs,
                        seeds=cfg.get("seeds", [0, 1, 2]),
                    )
                    curves[order] = curve.tolist()
        net.train(was_training)
        paths.append(
            intervention_figure(
                curves,
                out_dir / "cbm_intervention.png",
                true_acc=true_acc if stage == "test" else None,
                plain_acc=plain_acc if stage == "test" else None,
                stage=stage,
            )
        )

    idx = pick_samples(ev["labels"][: ev["images"].shape[0]], num_samples)
    ex = net.explain(ev["images"][idx].to(module.device))  # eval mode for the call, then as it was
    paths.append(
        concept_explanations_figure(
            ev["images"][idx],
            ex,
            out_dir / "cbm_explanations.png",
            true_concepts=ev["concepts"][idx],
            labels=ev["labels"][idx],
            class_names=class_names,
            top_k=top_k,
        )
    )
    paths.append(
        concept_auc_figure(
            concept_aucs(probs.cpu(), ev["concepts"]), concept_names, out_dir / "cbm_concept_auc.png"
        )
    )
    return paths


def _recorded_curves(module: Any, k: int) -> tuple[dict[str, list[float]] | None, str]:
    """The module's last recorded curve (test, else val) over ``0..k`` concepts, and its stage."""
    recorded: Mapping[str, Any] = getattr(module, "intervention_curves", None) or {}
    for stage in ("test", "val"):
        curves = recorded.get(stage)
        if curves and len(curves.get("counts", [])) == k + 1:
            return dict(curves), stage
    return None, "test"


@torch.no_grad()
def collect_test(
    module: Any, datamodule: Any, max_batches: int | None = None, keep_images: int = 256
) -> dict[str, torch.Tensor]:
    """Concept logits ``(N, k)``, true bottleneck concepts ``(N, k)`` and labels ``(N,)`` of the test split,
    and its first ``keep_images`` images ``(M, C, H, W)`` (CPU; eval mode for the pass)."""
    net = module.net
    was_training = net.training
    net.eval()
    logits, concepts, labels, images = [], [], [], []
    kept = 0
    for i, batch in enumerate(datamodule.test_dataloader()):
        if max_batches is not None and i >= max_batches:
            break
        x = batch_input(batch)
        logits.append(net.predict_concepts(x.to(module.device))[0].float().cpu())
        concepts.append(module.true_concepts(batch).float().cpu())
        labels.append(batch["label"].cpu())
        if kept < keep_images:
            images.append(x[: keep_images - kept].cpu())
            kept += images[-1].shape[0]
    net.train(was_training)
    k = net.n_concepts
    if not labels:
        empty = torch.zeros(0, k)
        return {"concept_logits": empty, "concepts": empty, "labels": torch.zeros(0, dtype=torch.long)}
    return {
        "concept_logits": torch.cat(logits),
        "concepts": torch.cat(concepts),
        "labels": torch.cat(labels),
        "images": torch.cat(images),
    }


def pick_samples(labels: torch.Tensor, n: int) -> list[int]:
    """Indices of ``n`` samples: the first of each class in ``labels`` ``(N,)``, then the next ones, sorted."""
    chosen: list[int] = []
    seen: set[int] = set()
    for i, c in enumerate(labels.tolist()):
        if len(chosen) >= n:
            break
        if int(c) not in seen:
            seen.add(int(c))
            chosen.append(i)
    for i in range(labels.shape[0]):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return sorted(chosen)


def intervention_figure(
    curves: Mapping[str, Sequence[float]],
    path: Path,
    true_acc: float | None = None,
    plain_acc: float | None = None,
    stage: str = "test",
) -> Path:
    """Task accuracy against the number of intervened concepts (Koh et al. 2020, Sec. 5, Fig. 4).

    Args:
        curves: ``{"counts": [0..k], "<order>": [accuracy per count], ...}`` as
            :attr:`~interpzoo.models.lit_cbm.CBMModule.intervention_curves` holds them; every key but
            ``counts`` is one order's curve.
        true_acc: accuracy of ``f`` on the true concepts (dashed line); default: the curves' last point,
            which is that accuracy by definition (every concept replaced).
        plain_acc: accuracy without intervention (dotted line); default: the curves' first point.
        stage: the split the curves were measured on (title).
    """
    if "counts" not in curves:
        raise ValueError(
            "curves needs 'counts' (the numbers of intervened concepts) next to one list per order, as in "
            "CBMModule.intervention_curves[stage]"
        )
    counts = [float(n) for n in curves["counts"]]
    orders = [o for o in curves if o != "counts"]
    if not orders:
        raise ValueError("curves holds no order's accuracies (e.g. 'random': [...]) next to 'counts'")
    for o in orders:
        if len(curves[o]) != len(counts):
            raise ValueError(f"curve {o!r} has {len(curves[o])} points for {len(counts)} counts")
    first = [float(curves[o][0]) for o in orders]
    last = [float(curves[o][-1]) for o in orders]
    true_acc = float(np.mean(last)) if true_acc is None else float(true_acc)
    plain_acc = float(np.mean(first)) if plain_acc is None else float(plain_acc)
    k = int(max(counts)) if counts else 0
    fig = Figure(figsize=(5.6, 3.8))
    ax = fig.subplots()
    many = len(counts) > 25
    for j, o in enumerate(orders):
        color, marker = _ORDER_STYLE.get(o, (f"C{j + 2}", "^"))
        label = "random order (mean of seeds)" if o == "random" else f"{o} order"
        ax.plot(
            counts,
            [float(v) for v in curves[o]],
            color=color,
            marker=None if many else marker,
            ms=4,
            lw=1.6,
            label=label,
        )
    ax.axhline(true_acc, color="black", ls="--", lw=1.2, label=f"true concepts ({true_acc:.3f})")
    ax.axhline(plain_acc, color="grey", ls=":", lw=1.2, label=f"no intervention ({plain_acc:.3f})")
    ax.set_xlabel(f"concepts intervened on (of {k})")
    ax.set_ylabel(f"{stage} task accuracy")
    ax.set_xlim(min(counts), max(counts))
    lo = min([plain_acc, true_acc] + [float(min(curves[o])) for o in orders])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    ax.set_title("test-time intervention: concepts replaced by their true values", fontsize=9)
    return save_figure(fig, path, tight=True)


def _select_concepts(
    values: torch.Tensor, wrong: torch.Tensor | None, top_k: int
) -> tuple[list[int], list[int]]:
    """The ``top_k`` concepts with the largest ``|values|`` ``(k,)``, and the wrongly predicted concepts
    among the rest (up to ``top_k`` more), each list largest first."""
    order = values.abs().argsort(descending=True, stable=True).tolist()
    top = order[: max(1, int(top_k))]
    extra: list[int] = []
    if wrong is not None:
        extra = [j for j in order[len(top) :] if bool(wrong[j])][: max(0, int(top_k))]
    return top, extra


def concept_explanations_figure(
    images: torch.Tensor,
    explanation: Any,
    path: Path,
    true_concepts: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    top_k: int = 10,
) -> Path:
    """One row per image: the image, its predicted concepts, and each concept's contribution to the
    predicted class (linear ``f``, Koh et al. 2020 Sec. 4; ``contributions.sum() + bias`` is the logit).

    Args:
        images: ``(B, C, H, W)`` in ``[0, 1]``, shown with their own colours.
        explanation: :class:`~interpzoo.models.cbm.CBMExplanation` of ``images`` (``net.explain(images)``).
        true_concepts: optional ``(B, k)`` 0/1 (NaN where unknown): each listed concept shows its true
            value, and a predicted concept (``p > 0.5``) that disagrees is drawn red and marked ``x``.
        labels: optional ``(B,)`` true classes (image titles).
        class_names: ``C`` class names (default ``"class c"``).
        top_k: concepts listed per image (largest ``|contribution|``, or ``|p - 0.5|`` for an MLP ``f``),
            then the wrongly predicted ones among the rest (at most ``top_k`` more).
    """
    ex = explanation
    b, k = ex.concept_probs.shape
    if images.shape[0] != b:
        raise ValueError(f"{images.shape[0]} images for an explanation of {b}")
    if true_concepts is not None and tuple(true_concepts.shape) != (b, k):
        raise ValueError(f"true_concepts must be (B, k) = {(b, k)}, got {tuple(true_concepts.shape)}")
    n_cls = ex.probabilities.shape[1]
    names = [str(c) for c in class_names] if class_names is not None else [f"class {c}" for c in range(n_cls)]
    if len(names) != n_cls:
        raise ValueError(f"{len(names)} class names for {n_cls} classes")
    linear = ex.contributions is not None
    rows = []
    for i in range(b):
        p = ex.concept_probs[i].float()
        wrong = None
        if true_concepts is not None:
            t = true_concepts[i].float()
            wrong = ~torch.isnan(t) & ((p > 0.5).float() != t)
        values = ex.contributions[i].float() if linear else p - 0.5
        top, extra = _select_concepts(values, wrong, top_k)
        rows.append((top + extra, len(top), wrong))
    n_bars = max(len(r[0]) for r in rows)
    row_h = max(1.9, 0.2 * n_bars + 0.7)
    cols = 3 if linear else 2
    # constrained layout keeps the suptitle clear of the first row (tight_layout ignores suptitles)
    fig = Figure(figsize=(3.0 + 3.6 * (cols - 1), row_h * b + 0.6), layout="constrained")
    axes = fig.subplots(b, cols, squeeze=False, gridspec_kw={"width_ratios": [0.8] + [1.5] * (cols - 1)})
    for i, (shown, n_top, wrong) in enumerate(rows):
        pred = int(ex.prediction[i])
        ax = axes[i][0]
        ax.imshow(image_array(images[i]), cmap="gray" if images.shape[1] == 1 else None, vmin=0, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        title = f"pred {wrap_label(names[pred], 22)} ({float(ex.probabilities[i, pred]):.2f})"
        if labels is not None:
            title = f"true {wrap_label(names[int(labels[i])], 22)}\n{title}"
        ax.set_title(title, fontsize=6)

        labels_j, colors = [], []
        for j in shown:
            tick = str(ex.concept_names[j])
            if true_concepts is not None and not math.isnan(float(true_concepts[i, j])):
                tick += f" (true {int(true_concepts[i, j])})"
            is_wrong = wrong is not None and bool(wrong[j])
            labels_j.append(("x " if is_wrong else "") + tick)
            colors.append("tab:red" if is_wrong else "black")
        pos = list(range(len(shown)))
        # predicted concepts: the probability, with the true value as a black tick where it is known
        ax = axes[i][1]
        probs = [float(ex.concept_probs[i, j]) for j in shown]
        ax.barh(pos, probs, color=["tab:red" if c == "tab:red" else "tab:green" for c in colors], alpha=0.8)
        if true_concepts is not None:
            tv = [(y, float(true_concepts[i, j])) for y, j in enumerate(shown)]
            known = [(y, v) for y, v in tv if not math.isnan(v)]
            if known:
                ax.scatter(
                    [v for _, v in known], [y for y, _ in known], marker="|", s=90, c="black", zorder=3
                )
        ax.axvline(0.5, color="grey", lw=0.6, ls=":")
        ax.set_xlim(-0.04, 1.04)  # room for the true-value ticks at 0 and 1
        ax.set_yticks(pos, labels_j, fontsize=6)
        for tick, c in zip(ax.get_yticklabels(), colors):
            tick.set_color(c)
        ax.set_ylim(n_bars - 0.5, -0.5)
        if n_top < len(shown):  # the wrong concepts appended after the top ones
            ax.axhline(n_top - 0.5, color="grey", lw=0.5)
        ax.tick_params(axis="x", labelsize=6)
        ax.set_title("predicted concepts: p(c_j) (| true value, x wrong)", fontsize=7)
        if linear:
            ax = axes[i][2]
            contrib = [float(ex.contributions[i, j]) for j in shown]
            ax.barh(pos, contrib, color=["tab:blue" if v >= 0 else "tab:red" for v in contrib])
            ax.axvline(0.0, color="black", lw=0.5)
            ax.set_yticks(pos, [str(ex.concept_names[j]) for j in shown], fontsize=6)
            ax.set_ylim(n_bars - 0.5, -0.5)
            ax.tick_params(axis="x", labelsize=6)
            title = f"W[y, j] * c_j for y = {wrap_label(names[pred], 26)}"
            if ex.bias is not None and ex.logits is not None:
                total = float(ex.contributions[i].sum())
                rest = total - float(sum(contrib))
                title += (
                    f"\nlogit {float(ex.logits[i, pred]):.2f} = shown {sum(contrib):.2f}"
                    f" + rest {rest:.2f} + bias {float(ex.bias[i]):.2f}"
                )
            ax.set_title(title, fontsize=6)
    what = "contribution to the predicted class" if linear else "(f is an MLP: no linear contributions)"
    fig.suptitle(f"concept bottleneck explanations of test images: predicted concepts and {what}", fontsize=8)
    return save_figure(fig, path)


def concept_auc_figure(aucs: torch.Tensor, concept_names: Sequence[str], path: Path) -> Path:
    """Horizontal bars of each concept's test ROC AUC ``(k,)`` in the bottleneck's order, labelled with
    ``concept_names``; the mean over defined concepts and chance (0.5) as lines, ``n/a`` where a concept has
    no positive or no negative test image (AUC undefined, NaN)."""
    vals = [float(v) for v in torch.as_tensor(aucs).flatten().tolist()]
    if len(vals) != len(concept_names):
        raise ValueError(f"{len(vals)} AUCs for {len(concept_names)} concept names")
    k = len(vals)
    defined = [v for v in vals if math.isfinite(v)]
    fig = Figure(figsize=(6.0, max(2.5, 0.17 * k + 1.0)))
    ax = fig.subplots()
    pos = list(range(k))
    bars = [v if math.isfinite(v) else 0.0 for v in vals]
    ax.barh(pos, bars, color="tab:blue")
    for y, v in enumerate(vals):
        if not math.isfinite(v):
            ax.text(0.01, y, "n/a (one class only)", va="center", fontsize=6, color="grey")
    ax.set_yticks(pos, [str(n) for n in concept_names], fontsize=6 if k > 20 else 8)
    ax.set_ylim(k - 0.5, -0.5)
    ax.axvline(0.5, color="grey", ls=":", lw=1.0, label="chance 0.5")
    if defined:
        mean = float(np.mean(defined))
        ax.axvline(mean, color="black", ls="--", lw=1.0, label=f"mean {mean:.3f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("test ROC AUC of p(c_j) against the true concept")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title(f"concept AUC per concept ({len(defined)} of {k} defined)", fontsize=9)
    return save_figure(fig, path, tight=True)
