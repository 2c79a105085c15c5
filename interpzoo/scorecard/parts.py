"""Part-location scores of any explainer that gives one map per "unit" (prototype, class map) per image.

An *explainer* here is a callable ``explain(batch) -> (maps, responses)``: ``maps`` ``(B, P, h, w)`` (a
prototype's similarity map, a Grad-CAM or Integrated-Gradients map of a class) and ``responses`` ``(B, P)``
(what the unit outputs: a prototype's pooled similarity, a class logit). ``unit_classes`` ``(P,)`` gives each
unit's class; only the images of a unit's class are read, as Huang et al. (ICCV 2023) do for prototypes.

On the same held-out images and with the same code, :func:`part_scores` measures

* ``part_consistency``: Huang et al.'s consistency (% of units that hit the same part on >= 80 % of their
  class's images; box of half-size ``36/224`` of the image side around the upsampled map's argmax);
* ``part_purity``: PIP-Net's purity (Nauta et al., CVPR 2023): for each unit's top-10 images, the share
  whose high-activation region lies on the unit's most frequent part
  (:func:`interpzoo.metrics.protopnet.region_part_hits`);
* ``part_deletion`` (causal): remove the unit's part from the image with the re-renderer (same layout,
  background and noise) and, separately, each other part; the share of (unit, image) pairs where removing
  the unit's own part lowers its response more than removing another part does (ties count one half).
  A unit's part is the one it hits most often (its consistency argmax).

Images must carry ``part_masks``, ``landmarks``, ``landmark_visible`` and ``index``, and the dataset must be a
:class:`~interpzoo.datamodules.partshapes.PartShapesDataset` (for the re-renderer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from interpzoo.datamodules.partshapes import image_to_tensor
from interpzoo.metrics.protopnet import PrototypeConsistency, PrototypePartPurity
from interpzoo.scorecard.common import ground_truth_batches

METRICS = ("part_consistency", "part_purity", "part_deletion")

__all__ = [
    "METRICS",
    "Explainer",
    "cyclic_unit_parts",
    "deletion_batch",
    "normalised_unit_scores",
    "oracle_explainer",
    "part_scores",
    "pooled_part_maps",
    "random_class_patches",
]

Explainer = Callable[[dict[str, Tensor]], tuple[Tensor, Tensor]]


def pooled_part_maps(part_masks: Tensor, grid: Sequence[int]) -> Tensor:
    """``(B, K, h, w)``: each part's mask ``(B, K, H, W)`` average-pooled onto the ``h x w`` latent grid.

    This is the ideal detector *on that grid*: a unit can do no better than report, per cell, how much of
    the cell its part covers. Scores read on it are the ceiling of a unit with that grid.
    """
    return F.adaptive_avg_pool2d(part_masks.float(), tuple(int(g) for g in grid))


def oracle_explainer(unit_parts: Tensor, grid: Sequence[int]) -> Explainer:
    """The oracle: unit ``j`` reports part ``unit_parts[j]``'s pooled mask; its response is the map's maximum."""

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        maps = pooled_part_maps(batch["part_masks"], grid)[:, unit_parts.to(batch["part_masks"].device)]
        return maps, maps.flatten(2).amax(2)

    return explain


def cyclic_unit_parts(unit_classes: Tensor, num_parts: int) -> Tensor:
    """``(P,)`` the oracle's part of each unit: the ``r``-th unit of a class gets part ``r mod K``.

    With at least ``K`` units per class every part of the class gets an oracle detector.
    """
    classes = torch.as_tensor(unit_classes, dtype=torch.long).cpu()
    rank_in_class = torch.zeros_like(classes)
    for c in classes.unique():
        members = (classes == c).nonzero().flatten()
        rank_in_class[members] = torch.arange(members.numel())
    return rank_in_class % int(num_parts)


def normalised_unit_scores(unit_values: Sequence[float], ceiling: float, random: float) -> list[float]:
    """``(value_j - random) / (ceiling - random)`` of every unit (``nan`` when ceiling and random coincide)."""
    span = float(ceiling) - float(random)
    return [(float(u) - random) / span if abs(span) > 1e-9 else float("nan") for u in unit_values]


@torch.no_grad()
def random_class_patches(
    latent: Callable[[Tensor], Tensor],
    pool,
    classes: Tensor,
    patch: Sequence[int],
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """``(P, D, ph, pw)``: for each unit, the latent patch at a random cell of a random image of its class.

    ``latent`` maps images ``(1, C, H, W)`` to the latent ``(1, D, h, w)`` the units compare with; ``pool`` is
    a dataset of labelled images (never the scored split); ``patch`` is ``(ph, pw)``. The random baseline of
    prototype methods: a real patch of the right class that nobody chose for being a part.
    """
    g = torch.Generator().manual_seed(int(seed))
    labels = torch.tensor([int(pool[i]["label"]) for i in range(len(pool))])
    ph, pw = (int(v) for v in patch)
    out = []
    for c in torch.as_tensor(classes).tolist():
        members = (labels == c).nonzero().flatten()
        if members.numel() == 0:
            raise ValueError(f"no image of class {c} to draw a random prototype from")
        i = int(members[torch.randint(members.numel(), (1,), generator=g)])
        z = latent(pool[i]["image"][None].to(device, dtype))[0]
        r = int(torch.randint(z.shape[1] - ph + 1, (1,), generator=g))
        s = int(torch.randint(z.shape[2] - pw + 1, (1,), generator=g))
        out.append(z[:, r : r + ph, s : s + pw])
    return torch.stack(out)


def deletion_batch(
    dataset, indices: Sequence[int], part: int, device: torch.device | str
) -> dict[str, Tensor]:
    """Images ``indices`` of ``dataset`` re-rendered without ``part`` (slot index), as a batch on ``device``."""
    images, masks = [], []
    k = dataset.renderer.num_slots
    for i in indices:
        smp = dataset.render(int(i), remove_parts=[int(part)])
        images.append(image_to_tensor(smp.image, dataset.grayscale))
        masks.append(
            torch.from_numpy(smp.part_map)[None] == torch.arange(1, k + 1, dtype=torch.uint8)[:, None, None]
        )
    return {"image": torch.stack(images).to(device), "part_masks": torch.stack(masks).to(device)}


@torch.no_grad()
def _location_scores(
    explain: Explainer, dataset, unit_classes: Tensor, num_classes: int, batch_size: int, device, dtype
) -> tuple[PrototypeConsistency, PrototypePartPurity]:
    k = dataset.renderer.num_slots
    cons = PrototypeConsistency(unit_classes, num_classes, k)
    pur = PrototypePartPurity(unit_classes, k, k=10)
    for batch in ground_truth_batches(dataset, batch_size, device, dtype):
        maps, resp = explain(batch)
        maps, resp = maps.float().cpu(), resp.float().cpu()
        y = batch["label"].cpu()
        size = tuple(batch["image"].shape[2:])
        cons.update(maps, y, batch["landmarks"].cpu(), batch["landmark_visible"].cpu(), size)
        own = y.view(-1, 1) == unit_classes.view(1, -1)
        # a unit is read on its own class's images only (Huang et al.); PIP-Net's top-k follows the same rule
        pur.update(resp.masked_fill(~own, float("-inf")), maps, size, part_masks=batch["part_masks"].cpu())
    return cons, pur


@torch.no_grad()
def _deletion(
    explain: Explainer,
    dataset,
    unit_classes: Tensor,
    unit_parts: Tensor,
    active: Tensor,
    num_images: int,
    batch_size: int,
    device,
    dtype,
) -> float:
    k = dataset.renderer.num_slots
    n = min(len(dataset), int(num_images))
    wins = total = 0.0
    for lo in range(0, n, batch_size):
        idx = list(range(lo, min(n, lo + batch_size)))
        batch = dataset_batch(dataset, idx, device, dtype)
        _, base = explain(batch)
        drops = []
        for q in range(k):
            b = deletion_batch(dataset, idx, q, device)
            b["label"] = batch["label"]
            if dtype is not None:
                b["image"] = b["image"].to(dtype)
            drops.append((base - explain(b)[1]).float().cpu())
        drop = torch.stack(drops, 2)  # (B, P, K): response lost when part q is removed
        y = batch["label"].cpu()
        own = (y.view(-1, 1) == unit_classes.view(1, -1)) & active.view(1, -1)  # (B, P)
        own_drop = drop.gather(2, unit_parts.view(1, -1, 1).expand(drop.shape[0], -1, 1)).squeeze(2)
        other = torch.ones_like(drop, dtype=torch.bool)
        other.scatter_(2, unit_parts.view(1, -1, 1).expand(drop.shape[0], -1, 1), False)
        # against each other part: own-part removal must hurt more (ties count one half)
        cmp = (own_drop.unsqueeze(2) > drop).float() + 0.5 * (own_drop.unsqueeze(2) == drop).float()
        cmp = (cmp * other).sum(2) / (k - 1)
        wins += float(cmp[own].sum())
        total += float(own.sum())
    return 100.0 * wins / max(total, 1.0)


def dataset_batch(dataset, indices: Sequence[int], device, dtype) -> dict[str, Tensor]:
    """Items ``indices`` of ``dataset`` collated into a batch on ``device``."""
    items = [dataset[int(i)] for i in indices]
    out = {}
    for key in items[0]:
        v = torch.stack([it[key] for it in items]).to(device)
        out[key] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return out


def part_scores(
    explain: Explainer,
    dataset,
    unit_classes: Sequence[int] | Tensor,
    num_classes: int,
    unit_parts: Tensor | None = None,
    unit_active: Tensor | None = None,
    deletion_images: int = 200,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """``{"part_consistency", "part_purity", "part_deletion", "unit_parts", "unit_purity"}`` of ``explain``.

    See the module doc for the scores; ``unit_parts`` is the list of each unit's most often hit part and
    ``unit_purity`` each unit's purity.

    ``unit_parts`` ``(P,)`` fixes each unit's part for the deletion test (the oracle's assigned parts); by
    default a unit's part is its consistency argmax on ``dataset``. ``deletion_images=0`` skips deletion.
    ``unit_active`` ``(P,)`` bool leaves pruned units out of every score.
    """
    classes = torch.as_tensor(unit_classes, dtype=torch.long).cpu()
    active = (
        torch.ones(classes.numel(), dtype=torch.bool) if unit_active is None else unit_active.bool().cpu()
    )
    cons, pur = _location_scores(explain, dataset, classes, num_classes, batch_size, device, dtype)
    cons.set_active(active)
    pur.set_active(active)
    hit_parts = cons.per_prototype().argmax(1)
    out: dict = {"part_consistency": float(cons.compute()), "part_purity": float(pur.compute()["mean"])}
    out["unit_parts"] = hit_parts.tolist()
    out["unit_purity"] = pur.per_prototype().tolist()
    if deletion_images > 0:
        parts = hit_parts if unit_parts is None else unit_parts.long().cpu()
        out["part_deletion"] = _deletion(
            explain, dataset, classes, parts, active, deletion_images, batch_size, device, dtype
        )
    return out
