"""Shared pieces of the ground-truth scorecard: the held-out split, batching, and the "no ground truth" case."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["NoGroundTruth", "ground_truth_dataset", "ground_truth_batches", "renderer_of"]


class NoGroundTruth(Exception):
    """The data has no ground-truth parts or concepts (real data): the scorecard logs nothing comparable."""


def renderer_of(datamodule: Any) -> Any:
    """The datamodule's :class:`~interpzoo.datamodules.partshapes.PartShapesRenderer`, or :class:`NoGroundTruth`."""
    renderer = getattr(datamodule, "renderer", None)
    if renderer is None or not hasattr(datamodule, "ground_truth_dataset"):
        name = type(datamodule).__name__
        raise NoGroundTruth(
            f"{name} has no ground-truth parts or concepts, so its interpretability metrics have no ceiling; "
            "the scorecard needs PartShapes (data=partshapes)"
        )
    return renderer


def ground_truth_dataset(datamodule: Any, num_samples: int = 500, split: str = "test") -> Dataset:
    """The datamodule's varied-pose held-out split (see ``PartShapesDataModule.ground_truth_dataset``)."""
    renderer_of(datamodule)
    return datamodule.ground_truth_dataset(num_samples, split)


def ground_truth_batches(
    dataset: Dataset,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``dataset`` in order, tensors on ``device`` (floating ones cast to ``dtype`` if given)."""
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        out = {}
        for k, v in batch.items():
            v = v.to(device)
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            out[k] = v
        yield out
