"""Concept bottleneck models on any backbone (Koh et al., "Concept Bottleneck Models", ICML 2020).

``y = f(g(x))``: the trunk and :class:`~interpzoo.layers.cbm.ConceptHead` form the concept predictor ``g``
(``k`` concept logits), and :class:`~interpzoo.layers.cbm.LabelPredictor` ``f`` predicts the class from the
bottleneck alone (``sigmoid(g(x))`` or the logits, ``bottleneck=``). Because ``f`` sees nothing else, a
user can correct a concept and watch the prediction change (test-time intervention, paper Sec. 5:
:meth:`CBMNet.intervene`). Training (independent, sequential, joint) is
:class:`interpzoo.models.lit_cbm.CBMModule`; the metrics are :mod:`interpzoo.metrics.cbm`.

Registered names: ``cbm`` (the architecture) and ``cbm_<backbone>`` for every backbone of the registry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from interpzoo.layers.cbm import (
    BOTTLENECKS,
    ConceptHead,
    LabelPredictor,
    bottleneck,
    intervene,
    intervention_targets,
)
from interpzoo.models.backbones import list_backbones
from interpzoo.models.explain import Explanation, _check_index, _class_label, _eval_mode
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.trunk import TrunkNet

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["CBMExplanation", "CBMNet", "CBMOutput"]


@dataclass
class CBMOutput(ClassifierOutput):
    """Output of :class:`CBMNet`.

    Attributes:
        logits: ``(B, C)`` = ``f(bottleneck)``.
        features: ``(B, D, H', W')`` trunk features.
        concept_logits: ``(B, k)`` ``g(x)``, one logit per concept.
        concepts: ``(B, k)`` the bottleneck ``f`` read: ``sigmoid(concept_logits)`` or ``concept_logits``
            (after interventions, if any).
        concept_probs: ``(B, k)`` ``sigmoid(concept_logits)`` (before interventions).
    """

    concept_logits: torch.Tensor | None = None
    concepts: torch.Tensor | None = None
    concept_probs: torch.Tensor | None = None


@dataclass
class CBMExplanation(Explanation):
    """A concept bottleneck's explanation: the predicted concepts and what each adds to the prediction.

    Attributes:
        prediction: ``(B,)``; probabilities: ``(B, C)``.
        concept_probs: ``(B, k)`` predicted probability of each concept.
        contributions: ``(B, k)`` for a linear ``f``: ``W[pred, j] * bottleneck_j``, the part of the predicted
            class's logit due to concept ``j`` (they sum to the logit minus the bias); ``None`` for an MLP.
        concept_names: ``k`` names.
        logits: ``(B, C)`` class logits ``f(bottleneck)``.
        bias: ``(B,)`` the bias of ``f`` for the predicted class (linear ``f``; ``None`` for an MLP), so that
            ``contributions.sum(1) + bias`` is the predicted class's logit.
    """

    prediction: torch.Tensor
    probabilities: torch.Tensor
    concept_probs: torch.Tensor
    contributions: torch.Tensor | None
    concept_names: list[str]
    logits: torch.Tensor | None = None
    bias: torch.Tensor | None = None

    def _draw(
        self, ax: Axes, index: int = 0, class_names: Sequence[str] | None = None, top_k: int = 12
    ) -> None:
        i = _check_index(index, self.concept_probs.shape[0])
        target = _class_label(class_names, int(self.prediction[i]))
        values = self.contributions[i] if self.contributions is not None else self.concept_probs[i]
        # the concepts that matter most for this image, largest first (k may be 100+ on CUB)
        order = values.abs().argsort(descending=True)[: max(1, int(top_k))].tolist()
        vals = values[order].detach().float().cpu()
        ax.barh(range(len(order)), vals.tolist(), color=["tab:blue" if v >= 0 else "tab:red" for v in vals])
        labels = [f"{self.concept_names[j]} (p={float(self.concept_probs[i, j]):.2f})" for j in order]
        ax.set_yticks(range(len(order)), labels)
        ax.invert_yaxis()
        ax.axvline(0.0, color="k", lw=0.5)
        if self.contributions is not None:
            title = f"concept contributions to {target}"
            if self.logits is not None and self.bias is not None:
                # the bars shown, the concepts not shown and the bias add up to the logit: say so
                shown = float(vals.sum())
                rest = float(self.contributions[i].sum()) - shown
                logit = float(self.logits[i, int(self.prediction[i])])
                title += f"\nlogit {logit:.2f} = shown {shown:.2f} + rest {rest:.2f} + bias {float(self.bias[i]):.2f}"
        else:
            title = f"concept probabilities (prediction {target})"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("W[class, j] * c_j" if self.contributions is not None else "p(c_j)")


@register_architecture("cbm")
class CBMNet(TrunkNet):
    """Concept bottleneck model ``y = f(g(x))`` on a backbone trunk (Koh et al. 2020, Sec. 3).

    Args:
        num_classes: classes ``C``.
        in_chans, mean, std, backbone: see :class:`~interpzoo.models.trunk.TrunkNet`.
        concepts: concept names, one bottleneck unit each in this order (the LightningModule fills them from
            ``model.concepts`` or the data's ``concept_names``).
        n_concepts: ``k`` when no names are given (units are then called ``concept 0..k-1``).
        bottleneck: ``sigmoid`` (``f`` reads concept probabilities) or ``logit`` (``f`` reads the logits;
            interventions then use the 5th/95th percentiles of the training logits, paper Sec. 5).
        concept_hidden: hidden sizes of the concept head (empty: one linear layer after pooling).
        predictor_hidden: hidden sizes of ``f`` (empty: linear, the paper's CUB model).
        dropout: dropout before the concept head and inside the MLPs.

    Shape:
        ``(B, in_chans, H, W)`` in ``[0, 1]`` to :class:`CBMOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        concepts: Sequence[str] | None = None,
        n_concepts: int | None = None,
        bottleneck: str = "sigmoid",
        concept_hidden: Sequence[int] = (),
        predictor_hidden: Sequence[int] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, mean, std, backbone)
        if bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {bottleneck!r}")
        if concepts is None and n_concepts is None:
            raise ValueError(
                "a concept bottleneck needs its concepts: give concepts=[names] (model.concepts, or a dataset "
                "with concept labels such as data=partshapes) or n_concepts=k"
            )
        if concepts is not None:
            names = [str(c) for c in concepts]
            if n_concepts is not None and int(n_concepts) != len(names):
                raise ValueError(f"n_concepts={n_concepts} but {len(names)} concept names were given")
            if len(set(names)) != len(names):
                raise ValueError(f"concept names repeat: {sorted({c for c in names if names.count(c) > 1})}")
        else:
            names = [f"concept {j}" for j in range(int(n_concepts))]  # type: ignore[arg-type]
        self.concepts = names
        self.n_concepts = len(names)
        self.bottleneck = bottleneck
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.concept_head = ConceptHead(self.backbone.out_channels, self.n_concepts, concept_hidden, dropout)
        self.predictor = LabelPredictor(self.n_concepts, num_classes, predictor_hidden, dropout)
        # 5th / 95th percentiles of each concept's training logits: what a logit bottleneck intervenes with
        # (paper Sec. 5). Buffers, so checkpoints and bundles carry them; NaN until measured.
        self.register_buffer("concept_low", torch.full((self.n_concepts,), float("nan")))
        self.register_buffer("concept_high", torch.full((self.n_concepts,), float("nan")))

    # -- the two halves ------------------------------------------------------------------------
    def concept_predictor_modules(self) -> list[nn.Module]:
        """The modules of ``g`` (trunk and concept head): what the sequential mode freezes for ``f``."""
        return [self.normalize, self.backbone, self.concept_head]

    def predict_concepts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(concept_logits (B, k), features (B, D, H', W'))`` = ``g(x)``."""
        feats = self.features(x)
        return self.concept_head(self.pool(feats).flatten(1)), feats

    def predict_from_concepts(self, concepts: torch.Tensor) -> torch.Tensor:
        """``f(c)``: class logits ``(B, C)`` of bottleneck values ``(B, k)`` (probabilities or logits)."""
        return self.predictor(concepts)

    def to_bottleneck(self, concept_logits: torch.Tensor) -> torch.Tensor:
        """The bottleneck values ``(B, k)`` that ``f`` reads for concept logits ``(B, k)``."""
        return bottleneck(concept_logits, self.bottleneck)

    def intervention_values(self, true_concepts: torch.Tensor) -> torch.Tensor:
        """Bottleneck values ``(B, k)`` standing for true 0/1 concepts (:func:`layers.cbm.intervention_targets`)."""
        return intervention_targets(true_concepts, self.bottleneck, self.concept_low, self.concept_high)

    @torch.no_grad()
    def set_intervention_values(self, train_concept_logits: torch.Tensor) -> None:
        """Store the 5th/95th percentiles of each concept's training logits ``(N, k)`` (paper Sec. 5)."""
        if train_concept_logits.dim() != 2 or train_concept_logits.shape[1] != self.n_concepts:
            raise ValueError(
                f"expected training concept logits (N, {self.n_concepts}), got {tuple(train_concept_logits.shape)}"
            )
        q = torch.quantile(
            train_concept_logits.float(), torch.tensor([0.05, 0.95]).to(train_concept_logits), 0
        )
        self.concept_low.copy_(q[0])
        self.concept_high.copy_(q[1])

    # -- forward -------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> CBMOutput:
        concept_logits, feats = self.predict_concepts(x)
        c = self.to_bottleneck(concept_logits)
        return CBMOutput(
            logits=self.predictor(c),
            features=feats,
            concept_logits=concept_logits,
            concepts=c,
            concept_probs=torch.sigmoid(concept_logits),
        )

    def intervene(self, x: torch.Tensor, true_concepts: torch.Tensor, mask: torch.Tensor) -> CBMOutput:
        """Predict with the concepts ``mask`` ``(B, k)`` or ``(k,)`` replaced by the truth ``(B, k)`` 0/1.

        Koh et al. (2020), Sec. 5: the intervened units take the true value (sigmoid bottleneck) or the
        5th/95th training percentile (logit bottleneck); every other unit keeps its prediction.
        """
        concept_logits, feats = self.predict_concepts(x)
        c = intervene(self.to_bottleneck(concept_logits), self.intervention_values(true_concepts), mask)
        return CBMOutput(
            logits=self.predictor(c),
            features=feats,
            concept_logits=concept_logits,
            concepts=c,
            concept_probs=torch.sigmoid(concept_logits),
        )

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> CBMExplanation:
        """Prediction, concept probabilities and (linear ``f``) each concept's share of the predicted logit.

        For a linear ``f`` (Koh et al. 2020, Sec. 4) ``contributions[i].sum() + bias[i]`` equals
        ``logits[i, prediction[i]]``. ``x``: ``(B, in_chans, H, W)`` in ``[0, 1]``; eval mode for the call.
        """
        with _eval_mode(self):
            out = self(x)
        logits = out.logits.detach().float()
        pred = logits.argmax(1)
        contributions = bias = None
        if self.predictor.linear:
            # Koh et al. (2020), Sec. 4: a linear f's logit of class y is sum_j W[y, j] c_j + b[y]
            weight = self.predictor.net.weight.float()  # (C, k)
            contributions = (weight[pred] * out.concepts.float()).cpu()
            bias = self.predictor.net.bias.float()[pred].cpu()
        return CBMExplanation(
            prediction=pred.cpu(),
            probabilities=logits.softmax(1).cpu(),
            concept_probs=out.concept_probs.detach().float().cpu(),
            contributions=contributions,
            concept_names=list(self.concepts),
            logits=logits.cpu(),
            bias=bias,
        )


for _bb in list_backbones():
    register_model(f"cbm_{_bb}", "cbm", backbone={"name": _bb})
