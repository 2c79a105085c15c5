"""Loading Lightning checkpoints safely (``weights_only=True``) and rebuilding their module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from interpzoo.models.registry import resolve_task, task_class
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


def load_checkpoint(path: str | Path, lightning_module: bool = False, eval_mode: bool = True) -> nn.Module:
    """Load an interpzoo Lightning checkpoint.

    Returns the network (``module.net``, with ``data_config``) ready for inference, or the whole
    LightningModule with ``lightning_module=True``.
    """
    ckpt = read_checkpoint(path)
    info = checkpoint_info(ckpt, path)
    cls = module_class(info, path)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(
            f"{path} lacks 'hyper_parameters' or 'state_dict'; it is not a complete checkpoint"
        )
    try:
        module = cls(**hparams)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"{path}: its model settings do not build a {cls.__name__} ({type(e).__name__}: "
            f"{e.args[0] if e.args else e}); it was written by another version of interpzoo or edited"
        ) from None
    from interpzoo.models.bundle import BundleError, load_state_strict

    try:
        load_state_strict(module, ckpt["state_dict"], what=f"checkpoint {path}")
    except BundleError as e:
        raise CheckpointError(str(e)) from None
    out: nn.Module = module if lightning_module else module.net
    if eval_mode:
        out.eval()
    return out
