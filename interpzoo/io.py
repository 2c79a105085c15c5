"""Plain-data conversion of tensors and numpy values, and atomic JSON writes of such data."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from interpzoo import utils


def to_plain(value: Any) -> Any:
    """Tensors, numpy scalars and nested containers to JSON-able Python values."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        try:
            return value.item()
        except (ValueError, AttributeError):
            pass
    if isinstance(value, dict):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else value
    if isinstance(value, Path):
        return str(value)
    return value


def write_json(path: str | Path, data: Any) -> Path:
    """Write ``data`` (tensors allowed, see :func:`to_plain`) as indented JSON atomically.

    See :func:`interpzoo.utils.write_json` (temporary file, fsync, ``os.replace``).
    """
    return utils.write_json(path, to_plain(data))
