"""Concept bottleneck pieces (Koh et al., "Concept Bottleneck Models", ICML 2020). Pure PyTorch.

A concept bottleneck model predicts ``y = f(g(x))``: ``g`` maps an input to ``k`` concept logits and the
label predictor ``f`` sees *only* the concepts (paper Sec. 3). The pieces here:

* :class:`ConceptHead`: pooled trunk features ``(B, D)`` to ``k`` concept logits (the last layer of ``g``);
* :class:`LabelPredictor`: concepts ``(B, k)`` to class logits, linear by default (the paper's CUB ``f``)
  or an MLP (its OAI ``f``);
* :func:`bottleneck`: what ``f`` reads, ``sigmoid(logits)`` (probabilities) or the logits themselves;
* :func:`intervention_targets` and :func:`intervene`: test-time interventions (Sec. 5), replacing the
  predicted concepts of a chosen set by the true ones;
* :func:`concept_loss` and :func:`joint_loss`: ``sum_j BCE(c_j)`` and ``CE(y) + lambda * sum_j BCE(c_j)``
  (Sec. 3, the joint bottleneck).

Training schedules (independent, sequential, joint) are in :mod:`interpzoo.models.lit_cbm`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BOTTLENECKS",
    "ConceptHead",
    "LabelPredictor",
    "bottleneck",
    "concept_loss",
    "intervene",
    "intervention_targets",
    "joint_loss",
]

#: what the label predictor reads: concept probabilities or concept logits
BOTTLENECKS = ("sigmoid", "logit")


def _mlp(in_features: int, hidden: Sequence[int], out_features: int, dropout: float) -> nn.Module:
    if not hidden:
        return nn.Linear(in_features, out_features)
    layers: list[nn.Module] = []
    d = in_features
    for h in hidden:
        layers += [nn.Linear(d, int(h)), nn.ReLU(), nn.Dropout(dropout)]
        d = int(h)
    layers.append(nn.Linear(d, out_features))
    return nn.Sequential(*layers)


class ConceptHead(nn.Module):
    """The last part of the concept predictor ``g``: features ``(B, D)`` to ``k`` concept logits.

    Koh et al. (2020), Sec. 3: ``g`` is the backbone with its final layer replaced by ``k`` outputs, one
    logit per binary concept. ``hidden`` adds ReLU layers before that output (empty: one linear layer).

    Shape:
        ``(B, in_features)`` to ``(B, n_concepts)``.
    """

    def __init__(
        self, in_features: int, n_concepts: int, hidden: Sequence[int] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        if n_concepts < 1:
            raise ValueError(f"a concept bottleneck needs at least one concept, got n_concepts={n_concepts}")
        self.in_features, self.n_concepts = int(in_features), int(n_concepts)
        self.dropout = nn.Dropout(dropout)
        self.net = _mlp(self.in_features, list(hidden), self.n_concepts, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(self.dropout(features))


class LabelPredictor(nn.Module):
    """The label predictor ``f``: concepts ``(B, k)`` to class logits ``(B, C)``.

    Koh et al. (2020), Sec. 3 and 4: linear on CUB (each class logit is a weighted sum of concepts, so a
    weight reads as "how much concept ``j`` argues for class ``c``"), an MLP where the task needs it
    (``hidden=[...]``).

    Shape:
        ``(B, n_concepts)`` to ``(B, num_classes)``.
    """

    def __init__(
        self, n_concepts: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.n_concepts, self.num_classes = int(n_concepts), int(num_classes)
        self.linear = not hidden
        self.net = _mlp(self.n_concepts, list(hidden), self.num_classes, dropout)

    def forward(self, concepts: torch.Tensor) -> torch.Tensor:
        if concepts.dim() != 2 or concepts.shape[1] != self.n_concepts:
            raise ValueError(
                f"the label predictor takes concepts (B, {self.n_concepts}), got {tuple(concepts.shape)}"
            )
        return self.net(concepts)


def bottleneck(concept_logits: torch.Tensor, kind: str = "sigmoid") -> torch.Tensor:
    """What ``f`` reads from concept logits ``(B, k)``: ``sigmoid`` probabilities or the ``logit`` values."""
    if kind == "sigmoid":
        return torch.sigmoid(concept_logits)
    if kind == "logit":
        return concept_logits
    raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {kind!r}")


def intervention_targets(
    true_concepts: torch.Tensor,
    kind: str = "sigmoid",
    low: torch.Tensor | None = None,
    high: torch.Tensor | None = None,
) -> torch.Tensor:
    """The bottleneck value that stands for each true concept ``(B, k)`` in ``{0, 1}``.

    Koh et al. (2020), Sec. 5: a sigmoid bottleneck takes the true 0/1 value; a logit bottleneck takes the
    5th percentile of concept ``j``'s logits over the training set when ``c_j = 0`` and the 95th when
    ``c_j = 1`` (``low``/``high`` ``(k,)``, :attr:`interpzoo.models.cbm.CBMNet.concept_low`).
    """
    c = true_concepts.float()
    if kind == "sigmoid":
        return c
    if kind != "logit":
        raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {kind!r}")
    if low is None or high is None or not (torch.isfinite(low).all() and torch.isfinite(high).all()):
        raise ValueError(
            "a logit bottleneck intervenes with the 5th/95th percentiles of each concept's training logits, "
            "which are not set: call net.set_intervention_values(train_concept_logits) (CBMModule does it "
            "before validation and test), or use bottleneck='sigmoid'"
        )
    return torch.where(c > 0.5, high.to(c), low.to(c))


def intervene(predicted: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Replace the predicted bottleneck values ``(B, k)`` by ``targets`` ``(B, k)`` where ``mask`` is set.

    ``mask`` is ``(B, k)`` or ``(k,)`` bool (the same concepts for every sample); every other entry is kept
    bit for bit. The label predictor then reads the result (Koh et al. 2020, Sec. 5, test-time intervention).
    """
    if predicted.shape != targets.shape:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and targets {tuple(targets.shape)} differ in shape"
        )
    mask = mask.to(device=predicted.device, dtype=torch.bool)
    if mask.shape not in (predicted.shape, predicted.shape[1:]):
        raise ValueError(
            f"intervention mask must be (B, k) = {tuple(predicted.shape)} or (k,), got {tuple(mask.shape)}"
        )
    return torch.where(mask, targets.to(predicted), predicted)


def concept_loss(concept_logits: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
    """``sum_j L_Cj``: the binary cross-entropy of each concept, averaged over the batch, summed over ``j``.

    Koh et al. (2020), Sec. 3 (the concept loss of ``g`` in every training mode). Logits ``(B, k)``,
    concepts ``(B, k)`` in ``[0, 1]``; computed from logits (stable for large ``|logit|``).
    """
    if concept_logits.shape != concepts.shape:
        raise ValueError(
            f"concept logits {tuple(concept_logits.shape)} and concept labels {tuple(concepts.shape)} differ"
        )
    per_entry = F.binary_cross_entropy_with_logits(
        concept_logits, concepts.to(concept_logits), reduction="none"
    )
    return per_entry.mean(0).sum()


def joint_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    concept_logits: torch.Tensor,
    concepts: torch.Tensor,
    concept_weight: float,
) -> dict[str, torch.Tensor]:
    """The joint bottleneck's terms ``{"ce": CE(f(g(x)), y), "concept": lambda * sum_j BCE(g_j(x), c_j)}``.

    Koh et al. (2020), Sec. 3: ``L = L_Y(f(g(x)), y) + lambda * sum_j L_Cj(g_j(x), c_j)``; their sum is the
    training loss.
    """
    return {
        "ce": F.cross_entropy(logits, labels),
        "concept": float(concept_weight) * concept_loss(concept_logits, concepts),
    }
