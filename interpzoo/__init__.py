"""interpzoo: an interpretable-by-design model zoo and its training framework, in one namespace.

>>> import interpzoo
>>> interpzoo.list_models("protopnet_*")
>>> net = interpzoo.create_model("protopnet_resnet18s", num_classes=10)
>>> net = interpzoo.load_pretrained("protopnet_resnet18s.partshapes_s0")

Sub-packages: ``interpzoo.layers`` (drop-in building blocks, pure torch), ``interpzoo.models`` (networks,
registry, bundles; ``lit_*`` LightningModules), ``interpzoo.metrics`` (tensors in, numbers out),
``interpzoo.datamodules`` (data and every DataLoader), ``interpzoo.reports`` (figures and callbacks),
``interpzoo.conf`` (the Hydra configs). Importing ``interpzoo`` is light: the registry functions below load
``interpzoo.models`` on first use, and neither Lightning nor matplotlib is imported.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.2.0"

# public name -> module that defines it (imported on first access, PEP 562)
_LAZY = {
    "create_model": "interpzoo.models.registry",
    "list_models": "interpzoo.models.registry",
    "list_pretrained": "interpzoo.models.registry",
    "list_architectures": "interpzoo.models.registry",
    "register_model": "interpzoo.models.registry",
    "register_architecture": "interpzoo.models.registry",
    "load_pretrained": "interpzoo.models.bundle",
    "save_pretrained": "interpzoo.models.bundle",
    "read_bundle_config": "interpzoo.models.bundle",
    "load_checkpoint": "interpzoo.models.checkpoint",
    "build_backbone": "interpzoo.models.backbones",
    "list_backbones": "interpzoo.models.backbones",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        importlib.import_module("interpzoo.models")  # registers every architecture
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'interpzoo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
