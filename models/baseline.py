"""The black-box baseline every interpretable method is compared with: trunk + pooling + linear."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from interpzoo.layers.normalize import InputNormalize
from interpzoo.models.backbones import backbone_from_config, list_backbones
from interpzoo.models.explain import ClassifierExplanation, explain_classifier
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model


@register_architecture("baseline")
class BaselineNet(nn.Module):
    """Backbone trunk, global average pooling, dropout, linear classifier.

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
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.backbone = backbone_from_config(backbone, in_chans=in_chans)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)
        self.num_classes = num_classes
        self.in_chans = in_chans

    def forward(self, x: torch.Tensor) -> ClassifierOutput:
        check_image_input(x, self.in_chans)
        feats = self.backbone(self.normalize(x))
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
        if x.dim() != 2 or x.shape[1] != self.num_features:
            raise ValueError(f"expected tabular input (B, {self.num_features}), got {tuple(x.shape)}")
        feats = self.body(self.normalize(x))
        return ClassifierOutput(logits=self.classifier(feats), features=feats)

    def explain(self, x: torch.Tensor) -> ClassifierExplanation:
        """Logits and probabilities (:mod:`models.explain`)."""
        return explain_classifier(self, x)


def check_image_input(x: torch.Tensor, in_chans: int) -> None:
    """Raise a clear error for inputs that are not ``(B, in_chans, H, W)`` images."""
    if x.dim() != 4:
        hint = " (add a batch dimension: x.unsqueeze(0))" if x.dim() == 3 else ""
        raise ValueError(f"expected an image batch (B, {in_chans}, H, W), got shape {tuple(x.shape)}{hint}")
    if x.shape[1] != in_chans:
        hint = " (channels-last? use x.permute(0, 3, 1, 2))" if x.shape[-1] == in_chans else ""
        raise ValueError(f"expected {in_chans} input channels, got shape {tuple(x.shape)}{hint}")


for _bb in list_backbones():
    register_model(f"baseline_{_bb}", "baseline", backbone={"name": _bb})
register_model("baseline_mlp", "baseline_mlp")
