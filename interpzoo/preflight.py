"""Pre-flight validation of a composed config, before seeding, data loading or logger start-up.

Hydra reports a typo in a group option well, but a typo in a key only as "Could not override" and
a wrong constructor argument only at instantiation, after work has started. This module walks every
``_target_`` node, imports the callable, checks keys against its signature (with did-you-mean) and
simple types against its annotations, checks registry names and data paths, and reports every
problem at once (``shared/specs/ecosystem.md`` §4.7).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from interpzoo.models.errors import did_you_mean

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Arguments the runner passes itself, so a config need not (and must not) set them.
_INJECTED = {"model": {"data_info"}, "trainer": {"callbacks", "logger", "plugins"}}
# Paths checked up front; sub-folders of a root are checked by the datamodule itself (DataError).
_PATH_KEYS = ("root", "path", "concepts_train_dir", "concepts_test_dir")


_OWN_PACKAGES = ("models.", "datamodules.", "metrics.", "layers.", "interpzoo.")


class ConfigError(ValueError):
    """The composed config has problems; the message lists each with its fix."""


def import_target(target: str) -> Any:
    """Import ``"pkg.module.Name"``; errors name the closest existing module attribute."""
    mod_name, _, attr = target.rpartition(".")
    if not mod_name:
        raise ConfigError(f"_target_ {target!r} is not a dotted path like 'package.module.Class'")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"_target_ {target!r}: cannot import module {mod_name!r} ({e})") from None
    if not hasattr(module, attr):
        names = [n for n in dir(module) if not n.startswith("_")]
        raise ConfigError(
            f"_target_ {target!r}: module {mod_name!r} has no {attr!r}{did_you_mean(attr, names)}"
        )
    return getattr(module, attr)


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path, node
        for k in node:
            if k in _HYDRA_KEYS:
                continue
            yield from _targets(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            yield from _targets(v, f"{path}[{i}]")


def _simple_type_ok(value: Any, annotation: Any) -> bool | None:
    """``True``/``False`` for annotations we can check, ``None`` when we cannot tell."""
    if annotation is inspect.Parameter.empty or annotation is Any:
        return None
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_simple_type_ok(value, a) for a in typing.get_args(annotation)]
        if any(r is True for r in results):
            return True
        return False if all(r is False for r in results) else None
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple) or annotation in (list, tuple):
        return isinstance(value, list | tuple | ListConfig) or None
    if origin is dict or annotation is dict:
        return isinstance(value, dict | DictConfig) or value is None or None
    return None


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _parameters(target: Any) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    """Named parameters, type hints and whether arbitrary keywords are accepted.

    A subclass ``__init__(self, *args, **kwargs)`` that forwards to its parent is followed up the MRO,
    so the parent's named arguments count and unknown keys are still caught.
    """
    functions = (
        [target]
        if not inspect.isclass(target)
        else [c.__init__ for c in target.__mro__ if "__init__" in vars(c)]
    )
    params: dict[str, inspect.Parameter] = {}
    hints: dict[str, Any] = {}
    for fn in functions:
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            return params, hints, True
        with contextlib.suppress(Exception):  # unresolvable annotations: skip type checks
            hints = {**typing.get_type_hints(fn), **hints}
        own = {n: p for n, p in sig.parameters.items() if n != "self"}
        forwards = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in own.values())
        params.update(
            {
                n: p
                for n, p in own.items()
                if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and n not in params
            }
        )
        if not forwards:
            return params, hints, False
        # Only our own classes are known to forward **kwargs to their parent; others may pass them anywhere.
        if not str(getattr(fn, "__module__", "")).startswith(_OWN_PACKAGES):
            return params, hints, True
    return params, hints, True


def _signature_problems(path: str, node: DictConfig, target: Any) -> list[str]:
    problems: list[str] = []
    params, hints, accepts_any = _parameters(target)
    if not params and accepts_any:
        return problems
    group = path.split(".")[0]
    for key in node:
        if key in _HYDRA_KEYS:
            continue
        if key not in params:
            if not accepts_any:
                problems.append(
                    f"{path}.{key}: {_target_name(node)} has no argument {key!r}{did_you_mean(key, params)}"
                )
            continue
        value = node._get_node(key)
        if OmegaConf.is_missing(node, key):
            problems.append(
                f"{path}.{key} is required (???): set it on the command line, e.g. {path}.{key}=..."
            )
            continue
        if isinstance(value, DictConfig | ListConfig):
            continue
        raw = value._value() if hasattr(value, "_value") else value
        if isinstance(raw, str) and "${" in raw:
            try:
                raw = OmegaConf.select(node, key, throw_on_resolution_failure=True)
            except Exception:  # noqa: BLE001 - unresolvable interpolations are reported by Hydra itself
                continue
        ok = _simple_type_ok(raw, hints.get(key, params[key].annotation))
        if ok is False:
            problems.append(
                f"{path}.{key}={raw!r}: expected {_type_name(hints.get(key, params[key].annotation))}, "
                f"got {type(raw).__name__}"
            )
    required = [
        n
        for n, p in params.items()
        if p.default is inspect.Parameter.empty
        and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        and n not in node.keys()  # noqa: SIM118 - "in node" is False for ??? (MISSING) values
        and n not in _INJECTED.get(group, set())
    ]
    problems += [f"{path}: {_target_name(node)} needs argument {n!r}; set {path}.{n}=..." for n in required]
    return problems


def _target_name(node: DictConfig) -> str:
    return str(node._get_node("_target_")._value()).rpartition(".")[2]


def _model_problems(model: DictConfig) -> list[str]:
    from interpzoo.models.backbones import build_backbone, list_backbones
    from interpzoo.models.registry import _ARCHITECTURES, resolve_model_name

    problems: list[str] = []
    backbone = model.get("backbone")
    if backbone is not None:
        bparams = inspect.signature(build_backbone).parameters
        for key in backbone:
            if key not in bparams or key == "in_chans":
                problems.append(
                    f"model.backbone.{key}: backbones take no {key!r}{did_you_mean(key, bparams)}"
                )
        name = backbone.get("name")
        if name is not None and name not in list_backbones():
            problems.append(
                f"model.backbone.name={name!r} is unknown{did_you_mean(name, list_backbones())}; "
                f"choose from {list_backbones()}"
            )
    arch_name = model.get("arch")
    if arch_name is None:
        return problems
    try:
        arch, _ = resolve_model_name(str(arch_name))
    except KeyError as e:
        return [*problems, f"model.arch: {e.args[0]}"]
    params = inspect.signature(_ARCHITECTURES[arch]).parameters
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in model.get("model_args") or {}:
        if key not in params and not accepts_any:
            problems.append(
                f"model.model_args.{key}: architecture {arch!r} has no argument {key!r}{did_you_mean(key, params)}"
            )
    return problems


def _path_problems(data: DictConfig) -> list[str]:
    problems: list[str] = []
    if data.get("download", False):
        return problems
    for key in _PATH_KEYS:
        if key not in data:
            continue
        value = OmegaConf.select(data, key, throw_on_resolution_failure=False)
        if value is None or OmegaConf.is_missing(data, key):
            continue
        p = Path(str(value))
        root = OmegaConf.select(data, "root", throw_on_resolution_failure=False) if key != "root" else None
        candidates = [p] if p.is_absolute() or root is None else [Path(str(root)) / p, p]
        if not any(c.exists() for c in candidates):
            problems.append(f"data.{key}={value!r}: no such file or folder; set data.{key}=<existing path>")
    return problems


def validate_config(cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer")) -> None:
    """Raise :class:`ConfigError` listing every problem of the composed config, or return quietly."""
    problems: list[str] = []
    for group in required:
        if group not in cfg or cfg[group] is None:
            problems.append(f"config has no {group!r} section; add {group}=<option> (see conf/{group}/)")
    for path, node in _targets(cfg):
        if path.startswith("hydra"):
            continue
        try:
            target = import_target(str(node._get_node("_target_")._value()))
        except ConfigError as e:
            problems.append(f"{path}: {e}")
            continue
        problems += _signature_problems(path, node, target)
    if "model" in cfg and cfg.model is not None:
        problems += _model_problems(cfg.model)
    if "data" in cfg and cfg.data is not None:
        problems += _path_problems(cfg.data)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def check_override_keys(config_dir: str, config_name: str, overrides: list[str]) -> None:
    """Did-you-mean for ``key=value`` overrides naming keys that do not exist.

    Composes the config with the group choices of ``overrides`` only, then looks up every other
    plain override (not ``+key``/``~key``/``++key``, not ``hydra.*``). Raises :class:`ConfigError`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    plain, group_choices = [], []
    for o in overrides:
        if "=" not in o or o.startswith(("+", "~", "-")):
            continue
        key = o.split("=", 1)[0]
        if key.startswith("hydra.") or key == "hydra":
            continue
        (group_choices if key in groups or key.split("@")[0] in groups else plain).append(o)
    if not plain:
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=group_choices)
    except Exception:  # noqa: BLE001 - group typos etc. are reported by Hydra itself with its option list
        return
    finally:
        GlobalHydra.instance().clear()
    problems = []
    for o in plain:
        key = o.split("=", 1)[0]
        node: Any = cfg
        walked: list[str] = []
        for part in key.split("."):
            if isinstance(node, DictConfig) and part in node:
                node = node._get_node(part)
                node = node if isinstance(node, DictConfig | ListConfig) else None
                walked.append(part)
                if node is None:
                    break
                continue
            if isinstance(node, DictConfig):
                where = ".".join(walked) or "the top level"
                problems.append(
                    f"override {o!r}: {where} has no key {part!r}{did_you_mean(part, list(node.keys()))} "
                    f"(to add a new key on purpose, write +{o})"
                )
            break
    if problems:
        raise ConfigError("invalid override:\n  - " + "\n  - ".join(problems))
