"""Causal concept edits on PartShapes, shared by the concept scorecards (concept whitening, CBM).

Every held-out image gets one edit per concept, re-rendered with the same layout and noise: where the concept
is absent, one part's colour / shape / texture is changed to a value that carries it; where present, every
part carrying it is changed to a value that does not. A concept score (a whitened axis, a bottleneck unit)
should then move the way of the edit: :func:`~interpzoo.metrics.concept_whitening.intervention_accuracy`.
The edits depend only on the renderer, the split, the concept column and the seed, so two methods scored
with the same seed see the same edited images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from interpzoo.datamodules.partshapes import concept_carriers, concept_edit
from interpzoo.metrics.calibration import Score
from interpzoo.scorecard.common import NoGroundTruth

__all__ = [
    "ConceptEdits",
    "concept_carriers",
    "concept_columns",
    "concept_edit",
    "concept_rows",
    "edited_images",
]


@dataclass
class ConceptEdits:
    """The edited images of one concept on a held-out split.

    Attributes:
        index: ``(M,)`` long, the dataset index of each edited image (images without a single-attribute edit
            are skipped).
        sign: ``(M,)`` float64, ``+1`` where the edit added the concept, ``-1`` where it removed it.
        images: ``(M, C, H, W)`` the re-rendered images, as the dataset's items are.
        truth_after: ``(M,)`` float64, the concept's ground-truth value after the edit.
    """

    index: torch.Tensor
    sign: torch.Tensor
    images: torch.Tensor
    truth_after: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.numel())


def edited_images(dataset: Any, column: int, seed: int = 0) -> ConceptEdits:
    """One edit per image of ``dataset`` (a ``PartShapesDataset``) for the concept in ``column``.

    The edit of image ``i`` is chosen by ``np.random.default_rng([seed, column, i])``, so it does not depend on
    which other images or concepts are scored.
    """
    from interpzoo.datamodules.partshapes import image_to_tensor

    grey = bool(getattr(dataset, "grayscale", False))
    carriers = concept_carriers(dataset.renderer, column)
    idx, signs, images, truth_after = [], [], [], []
    for i in range(len(dataset)):
        spec = dataset.renderer.draw(dataset.split, i)
        edit = concept_edit(carriers, spec.attrs, spec.present, np.random.default_rng([seed, column, i]))
        if edit is None:
            continue
        sample = dataset.render(i, replace_part=edit[0])
        idx.append(i)
        signs.append(edit[1])
        images.append(image_to_tensor(sample.image, grey))
        truth_after.append(float(sample.concepts[column]))
    return ConceptEdits(
        torch.tensor(idx, dtype=torch.long),
        torch.tensor(signs, dtype=torch.float64),
        torch.stack(images) if images else torch.empty(0),
        torch.tensor(truth_after, dtype=torch.float64),
    )


def concept_columns(renderer: Any, concepts: Sequence[str]) -> list[int]:
    """Columns of the renderer's concept vector holding ``concepts``; :class:`NoGroundTruth` if one is missing."""
    names = list(renderer.concept_names)
    missing = [c for c in concepts if c not in names]
    if missing:
        raise NoGroundTruth(
            f"concept(s) {missing} are not in the data's concept vectors, so they have no ground truth"
        )
    return [names.index(c) for c in concepts]


def concept_rows(
    metric: str,
    concepts: Sequence[str],
    raw: Sequence[float],
    ceiling: Sequence[float],
    random: Sequence[float],
    method: str,
    baseline: str = "",
    note: str = "",
) -> list[Score]:
    """One row per concept (``metric/<concept>``) and their mean (``metric``, NaNs skipped)."""
    rows = [
        Score(method, f"{metric}/{c}", float(r), float(t), float(b), baseline, note)
        for c, r, t, b in zip(concepts, raw, ceiling, random)
    ]
    mean = [float(np.nanmean(np.asarray(v, dtype=np.float64))) for v in (raw, ceiling, random)]
    rows.append(Score(method, metric, *mean, baseline, note))
    return rows


def population_sd(t: torch.Tensor) -> float:
    """Population std: the effect is in units of each score's spread over the un-edited images, so an axis,
    a random direction and the 0/1 indicator (std ``sqrt(p (1 - p))``) compare."""
    return float(t.std(unbiased=False))
