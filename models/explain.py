"""One explain API for every zoo model: typed explanations with ``as_dict()`` and ``plot()``.

Every zoo network has ``net.explain(x)``; what it returns depends on the method:

* ProtoPNet: :class:`models.protopnet.ProtoPNetExplanation`, one
  :class:`models.protopnet.PrototypeExplanation` per image (``ex[i]``) with the top prototypes, their
  contributions and boxes (Chen et al. 2019);
* SENN: :class:`SENNExplanation`, concepts ``h(x)`` and relevances ``theta(x)`` (Alvarez-Melis &
  Jaakkola 2018, Eq. 3);
* concept whitening: :class:`ConceptWhiteningExplanation`, the activation of every concept axis of the
  whitened layer, pooled with the layer's ``activation_mode`` (Chen et al. 2020, Sec. 3);
* interpretable CNN: :class:`ICNNExplanation`, each part filter's activation map and the image position
  of its strongest unit (Zhang et al. 2018, Sec. 3.1);
* soft autoencoder: :class:`SoftAEExplanation`, per-stage codes and their sparsity;
* black-box baseline: :class:`ClassifierExplanation`, logits and probabilities only.

Each explanation is a dataclass of CPU tensors for the whole batch; :meth:`Explanation.plot` draws one
image of it (``index=0``) on a matplotlib axes (or a new :class:`~matplotlib.figure.Figure`, made without
pyplot, so it neither needs nor changes a backend), returns the figure and optionally writes a PNG.
Drawers take ``class_names=[...]`` (e.g. ``net.data_config["class_names"]`` or PartShapes'
``renderer.class_display_names``) to label classes by name instead of by index, and the prototype and
part-filter drawers take ``part_scores=[...]`` (one normalised part score per prototype/filter, from the
ground-truth scorecard) to print ``part 0.83`` next to each unit they mark.

>>> ex = net.explain(x)          # doctest: +SKIP
>>> ex.plot(index=1, path="explanation.png")  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "ClassifierExplanation",
    "ConceptWhiteningExplanation",
    "Explanation",
    "ICNNExplanation",
    "SENNExplanation",
    "SoftAEExplanation",
    "explain",
    "explain_classifier",
    "explain_concept_whitening",
    "explain_icnn",
    "explain_soft_autoencoder",
    "explanation_figure_class",
]


@dataclass
class Explanation:
    """Base of every typed explanation.

    Subclasses are dataclasses and implement :meth:`_draw`.
    """

    def as_dict(self) -> dict[str, Any]:
        """``{field name: value}`` (tensors as they are, nested dicts kept)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def plot(self, ax: Axes | None = None, path: str | Path | None = None, **kwargs: Any) -> Figure:
        """Draw the explanation and return its figure.

        Args:
            ax: axes to draw on; ``None`` makes a new :class:`~matplotlib.figure.Figure` (no pyplot, so it
                works headless and leaves no global state).
            path: if given, the figure is also written there (PNG by the suffix).
            **kwargs: method-specific options (e.g. ``index`` of the image in a batch explanation).
        """
        if ax is None:
            fig = explanation_figure_class()(figsize=(5, 3.5), layout="constrained")
            ax = fig.subplots()
        else:
            fig = ax.figure
        self._draw(ax, **kwargs)
        if path is not None:
            fig.savefig(str(path), dpi=100)
        return fig

    def _draw(self, ax: Axes, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not implement _draw(ax)")


@functools.cache
def explanation_figure_class() -> type[Figure]:
    """:class:`ExplanationFigure`, made on first use (``import interpzoo`` does not import matplotlib).

    ``ExplanationFigure`` is a plain :class:`~matplotlib.figure.Figure` that also renders itself as PNG
    (``_repr_png_``), so ``net.explain(x).plot()`` as the last expression of a Jupyter cell shows the figure
    whatever the backend, without pyplot and without ``%matplotlib inline``; elsewhere it is an ordinary
    figure (``savefig``, ``add_subplot``, ...).
    """
    import io

    from matplotlib.figure import Figure

    class ExplanationFigure(Figure):
        __module__ = __name__
        __qualname__ = "ExplanationFigure"

        def _repr_png_(self) -> bytes:
            buf = io.BytesIO()
            self.savefig(buf, format="png", dpi=100)
            return buf.getvalue()

    globals()["ExplanationFigure"] = ExplanationFigure  # so that pickle finds the class
    return ExplanationFigure


def _check_index(index: int, batch: int) -> int:
    if not -batch <= index < batch:
        raise IndexError(f"index {index} is out of range for an explanation of {batch} images")
    return index % batch


def _barh(ax: Axes, labels: Sequence[str], values: torch.Tensor, title: str, xlabel: str) -> None:
    vals = values.detach().float().cpu().tolist()
    colors = ["tab:blue" if v >= 0 else "tab:red" for v in vals]
    ax.barh(range(len(vals)), vals, color=colors)
    ax.set_yticks(range(len(vals)), [str(s) for s in labels])
    ax.invert_yaxis()
    ax.axvline(0.0, color="k", lw=0.5)
    ax.set_title(title)
    ax.set_xlabel(xlabel)


def _class_label(class_names: Sequence[str] | None, c: int) -> str:
    """Name of class ``c`` (``"class 3"`` without names, or for an index outside them)."""
    return str(class_names[c]) if class_names is not None and 0 <= c < len(class_names) else f"class {c}"


def _part_label(part_scores: Sequence[float] | None, i: int) -> str:
    """``" part 0.83"`` for unit ``i``, ``""`` without scores (``interpzoo.reports.common.part_score_label``;
    network files may not import the reports package)."""
    if part_scores is None:
        return ""
    v = float(part_scores[i])
    return f" part {v:.2f}" if math.isfinite(v) else " part n/a"


def _imshow(ax: Axes, image: torch.Tensor) -> None:
    """Show a ``(C, H, W)`` image in ``[0, 1]`` (grey for one channel)."""
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img[:3].permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


@contextlib.contextmanager
def _eval_mode(net: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration (explanations use running statistics; training mode would update them)."""
    was_training = net.training
    net.eval()
    try:
        yield net
    finally:
        net.train(was_training)


# ---------------------------------------------------------------------------------------------
# ProtoPNet (the dataclass lives in models.protopnet; this draws it)
# ---------------------------------------------------------------------------------------------
def draw_prototype_explanation(
    ex: Any,
    ax: Axes,
    image: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    part_scores: Sequence[float] | None = None,
) -> None:
    """ "This looks like that" on one axes: with ``image`` ``(C, H, W)`` the image and each prototype's
    high-activation box, otherwise the bar chart of the contributions ``W[target, j] * s_j``.

    Args:
        class_names: optional name per class (labels and title use them instead of indices).
        part_scores: optional normalised part score per prototype ``(P,)``, indexed by prototype number,
            printed after each prototype's label.
    """
    labels = [
        f"p{int(j)} ({_class_label(class_names, int(c))}){_part_label(part_scores, int(j))}"
        for j, c in zip(ex.prototypes, ex.prototype_classes)
    ]
    title = f"{_class_label(class_names, int(ex.target))}: logit {ex.logit:.3g}"
    if image is None:
        _barh(ax, labels, ex.contributions, title, "contribution")
        return
    from matplotlib.patches import Rectangle

    _imshow(ax, image)
    for rank, (box, label) in enumerate(zip(ex.boxes.tolist(), labels)):
        x0, y0, x1, y1 = box
        color = f"C{rank % 10}"
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
        ax.text(x0, y0, label, color=color, fontsize=6, va="bottom")
    ax.set_title(title)


# ---------------------------------------------------------------------------------------------
# Plain classifiers
# ---------------------------------------------------------------------------------------------
@dataclass
class ClassifierExplanation(Explanation):
    """What a black-box classifier offers: its scores (``models.baseline``).

    Attributes:
        logits: ``(B, K)``.
        probabilities: ``(B, K)`` softmax of the logits.
        prediction: ``(B,)`` argmax class.
        class_names: optional ``K`` names.
    """

    logits: torch.Tensor
    probabilities: torch.Tensor
    prediction: torch.Tensor
    class_names: list[str] | None = None

    def _draw(self, ax: Axes, index: int = 0, class_names: Sequence[str] | None = None) -> None:
        i = _check_index(index, self.logits.shape[0])
        k = self.probabilities.shape[1]
        given = class_names or self.class_names
        names = [_class_label(given, c) for c in range(k)]
        _barh(
            ax, names, self.probabilities[i], f"prediction: {names[int(self.prediction[i])]}", "probability"
        )


@torch.no_grad()
def explain_classifier(net: nn.Module, x: torch.Tensor) -> ClassifierExplanation:
    """Logits and probabilities of any zoo classifier (eval mode during the call)."""
    with _eval_mode(net):
        logits = net(x).logits.detach().float().cpu()
    return ClassifierExplanation(logits=logits, probabilities=logits.softmax(1), prediction=logits.argmax(1))


# ---------------------------------------------------------------------------------------------
# SENN
# ---------------------------------------------------------------------------------------------
@dataclass
class SENNExplanation(Explanation):
    """SENN's explanation: concepts ``h(x)`` and relevances ``theta(x)`` (Alvarez-Melis & Jaakkola 2018, Eq. 3).

    Also readable as a mapping (``ex["relevances"]``), which is what ``SENN.explain`` returned before.

    Attributes:
        prediction: ``(B,)``.
        probabilities: ``(B, C)``.
        concepts: ``(B, k)`` concept activations ``h(x)``.
        relevances: ``(B, k, C)`` relevances ``theta(x)``.
        relevance: ``(B, k)`` relevance of each concept for the predicted class.
        contributions: ``(B, k)`` ``relevance * concepts`` (they sum to the predicted logit).
        concept_names: ``k`` names.
    """

    prediction: torch.Tensor
    probabilities: torch.Tensor
    concepts: torch.Tensor
    relevances: torch.Tensor
    relevance: torch.Tensor
    contributions: torch.Tensor
    concept_names: list[str] | None = None

    _KEYS = ("prediction", "probabilities", "concepts", "relevances", "relevance", "contributions")

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._KEYS:
            raise KeyError(f"{key!r}; SENN explanations have {list(self._KEYS)}")
        return getattr(self, key)

    def keys(self) -> tuple[str, ...]:
        return self._KEYS

    def _draw(self, ax: Axes, index: int = 0, class_names: Sequence[str] | None = None) -> None:
        i = _check_index(index, self.concepts.shape[0])
        k = self.concepts.shape[1]
        names = self.concept_names or [f"concept {j}" for j in range(k)]
        target = _class_label(class_names, int(self.prediction[i]))
        _barh(ax, names, self.relevance[i], f"relevances for {target}", "theta")


# ---------------------------------------------------------------------------------------------
# Concept whitening
# ---------------------------------------------------------------------------------------------
@dataclass
class ConceptWhiteningExplanation(Explanation):
    """Concept-axis activations of the whitened layer (Chen, Bei & Rudin 2020, Sec. 3).

    Attributes:
        logits: ``(B, K)``; prediction: ``(B,)``.
        concept_names: names of axes ``0..k-1``.
        concept_activations: ``(B, k)`` ``phi(z_j)`` of each concept axis (``activation_mode`` pooling).
        axis_maps: ``(B, k, H, W)`` the whitened map of each concept axis.
        layer: the whitened layer's name in the trunk; activation_mode: the pooling ``phi``.
    """

    logits: torch.Tensor
    prediction: torch.Tensor
    concept_names: list[str]
    concept_activations: torch.Tensor
    axis_maps: torch.Tensor
    layer: str = ""
    activation_mode: str = "pool_max"

    def by_concept(self, index: int = 0) -> dict[str, float]:
        """``{concept name: activation}`` of image ``index``."""
        i = _check_index(index, self.concept_activations.shape[0])
        return {n: float(v) for n, v in zip(self.concept_names, self.concept_activations[i])}

    def _draw(self, ax: Axes, index: int = 0, class_names: Sequence[str] | None = None) -> None:
        i = _check_index(index, self.concept_activations.shape[0])
        pred = int(self.prediction[i])
        pred_label = _class_label(class_names, pred) if class_names else str(pred)
        _barh(
            ax,
            self.concept_names,
            self.concept_activations[i],
            f"concept axes of {self.layer} (prediction {pred_label})",
            f"activation ({self.activation_mode})",
        )


@torch.no_grad()
def explain_concept_whitening(net: Any, x: torch.Tensor) -> ConceptWhiteningExplanation:
    """:class:`ConceptWhiteningExplanation` of a :class:`models.concept_whitening.ConceptWhiteningNet`."""
    if not net.concepts:
        raise ValueError(
            "this concept-whitening network has no concept names (construct it with concepts=[...])"
        )
    with _eval_mode(net):
        out = net(x)
    k = len(net.concepts)
    logits = out.logits.detach().float().cpu()
    return ConceptWhiteningExplanation(
        logits=logits,
        prediction=logits.argmax(1),
        concept_names=list(net.concepts),
        concept_activations=out.concept_activations.detach().float().cpu(),
        axis_maps=out.whitened[:, :k].detach().float().cpu(),
        layer=net.whitened_names[0],
        activation_mode=net.activation_mode,
    )


# ---------------------------------------------------------------------------------------------
# Interpretable CNN
# ---------------------------------------------------------------------------------------------
@dataclass
class ICNNExplanation(Explanation):
    """Part positions of the interpretable filters (Zhang, Wu & Zhu 2018, Sec. 3.1).

    Attributes:
        logits: ``(B, K)``; prediction: ``(B,)``.
        layer: the interpretable layer explained (``icnn1``, ...).
        activation_maps: ``(B, C, h, w)`` each filter's map after ReLU, before the part mask.
        scores: ``(B, C)`` each filter's strongest activation.
        positions: ``(B, C, 2)`` ``(x, y)`` image-pixel centre of that unit: ``x = (j + 0.5) * stride_x``.
        stride: ``(stride_y, stride_x)`` image pixels per map cell.
        filter_classes: ``(C,)`` the category each filter serves (``-1`` if it serves none / unknown).
        images: ``(B, C_in, H, W)`` the explained images (for drawing).
    """

    logits: torch.Tensor
    prediction: torch.Tensor
    layer: str
    activation_maps: torch.Tensor
    scores: torch.Tensor
    positions: torch.Tensor
    stride: tuple[float, float]
    filter_classes: torch.Tensor
    images: torch.Tensor

    def _draw(
        self,
        ax: Axes,
        index: int = 0,
        top_k: int = 5,
        class_names: Sequence[str] | None = None,
        part_scores: Sequence[float] | None = None,
    ) -> None:
        """Image ``index`` with the ``top_k`` strongest filters' positions; ``part_scores`` ``(C,)``: the
        normalised part score of each filter of :attr:`layer`, printed after its label."""
        i = _check_index(index, self.images.shape[0])
        _imshow(ax, self.images[i])
        top = self.scores[i].topk(min(top_k, self.scores.shape[1])).indices
        for rank, f in enumerate(top.tolist()):
            px, py = self.positions[i, f].tolist()
            ax.scatter([px - 0.5], [py - 0.5], s=40, color=f"C{rank % 10}", edgecolors="w")
            ax.text(px, py, f"f{f}{_part_label(part_scores, f)}", color=f"C{rank % 10}", fontsize=7)
        pred = int(self.prediction[i])
        pred_label = _class_label(class_names, pred) if class_names else str(pred)
        ax.set_title(f"{self.layer}: top {len(top)} part filters (prediction {pred_label})")


@torch.no_grad()
def explain_icnn(net: Any, x: torch.Tensor, layer: str | None = None) -> ICNNExplanation:
    """:class:`ICNNExplanation` of a :class:`models.icnn.ICNNNet` (default: its last interpretable layer)."""
    with _eval_mode(net):
        out = net(x)
    names = list(out.part_features)
    layer = names[-1] if layer is None else layer
    if layer not in out.part_features:
        raise ValueError(f"unknown interpretable layer {layer!r}; this network has {names}")
    maps = out.part_features[layer].detach().float().cpu()
    b, c, h, w = maps.shape
    sy, sx = x.shape[-2] / h, x.shape[-1] / w
    scores, idx = maps.flatten(2).max(-1)
    rows, cols = (idx // w).float(), (idx % w).float()
    positions = torch.stack([(cols + 0.5) * sx, (rows + 0.5) * sy], -1)
    classes = torch.full((c,), -1, dtype=torch.long)
    if layer in net.assignments:  # FilterAssignment keeps each filter's category in a buffer
        classes = net.assignments[layer].filter_class.detach().long().cpu()
    logits = out.logits.detach().float().cpu()
    return ICNNExplanation(
        logits=logits,
        prediction=logits.argmax(1),
        layer=layer,
        activation_maps=maps,
        scores=scores,
        positions=positions,
        stride=(sy, sx),
        filter_classes=classes,
        images=x.detach().float().cpu(),
    )


# ---------------------------------------------------------------------------------------------
# Soft autoencoder
# ---------------------------------------------------------------------------------------------
@dataclass
class SoftAEExplanation(Explanation):
    """Per-stage codes of the soft-threshold autoencoder and their sparsity.

    Attributes:
        reconstruction: ``(B, C, H, W)``.
        reconstruction_error: ``(B,)`` mean squared error against the input.
        codes: ``{stage: (B, C_i, H_i, W_i)}``.
        sparsity: ``{stage: (B,)}`` fraction of exactly-zero code coefficients per image.
        thresholds: ``{stage: (C_i,)}`` the learned soft thresholds (empty for ReLU/linear stages).
    """

    reconstruction: torch.Tensor
    reconstruction_error: torch.Tensor
    codes: dict[str, torch.Tensor] = field(default_factory=dict)
    sparsity: dict[str, torch.Tensor] = field(default_factory=dict)
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)

    def _draw(self, ax: Axes, index: int = 0) -> None:
        i = _check_index(index, self.reconstruction.shape[0])
        stages = list(self.sparsity)
        ax.bar(range(len(stages)), [float(self.sparsity[s][i]) for s in stages], color="tab:blue")
        ax.set_xticks(range(len(stages)), stages)
        ax.set_ylim(0, 1)
        ax.set_ylabel("fraction of zero coefficients")
        ax.set_title(f"code sparsity (MSE {float(self.reconstruction_error[i]):.3g})")


@torch.no_grad()
def explain_soft_autoencoder(net: Any, x: torch.Tensor) -> SoftAEExplanation:
    """:class:`SoftAEExplanation` of a :class:`models.soft_autoencoder.SoftAutoencoder`."""
    with _eval_mode(net):
        out = net(x)
    codes = {k: v.detach().float().cpu() for k, v in (out.codes or {}).items()}
    recon = out.reconstruction.detach().float().cpu()
    return SoftAEExplanation(
        reconstruction=recon,
        reconstruction_error=(recon - x.detach().float().cpu()).pow(2).flatten(1).mean(1),
        codes=codes,
        sparsity={k: (v == 0).flatten(1).float().mean(1) for k, v in codes.items()},
        thresholds={k: v.float().cpu() for k, v in net.thresholds().items()},
    )


def explain(net: nn.Module, x: torch.Tensor, **kwargs: Any) -> Any:
    """``net.explain(x, **kwargs)``, with a clear error for networks without one."""
    method = getattr(net, "explain", None)
    if method is None:
        raise TypeError(f"{type(net).__name__} has no explain(x); zoo networks do (see models.explain)")
    return method(x, **kwargs)
