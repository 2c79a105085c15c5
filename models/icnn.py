"""Interpretable CNNs (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018).

The network (:class:`ICNNNet`, architecture ``icnn``, model names ``icnn_<backbone>``) is a backbone
trunk with one or more :class:`~layers.icnn.InterpretableConv2d` layers inserted after a
named module, then global average pooling and a linear classifier. Placement follows the paper and
its reference code:

* VGG: after the ReLU of conv5_3 (``features.42`` for ``vgg16_bn``), before the last max-pool: a new
  3x3 conv 512 -> 512 whose filters are the part filters;
* ResNet: after ``layer3`` (the ada-shen port), followed by the pretrained ``layer4``;
* DenseNet: on top of the final feature map;
* or after any named submodule of the trunk (``placement: layer2``, ``placement: "layer3.1"``).

Deviation: the head is GAP + linear, not VGG's fc6/fc7 (a 7x7 conv to 4096 and a 1x1 conv).

:class:`~interpzoo.models.lit_icnn.ICNNModule` trains it with ``task loss + lambda * filter loss`` (paper
Eq. 1); its report figure is drawn by :mod:`interpzoo.reports.icnn`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from interpzoo.layers.icnn import FilterAssignment, InterpretableConv2d
from interpzoo.models.backbones import _SPECS, list_backbones
from interpzoo.models.explain import ICNNExplanation, explain_icnn
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import get_submodule, set_submodule
from interpzoo.models.trunk import TrunkNet
from interpzoo.utils import did_you_mean


@dataclass
class ICNNOutput(ClassifierOutput):
    """Output of :class:`ICNNNet`.

    Attributes:
        logits: ``(B, K)``.
        features: ``(B, C', H', W')`` trunk output (after the whole trunk).
        masked_features: ``(B, C, h, w)`` masked output of the last interpretable layer.
        part_features: ``{name: (B, C, h, w)}`` maps of every interpretable layer after ReLU and
            before the mask (what the filter loss and the metrics read); names ``icnn1``, ``icnn2``,
            ... and ``icnn1_input`` when the layer also masks its input.
        part_masks: ``{name: (B, C, h, w)}`` the masks applied to them (empty without masks).
    """

    masked_features: torch.Tensor | None = None
    part_features: dict[str, torch.Tensor] | None = None
    part_masks: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out.update({f"{f.name}/{k}": t for k, t in v.items()})
            elif v is not None:
                out[f.name] = v
        return out


def _infer_channels(root: nn.Module, name: str, example: torch.Tensor) -> int:
    """Channels of the output of ``root.<name>`` from one forward pass of ``example`` (no grad, eval)."""
    seen: list[int] = []
    handle = get_submodule(root, name).register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            root(example)
    finally:
        handle.remove()
        root.train(was_training)
    if not seen:
        raise ValueError(f"module {name!r} was not called in a forward pass; choose another placement")
    return int(seen[-1])


def attach_part_filters(
    net: nn.Module,
    name: str,
    in_channels: int | None = None,
    num_layers: int = 1,
    example_input: torch.Tensor | None = None,
    **block_kwargs: Any,
) -> list[InterpretableConv2d]:
    """Append interpretable conv layers after the submodule ``name`` of any network, in place.

    ``net.<name>`` becomes ``Sequential(base=<old module>, icnn1=..., icnnN=...)``; each layer keeps
    the channel count, so the rest of the network is unchanged. Train with
    ``sum(b.filter_loss(positive).loss for b in blocks)`` added to the task loss.

    Args:
        net: any ``nn.Module`` (e.g. a torchvision ResNet: ``name="layer3"``).
        name: dotted submodule name.
        in_channels: channels of its output; inferred from ``example_input`` (one forward pass) or
            from the last conv/norm layer inside the submodule.
        num_layers: interpretable layers appended.
        **block_kwargs: arguments of :class:`InterpretableConv2d` (``mask_input`` applies to the first).

    Returns:
        the new layers, in order.
    """
    if in_channels is None:
        if example_input is not None:
            in_channels = _infer_channels(net, name, example_input)
        else:
            found = [
                m for m in get_submodule(net, name).modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
            ]
            if not found:
                raise ValueError(f"cannot tell the channels of {name!r}: pass in_channels= or example_input=")
            last = found[-1]
            in_channels = last.out_channels if isinstance(last, nn.Conv2d) else last.num_features
    # Only the first layer can mask its input: the others receive an already masked map.
    first_kw = dict(block_kwargs)
    rest_kw = {**block_kwargs, "mask_input": False}
    blocks = [
        InterpretableConv2d(in_channels, in_channels, **(first_kw if k == 0 else rest_kw))
        for k in range(num_layers)
    ]
    old = get_submodule(net, name)
    seq = nn.Sequential(OrderedDict([("base", old), *((f"icnn{k + 1}", b) for k, b in enumerate(blocks))]))
    set_submodule(net, name, seq)
    return blocks


def default_placement(trunk: nn.Module, backbone_name: str) -> str:
    """The paper's placement on a trunk: ResNet ``layer3``, VGG the last ReLU (conv5_3), else the end."""
    family = _SPECS[backbone_name].family if backbone_name in _SPECS else ""
    children = [n for n, _ in trunk.body.named_children()]
    if family == "resnet" and "layer3" in children:
        return "layer3"
    if family == "vgg":
        relus = [n for n, m in trunk.body.named_children() if isinstance(m, nn.ReLU)]
        return relus[-1]
    return children[-1]


@register_architecture("icnn")
class ICNNNet(TrunkNet):
    """Backbone with interpretable part-filter layers, GAP and a linear classifier (paper Fig. 2); a
    :class:`~interpzoo.models.trunk.TrunkNet` whose trunk holds the part filters.

    Args:
        num_classes: classes ``K`` (2 in the single-category setting).
        in_chans, mean, std: input channels and normalisation (inputs are ``[0, 1]`` images).
        backbone: trunk config (``{"name": "vgg16_bn", "pretrained": true}``).
        placement: ``"auto"`` (see the module docstring) or a dotted submodule name of the trunk body.
        num_layers: interpretable layers stacked there (1 in the paper; the ResNet port uses 2).
        kernel_size, batch_norm, mask_input, beta, locate, mask_style, learn_sharpness, init_std:
            see :class:`~layers.icnn.InterpretableConv2d`.
        use_mask: apply the part masks (``False`` gives the matched ordinary CNN with the same layers).
        dropout: before the classifier.
        assignment: ``"single"``, ``"static"`` or ``"dynamic"`` filter categories
            (:class:`~layers.icnn.FilterAssignment`); target_class: the single category.

    Shape:
        ``(B, C_in, H, W)`` to :class:`ICNNOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        placement: str = "auto",
        num_layers: int = 1,
        kernel_size: int = 3,
        batch_norm: bool = False,
        mask_input: bool = False,
        beta: float = 4.0,
        locate: str = "argmax",
        mask_style: str = "paper",
        learn_sharpness: bool = False,
        use_mask: bool = True,
        init_std: float | None = None,
        dropout: float = 0.0,
        assignment: str = "dynamic",
        target_class: int = 1,
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        super().__init__(num_classes, in_chans, mean, std, backbone)
        body = self.backbone.body
        if placement == "auto":
            placement = default_placement(self.backbone, self.backbone.name)
        names = [n for n, _ in body.named_modules() if n]
        if placement not in names:
            raise ValueError(
                f"placement {placement!r} is not a submodule of the {self.backbone.name} trunk"
                f"{did_you_mean(placement, names)}; top-level names: {[n for n, _ in body.named_children()]}"
            )
        channels = _infer_channels(body, placement, torch.zeros(1, in_chans, 64, 64))
        block_kw = dict(
            kernel_size=kernel_size,
            batch_norm=batch_norm,
            mask_input=mask_input,
            beta=beta,
            locate=locate,
            mask_style=mask_style,
            learn_sharpness=learn_sharpness,
            use_mask=use_mask,
            init_std=init_std,
        )
        attach_part_filters(body, placement, channels, num_layers, **block_kw)
        self.placement = placement
        self._block_paths = [f"backbone.body.{placement}.icnn{k + 1}" for k in range(num_layers)]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)
        # Which category each filter serves: buffers, so a bundle keeps what its filters mean.
        self.assignments = nn.ModuleDict()
        for k in range(num_layers):
            if mask_input and k == 0:
                self.assignments[f"icnn{k + 1}_input"] = FilterAssignment(
                    channels, num_classes, assignment, target_class
                )
            self.assignments[f"icnn{k + 1}"] = FilterAssignment(
                channels, num_classes, assignment, target_class
            )

    @property
    def gradcam_layer(self) -> str:
        """The last interpretable layer (its masked output is the part-filter map Grad-CAM should read)."""
        return self._block_paths[-1]

    def blocks(self) -> dict[str, InterpretableConv2d]:
        """The interpretable layers by name (``icnn1``, ...)."""
        return {f"icnn{k + 1}": self.get_submodule(p) for k, p in enumerate(self._block_paths)}

    def masks(self) -> dict[str, nn.Module]:
        """The :class:`~layers.icnn.PartFilterMask` of every part-feature name."""
        out: dict[str, nn.Module] = {}
        for name, block in self.blocks().items():
            for key, m in block.masks().items():
                out[name if key == "output" else f"{name}_input"] = m
        return out

    def forward(self, x: torch.Tensor) -> ICNNOutput:
        feats = self.features(x)
        part_features: dict[str, torch.Tensor] = {}
        part_masks: dict[str, torch.Tensor] = {}
        masked = None
        for name, block in self.blocks().items():
            # The layers ran inside the trunk; read the maps they kept from this forward pass.
            for key, t in block.last_features.items():
                part_features[name if key == "output" else f"{name}_input"] = t
            for key, t in block.last_masks.items():
                part_masks[name if key == "output" else f"{name}_input"] = t
            masked = block.last_output
        logits = self.classifier(self.dropout(self.pool(feats).flatten(1)))
        return ICNNOutput(
            logits=logits,
            features=feats,
            masked_features=masked,
            part_features=part_features,
            part_masks=part_masks,
        )

    def explain(self, x: torch.Tensor, layer: str | None = None) -> ICNNExplanation:
        """Each part filter's map and its strongest unit's image position (:mod:`models.explain`)."""
        return explain_icnn(self, x, layer)


for _bb in list_backbones():
    register_model(f"icnn_{_bb}", "icnn", backbone={"name": _bb})


def icnn_net_summary(net: ICNNNet) -> dict[str, Any]:
    """Plain-data description of where the part filters sit (for logs and bundles)."""
    return {
        "placement": net.placement,
        "layers": list(net.blocks()),
        "filters": {n: int(a.filter_class.numel()) for n, a in net.assignments.items()},
    }


__all__ = [
    "ICNNNet",
    "ICNNOutput",
    "attach_part_filters",
    "default_placement",
    "icnn_net_summary",
]
