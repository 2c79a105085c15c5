"""Checkpoint I/O that never leaves a half-written file behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO

from interpzoo.utils import atomic_open


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``.

    A run killed mid-write leaves the previous checkpoint intact, so ``ckpt_path=.../last.ckpt``
    always resumes from a complete file.
    """
    with atomic_open(Path(path), "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` writing local checkpoints with :func:`atomic_torch_save`.

    Loading goes through the parent with ``weights_only=True`` (torch's default): checkpoints hold
    plain data only.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # remote file systems: keep Lightning's own transaction logic
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)
