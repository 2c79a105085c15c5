"""Backbone trunks: torchvision CNNs cut at a chosen stage, reporting channels and stride.

A :class:`Trunk` maps ``(B, C_in, H, W)`` to a feature map ``(B, C, H / stride, W / stride)`` and
knows ``out_channels`` and ``stride``, so interpretable heads (prototype layers, part filters,
concept whitening) can be sized without running the network.

Names: ``resnet18``, ``resnet34``, ``resnet50``, ``vgg11_bn``, ``vgg16_bn``, ``densenet121`` (torchvision
definitions, optionally with torchvision's ImageNet weights) and ``resnet18s``, a narrow ResNet-18 with
a CIFAR-style stem (3x3 conv, no max-pool) for CPU runs and small images.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from interpzoo.utils import UsageError, did_you_mean


class PretrainedWeightsError(UsageError, RuntimeError):
    """Pretrained backbone weights are not available locally (the message names where to put them)."""


@dataclass(frozen=True)
class _BackboneSpec:
    builder: Callable[[], nn.Module]
    weights: str | None  # torchvision weights enum path, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    stages: tuple[str, ...]
    default_stage: str
    family: str


def _tv(name: str) -> Callable[[], nn.Module]:
    return lambda: getattr(torchvision.models, name)(weights=None)


def _resnet_small(width: int = 16) -> nn.Module:
    return SmallResNet(widths=(width, 2 * width, 4 * width, 8 * width))


_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_SPECS: dict[str, _BackboneSpec] = {
    "resnet18": _BackboneSpec(
        _tv("resnet18"), "ResNet18_Weights.IMAGENET1K_V1", _RESNET_STAGES, "layer4", "resnet"
    ),
    "resnet34": _BackboneSpec(
        _tv("resnet34"), "ResNet34_Weights.IMAGENET1K_V1", _RESNET_STAGES, "layer4", "resnet"
    ),
    "resnet50": _BackboneSpec(
        _tv("resnet50"), "ResNet50_Weights.IMAGENET1K_V2", _RESNET_STAGES, "layer4", "resnet"
    ),
    "resnet18s": _BackboneSpec(_resnet_small, None, _RESNET_STAGES, "layer4", "resnet"),
    "vgg11_bn": _BackboneSpec(
        _tv("vgg11_bn"), "VGG11_BN_Weights.IMAGENET1K_V1", ("features",), "features", "vgg"
    ),
    "vgg16_bn": _BackboneSpec(
        _tv("vgg16_bn"), "VGG16_BN_Weights.IMAGENET1K_V1", ("features",), "features", "vgg"
    ),
    "densenet121": _BackboneSpec(
        _tv("densenet121"), "DenseNet121_Weights.IMAGENET1K_V1", ("features",), "features", "densenet"
    ),
}


def list_backbones() -> list[str]:
    """Names accepted by :func:`build_backbone`."""
    return sorted(_SPECS)


class SmallResNet(nn.Module):
    """ResNet-18 layout with configurable widths and a CIFAR-style stem.

    Module names follow torchvision (``conv1``, ``bn1``, ``layer1`` ... ``layer4``) so dotted paths
    such as ``layer3.0.bn1`` mean the same thing as on a torchvision ResNet.

    Args:
        widths: channels of ``layer1`` ... ``layer4``.
        blocks: BasicBlocks per stage.
        in_chans: input channels.
    """

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64, 128),
        blocks: tuple[int, ...] = (2, 2, 2, 2),
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.Identity()
        inplanes = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            stride = 1 if i == 0 else 2
            layers: list[nn.Module] = []
            for b in range(n):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or inplanes != w:
                    down = nn.Sequential(nn.Conv2d(inplanes, w, 1, stride=s, bias=False), nn.BatchNorm2d(w))
                layers.append(BasicBlock(inplanes, w, stride=s, downsample=down))
                inplanes = w
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class Trunk(nn.Module):
    """A backbone cut after ``stage``.

    Attributes:
        name: backbone name.
        stage: last stage kept (``layer3`` keeps ``layer1..layer3`` of a ResNet).
        out_channels: channels ``C`` of the output map.
        stride: spatial reduction: output is ``(B, C, ceil(H / stride), ceil(W / stride))``.

    Shape:
        ``(B, C_in, H, W)`` to ``(B, C, H', W')``.
    """

    def __init__(self, name: str, body: nn.Module, stage: str, out_channels: int, stride: int) -> None:
        super().__init__()
        self.name = name
        self.stage = stage
        self.body = body
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _kept_modules(spec: Any, stage: str) -> set[str]:
    """Top-level module names of the full torchvision model that the trunk cut at ``stage`` keeps."""
    if spec.family != "resnet":
        return {"features"}
    stages = list(_RESNET_STAGES)
    return {"conv1", "bn1", *stages[: stages.index(stage) + 1]}


def _resnet_body(net: nn.Module, stage: str) -> nn.Sequential:
    parts: list[tuple[str, nn.Module]] = [
        ("conv1", net.conv1),
        ("bn1", net.bn1),
        ("relu", net.relu),
        ("maxpool", net.maxpool),
    ]
    for s in _RESNET_STAGES:
        parts.append((s, getattr(net, s)))
        if s == stage:
            break
    return nn.Sequential(OrderedDict(parts))


def _replace_first_conv(body: nn.Module, in_chans: int) -> None:
    """Adapt the first convolution to ``in_chans`` inputs (grey images), averaging RGB weights."""
    for name, m in body.named_modules():
        if isinstance(m, nn.Conv2d):
            if m.in_channels == in_chans:
                return
            new = nn.Conv2d(
                in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, bias=m.bias is not None
            )
            with torch.no_grad():
                w = m.weight.mean(dim=1, keepdim=True).repeat(1, in_chans, 1, 1) * (m.in_channels / in_chans)
                new.weight.copy_(w)
                if m.bias is not None:
                    new.bias.copy_(m.bias)
            parent_name, _, attr = name.rpartition(".")
            parent = body.get_submodule(parent_name) if parent_name else body
            setattr(parent, attr, new)
            return


def _weights_file(weights_name: str) -> Path:
    enum_name, member = weights_name.split(".")
    weights = getattr(getattr(torchvision.models, enum_name), member)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)


_TRUNK_PREFIX = "backbone.body."
# the value the part-scale experiments put where the black box's bundle must go (conf/experiment/*_partscale.yaml)
_PLACEHOLDER = "SET-model.net.backbone.pretrained"


def _load_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The torchvision-named state dict in ``path``.

    ``path`` is a ``.pth``/``.safetensors`` state dict of the full torchvision model, or a trained interpzoo
    model to warm-start from (its trunk, ``backbone.body.*``): a bundle folder (``config.json`` +
    ``model.safetensors``) or a shipped bundle's name (:func:`~interpzoo.models.list_pretrained`), a bundle's
    ``model.safetensors`` or a Lightning ``.ckpt``. Everything is read
    without pickle (``weights_only=True``).
    """
    path = Path(path)
    if str(path).startswith(_PLACEHOLDER):
        raise PretrainedWeightsError(
            "this recipe warm-starts its trunk from a trained matched black box and none was given "
            f"(model.net.backbone.pretrained is still the placeholder {str(path)!r}). Train one first: "
            "`python train.py experiment=baseline_partscale paths.output_dir=runs/blackbox`, then add "
            "model.net.backbone.pretrained=runs/blackbox/bundle; or start from a shipped one: "
            "model.net.backbone.pretrained=baseline_resnet18s.partshapes_partscale_s0 model.net.backbone.width=8"
        )
    if not path.exists() and len(path.parts) == 1:
        from interpzoo.models.registry import PRETRAINED_DIR, list_pretrained

        if str(path) in list_pretrained():  # a shipped bundle by name, e.g. the part-scale black boxes
            path = PRETRAINED_DIR / str(path)
    if path.is_dir():
        if not (path / "model.safetensors").is_file():
            raise PretrainedWeightsError(
                f"backbone.pretrained={path} is a folder without model.safetensors: pass a bundle folder "
                "(config.json + model.safetensors, e.g. <run>/bundle), a .ckpt or a .pth state dict"
            )
        path = path / "model.safetensors"
    if not path.is_file():
        raise PretrainedWeightsError(
            f"backbone weights file not found: {path}. Pass the path of an existing .pth or .safetensors state "
            f"dict, a bundle folder or a .ckpt of a trained model as backbone.pretrained=<path>, or "
            f"backbone.pretrained=false to start from scratch."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
    return _trunk_state(state)


def _trunk_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A trained interpzoo model's trunk (``[net.]backbone.body.<name>``) renamed to torchvision's ``<name>``;
    any other state dict unchanged."""
    prefixes = {k[: k.index(_TRUNK_PREFIX) + len(_TRUNK_PREFIX)] for k in state if _TRUNK_PREFIX in k}
    if not prefixes:
        return state
    # the shortest prefix is the network's own trunk (a nested model would have a longer one)
    prefix = min(prefixes, key=len)
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def build_backbone(
    name: str = "resnet18s",
    stage: str | None = None,
    pretrained: bool | str = False,
    in_chans: int = 3,
    width: int = 16,
    download: bool = False,
) -> Trunk:
    """Build a :class:`Trunk`.

    Args:
        name: one of :func:`list_backbones`.
        stage: where to cut (ResNets: ``layer1``..``layer4``; VGG/DenseNet: ``features``).
        pretrained: ``False``; ``True`` for torchvision's ImageNet weights (read from the torch hub
            cache; downloaded only with ``download=True``); a path to a ``.pth``/``.safetensors``
            state dict of the full torchvision model; or a trained interpzoo model of the same backbone (a
            bundle folder or a ``.ckpt``, e.g. the matched black box ``model=baseline``) whose trunk warm-starts
            this one (layers beyond its ``stage`` are ignored).
        in_chans: input channels (the first conv is adapted when it differs from 3).
        width: base width of ``resnet18s``.
        download: allow torchvision to download missing weights (needs internet).
    """
    if name not in _SPECS:
        raise ValueError(
            f"unknown backbone {name!r}{did_you_mean(name, _SPECS)}; available: {list_backbones()}"
        )
    spec = _SPECS[name]
    stage = stage or spec.default_stage
    if stage not in spec.stages:
        raise ValueError(
            f"backbone {name!r} has no stage {stage!r}{did_you_mean(stage, spec.stages)}; stages: {list(spec.stages)}"
        )
    net = _resnet_small(width) if name == "resnet18s" else spec.builder()

    if pretrained:
        if isinstance(pretrained, str) and pretrained.lower() not in ("true", "imagenet"):
            state = _load_state(pretrained)
        elif spec.weights is None:
            raise PretrainedWeightsError(
                f"backbone {name!r} has no published weights; pass a file path instead"
            )
        else:
            cached = _weights_file(spec.weights)
            if cached.is_file():
                state = _load_state(cached)
            elif download:
                enum_name, member = spec.weights.split(".")
                state = getattr(getattr(torchvision.models, enum_name), member).get_state_dict(progress=True)
            else:
                raise PretrainedWeightsError(
                    f"ImageNet weights for {name!r} are not in the local cache ({cached}). Either copy the file "
                    f"there, pass backbone.pretrained=/path/to/weights.pth, set backbone.download=true on a "
                    f"machine with internet, or use backbone.pretrained=false."
                )
        own = net.state_dict()
        wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if wrong:
            k = wrong[0]
            raise PretrainedWeightsError(
                f"weights do not fit backbone {name!r}: {len(wrong)} tensors of another shape, e.g. {k} "
                f"{tuple(state[k].shape)} in the file vs {tuple(own[k].shape)} here. Build the backbone the file "
                f"was trained with (its width, in_chans and name: see its config.json) or start from scratch."
            )
        missing, unexpected = net.load_state_dict(state, strict=False)
        # only the layers the trunk keeps (up to ``stage``) must come from the file
        kept = _kept_modules(spec, stage)
        bad = [k for k in missing if not k.startswith(("fc.", "classifier.")) and k.split(".")[0] in kept]
        if bad:
            raise PretrainedWeightsError(
                f"weights do not fit backbone {name!r}: {len(bad)} missing keys (e.g. {bad[:3]}); "
                f"unexpected keys e.g. {unexpected[:3]}"
            )

    if spec.family == "resnet":
        body: nn.Module = _resnet_body(net, stage)
        stride = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}[stage]
        if name == "resnet18s":
            stride //= 4  # CIFAR stem: no stride-2 conv, no max-pool
        last = getattr(net, stage)[-1]
        out_channels = last.conv3.out_channels if hasattr(last, "conv3") else last.conv2.out_channels
    elif spec.family == "vgg":
        body = net.features
        stride = 32
        out_channels = [m for m in body.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
    else:  # densenet: features end in norm5, add the ReLU torchvision applies in forward
        body = nn.Sequential(net.features, nn.ReLU(inplace=False))
        stride = 32
        out_channels = net.features.norm5.num_features
    if in_chans != 3:
        _replace_first_conv(body, in_chans)
    return Trunk(name, body, stage, out_channels, stride)


def backbone_from_config(cfg: dict[str, Any] | str | None, in_chans: int = 3) -> Trunk:
    """Build a trunk from a config dict (``{"name": ..., "stage": ..., "pretrained": ...}``) or a name."""
    if cfg is None:
        cfg = {}
    if isinstance(cfg, str):
        cfg = {"name": cfg}
    return build_backbone(in_chans=in_chans, **cfg)
