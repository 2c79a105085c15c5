"""Model bundles: ``config.json`` + ``model.safetensors``, loaded without unpickling anything.

``config.json`` holds the architecture name and constructor arguments (from
``net.interpzoo_config``), the data config (input size, mean/std, class, concept and part names),
and free-form provenance (recipe, seed, metrics). ``model.safetensors`` holds the state dict.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from interpzoo.models.errors import did_you_mean
from interpzoo.models.registry import PRETRAINED_DIR, build_architecture, list_pretrained

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


class BundleError(RuntimeError):
    """A bundle is missing, incomplete or does not match the network."""


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".weights.")
    os.close(fd)
    try:
        save_file(_contiguous_state(net), tmp, metadata={"format": "pt", "architecture": cfg["architecture"]})
        os.replace(tmp, directory / WEIGHTS_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _atomic_write_bytes(directory / CONFIG_NAME, json.dumps(config, indent=2, sort_keys=True).encode())
    return directory


def read_bundle_config(source: str | Path) -> dict[str, Any]:
    """The parsed ``config.json`` of a bundle path or shipped bundle name."""
    return json.loads((_resolve(source) / CONFIG_NAME).read_text())


def _resolve(source: str | Path) -> Path:
    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise BundleError(f"{path} is not a model bundle: it needs {CONFIG_NAME} and {WEIGHTS_NAME}")
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
    ``net.bundle_config`` (the whole ``config.json``). Nothing is unpickled.
    """
    path = _resolve(source)
    config = json.loads((path / CONFIG_NAME).read_text())
    for key in ("architecture", "model_args"):
        if key not in config:
            raise BundleError(f"{path / CONFIG_NAME} has no {key!r} entry; it was not written by interpzoo")
    net = build_architecture(config["architecture"], config["model_args"])
    state = load_file(str(path / WEIGHTS_NAME), device=str(map_location))
    load_state_strict(net, state, what=f"bundle {path}")
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
