"""The shared base of trunk classifiers: input normalisation, a backbone trunk, input checks, feature info.

:class:`TrunkNet` holds what the baseline, ProtoPNet, concept-whitening and ICNN networks have in common,
so each of them only adds its head:

* ``normalize``: :class:`~interpzoo.layers.normalize.InputNormalize` (networks take ``[0, 1]`` images);
* ``backbone``: a :class:`~interpzoo.models.backbones.Trunk` built from a config
  (:func:`~interpzoo.models.backbones.backbone_from_config`);
* :meth:`TrunkNet.check_input`: the checks of :func:`~interpzoo.models.input_checks.check_image_input`
  with this trunk's minimum image size;
* :meth:`TrunkNet.features`: checked, normalised input through the trunk;
* :attr:`TrunkNet.gradcam_layer`: the dotted name of the module Grad-CAM should read
  (:func:`interpzoo.models.captum_adapter.default_gradcam_layer`);
* :attr:`TrunkNet.feature_info`: channels, reduction and module of the trunk output.

The attribute names (``normalize``, ``backbone``) are the state-dict prefixes every bundle stores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interpzoo.layers.normalize import InputNormalize
from interpzoo.models.backbones import Trunk, backbone_from_config
from interpzoo.models.input_checks import IMAGE_MAX_VALUE, check_image_input

__all__ = ["FeatureInfo", "TrunkNet"]


@dataclass(frozen=True)
class FeatureInfo:
    """What the trunk of a :class:`TrunkNet` outputs.

    Attributes:
        channels: ``C`` of the ``(B, C, H', W')`` trunk output.
        reduction: ``H / H'`` (the trunk's stride; ``H' = ceil(H / reduction)``).
        module: dotted name of the module producing it (``"backbone"``).
    """

    channels: int
    reduction: int
    module: str


class TrunkNet(nn.Module):
    """Base of the trunk classifiers: ``normalize`` then ``backbone``; subclasses add their head.

    Args:
        num_classes: classes ``K``.
        in_chans: input channels.
        mean, std: input normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18s", "stage": "layer4", "pretrained": False}``), a
            backbone name, or ``None`` for the default trunk.

    Shape:
        :meth:`features`: ``(B, in_chans, H, W)`` in ``[0, 1]`` to ``(B, C, ceil(H / r), ceil(W / r))``
        with ``C, r = feature_info.channels, feature_info.reduction``.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_chans = int(in_chans)
        self.normalize = InputNormalize(mean, std)
        self.backbone: Trunk = backbone_from_config(backbone, in_chans=self.in_chans)

    @property
    def min_input_size(self) -> tuple[int, int]:
        """``(H, W)`` of the smallest image the trunk gives at least one full output cell for (its stride)."""
        s = int(self.backbone.stride)
        return s, s

    @property
    def feature_info(self) -> FeatureInfo:
        """Channels and reduction of the trunk output (what :meth:`features` returns)."""
        return FeatureInfo(int(self.backbone.out_channels), int(self.backbone.stride), "backbone")

    @property
    def gradcam_layer(self) -> str:
        """Dotted name of the module LayerGradCam should read: the trunk's last stage (Selvaraju et al.
        2017 use the last convolutional feature map), e.g. ``backbone.body.layer4`` for ResNets."""
        children = [n for n, _ in self.backbone.body.named_children()]
        return f"backbone.body.{children[-1]}" if children else "backbone.body"

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem and its fix unless ``x`` is a ``(B, in_chans, H, W)``
        float batch in about ``[0, 1]``, finite, and at least :attr:`min_input_size`
        (:func:`~interpzoo.models.input_checks.check_image_input`)."""
        check_image_input(x, self.in_chans, self.min_input_size, IMAGE_MAX_VALUE, self.backbone.name)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, C, H', W')`` trunk features of checked ``[0, 1]`` images ``(B, in_chans, H, W)``."""
        self.check_input(x)
        return self.backbone(self.normalize(x))
