"""ProtoPNet on the scorecard (Chen et al., "This looks like that", NeurIPS 2019).

Rows (all on the varied-pose held-out split, see :mod:`interpzoo.scorecard.parts` for the definitions):

* ``part_consistency`` (Huang et al., ICCV 2023), ``part_purity`` (PIP-Net), ``part_deletion`` (causal).
* Ceiling: the **oracle** prototypes. Prototype ``j`` of a class is given part ``j mod K`` and reports that
  part's mask average-pooled onto the network's own latent grid (so the ceiling includes the grid's blur).
* Random baseline: **random own-class patches used as prototypes** in the trained network: each prototype is
  replaced by the latent patch at a random cell of a random image of its class (drawn from the validation
  split, never the scored one), averaged over ``draws`` seeded draws. Such a prototype is a real patch of the
  right class that nobody chose for being a part.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from interpzoo.layers.protopnet import squared_l2_distances
from interpzoo.metrics.calibration import Score
from interpzoo.scorecard.common import ground_truth_batches, ground_truth_dataset, renderer_of
from interpzoo.scorecard.parts import (
    METRICS,
    Explainer,
    cyclic_unit_parts,
    normalised_unit_scores,
    oracle_explainer,
    part_scores,
    random_class_patches,
)

__all__ = ["model_explainer", "random_patch_prototypes", "score"]


def model_explainer(net: Any, prototypes: Tensor | None = None) -> Explainer:
    """``batch -> (similarity maps (B, P, h, w), pooled similarities (B, P))`` of ``net``.

    With ``prototypes`` ``(P, D, ph, pw)`` the trained network's latent is compared with those vectors instead
    of its own (same distance and similarity function), which is how the random baseline is scored.
    """

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x = batch["image"]
        if prototypes is None:
            out = net(x)
            return out.similarity_maps, out.similarity_maps.flatten(2).amax(2)
        z = net.latent(net.features(x))
        maps = net.prototype_layer.similarity(squared_l2_distances(z, prototypes.to(z)))
        return maps, maps.flatten(2).amax(2)

    return explain


def random_patch_prototypes(net: Any, pool, classes: Tensor, seed: int) -> Tensor:
    """``(P, D, ph, pw)``: for each prototype, the latent patch at a random cell of a random image of its class.

    ``pool`` is a dataset of labelled images (not the scored split).
    """
    p = next(net.parameters())
    return random_class_patches(
        lambda x: net.latent(net.features(x)), pool, classes, net.prototype_layer.hw, seed, p.device, p.dtype
    )


def _grid(net: Any, dataset, device, dtype) -> tuple[int, int]:
    batch = next(iter(ground_truth_batches(dataset, 1, device, dtype)))
    with torch.no_grad():
        return tuple(net(batch["image"]).similarity_maps.shape[2:])


def score(
    net: Any,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    draws: int = 2,
    deletion_images: int | None = None,
    details: dict[str, Any] | None = None,
) -> list[Score]:
    """Scorecard rows of a ProtoPNet ``net`` on ``datamodule``'s varied-pose held-out split.

    ``draws``: random-prototype draws averaged in the baseline; ``deletion_images``: images of the deletion
    test (each re-rendered once per part; default half of ``num_samples``).
    ``details``, if given, receives ``"unit_part_scores"``: each prototype's normalised part purity
    ``(purity_j - random) / (ceiling - random)`` against the metric's ceiling and random baseline (what the
    report prints in each prototype panel).
    """
    renderer = renderer_of(datamodule)
    ds = ground_truth_dataset(datamodule, num_samples, "test")
    pool = ground_truth_dataset(datamodule, min(num_samples, 500), "val")
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    active = net.prototype_mask > 0
    classes = net.prototype_classes.cpu()
    k = renderer.num_slots
    grid = _grid(net, ds, device, dtype)
    if deletion_images is None:
        deletion_images = max(1, num_samples // 2)
    kw = {"deletion_images": deletion_images, "device": device, "dtype": dtype}
    kw["unit_active"] = active.cpu()
    raw = part_scores(model_explainer(net), ds, classes, renderer.num_classes, **kw)
    # prototype j of a class is the oracle of part (j mod K): every part gets an oracle when m >= K
    oracle_parts = cyclic_unit_parts(classes, k)
    ceiling = part_scores(
        oracle_explainer(oracle_parts, grid), ds, classes, renderer.num_classes, unit_parts=oracle_parts, **kw
    )
    randoms = [
        part_scores(
            model_explainer(net, random_patch_prototypes(net, pool, classes, seed + d)),
            ds,
            classes,
            renderer.num_classes,
            **kw,
        )
        for d in range(draws)
    ]
    if details is not None:
        rnd_purity = sum(r["part_purity"] for r in randoms) / len(randoms)
        details["unit_part_scores"] = normalised_unit_scores(
            raw["unit_purity"], ceiling["part_purity"], rnd_purity
        )
    rows = []
    for name in METRICS:
        rnd = sum(r[name] for r in randoms) / len(randoms)
        rows.append(
            Score(
                "protopnet",
                name,
                raw[name],
                ceiling[name],
                rnd,
                baseline=f"random own-class patches as prototypes ({draws} draws)",
                note=f"{num_samples} varied-pose test images, latent grid {grid[0]}x{grid[1]}",
            )
        )
    return rows
