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

dependencies = ["torch", "torchvision"]


def _default_bundles() -> dict[str, str]:
    """``{model name: its default shipped bundle}``.

    Shipped bundles are named ``<model name>.<data>_s<seed>``; the default is the first by name (seed 0 of
    the first data set).
    """
    defaults: dict[str, str] = {}
    for bundle in list_pretrained():
        defaults.setdefault(bundle.split(".", 1)[0], bundle)
    return defaults


DEFAULT_BUNDLES = _default_bundles()


def _entry(name: str):
    def build(pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
        if pretrained is True:
            if name not in DEFAULT_BUNDLES:
                have = ", ".join(sorted(DEFAULT_BUNDLES)) or "none"
                raise ValueError(
                    f"{name!r} has no shipped pretrained bundle; pretrained=True works for {have}. "
                    f"Load a bundle you trained with pretrained='<run>/bundle', or drop pretrained=True "
                    f"for a freshly initialised {name}."
                )
            if kwargs:
                raise ValueError(
                    f"pretrained=True loads the bundle {DEFAULT_BUNDLES[name]!r} as it was trained; "
                    f"constructor arguments ({', '.join(sorted(kwargs))}) cannot change it"
                )
            return create_model(DEFAULT_BUNDLES[name], pretrained=True)
        return create_model(name, pretrained=pretrained, **kwargs)

    build.__name__ = name
    default = DEFAULT_BUNDLES.get(name)
    build.__doc__ = f"``interpzoo.create_model({name!r}, ...)``." + (
        f" ``pretrained=True`` loads the shipped bundle ``{default}``." if default else ""
    )
    return build


for _name in list_models():
    globals()[_name] = _entry(_name)
