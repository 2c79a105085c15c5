"""torch.hub entry points: ``torch.hub.load("<repo dir>", "protopnet_resnet18s", source="local", num_classes=10)``.

Every registered model name is an entry; ``pretrained="<bundle path or shipped name>"`` loads a bundle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interpzoo.models import create_model, list_models

dependencies = ["torch", "torchvision"]


def _entry(name: str):
    def build(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    build.__doc__ = f"``interpzoo.create_model({name!r}, ...)``."
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
