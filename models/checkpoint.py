"""Loading Lightning checkpoints safely (``weights_only=True``) and rebuilding their module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from interpzoo.models.registry import (
    build_model,
    check_architecture,
    resolve_task,
    task_class,
    upgrade_hparams,
    without_backbone_weights,
)
from interpzoo.utils import UsageError

CHECKPOINT_KEY = "interpzoo"
# the run's model, data and seed settings (interpzoo.run.RunConfigInCheckpoint), to check a resume against
RUN_CONFIG_KEY = "interpzoo_run"
_ZIP_MAGIC = b"PK\x03\x04"


class CheckpointError(UsageError, RuntimeError):
    """A checkpoint is missing, unsafe to load, or belongs to another model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if path.is_dir():
        hint = (
            " It is a bundle: load it with interpzoo.load_pretrained(path) or evaluate it with "
            "`python eval.py ckpt_path=...`."
            if (path / "config.json").is_file()
            else ""
        )
        raise CheckpointError(f"{path} is a folder, not a checkpoint file (.ckpt).{hint}")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path}; give an existing .ckpt file (e.g. <run>/checkpoints/last.ckpt)"
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason
        lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
        reason = next((ln for ln in lines if "Unsupported global" in ln), lines[0])
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise CheckpointError(
                f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: {reason}). interpzoo "
                "checkpoints hold plain data only; a file that needs unpickling of code was not written by "
                "interpzoo and is not loaded."
            ) from None
        with path.open("rb") as f:
            head = f.read(4)
        what = "truncated or damaged" if head == _ZIP_MAGIC else "not a PyTorch checkpoint"
        raise CheckpointError(
            f"{path} cannot be read: it is {what} ({type(e).__name__}: {reason}). Use another checkpoint of the run "
            "(<run>/checkpoints/last.ckpt or epoch_*.ckpt), or train again."
        ) from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint (a dict)")
    return ckpt


def checkpoint_info(ckpt: dict[str, Any], path: str | Path = "") -> dict[str, Any]:
    info = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or not ("task" in info or "module_class" in info):
        hint = (
            " It looks like a plain state dict (torch.save(model.state_dict())): load it into a network with "
            "net.load_state_dict(torch.load(path, weights_only=True))."
            if "state_dict" not in ckpt and "hyper_parameters" not in ckpt
            else " Lightning checkpoints of other projects cannot be loaded; train with interpzoo."
        )
        raise CheckpointError(f"{path} is not an interpzoo checkpoint (no {CHECKPOINT_KEY!r} entry).{hint}")
    return info


def module_class(info: dict[str, Any], path: str | Path = "") -> type:
    """The LightningModule class of a checkpoint's or bundle's registered task name (never a class path)."""
    try:
        return task_class(resolve_task(info))
    except KeyError as e:
        raise CheckpointError(f"{path or 'the file'}: {e.args[0]}") from None


def checkpoint_hparams(ckpt: dict[str, Any], path: str | Path = "") -> dict[str, Any]:
    """The checkpoint's LightningModule settings in the current shape (:func:`~interpzoo.models.registry.upgrade_hparams`)."""
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path} lacks 'hyper_parameters'; it is not a complete interpzoo checkpoint")
    try:
        return upgrade_hparams(hparams)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e.args[0]}; it was edited or damaged") from None


def _settings_error(path: str | Path, what: str, e: Exception) -> CheckpointError:
    return CheckpointError(
        f"{path}: its model settings do not build a {what} ({type(e).__name__}: "
        f"{e.args[0] if e.args else e}); it was written by another version of interpzoo or edited"
    )


def load_checkpoint(path: str | Path, lightning_module: bool = False, eval_mode: bool = True) -> nn.Module:
    """Load an interpzoo Lightning checkpoint.

    Returns the network ready for inference, with ``data_config``: built by
    :func:`~interpzoo.models.registry.build_model` from the architecture and constructor arguments the
    checkpoint records, with the ``net.`` part of its state dict (no LightningModule is built). With
    ``lightning_module=True``, the whole LightningModule of the checkpoint's registered task.
    """
    from interpzoo.models.bundle import BundleError, load_state_strict

    ckpt = read_checkpoint(path)
    info = checkpoint_info(ckpt, path)
    try:
        resolve_task(info)  # a file naming anything but a registered task is refused before any build
    except KeyError as e:
        raise CheckpointError(f"{path}: {e.args[0]}") from None
    hparams = checkpoint_hparams(ckpt, path)
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} lacks 'state_dict'; it is not a complete checkpoint")
    recorded = isinstance(info.get("architecture"), str) and isinstance(info.get("model_args"), dict)
    out: nn.Module
    if lightning_module or not recorded:
        cls = module_class(info, path)
        if isinstance(hparams.get("net"), dict):
            hparams = {**hparams, "net": without_backbone_weights(hparams["net"])}
        try:
            module = cls(**hparams)
        except (KeyError, TypeError, ValueError) as e:
            raise _settings_error(path, cls.__name__, e) from None
        try:
            load_state_strict(module, state, what=f"checkpoint {path}")
        except BundleError as e:
            raise CheckpointError(str(e)) from None
        out = module if lightning_module else module.net
    else:
        data_info = dict(hparams.get("data_info") or {})
        try:
            out = build_model(
                without_backbone_weights(
                    {**info["model_args"], "name": check_architecture(info["architecture"])}
                ),
                data_info,
            )
        except (KeyError, TypeError, ValueError) as e:
            raise _settings_error(path, f"{info['architecture']!r} network", e) from None
        own = {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}
        try:
            load_state_strict(out, own, what=f"checkpoint {path}")
        except BundleError as e:
            raise CheckpointError(str(e)) from None
    if eval_mode:
        out.eval()
    return out
