"""Pre-flight validation of a composed config, before seeding, data loading or logger start-up.

Hydra reports a typo in a group option well, but a typo in a key only as "Could not override" and
a wrong constructor argument only at instantiation, after work has started. This module walks every
``_target_`` node, imports the callable, checks keys against its signature (with did-you-mean) and
simple types against its annotations, checks registry names and data paths, and reports every
problem at once.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
import os
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

import interpzoo.conf  # noqa: F401  (registers the entry configs' structured schemas)
from interpzoo.utils import UsageError, did_you_mean

_HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
# Arguments the runner passes itself, so a config need not (and must not) set them.
_INJECTED = {"model": {"data_info"}, "trainer": {"callbacks", "logger", "plugins"}}
# Paths checked up front; sub-folders of a root are checked by the datamodule itself (DataError).
_PATH_KEYS = ("root", "path", "concepts_train_dir", "concepts_test_dir")


_OWN_PACKAGES = ("models.", "datamodules.", "metrics.", "layers.", "interpzoo.")


class ConfigError(UsageError, ValueError):
    """The composed config has problems; the message lists each with its fix."""


# model.* keys of interpzoo 0.1 (before the LightningModules took the network config as one argument, net)
_RENAMED_MODEL_KEYS = {"arch": "net.name", "model_args": "net", "backbone": "net.backbone"}


def renamed_key(key: str) -> str | None:
    """The current spelling of an old dotted key (``model.model_args.X`` -> ``model.net.X``, ``model.arch`` ->
    ``model.net.name``, ``model.backbone.X`` -> ``model.net.backbone.X``), or ``None`` if it is not an old one."""
    parts = key.split(".")
    if len(parts) >= 2 and parts[0] == "model" and parts[1] in _RENAMED_MODEL_KEYS:
        return ".".join(["model", _RENAMED_MODEL_KEYS[parts[1]], *parts[2:]])
    return None


def _renamed_message(key: str, new: str) -> str:
    return (
        f"{key} was renamed to {new}: the network settings are one argument now, "
        "model.net: {name: <model name>, <constructor arguments>, backbone: {...}}"
    )


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
            new = renamed_key(f"{path}.{key}")
            if new and not accepts_any:
                problems.append(_renamed_message(f"{path}.{key}", new))
            elif not accepts_any:
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
    """``model.net``: the registry name, its keys against the architecture's constructor, the backbone's keys;
    the optimizer and scheduler names."""
    from interpzoo.models.backbones import build_backbone, list_backbones
    from interpzoo.models.registry import architecture_parameters, resolve_model_name

    problems: list[str] = []
    net = model.get("net")
    if net is not None and not isinstance(net, DictConfig):
        problems.append(
            f"model.net={net!r}: must be a mapping {{name: <model name>, <constructor arguments>}}"
        )
        net = None
    backbone = net.get("backbone") if net is not None else None
    if isinstance(backbone, DictConfig):
        bparams = inspect.signature(build_backbone).parameters
        for key in backbone:
            if key not in bparams or key == "in_chans":
                problems.append(
                    f"model.net.backbone.{key}: backbones take no {key!r}{did_you_mean(key, bparams)}"
                )
        name = backbone.get("name")
        if name is not None and name not in list_backbones():
            problems.append(
                f"model.net.backbone.name={name!r} is unknown{did_you_mean(name, list_backbones())}; "
                f"choose from {list_backbones()}"
            )
    from interpzoo.models.optim import _OPTIMIZERS, _SCHEDULERS

    for key, names in (("optimizer", list(_OPTIMIZERS)), ("scheduler", list(_SCHEDULERS))):
        node = model.get(key) if isinstance(model, DictConfig) else None
        name = node.get("name") if isinstance(node, DictConfig) else None
        if name is not None and str(name).lower() not in names:
            problems.append(
                f"model.{key}.name={name!r} is unknown{did_you_mean(str(name), names)}; choose one of {names}"
            )
    if net is None:
        return problems
    net_name = net.get("name")
    if net_name is None and "_target_" in model:  # the LightningModule's default network
        with contextlib.suppress(ConfigError):
            net_name = getattr(import_target(str(model._get_node("_target_")._value())), "default_net", None)
    if net_name is None:
        return problems
    try:
        arch, _ = resolve_model_name(str(net_name))
    except KeyError as e:
        return [*problems, f"model.net.name: {e.args[0]}"]
    params = architecture_parameters(arch)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key in net:
        # name is the registry name; backbone= composes into every model, trunk-less architectures ignore it
        if key in ("name", "backbone") or key in params or accepts_any:
            continue
        problems.append(
            f"model.net.{key}: architecture {arch!r} (model.net.name={net_name}) has no argument {key!r}"
            f"{did_you_mean(str(key), params)}"
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


# -- values: checked before anything is imported or started (light: no torch) --------------------------------

# data.<key> -> (smallest allowed value, why); whole numbers
_DATA_COUNTS = {
    "n_train": (1, "a run needs training samples"),
    "n_val": (1, "the validation split selects the checkpoint"),
    "n_test": (1, "the test split gives the final metrics"),
    "n_concept_train": (1, "each concept probe set needs images"),
    "n_concept_test": (1, "each concept probe set needs images"),
    "batch_size": (1, "samples per step"),
    "num_workers": (0, "DataLoader worker processes; 0 loads in the main process"),
    "num_classes": (2, "a classifier needs two classes or more"),
}
# data.<key> -> (low, high, low included): fractions of a split
_DATA_FRACTIONS = {"val_fraction": (0.0, 1.0, True), "test_fraction": (0.0, 1.0, False)}
EVAL_SPLITS = ("val", "test")
EVAL_NEEDS_CKPT = (
    "eval needs ckpt_path=<a .ckpt file or a bundle folder>, e.g. "
    "python eval.py ckpt_path=logs/train/runs/<run>/bundle"
)
# files and folders of a finished (or started) run: a new run into that folder would replace them
RUN_RESULTS = ("metrics.json", "config.yaml", "bundle", "checkpoints")


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _resolved(node: DictConfig, key: str) -> tuple[bool, Any]:
    """``(True, value)`` for a set, resolvable value; ``(False, None)`` for ``???`` or a failing interpolation."""
    if OmegaConf.is_missing(node, key):
        return False, None
    try:
        return True, OmegaConf.select(node, key, throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - ${hydra:...} before Hydra runs; reported where it is used
        return False, None


def _missing_problems(node: Any, path: str = "") -> list[str]:
    """``key: ???`` values nobody set (without resolving anything)."""
    problems: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():  # noqa: SIM118 - keys() lists ??? values, iteration over node does too
            full = f"{path}.{key}" if path else str(key)
            if full == "hydra" or key in _HYDRA_KEYS:
                continue
            if OmegaConf.is_missing(node, key):
                problems.append(f"{full} is required (???): set it on the command line, e.g. {full}=...")
            else:
                problems += _missing_problems(node._get_node(key), full)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            problems += _missing_problems(node._get_node(i), f"{path}[{i}]")
    return problems


def _optimizer_problems(node: Any, path: str) -> list[str]:
    """Learning rates and weight decays anywhere under ``model`` (also in ``param_groups``)."""
    problems: list[str] = []
    if isinstance(node, DictConfig):
        for key in node.keys():  # noqa: SIM118
            full = f"{path}.{key}"
            if key in ("lr", "weight_decay"):
                ok, value = _resolved(node, str(key))
                if not ok or value is None:
                    continue
                if (
                    not _number(value)
                    or not math.isfinite(value)
                    or value < 0
                    or (key == "lr" and value == 0)
                ):
                    what = (
                        "the learning rate must be a finite number > 0"
                        if key == "lr"
                        else ("the weight decay must be a finite number >= 0")
                    )
                    example = "0.001" if key == "lr" else "0.0001"
                    problems.append(f"{full}={value!r}: {what}; set e.g. {full}={example}")
            else:
                problems += _optimizer_problems(node._get_node(key), full)
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            problems += _optimizer_problems(node._get_node(i), f"{path}[{i}]")
    return problems


def _data_value_problems(data: DictConfig) -> list[str]:
    problems: list[str] = []
    for key, (low, why) in _DATA_COUNTS.items():
        if key not in data:
            continue
        ok, value = _resolved(data, key)
        if (
            ok
            and value is not None
            and (not isinstance(value, int) or isinstance(value, bool) or value < low)
        ):
            problems.append(
                f"data.{key}={value!r}: must be a whole number >= {low} ({why}); set data.{key}=..."
            )
    for key, (low, high, closed) in _DATA_FRACTIONS.items():
        if key not in data:
            continue
        ok, value = _resolved(data, key)
        if not ok or value is None:
            continue
        inside = _number(value) and (low <= value if closed else low < value) and value < high
        if not inside:
            interval = f"{'[' if closed else '('}{low:g}, {high:g})"
            problems.append(
                f"data.{key}={value!r}: a fraction of a split, must be in {interval}; set data.{key}=0.1"
            )
    if "image_size" in data:
        ok, value = _resolved(data, "image_size")
        sizes = list(value) if isinstance(value, list | tuple | ListConfig) else [value]
        if (
            ok
            and value is not None
            and not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)
        ):
            problems.append(f"data.image_size={value!r}: must be a side in pixels >= 1 (or [height, width])")
    return problems


def _checkpoint_path_problems(cfg: DictConfig, entry: str | None) -> list[str]:
    if "ckpt_path" not in cfg or OmegaConf.is_missing(cfg, "ckpt_path"):
        return []
    ok, value = _resolved(cfg, "ckpt_path")
    if not ok or value is None or value == "":
        return []
    path = Path(str(value)).expanduser()
    if not path.exists():
        what = (
            "a .ckpt file or a bundle folder"
            if entry == "eval"
            else "a .ckpt file (e.g. <run>/checkpoints/last.ckpt)"
        )
        return [f"ckpt_path={value}: no such file or folder; give {what}"]
    if path.is_dir():
        if entry == "eval":
            missing = [n for n in ("config.json", "model.safetensors") if not (path / n).is_file()]
            if missing:
                return [
                    f"ckpt_path={value} is a folder but not a model bundle (it has no {' and no '.join(missing)}); "
                    "give a .ckpt file or a bundle folder (<run>/bundle)"
                ]
            return _bundle_config_problems(path / "config.json")
        hint = (
            " (it is a bundle: evaluate it with `python eval.py ckpt_path=...`)"
            if (path / "config.json").is_file()
            else ""
        )
        return [
            f"ckpt_path={value} is a folder{hint}; a run resumes from a Lightning checkpoint file, "
            "e.g. ckpt_path=<run>/checkpoints/last.ckpt"
        ]
    return _checkpoint_file_problems(path)


def _checkpoint_file_problems(path: Path) -> list[str]:
    """A file that cannot be a checkpoint at all: torch.save writes a zip archive (its directory at the end).

    The same check as :func:`interpzoo.models.checkpoint.read_checkpoint`, without importing torch; legacy
    (non-zip) PyTorch files, which start with a pickle opcode, are left to it.
    """
    import zipfile

    with path.open("rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":
        return []
    what = "truncated or damaged" if head == b"PK\x03\x04" else "not a PyTorch checkpoint"
    return [
        f"{path} cannot be read: it is {what}. Use another checkpoint of the run "
        "(<run>/checkpoints/last.ckpt or epoch_*.ckpt), or train again."
    ]


def _bundle_config_problems(file: Path) -> list[str]:
    """A bundle's ``config.json`` that is not a JSON object (as :func:`interpzoo.models.bundle.read_bundle_config`)."""
    import json

    reexport = (
        "export the bundle again (python train.py ... writes <run>/bundle; interpzoo.save_pretrained(net, "
        "folder) from Python) or copy the folder again"
    )
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        return [f"{file} is not text (not UTF-8 JSON); the bundle is damaged: {reexport}"]
    except json.JSONDecodeError as e:
        return [
            f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the bundle is damaged "
            f"or was edited: fix the file, or {reexport}"
        ]
    if not isinstance(config, dict):
        return [f"{file} holds a JSON {type(config).__name__}, not an object: {reexport}"]
    return []


def value_problems(cfg: DictConfig, entry: str | None = None) -> list[str]:
    """Problems of the config's values that need no import: ``???`` left unset, learning rates, split sizes
    and fractions, ``split``, ``seed``, ``overwrite``, ``ckpt_path`` and data paths.

    ``entry`` is ``"train"`` or ``"eval"`` (the command), ``None`` when unknown. Used by :func:`check_run`
    before Hydra starts, by :mod:`interpzoo.cli` before the heavy imports, and by :func:`validate_config`.
    """
    problems: list[str] = []
    for problem in _missing_problems(cfg):
        problems.append(EVAL_NEEDS_CKPT if problem.startswith("ckpt_path ") else problem)
    has_ckpt = "ckpt_path" in cfg.keys() and bool(_resolved(cfg, "ckpt_path")[1])  # noqa: SIM118 - ??? too
    if entry == "eval" and EVAL_NEEDS_CKPT not in problems and not has_ckpt:
        problems.append(EVAL_NEEDS_CKPT)
    if isinstance(cfg.get("model"), DictConfig):
        problems += _optimizer_problems(cfg.model, "model")
    if isinstance(cfg.get("data"), DictConfig):
        problems += _data_value_problems(cfg.data)
        problems += _path_problems(cfg.data)
    if isinstance(cfg.get("trainer"), DictConfig):
        for key in ("max_epochs", "max_steps"):
            ok, value = _resolved(cfg.trainer, key) if key in cfg.trainer else (False, None)
            if (
                ok
                and value is not None
                and (not isinstance(value, int) or isinstance(value, bool) or (value < 1 and value != -1))
            ):
                problems.append(f"trainer.{key}={value!r}: must be a whole number >= 1, or -1 for no limit")
    for key, kind in (("seed", int), ("overwrite", bool)):
        if key not in cfg:
            continue
        ok, value = _resolved(cfg, key)
        if (
            ok
            and value is not None
            and (not isinstance(value, kind) or (kind is int and isinstance(value, bool)))
        ):
            expected = "a whole number" if kind is int else "true or false"
            problems.append(f"{key}={value!r}: must be {expected}")
    if entry == "eval" and "split" in cfg:
        ok, split = _resolved(cfg, "split")
        if ok and split not in EVAL_SPLITS:
            problems.append(
                f"split={split!r}: eval evaluates the val or the test split{did_you_mean(str(split), EVAL_SPLITS) or ';'} "
                "set split=val or split=test"
            )
    problems += _checkpoint_path_problems(cfg, entry)
    return problems


def run_folder_problems(out_dir: str | Path, cfg: DictConfig, entry: str | None = None) -> list[str]:
    """Refuse a run into a folder that holds another run's results (:data:`RUN_RESULTS`).

    Allowed with ``overwrite=true``, and for ``python train.py ckpt_path=<run>/checkpoints/<file>.ckpt``
    resuming into its own folder ``<run>``.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        return [f"the run folder {out} is a file; choose another folder with hydra.run.dir=<folder>"]
    if not out.is_dir():
        return []
    found = [
        n for n in RUN_RESULTS if (out / n).is_file() or ((out / n).is_dir() and any((out / n).iterdir()))
    ]
    if not found or cfg.get("overwrite") is True:
        return []
    ok, ckpt = _resolved(cfg, "ckpt_path") if "ckpt_path" in cfg else (False, None)
    if entry != "eval" and ok and ckpt:
        with contextlib.suppress(OSError, ValueError):
            Path(str(ckpt)).expanduser().resolve().relative_to(out.resolve())
            return []  # resuming a run into its own folder
    resume = out / "checkpoints" / "last.ckpt"
    hint = f", resume it with ckpt_path={resume}" if entry != "eval" and resume.is_file() else ""
    return [
        f"the run folder {out} already holds another run's results ({', '.join(found)}), and a run never "
        f"replaces them: leave hydra.run.dir (hydra.sweep.dir with -m) out for a new timestamped folder or choose "
        f"a new one{hint}, or add overwrite=true to replace them"
    ]


def validate_config(
    cfg: DictConfig, required: tuple[str, ...] = ("data", "model", "trainer"), entry: str | None = None
) -> None:
    """Raise :class:`ConfigError` listing every problem of the composed config, or return quietly.

    ``entry`` (``"train"``/``"eval"``) selects the command-specific value checks of :func:`value_problems`.
    """
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
    problems += value_problems(cfg, entry)
    if problems:
        problems = list(dict.fromkeys(problems))  # a ??? value is found by two checks
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _parse_overrides(overrides: list[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - syntax errors are reported by Hydra itself, with the position
        return []


def _is_group(name: str, groups: set[str]) -> bool:
    """``model``, ``hparams_search``, ``hydra/launcher``: a config group (a folder), not a key."""
    return "/" in name or name in groups


def _compose_overrides(parsed: list[Any], groups: set[str], extra_config_dir: str | None) -> list[str]:
    """The overrides that shape the job config: group choices (a sweep's first choice) and ``+``/``~`` edits."""
    out: list[str] = []
    searchpath: list[str] = []
    for o in parsed:
        name = o.key_or_group
        if name == "hydra.searchpath":
            searchpath += [str(v) for v in (o.value() or [])]
            continue
        if name == "hydra" or name.startswith(("hydra.", "hydra/")):
            continue  # Hydra's own settings and groups shape the hydra node only
        if not _is_group(name, groups) and not (o.is_add() or o.is_delete() or o.is_force_add()):
            continue  # a plain key: looked up, not composed
        if o.is_sweep_override():
            first = next(iter(o.sweep_string_iterator()), None)
            if first is not None:
                out.append(f"{o.get_key_element()}={first}")
        else:
            out.append(o.input_line)
    if extra_config_dir is not None:
        searchpath.append(f"file://{Path(extra_config_dir).resolve()}")
    if searchpath:
        out.append("hydra.searchpath=[" + ",".join(searchpath) + "]")
    return out


def check_override_keys(
    config_dir: str, config_name: str, overrides: list[str], extra_config_dir: str | None = None
) -> None:
    """Did-you-mean for ``key=value`` overrides naming keys that do not exist.

    Composes the config with the group choices and ``+``/``~`` edits of ``overrides`` (a sweep's first
    choice; ``extra_config_dir`` is Hydra's ``--config-dir``), then looks up every other plain override.
    Never blocks what Hydra owns: ``hydra.*`` keys, ``hydra/<group>=`` choices, ``+key=`` additions,
    ``???`` values set on the command line, sweeps (``seed=0,1``). A command line asking for a sweeper
    or launcher plugin that is not installed gets the extra to install. Raises :class:`ConfigError`.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from interpzoo.sweeps import missing_plugins

    problems = missing_plugins(overrides)
    if problems:
        raise ConfigError("missing plugin:\n  - " + "\n  - ".join(problems))
    groups = {p.name for p in Path(config_dir).iterdir() if p.is_dir()}
    parsed = _parse_overrides(overrides)
    plain = []
    for o in parsed:
        name = o.key_or_group
        if o.is_add() or o.is_delete() or o.is_force_add() or name == "hydra" or name.startswith("hydra."):
            continue
        if not _is_group(name, groups):
            plain.append((o.input_line, name))
    if not plain:
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(
                config_name=config_name,
                overrides=_compose_overrides(parsed, groups, extra_config_dir),
                return_hydra_config=True,
            )
    except Exception:  # noqa: BLE001 - group typos etc. are reported by Hydra itself with its option list
        return
    finally:
        GlobalHydra.instance().clear()
    problems = missing_plugins([], composed=cfg)
    if problems:
        raise ConfigError("missing plugin:\n  - " + "\n  - ".join(problems))
    for o, key in plain:
        new = renamed_key(key)
        if new is not None:
            problems.append(f"override {o!r}: {_renamed_message(key, new)}; write {o.replace(key, new, 1)!r}")
            continue
        node: Any = cfg
        walked: list[str] = []
        for part in key.split("."):
            # keys() lists ??? (MISSING) values too, which `part in node` does not
            if isinstance(node, DictConfig) and part in node.keys():  # noqa: SIM118
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


def check_command_line(config_dir: str, config_name: str, argv: list[str]) -> None:
    """:func:`check_override_keys` for a whole command line, parsed as Hydra parses it.

    Honours ``--config-dir``/``-cd`` (an extra config folder) and ``--config-name``/``-cn``; flags such as
    ``-m``, ``--cfg job`` or ``--info`` are Hydra's. With ``--config-path``/``-cp`` (another primary
    folder) or ``--shell-completion`` nothing is checked here; Hydra reports what it finds.
    """
    from hydra._internal.utils import get_args_parser

    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error; Hydra prints it again with its usage line
        return
    if args.config_path is not None or args.shell_completion:
        return
    if args.config_dir is not None and not Path(args.config_dir).is_dir():
        raise ConfigError(
            f"--config-dir {args.config_dir!r}: no such folder; give an existing folder of configs"
        )
    check_override_keys(config_dir, args.config_name or config_name, list(args.overrides), args.config_dir)


def _is_child_rank() -> bool:
    """A DDP process other than the first (Lightning's re-launched scripts, torchrun, SLURM tasks).

    Those start after (or with) rank 0 in the same run folder, which rank 0 may already have written to.
    """
    return any(
        int(os.environ.get(k, "0") or 0) > 0 for k in ("LOCAL_RANK", "RANK", "NODE_RANK", "SLURM_PROCID")
    )


def check_run_folder(out_dir: str | Path, cfg: DictConfig, entry: str | None = None) -> None:
    """Raise :class:`ConfigError` from :func:`run_folder_problems` (never in a DDP child rank)."""
    if _is_child_rank():
        return
    problems = run_folder_problems(out_dir, cfg, entry)
    if problems:
        raise ConfigError("refusing to overwrite: " + " ".join(problems))


def check_values(cfg: DictConfig, entry: str | None = None) -> None:
    """Raise :class:`ConfigError` listing :func:`value_problems`."""
    problems = value_problems(cfg, entry)
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _missing_option(e: Exception) -> ConfigError:
    """Hydra's "Could not find 'model/protopnett'" as one line with did-you-mean and the options."""
    missing = str(getattr(e, "missing_cfg_file", "") or "")
    options = [str(o) for o in (getattr(e, "options", None) or [])]
    group, _, name = missing.rpartition("/")
    if not group or not options:
        return ConfigError(str(e).split("\nConfig search path")[0])
    return ConfigError(
        f"{group}={name}: there is no such option{did_you_mean(name, options) or '.'} Choose one of "
        f"{', '.join(options)} (the files in conf/{group}/, or your own with --config-dir)."
    )


def _schema_error(e: Exception) -> ConfigError | None:
    """A command-line value of the wrong type for the entry config's schema, as one line (or ``None``)."""
    from omegaconf.errors import ValidationError

    cause = e.__cause__
    if not isinstance(cause, ValidationError):
        return None
    override = str(e).removeprefix("Error merging override ").strip()
    reason = str(getattr(cause, "msg", cause)).strip().splitlines()[0]
    return ConfigError(f"invalid override: {override}: {reason}")


def check_run(config_dir: str, config_name: str, argv: list[str], entry: str | None = None) -> None:
    """The pre-flight of a command line, before Hydra starts: keys, values and the run folder.

    Composes the whole command line once and raises :class:`ConfigError` for a config group option that
    does not exist (did-you-mean), a value of the wrong type, :func:`value_problems` and
    :func:`run_folder_problems` of ``hydra.run.dir``, so that nothing is created or replaced. A command line
    that does not compose (a mistyped key, ...) goes to :func:`check_command_line` for its did-you-mean.
    ``-m`` (or a config with ``hydra.mode: MULTIRUN``), ``--cfg``, ``--help`` and the like get the key check
    only: their jobs are checked inside each job (:mod:`interpzoo.cli`). Anything else Hydra reports itself.
    """
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from hydra.errors import MissingConfigException

    from interpzoo.sweeps import missing_plugins

    if "--version" in argv:
        return
    try:
        args, _ = get_args_parser().parse_known_args(argv)
    except SystemExit:  # argparse's own usage error; Hydra prints it again with its usage line
        return
    single = not (
        args.config_path is not None
        or args.shell_completion
        or args.help
        or args.hydra_help
        or args.info
        or args.cfg is not None
        or args.multirun
        or args.experimental_rerun is not None
    )
    overrides = list(args.overrides)
    if args.config_dir is not None:
        if any(o.startswith("hydra.searchpath") for o in overrides):
            single = False  # two search paths to merge: leave it to check_command_line and Hydra
        overrides.append(f"hydra.searchpath=[file://{Path(args.config_dir).resolve()}]")
    problems = missing_plugins(list(args.overrides))
    if not single or problems or (args.config_dir is not None and not Path(args.config_dir).is_dir()):
        check_command_line(config_dir, config_name, argv)
        return
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
            cfg = compose(
                config_name=args.config_name or config_name, overrides=overrides, return_hydra_config=True
            )
    except MissingConfigException as e:
        raise _missing_option(e) from None
    except Exception as e:  # noqa: BLE001 - Hydra reports what is not ours to explain, with its own message
        schema = _schema_error(e)
        if schema is not None:
            raise schema from None
        check_command_line(config_dir, config_name, argv)  # a mistyped key: did-you-mean
        return
    finally:
        GlobalHydra.instance().clear()
    problems = missing_plugins([], composed=cfg)
    if problems:
        raise ConfigError("missing plugin:\n  - " + "\n  - ".join(problems))
    if str(cfg.hydra.get("mode") or "") == "MULTIRUN":
        return
    check_values(cfg, entry)
    HydraConfig.instance().set_config(cfg)  # ${hydra:runtime.cwd} in paths.*, hence in hydra.run.dir
    try:
        run_dir = OmegaConf.select(cfg, "hydra.run.dir", throw_on_resolution_failure=True)
    except Exception:  # noqa: BLE001 - an unresolvable run folder is Hydra's to report
        return
    if run_dir:
        check_run_folder(Path(str(run_dir)), cfg, entry)
