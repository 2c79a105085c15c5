"""timm-style registry: ``create_model``, ``list_models``, ``list_pretrained``, ``load_pretrained``.

Two levels:

* an **architecture** is a network class registered with :func:`register_architecture` (e.g.
  ``"baseline"``, ``"protopnet"``); its constructor takes plain data only;
* a **model name** such as ``baseline_resnet18`` is an architecture plus default arguments
  (usually the backbone), registered with :func:`register_model`.

A **network config** is a plain dict ``{"name": <model or architecture name>, **constructor arguments}``
(the ``model.net`` node of a training config, e.g. ``{"name": "protopnet", "prototypes_per_class": 10,
"backbone": {"name": "resnet34"}}``). :func:`build_model` is the one builder: ``create_model``,
``load_pretrained``, ``load_checkpoint``, the LightningModules and ``interpzoo.run.module_from_source`` all
build their network through it.

Every network made here carries ``net.interpzoo_config = {"architecture": ..., "model_args": ...}``,
which is exactly what a bundle's ``config.json`` stores, so a network can always be rebuilt from
plain JSON.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from interpzoo.utils import did_you_mean

_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}
PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"


def register_architecture(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator registering a network class under ``name``."""

    def deco(cls: type[nn.Module]) -> type[nn.Module]:
        if name in _ARCHITECTURES and _ARCHITECTURES[name] is not cls:
            raise ValueError(f"architecture {name!r} is already registered by {_ARCHITECTURES[name]}")
        _ARCHITECTURES[name] = cls
        return cls

    return deco


def register_model(name: str, architecture: str, **defaults: Any) -> None:
    """Register ``name`` as ``architecture`` with default constructor arguments."""
    if architecture not in _ARCHITECTURES:
        raise KeyError(f"architecture {architecture!r} is not registered")
    _MODELS[name] = (architecture, defaults)


def list_architectures() -> list[str]:
    return sorted(_ARCHITECTURES)


def list_models(filter: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching the glob ``filter`` (with ``pretrained``: shipped bundles)."""
    names = list_pretrained() if pretrained else sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatchcase(n, filter)]


def list_pretrained(filter: str = "*") -> list[str]:
    """Names of the bundles shipped in ``models/pretrained/`` (``<method>_<backbone>.<data>_s<seed>``)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    names = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "config.json").is_file())
    return [n for n in names if fnmatch.fnmatchcase(n, filter)]


def _deep_update(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_update(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def resolve_model_name(name: str) -> tuple[str, dict[str, Any]]:
    """``(architecture, default_args)`` for a model or architecture name, with did-you-mean."""
    if name in _MODELS:
        arch, defaults = _MODELS[name]
        return arch, copy.deepcopy(defaults)
    if name in _ARCHITECTURES:
        return name, {}
    raise KeyError(
        f"unknown model {name!r}{did_you_mean(name, list(_MODELS) + list(_ARCHITECTURES))}; "
        f"see interpzoo.list_models()"
    )


def check_architecture(architecture: Any) -> str:
    """``architecture`` if it is a registered architecture name (what bundles and checkpoints record), else
    :class:`KeyError` with did-you-mean."""
    if not isinstance(architecture, str) or architecture not in _ARCHITECTURES:
        raise KeyError(
            f"unknown architecture {architecture!r}{did_you_mean(str(architecture), _ARCHITECTURES)}; "
            f"registered: {list_architectures()}"
        )
    return architecture


def build_architecture(architecture: str, model_args: dict[str, Any]) -> nn.Module:
    """Instantiate a registered architecture and stamp it with its plain-data config (the primitive under
    :func:`build_model`, which resolves names, defaults and ``data_info`` first)."""
    check_architecture(architecture)
    cls = _ARCHITECTURES[architecture]
    try:
        net = cls(**model_args)
    except TypeError as e:
        params = [p for p in inspect.signature(cls).parameters if p != "self"]
        bad = [k for k in model_args if k not in params]
        hint = "".join(f"\n  unknown argument {k!r}{did_you_mean(k, params)}" for k in bad)
        raise TypeError(f"cannot build {architecture!r}: {e}{hint}\n  accepted arguments: {params}") from None
    net.interpzoo_config = {"architecture": architecture, "model_args": copy.deepcopy(model_args)}
    return net


# data_info key -> the constructor argument of the same name it fills, when the architecture accepts it.
DATA_ARGS = ("num_classes", "in_chans", "mean", "std", "num_features", "image_size")


def architecture_parameters(architecture: str) -> dict[str, inspect.Parameter]:
    """The constructor parameters of a registered architecture (``self`` excluded)."""
    return dict(inspect.signature(_ARCHITECTURES[architecture]).parameters)


def resolve_net(
    net_config: dict[str, Any],
    data_info: dict[str, Any] | None = None,
    *,
    drop_unused_backbone: bool = False,
) -> tuple[str, dict[str, Any]]:
    """``(architecture, constructor arguments)`` of a network config, without building anything.

    Precedence: the registered defaults of ``net_config["name"]`` < the ``data_info`` entries the
    architecture accepts (:data:`DATA_ARGS`) < the other keys of ``net_config`` (nested dicts such as
    ``backbone`` merge key by key). ``drop_unused_backbone`` drops a ``backbone`` entry when the architecture
    has no trunk (a training config composes the ``backbone=`` group into every model's ``net``).
    """
    if not isinstance(net_config, dict):
        raise TypeError(
            f"a network config is a dict {{'name': <model name>, **constructor arguments}}, got "
            f"{type(net_config).__name__}"
        )
    config = dict(net_config)
    name = config.pop("name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"the network config has no 'name' (got {name!r}): give a model or architecture name, e.g. "
            f"{{'name': 'protopnet', ...}} (model.net.name=protopnet); see interpzoo.list_models()"
        )
    arch, args = resolve_model_name(name)
    params = architecture_parameters(arch)
    for key in DATA_ARGS:
        if key in params and (data_info or {}).get(key) is not None:
            args[key] = copy.deepcopy(data_info[key])  # type: ignore[index]
    if drop_unused_backbone and "backbone" not in params:
        config.pop("backbone", None)
    return arch, _deep_update(args, config)


def without_backbone_weights(net_config: dict[str, Any]) -> dict[str, Any]:
    """``net_config`` with ``backbone.pretrained`` off, for rebuilding a network whose weights come from a
    bundle or checkpoint: the warm-start source (ImageNet weights, another model's bundle) need not exist on
    the machine that loads it, and would be overwritten anyway."""
    out = copy.deepcopy(net_config)
    backbone = out.get("backbone")
    if isinstance(backbone, dict) and backbone.get("pretrained"):
        backbone["pretrained"] = False
    return out


def build_model(
    net_config: dict[str, Any],
    data_info: dict[str, Any] | None = None,
    *,
    drop_unused_backbone: bool = False,
) -> nn.Module:
    """Build the network of a network config ``{"name": ..., **constructor arguments}`` (the one builder).

    ``data_info`` (a datamodule's :attr:`data_info`, or a bundle's ``data_config``) fills the constructor
    arguments the architecture accepts (``num_classes``, ``in_chans``, ``mean``, ``std``, ``num_features``,
    ``image_size``) and is kept as ``net.data_config``; keys of ``net_config`` win over both. See
    :func:`resolve_net` for the precedence. The network carries ``net.interpzoo_config``.
    """
    arch, args = resolve_net(net_config, data_info, drop_unused_backbone=drop_unused_backbone)
    net = build_architecture(arch, args)
    if data_info is not None:
        net.data_config = dict(data_info)
    return net


# Constructor keywords of the LightningModules before interpzoo 0.2, and what they became.
_OLD_NET_KEYS = ("arch", "model_args", "backbone")


def upgrade_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """LightningModule settings in the current shape: old ``arch``/``model_args``/``backbone`` become ``net``.

    Checkpoints and bundles written before the LightningModules took one network argument record
    ``arch=<name>, model_args={...}, backbone={...}``; that is ``net={"name": arch, "backbone": backbone,
    **model_args}`` now (``model_args`` wins over ``backbone``, as it did). Settings already in the current
    shape come back unchanged (as a new dict). Also used on the ``model`` section of a saved run config.
    """
    hp = dict(hparams)
    if not any(k in hp for k in _OLD_NET_KEYS):
        return hp
    if "net" in hp:
        raise ValueError(
            f"the settings hold both 'net' and the old {[k for k in _OLD_NET_KEYS if k in hp]}; keep only net"
        )
    arch = hp.pop("arch", None)
    model_args = hp.pop("model_args", None) or {}
    backbone = hp.pop("backbone", None)
    net: dict[str, Any] = {"backbone": copy.deepcopy(dict(backbone))} if backbone is not None else {}
    net = _deep_update(net, dict(model_args))
    if arch is not None:
        net = {"name": arch, **net}
    hp["net"] = net
    return hp


# Lightning task name -> (module, class). The table is code: a checkpoint or a bundle names a task from
# it and nothing else, so loading never imports or calls anything that a file names.
_TASKS: dict[str, tuple[str, str]] = {
    "classification": ("interpzoo.models.lit_base", "ClassificationModule"),
    "reconstruction": ("interpzoo.models.lit_base", "ReconstructionModule"),
    "protopnet": ("interpzoo.models.lit_protopnet", "ProtoPNetModule"),
    "concept_whitening": ("interpzoo.models.lit_concept_whitening", "ConceptWhiteningModule"),
    "icnn": ("interpzoo.models.lit_icnn", "ICNNModule"),
    "senn": ("interpzoo.models.lit_senn", "SENNModule"),
    "cbm": ("interpzoo.models.lit_cbm", "CBMModule"),
    "soft_autoencoder": ("interpzoo.models.lit_soft_autoencoder", "SoftAutoencoderModule"),
    "pipnet": ("interpzoo.models.lit_pipnet", "PIPNetModule"),
}
# Class paths written by interpzoo 0.1 (before the single namespace): read as the task they meant.
_LEGACY_TASKS = {
    "models.lit_base.ClassificationModule": "classification",
    "models.lit_base.ReconstructionModule": "reconstruction",
    "models.lit_protopnet.ProtoPNetModule": "protopnet",
    "models.concept_whitening.ConceptWhiteningModule": "concept_whitening",
    "models.icnn.ICNNModule": "icnn",
    "models.senn.SENNModule": "senn",
    "models.soft_autoencoder.SoftAutoencoderModule": "soft_autoencoder",
}


def list_tasks() -> list[str]:
    """Registered Lightning task names (what checkpoints and bundles record)."""
    return sorted(_TASKS)


def task_class(name: str) -> type:
    """The LightningModule class of a registered task name; anything else is refused before any import."""
    import importlib

    if not isinstance(name, str) or name not in _TASKS:
        raise KeyError(
            f"unknown task {name!r}{did_you_mean(str(name), _TASKS)}; a checkpoint or bundle may only name a "
            f"registered task ({', '.join(list_tasks())}). Nothing it names is imported or called."
        )
    module, cls = _TASKS[name]
    return getattr(importlib.import_module(module), cls)


def task_name(module: Any) -> str:
    """The registered task name of a LightningModule instance or class."""
    cls = module if isinstance(module, type) else type(module)
    for name, (mod, qual) in _TASKS.items():
        if cls.__module__ == mod and cls.__qualname__ == qual:
            return name
    raise KeyError(f"{cls.__module__}.{cls.__qualname__} is not a registered task; add it to registry._TASKS")


def resolve_task(info: dict[str, Any]) -> str:
    """The task name recorded in checkpoint/bundle metadata (``task``, or a legacy ``module_class``)."""
    if "task" in info:
        return info["task"]
    legacy = info.get("module_class")
    if isinstance(legacy, str) and legacy in _LEGACY_TASKS:
        return _LEGACY_TASKS[legacy]
    raise KeyError(
        f"the file names no registered task (got module_class={legacy!r}); interpzoo loads only its own "
        f"registered tasks ({', '.join(list_tasks())}) and never imports a class a file names"
    )


def default_bundle(name: str) -> str:
    """The shipped bundle ``pretrained=True`` loads for a model name: of its ``<name>.<data>_s<seed>`` bundles the
    one with the plainest tag (shortest, then first by name: ``baseline_resnet18s.partshapes_s0`` before
    ``baseline_resnet18s.partshapes_partscale_s0``)."""
    for bundle in sorted(list_pretrained(f"{name}.*"), key=lambda b: (len(b), b)):
        return bundle
    have = sorted({b.split(".", 1)[0] for b in list_pretrained()})
    raise ValueError(
        f"{name!r} has no shipped pretrained bundle; pretrained=True works for {', '.join(have) or 'none'}. "
        f"Load a bundle you trained with pretrained='<run>/bundle', or drop pretrained=True for a freshly "
        f"initialised {name}."
    )


def create_model(name: str, pretrained: bool | str = False, **kwargs: Any) -> nn.Module:
    """Create a network by registered name, e.g. ``create_model("baseline_resnet18s", num_classes=10)``.

    Args:
        name: a model name (:func:`list_models`), an architecture name, or ``"name.tag"`` for a
            shipped pretrained bundle (:func:`list_pretrained`).
        pretrained: ``True`` to load the shipped bundle ``name`` (a ``name.tag``, or for a plain model name its
            default bundle, :func:`default_bundle`), or a bundle path.
        **kwargs: constructor arguments overriding the registered defaults (nested dicts merge).
    """
    if pretrained or "." in name:
        from interpzoo.models.bundle import load_pretrained

        source = pretrained if isinstance(pretrained, str) else name
        if pretrained is True and "." not in name:
            source = default_bundle(name)
        if kwargs:
            raise ValueError(
                f"constructor arguments ({', '.join(sorted(kwargs))}) cannot change a pretrained bundle: it "
                f"loads as it was trained; drop them, or drop pretrained= for a freshly initialised {name!r}"
            )
        return load_pretrained(source)
    return build_model({"name": name, **{k: v for k, v in kwargs.items() if v is not None}})
