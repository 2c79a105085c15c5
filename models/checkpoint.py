"""Loading Lightning checkpoints safely (``weights_only=True``) and rebuilding their module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from interpzoo.models.registry import resolve_task, task_class

CHECKPOINT_KEY = "interpzoo"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unsafe to load, or belongs to another model."""


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only, never code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the reason
        raise CheckpointError(
            f"{path} cannot be loaded with weights_only=True ({type(e).__name__}: {e}). interpzoo checkpoints "
            "hold plain data only; a file that needs unpickling of code was not written by interpzoo and is "
            "not loaded."
        ) from None


def checkpoint_info(ckpt: dict[str, Any], path: str | Path = "") -> dict[str, Any]:
    info = ckpt.get(CHECKPOINT_KEY)
    if not isinstance(info, dict) or not ("task" in info or "module_class" in info):
        raise CheckpointError(f"{path} is not an interpzoo checkpoint (no {CHECKPOINT_KEY!r} entry)")
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
    module = cls(**ckpt["hyper_parameters"])
    from interpzoo.models.bundle import load_state_strict

    load_state_strict(module, ckpt["state_dict"], what=f"checkpoint {path}")
    out: nn.Module = module if lightning_module else module.net
    if eval_mode:
        out.eval()
    return out
