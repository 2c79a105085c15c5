"""Helpers of every report module and the figure every classifier gets: the test confusion matrix.

Figures are drawn with matplotlib's object-oriented API (``Figure(...)``, ``fig.savefig(path)``), which
needs no backend and leaves a user's pyplot state and backend untouched.

Shared drawing conventions (issue 13, "the figures let a person see the evidence"):

* :func:`overlay_heat` shows where a unit fires *without* washing the image in a colour map: PartShapes
  classes differ by their parts' colours, and a ``jet`` wash at alpha 0.4 shifts every pixel towards blue
  (low activation) or red (high), hiding exactly that evidence. The image is drawn untouched and the
  heat map as contour lines (or with the pixels outside the high-activation region dimmed).
* :func:`class_display_names` labels classes by what they look like (``"c3: green circle head"``,
  :attr:`~interpzoo.datamodules.partshapes.PartShapesRenderer.class_display_names`) instead of ``class_03``.
* :func:`part_score_label` prints a prototype's or filter's normalised part score (from the ground-truth
  scorecard, :mod:`interpzoo.scorecard`) in its panel title when the caller passes ``part_scores``.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from interpzoo.models.lit_base import batch_input

__all__ = [
    "class_display_names",
    "classification_report",
    "confusion_matrix_figure",
    "image_array",
    "overlay_heat",
    "part_score_label",
    "part_scores_list",
    "predict_split",
    "save_figure",
    "upsample_heat",
    "with_part_score",
    "wrap_label",
]


def save_figure(fig: Figure, path: Path, dpi: int = 100, tight: bool = False) -> Path:
    """Write ``fig`` as a PNG at ``path`` (parent folders created); ``tight`` runs ``tight_layout`` first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path


@torch.no_grad()
def predict_split(
    module: Any, loader: Any, max_batches: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(labels, predictions)``, each ``(N,)``, of ``module`` over ``loader`` (eval mode, no gradients)."""
    was_training = module.training
    module.eval()
    ys, ps = [], []
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        x = batch_input(batch).to(module.device)
        ps.append(module(x).logits.argmax(1).cpu())
        ys.append(batch["label"])
    module.train(was_training)
    return torch.cat(ys), torch.cat(ps)


def confusion_matrix_figure(module: Any, datamodule: Any, path: Path, max_batches: int | None = 50) -> Path:
    """Confusion matrix of the test split, rows = true class, normalised per row."""
    y, p = predict_split(module, datamodule.test_dataloader(), max_batches)
    k = int(module.data_info.get("num_classes") or int(max(y.max(), p.max())) + 1)
    cm = torch.zeros(k, k)
    cm.index_put_((y, p), torch.ones_like(y, dtype=torch.float), accumulate=True)
    cm = cm / cm.sum(1, keepdim=True).clamp(min=1)
    names = class_display_names(k, datamodule, module.data_info)
    # room for the tick labels: display names run to ~30 characters at fontsize 7 (~0.06 in each)
    side = 1 + 0.45 * k + 0.06 * max((len(n) for n in names), default=0)
    fig = Figure(figsize=(side, side))
    ax = fig.subplots()
    ax.imshow(cm.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"test accuracy {float((y == p).float().mean()):.3f}")
    return save_figure(fig, path, tight=True)


def classification_report(module: Any, datamodule: Any, out_dir: Path) -> list[Path]:
    """``confusion_matrix.png`` in ``out_dir``: the report of a plain classifier."""
    return [confusion_matrix_figure(module, datamodule, Path(out_dir) / "confusion_matrix.png")]


# ---------------------------------------------------------------------------------------------
# Heat overlays that keep the image's colours
# ---------------------------------------------------------------------------------------------
def image_array(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """A displayable float array in ``[0, 1]``: ``(H, W, 3)`` for colour, ``(H, W)`` for grey.

    Accepts a tensor ``(C, H, W)`` (``C`` = 1 or 3; more channels: the first three) or an array already
    laid out as ``(H, W)``, ``(H, W, 1)`` or ``(H, W, 3)``.
    """
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 3:
            t = t[0] if t.shape[0] == 1 else t[:3].permute(1, 2, 0)
        arr = t.numpy()
    else:
        raw = np.asarray(image)
        arr = raw.astype(np.float64)
        if raw.dtype.kind in "ui":  # a rendered uint8 image (0..255)
            arr = arr / 255.0
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return np.clip(arr, 0.0, 1.0)


def upsample_heat(heat: torch.Tensor | np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A heat map ``(h, w)`` (or ``(1, h, w)``) bilinearly resized to ``size = (H, W)``, as float64.

    ``align_corners=False``: each map cell covers an ``H/h x W/w`` block of pixels and its value lands on
    the block's centre, so a contour around a cell encloses the pixels that cell sees most directly.
    """
    h = torch.as_tensor(np.asarray(heat) if not isinstance(heat, torch.Tensor) else heat.detach())
    h = h.float().cpu().reshape(h.shape[-2], h.shape[-1])
    if tuple(h.shape) != tuple(size):
        h = F.interpolate(h[None, None], size=tuple(size), mode="bilinear", align_corners=False)[0, 0]
    return h.double().numpy()


def overlay_heat(
    ax: Any,
    image: torch.Tensor | np.ndarray,
    heat: torch.Tensor | np.ndarray | None = None,
    mode: str = "contour",
    levels: Sequence[float] = (0.5, 0.75, 0.9),
    vmin: float | None = None,
    vmax: float | None = None,
    dim: float = 0.35,
    color: str = "white",
) -> None:
    """Draw ``image`` with its own colours and mark where ``heat`` is high.

    The image is shown pixel for pixel (``interpolation="nearest"``). The heat map is resized to the image
    (:func:`upsample_heat`), scaled to ``[0, 1]`` by ``(heat - vmin) / (vmax - vmin)`` (default: the map's
    own minimum and maximum; pass a shared ``vmax`` to compare several images of one unit), and then

    * ``mode="contour"``: drawn as contour lines at ``levels`` (thicker at higher levels, a dark halo so
      they read on light parts too); every pixel off the lines keeps the image's colour;
    * ``mode="mask"``: the pixels below ``levels[0]`` are multiplied by ``dim`` (darkened, hue kept), the
      high-activation region is left as it is, and its outline is drawn at ``levels[0]``.

    This replaces the ``jet`` wash at alpha 0.4 of Chen et al. 2019's reference ``push.py``/
    ``local_analysis.py`` (and of earlier versions of these reports), which turned every PartShapes image
    blue and hid the part colours that separate the classes.

    Args:
        ax: matplotlib axes.
        image: ``(C, H, W)`` tensor or ``(H, W[, C])`` array in ``[0, 1]`` (see :func:`image_array`).
        heat: ``(h, w)`` activation map, any resolution; ``None`` draws the image only.
        mode: ``"contour"`` or ``"mask"``.
        levels: increasing fractions of the scaled heat at which lines are drawn.
        vmin, vmax: the heat values mapped to 0 and 1.
        dim: brightness factor of the pixels outside the high-activation region (``mode="mask"``).
        color: colour of the contour lines.
    """
    if mode not in ("contour", "mask"):
        raise ValueError(f"mode must be 'contour' or 'mask', got {mode!r}")
    arr = image_array(image)
    grey = arr.ndim == 2
    if heat is None:
        ax.imshow(arr, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    h = upsample_heat(heat, arr.shape[:2])
    lo = float(h.min()) if vmin is None else float(vmin)
    hi = float(h.max()) if vmax is None else float(vmax)
    flat = hi - lo <= 1e-12 or not math.isfinite(hi - lo)
    scaled = np.zeros_like(h) if flat else np.clip((h - lo) / (hi - lo), 0.0, 1.0)
    lv = sorted(float(v) for v in levels)
    if mode == "mask" and not flat and lv:
        keep = scaled >= lv[0]
        factor = np.where(keep, 1.0, float(dim))
        arr = arr * (factor if grey else factor[..., None])  # a multiplicative dim keeps each pixel's hue
        lv = lv[:1]
    ax.imshow(arr, cmap="gray" if grey else None, vmin=0, vmax=1, interpolation="nearest")
    # contour warns on levels outside the data; a constant map (a dead unit) gets no lines at all
    lv = [v for v in lv if float(scaled.min()) < v < float(scaled.max())]
    if lv and not flat:
        from matplotlib import patheffects

        widths = [0.7 + 0.6 * i for i in range(len(lv))]
        cs = ax.contour(scaled, levels=lv, colors=color, linewidths=widths)
        cs.set_path_effects(
            [patheffects.withStroke(linewidth=max(widths) + 1.2, foreground="black", alpha=0.6)]
        )
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------------------------
# Labels: class names and part scores
# ---------------------------------------------------------------------------------------------
def class_display_names(
    num_classes: int, datamodule: Any = None, info: Mapping[str, Any] | None = None
) -> list[str]:
    """Readable labels of ``num_classes`` classes for figures.

    In order of preference: the renderer's
    :attr:`~interpzoo.datamodules.partshapes.PartShapesRenderer.class_display_names` (``datamodule`` or a
    dataset with a ``renderer``; used only if ``info["class_hash"]``, when present, is the renderer's, so a
    network trained on other classes is not mislabelled), then ``info["class_names"]`` (a module's
    ``data_info`` or a network's ``data_config``), then the datamodule's ``class_names``, then ``"0"``,
    ``"1"``, ... .
    """
    info = info or {}
    renderer = getattr(datamodule, "renderer", None)
    names = getattr(renderer, "class_display_names", None)
    if names is not None and len(names) == num_classes:
        want = info.get("class_hash")
        if want is None or want == getattr(renderer, "class_hash", None):
            return [str(n) for n in names]
    for given in (info.get("class_names"), getattr(datamodule, "class_names", None)):
        if given is not None and len(given) == num_classes:
            return [str(n) for n in given]
    return [str(c) for c in range(num_classes)]


def wrap_label(text: str, width: int = 18) -> str:
    """``text`` broken into lines of at most ``width`` characters (at spaces) for narrow panels."""
    return textwrap.fill(str(text), width=width, break_long_words=False) or str(text)


def part_scores_list(
    part_scores: Sequence[float] | torch.Tensor | np.ndarray | None, n: int, what: str = "units"
) -> list[float] | None:
    """``part_scores`` as ``n`` floats (``None`` stays ``None``); a wrong length is a ``ValueError``."""
    if part_scores is None:
        return None
    if isinstance(part_scores, torch.Tensor | np.ndarray):
        part_scores = part_scores.tolist()
    vals = [float(v) for v in part_scores]
    if len(vals) != n:
        raise ValueError(f"part_scores has {len(vals)} values for {n} {what}; pass one score for each")
    return vals


def part_score_label(part_scores: Sequence[float] | None, i: int) -> str:
    """``"part 0.83"`` for unit ``i`` (``"part n/a"`` if its score is not finite), ``""`` without scores.

    The score is the unit's *normalised* part score from the scorecard (``(raw - random) / (ceiling -
    random)``, :class:`interpzoo.metrics.calibration.Score`): 1 is the oracle, 0 a random unit.
    """
    if part_scores is None:
        return ""
    v = float(part_scores[i])
    return f"part {v:.2f}" if math.isfinite(v) else "part n/a"


def with_part_score(title: str, part_scores: Sequence[float] | None, i: int, sep: str = "\n") -> str:
    """``title`` followed by :func:`part_score_label` (on a new line by default); unchanged without scores."""
    label = part_score_label(part_scores, i)
    return f"{title}{sep}{label}" if label and title else (label or title)
