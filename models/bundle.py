"""Model bundles: ``config.json`` + ``model.safetensors``, loaded without unpickling anything.

``config.json`` holds the architecture name and constructor arguments (from
``net.interpzoo_config``), the data config (input size, mean/std, class, concept and part names),
and free-form provenance (recipe, seed, metrics). ``model.safetensors`` holds the state dict.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import nn

from interpzoo.models.registry import (
    PRETRAINED_DIR,
    build_model,
    check_architecture,
    list_pretrained,
    without_backbone_weights,
)
from interpzoo.utils import UsageError, atomic_write_bytes, atomic_write_text, did_you_mean

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class BundleError(UsageError, RuntimeError):
    """A bundle is missing, incomplete or does not match the network."""


def _contiguous_state(net: nn.Module) -> dict[str, torch.Tensor]:
    # safetensors rejects shared storage: clone tensors that alias another entry.
    seen: dict[tuple[int, int], str] = {}
    out: dict[str, torch.Tensor] = {}
    for k, v in net.state_dict().items():
        t = v.detach().cpu()
        key = (t.untyped_storage().data_ptr(), t.storage_offset()) if t.numel() else (id(t), 0)
        t = t.clone().contiguous() if key in seen or not t.is_contiguous() else t
        seen[key] = k
        out[k] = t
    return out


def save_pretrained(
    net: nn.Module,
    directory: str | Path,
    data_config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``net`` as a bundle folder; returns its path. Files are written atomically."""
    cfg = getattr(net, "interpzoo_config", None)
    if cfg is None:
        raise BundleError(
            "this network was not built by interpzoo.create_model, so its constructor arguments are "
            "unknown; build it with create_model(...) to export it"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {
        "format_version": FORMAT_VERSION,
        "architecture": cfg["architecture"],
        "model_args": cfg["model_args"],
        "data_config": data_config or getattr(net, "data_config", None) or {},
        **(extra or {}),
    }
    metadata = {"format": "pt", "architecture": cfg["architecture"]}
    atomic_write_bytes(directory / WEIGHTS_NAME, save(_contiguous_state(net), metadata=metadata))
    atomic_write_text(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True))
    return directory


_REEXPORT = (
    "export the bundle again (python train.py ... writes <run>/bundle; interpzoo.save_pretrained(net, folder) "
    "from Python) or copy the folder again"
)


def read_bundle_config(source: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a bundle path or shipped bundle name; :class:`BundleError` if damaged."""
    file = _resolve(source) / CONFIG_NAME
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise BundleError(
            f"{file} is not text (not UTF-8 JSON); the bundle is damaged: {_REEXPORT}"
        ) from None
    except json.JSONDecodeError as e:
        raise BundleError(
            f"{file} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); the bundle is damaged "
            f"or was edited: fix the file, or {_REEXPORT}"
        ) from None
    if not isinstance(config, dict):
        raise BundleError(
            f"{file} holds a JSON {type(config).__name__}, not an object with 'architecture' and 'model_args'; "
            f"{_REEXPORT}"
        )
    return config


def _read_weights(file: Path, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with an error naming the file, what is wrong with it and the fix."""
    try:
        return load_file(str(file), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (and OSError)
        with file.open("rb") as f:
            head = f.read(8)
        size = file.stat().st_size
        if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
            raise BundleError(
                f"{file} is a pickled PyTorch file (torch.save), not safetensors; interpzoo never unpickles bundle "
                "weights. Convert it: safetensors.torch.save_file(torch.load(f, weights_only=True), "
                f"'{WEIGHTS_NAME}'), or {_REEXPORT}"
            ) from None
        what = "empty" if size == 0 else f"truncated or damaged ({size} bytes; {type(e).__name__}: {e})"
        raise BundleError(f"{file} cannot be read as safetensors: it is {what}; {_REEXPORT}") from None


def _resolve(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        missing = [n for n in (CONFIG_NAME, WEIGHTS_NAME) if not (path / n).is_file()]
        if missing:
            raise BundleError(
                f"{path} is not a model bundle: it needs {CONFIG_NAME} and {WEIGHTS_NAME} and has no "
                f"{' and no '.join(missing)}; give a bundle folder (<run>/bundle) or {_REEXPORT}"
            )
        return path
    shipped = PRETRAINED_DIR / str(source)
    if shipped.is_dir():
        return _resolve(shipped)
    if path.suffix == ".ckpt" or path.is_file():
        raise BundleError(
            f"{path} is a file, not a bundle folder; for a Lightning checkpoint use "
            f"interpzoo.load_checkpoint({str(path)!r})"
        )
    raise BundleError(
        f"no bundle at {str(source)!r}{did_you_mean(str(source), list_pretrained())}; "
        f"pass a folder with {CONFIG_NAME} and {WEIGHTS_NAME}, or a name from interpzoo.list_pretrained()"
    )


def load_pretrained(
    source: str | Path, map_location: str | torch.device = "cpu", eval_mode: bool = True
) -> nn.Module:
    """Load a bundle (folder path or shipped name) and return the network ready for inference.

    The network gets ``net.data_config`` (input size, mean/std, class/concept names) and
    ``net.bundle_config`` (the whole ``config.json``), and is placed on ``map_location`` (``"cuda"``: a
    network on the GPU). Nothing is unpickled.
    """
    path = _resolve(source)
    config = read_bundle_config(path)
    for key in ("architecture", "model_args"):
        if key not in config:
            raise BundleError(f"{path / CONFIG_NAME} has no {key!r} entry; it was not written by interpzoo")
    if not isinstance(config["model_args"], dict):
        raise BundleError(f"{path / CONFIG_NAME}: 'model_args' must be a JSON object; {_REEXPORT}")
    net = build_model(
        without_backbone_weights({**config["model_args"], "name": check_architecture(config["architecture"])})
    )
    state = _read_weights(path / WEIGHTS_NAME, map_location)
    load_state_strict(net, state, what=f"bundle {path}")
    net.to(map_location)  # the network is built on the CPU: place it where its weights were asked for
    net.data_config = config.get("data_config", {})
    net.bundle_config = config
    if eval_mode:
        net.eval()
    return net


def load_state_strict(net: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that says which model the weights belong to."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shape:
        arch = getattr(net, "interpzoo_config", {}).get("architecture", type(net).__name__)
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shape:
            k = shape[0]
            parts.append(
                f"{len(shape)} shape mismatches (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})"
            )
        raise BundleError(
            f"{what} does not fit a {arch!r} network: " + "; ".join(parts) + ". It was probably saved from "
            "another model or with other constructor arguments."
        )
    net.load_state_dict(state, strict=True)
