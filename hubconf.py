"""torch.hub entry points: ``torch.hub.load("<repo dir>", "protopnet_resnet18s", source="local", num_classes=10)``.

Every registered model name is an entry. ``pretrained=True`` loads the default shipped bundle of that name
(:data:`DEFAULT_BUNDLES`, e.g. ``senn_mlp`` -> ``senn_mlp.breast_cancer_s0``; a name without a shipped
bundle gets an error that lists the names with one), and ``pretrained="<bundle folder or shipped bundle
name>"`` loads that bundle.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from interpzoo.models import create_model, list_models, list_pretrained
from interpzoo.models.registry import default_bundle

dependencies = ["torch", "torchvision"]


def _default_bundles() -> dict[str, str]:
    """``{model name: its default shipped bundle}`` (:func:`interpzoo.models.registry.default_bundle`)."""
    return {bundle.split(".", 1)[0]: default_bundle(bundle.split(".", 1)[0]) for bundle in list_pretrained()}


DEFAULT_BUNDLES = _default_bundles()


def _entry(name: str):
    def build(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    default = DEFAULT_BUNDLES.get(name)
    build.__doc__ = f"``interpzoo.create_model({name!r}, ...)``." + (
        f" ``pretrained=True`` loads the shipped bundle ``{default}``." if default else ""
    )
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
