"""The black-box baseline every interpretable method is compared with: trunk + pooling + linear."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from interpzoo.layers.normalize import InputNormalize
from interpzoo.models.backbones import list_backbones
from interpzoo.models.explain import ClassifierExplanation, explain_classifier
from interpzoo.models.input_checks import check_tabular_input
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.trunk import TrunkNet


@register_architecture("baseline")
class BaselineNet(TrunkNet):
    """Backbone trunk, global average pooling, dropout, linear classifier (a :class:`TrunkNet`).

    Args:
        num_classes: number of classes ``K``.
        in_chans: input channels.
        mean, std: input normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18", "stage": "layer4", "pretrained": False}``).
        dropout: dropout before the classifier.

    Shape:
        ``(B, C_in, H, W)`` to :class:`ClassifierOutput` with ``logits`` ``(B, K)`` and
        ``features`` ``(B, C, H', W')``.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_classes, in_chans, mean, std, backbone)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        feats = self.features(x)
        logits = self.classifier(self.dropout(self.pool(feats).flatten(1)))
        return ClassifierOutput(logits=logits, features=feats)

    def explain(self, x: torch.Tensor) -> ClassifierExplanation:
        """A black box explains nothing: logits and probabilities (:mod:`models.explain`)."""
        return explain_classifier(self, x)


@register_architecture("baseline_mlp")
class BaselineMLP(nn.Module):
    """Black-box MLP for tabular data (the SENN tabular comparison).

    Shape:
        ``(B, F)`` to :class:`ClassifierOutput` with ``logits`` ``(B, K)`` and ``features`` ``(B, hidden[-1])``.
    """

    def __init__(
        self,
        num_classes: int,
        num_features: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        hidden: Sequence[int] = (64, 64),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalize(mean, std) if mean is not None and std is not None else nn.Identity()
        layers: list[nn.Module] = []
        d = num_features
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU(), nn.Dropout(dropout)]
            d = h
        self.body = nn.Sequential(*layers)
        self.classifier = nn.Linear(d, num_classes)
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        check_tabular_input(x, self.num_features)
        feats = self.body(self.normalize(x))
        return ClassifierOutput(logits=self.classifier(feats), features=feats)

    def explain(self, x: torch.Tensor) -> ClassifierExplanation:
        """Logits and probabilities (:mod:`models.explain`)."""
        return explain_classifier(self, x)


for _bb in list_backbones():
    register_model(f"baseline_{_bb}", "baseline", backbone={"name": _bb})
register_model("baseline_mlp", "baseline_mlp")
