"""Ground-truth scorecard of a concept bottleneck model (Koh et al., "Concept Bottleneck Models", ICML 2020).

A CBM is trained to predict named concepts (``g(x)``, Sec. 3), so its bottleneck can be checked against the
concepts PartShapes knows for every image. Rows, on the varied-pose held-out split
(:func:`~interpzoo.scorecard.common.ground_truth_dataset`), with the same concepts and edits as the
concept-whitening scorecard (:mod:`interpzoo.scorecard.concept_edits`) so the two compare:

* ``concept_auc/<concept>`` for the scorecard's concepts the model has (``has_red``, ``has_striped``,
  ``has_circle``), and ``concept_auc``, the mean over **all** of the model's concepts (concepts with a single
  class on the split are left out): the ROC AUC of the predicted concept probability ``sigmoid(g_j(x))``
  with the image's true concept label. Ceiling: the true label as the score (1). Random: seeded uniform
  random scores (0.5 in expectation), the mean over ``num_random`` draws.
* ``concept_intervention_accuracy/<concept>`` (and mean): each image is re-rendered with the concept added
  or removed (one part's colour / shape / texture changed, same layout and noise); the share of edits after
  which the predicted concept probability moved the right way (ties count one half). Ceiling: the true label
  (1). Random: independent random scores before and after (0.5 in expectation).
* ``concept_intervention_effect/<concept>`` (and mean): the mean signed change of the concept logit in units
  of its std over the un-edited images. Ceiling: the label's ``1 / sqrt(p (1 - p))``; random: random scores
  (0 in expectation).

The intervention rows read the concept *logit*: it orders images like the probability but does not saturate
to ties in floating point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from interpzoo.metrics.calibration import Score
from interpzoo.metrics.concept_whitening import (
    binary_auc,
    concept_auc_ceiling,
    intervention_accuracy,
    intervention_effect,
)
from interpzoo.scorecard.common import NoGroundTruth, ground_truth_batches, ground_truth_dataset, renderer_of
from interpzoo.scorecard.concept_edits import concept_columns, concept_rows, edited_images, population_sd

__all__ = ["SCORECARD_CONCEPTS", "score"]

METHOD = "cbm"
#: the concepts scored one by one (a colour, a texture, a shape), as in the concept-whitening scorecard
SCORECARD_CONCEPTS = ("has_red", "has_striped", "has_circle")
NUM_RANDOM = 16


@torch.no_grad()
def _concept_logits(net: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``(N, k)`` float64 concept logits ``g(x)`` of ``images`` ``(N, C, H, W)`` on CPU."""
    p = next(net.parameters())
    out = [
        net(images[s : s + batch_size].to(p.device, p.dtype)).concept_logits.double().cpu()
        for s in range(0, images.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.empty(0, len(net.concepts), dtype=torch.float64)


def score(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    concepts: Sequence[str] | None = None,
    num_random: int = NUM_RANDOM,
    batch_size: int = 100,
) -> list[Score]:
    """Concept AUC and causal concept interventions of a concept bottleneck model (module docstring).

    Args:
        net: a :class:`~interpzoo.models.cbm.CBMNet` whose concepts are named after the data's concepts;
            scored in eval mode, its mode restored after.
        datamodule: PartShapes (its renderer gives the true concepts and the re-rendered edits).
        num_samples: images of the varied-pose held-out split.
        seed: seed of the random baseline and of the choice among valid edits (the concept-whitening
            scorecard with the same seed edits the same images the same way).
        concepts: concepts scored one by one; default: those of :data:`SCORECARD_CONCEPTS` the model has.
        num_random: draws of random scores averaged for the random baseline.

    Returns:
        ``concept_auc``, ``concept_intervention_accuracy`` and ``concept_intervention_effect`` rows.
    """
    if num_random < 1:
        raise ValueError(f"num_random (draws of the random baseline) must be >= 1, got {num_random}")
    renderer = renderer_of(datamodule)
    names = list(getattr(net, "concepts", []))
    if not names:
        raise NoGroundTruth(f"{type(net).__name__} has no named concepts to compare with the data's")
    all_cols = concept_columns(renderer, names)
    if concepts is None:
        concepts = [c for c in SCORECARD_CONCEPTS if c in names]
    unknown = [c for c in concepts if c not in names]
    if unknown:
        raise ValueError(f"concepts {unknown} are not in this CBM's bottleneck; it has {names}")
    was = net.training
    net.eval()
    try:
        return _score(
            net,
            renderer,
            datamodule,
            names,
            all_cols,
            list(concepts),
            num_samples,
            seed,
            num_random,
            batch_size,
        )
    finally:
        net.train(was)


def _nanmean(values: Any) -> float:
    """Mean of the non-NaN values; NaN (no warning) when there are none (a concept with one class)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def _random_auc(truth: torch.Tensor, num_random: int, gen: torch.Generator) -> torch.Tensor:
    """``(k,)`` mean AUC of ``num_random`` draws of uniform random scores against ``truth`` ``(N, k)``."""
    aucs = np.array(
        [
            [
                binary_auc(torch.rand(truth.shape[0], generator=gen, dtype=torch.float64), truth[:, j])
                for j in range(truth.shape[1])
            ]
            for _ in range(num_random)
        ]
    )
    return torch.tensor([_nanmean(aucs[:, j]) for j in range(truth.shape[1])], dtype=torch.float64)


@torch.no_grad()
def _score(
    net: nn.Module,
    renderer: Any,
    datamodule: Any,
    names: list[str],
    all_cols: list[int],
    concepts: list[str],
    num_samples: int,
    seed: int,
    num_random: int,
    batch_size: int,
) -> list[Score]:
    ds = ground_truth_dataset(datamodule, num_samples, "test")
    p = next(net.parameters())
    logits, truth = [], []
    for batch in ground_truth_batches(ds, batch_size, p.device, p.dtype):
        logits.append(net(batch["image"]).concept_logits.double().cpu())
        truth.append(batch["concepts"][:, all_cols].double().cpu())
    before, labels = torch.cat(logits), torch.cat(truth)
    gen = torch.Generator().manual_seed(int(seed))
    baseline = f"{num_random} draws of uniform random concept scores"
    rows: list[Score] = []

    # 1. concept AUC: the probability (a monotone map of the logit: the same ranking up to float ties)
    probs = torch.sigmoid(before)
    raw = torch.tensor([binary_auc(probs[:, j], labels[:, j] > 0.5) for j in range(len(names))])
    ceiling = concept_auc_ceiling(labels > 0.5)
    rand = _random_auc(labels > 0.5, num_random, gen)
    note = f"{len(ds)} varied-pose held-out images; labels = the images' true concept vectors"
    pick = [names.index(c) for c in concepts]
    per = concept_rows(
        "concept_auc",
        concepts,
        raw[pick].tolist(),
        ceiling[pick].tolist(),
        rand[pick].tolist(),
        METHOD,
        baseline,
        note,
    )[:-1]
    # the mean row is over all of the model's concepts, not only the ones listed one by one
    mean = [_nanmean(v.numpy()) for v in (raw, ceiling, rand)]
    rows += per + [
        Score(METHOD, "concept_auc", *mean, baseline, note + f"; mean over the model's {len(names)} concepts")
    ]

    # 2. causal interventions on the same images
    acc: dict[str, list[float]] = {"raw": [], "ceiling": [], "random": []}
    eff: dict[str, list[float]] = {"raw": [], "ceiling": [], "random": []}
    for j in pick:
        edits = edited_images(ds, all_cols[j], seed)
        if not len(edits):
            for d in (acc, eff):
                for key in d:
                    d[key].append(float("nan"))
            continue
        sel, sign = edits.index, edits.sign
        after = _concept_logits(net, edits.images, batch_size)[:, j]
        acc["raw"].append(intervention_accuracy(before[sel, j], after, sign))
        acc["ceiling"].append(intervention_accuracy(labels[sel, j], edits.truth_after, sign))
        eff["raw"].append(intervention_effect(before[sel, j], after, sign, population_sd(before[:, j])))
        eff["ceiling"].append(
            intervention_effect(labels[sel, j], edits.truth_after, sign, population_sd(labels[:, j]))
        )
        r_acc, r_eff = [], []
        for _ in range(num_random):
            rb = torch.rand(len(ds), generator=gen, dtype=torch.float64)
            ra = torch.rand(len(edits), generator=gen, dtype=torch.float64)
            r_acc.append(intervention_accuracy(rb[sel], ra, sign))
            r_eff.append(intervention_effect(rb[sel], ra, sign, population_sd(rb)))
        acc["random"].append(float(np.mean(r_acc)) if r_acc else float("nan"))
        eff["random"].append(float(np.mean(r_eff)) if r_eff else float("nan"))
    note = (
        "varied-pose held-out split; one single-attribute edit per image and concept, re-rendered with the same "
        "layout and noise (images without a single-attribute edit are skipped); score = the concept logit"
    )
    baseline = f"{num_random} draws of independent uniform random scores before and after the edit"
    if concepts:
        rows += concept_rows(
            "concept_intervention_accuracy",
            concepts,
            acc["raw"],
            acc["ceiling"],
            acc["random"],
            METHOD,
            baseline,
            note,
        )
        rows += concept_rows(
            "concept_intervention_effect",
            concepts,
            eff["raw"],
            eff["ceiling"],
            eff["random"],
            METHOD,
            baseline,
            note,
        )
    return rows
