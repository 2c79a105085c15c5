"""PIP-Net on the scorecard (Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive
Prototypes for Interpretable Image Classification", CVPR 2023).

PIP-Net's prototypes are shared by the classes: prototype ``d`` serves class ``c`` when the scoring sheet's
weight ``relu(W)[c, d] > 0``. The scored **units** are the (prototype, class) pairs with a non-zero weight:
unit ``(d, c)`` is prototype ``d``'s map ``z_d`` (the patch softmax, Sec. 3.1) read on the images of class
``c``, so a prototype that serves two classes is asked to find one part in each. Prototypes the classifier
does not use (a zero column of ``W``) are not scored: they never enter an explanation.

Rows (all on the varied-pose held-out split, see :mod:`interpzoo.scorecard.parts` for the definitions):

* ``part_consistency`` (Huang et al., ICCV 2023), ``part_purity`` (PIP-Net's own purity, Sec. 4, on each
  unit's top-10 own-class images), ``part_deletion`` (causal; a unit's response is its presence
  ``p_d = max_{hw} z_{hw,d}`` *before* the eval-mode presence threshold, so a small drop still counts).
* Ceiling: the **oracle** units. The ``r``-th unit of a class is given part ``r mod K`` and reports that
  part's mask average-pooled onto the network's own latent grid (as ProtoPNet's oracle: the ceiling includes
  the grid's blur).
* Random baseline: **random own-class patches as prototypes, in the trained network.** Unit ``(d, c)``'s
  1x1-convolution row ``w_d`` is replaced by the trunk feature vector at a random cell of a random
  validation image of class ``c``, rescaled to ``|w_d|`` (so its logits have the trained prototype's
  scale; bias ``b_d`` kept), and its map is the patch softmax of that row against the *other* trained
  prototypes, exactly as PIP-Net computes ``z_d``. This is the fair chance level for PIP-Net: the same
  trunk, the same softmax competition and the same class's patches, only the choice of prototype is
  random; averaged over ``draws`` seeded draws. It is ProtoPNet's baseline carried over to PIP-Net's
  similarity function, so the two rows read on one scale.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

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

__all__ = ["model_explainer", "random_explainer", "random_prototype_rows", "score", "used_units"]


def used_units(net: Any) -> tuple[Tensor, Tensor]:
    """``(prototypes (U,), classes (U,))``: every (prototype, class) pair with ``relu(W)[c, d] > 0``.

    Ordered by prototype, then class. Raises ``ValueError`` when the scoring sheet has no positive weight.
    """
    w = net.class_weights.detach().cpu()  # (K, D)
    d, c = (w.t() > 0).nonzero(as_tuple=True)
    if d.numel() == 0:
        raise ValueError(
            "the PIP-Net scoring sheet has no positive weight (relu(W) == 0): no prototype is used, so there is "
            "nothing to score; train the classifier (the full phase after pretrain_epochs) first"
        )
    return d, c


def model_explainer(net: Any, prototypes: Tensor) -> Explainer:
    """``batch -> (maps (B, U, h, w), presence (B, U))`` of units on prototypes ``prototypes`` ``(U,)``.

    The maps are PIP-Net's patch softmaxes ``z_d`` and the response the presence before the eval threshold.
    """

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        out = net(batch["image"])
        idx = prototypes.to(out.prototype_maps.device)
        return out.prototype_maps[:, idx], out.presence_raw[:, idx]

    return explain


@torch.no_grad()
def random_prototype_rows(net: Any, pool, prototypes: Tensor, classes: Tensor, seed: int) -> Tensor:
    """``(U, C)``: unit ``u``'s random 1x1-convolution row, a trunk feature vector of a random patch of its class.

    Each row is the trunk feature at a random cell of a random image of ``classes[u]`` in ``pool`` (never the
    scored split), rescaled to the norm of the trained row ``w_{prototypes[u]}``.
    """
    p = next(net.parameters())
    feats = random_class_patches(net.features, pool, classes, (1, 1), seed, p.device, p.dtype)[:, :, 0, 0]
    w = net.prototypes.conv.weight[prototypes.to(p.device), :, 0, 0]  # (U, C)
    # a patch of all-zero features has no direction: it stays zero (logit = bias), which is still a prototype
    scale = w.norm(dim=1, keepdim=True) / feats.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return feats * scale


def random_explainer(net: Any, prototypes: Tensor, rows: Tensor) -> Explainer:
    """Units whose prototype ``prototypes[u]`` is replaced by the 1x1-convolution row ``rows[u]`` ``(U, C)``.

    Unit ``u``'s map is PIP-Net's patch softmax with row ``d = prototypes[u]`` swapped for ``rows[u]`` and the
    other ``D - 1`` trained prototypes as they are:
    ``exp(l_u) / (exp(l_u) + sum_{d' != d} exp(a_{d'}))`` with ``l_u = rows[u] . f + b_d``, ``a = conv(f)``.
    """
    conv = net.prototypes.conv

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        f = net.features(batch["image"])  # (B, C, h, w)
        a = conv(f)  # (B, D, h, w) trained prototype logits
        idx = prototypes.to(f.device)
        bias = conv.bias[idx] if conv.bias is not None else torch.zeros(idx.numel(), device=f.device)
        logits = torch.einsum("bchw,uc->buhw", f, rows.to(f)) + bias.view(1, -1, 1, 1)  # (B, U, h, w)
        # log-sum-exp of the other prototypes, once per distinct replaced prototype (exact, no cancellation)
        others = torch.empty_like(logits)
        for d in idx.unique():
            keep = torch.ones(a.shape[1], dtype=torch.bool, device=f.device)
            keep[d] = False
            lse = a[:, keep].logsumexp(1) if bool(keep.any()) else torch.full_like(a[:, 0], float("-inf"))
            others[:, idx == d] = lse.unsqueeze(1)
        maps = torch.sigmoid(logits - others)  # = exp(l) / (exp(l) + exp(others))
        return maps, maps.flatten(2).amax(2)

    return explain


def _grid(net: Any, dataset, device, dtype) -> tuple[int, int]:
    batch = next(iter(ground_truth_batches(dataset, 1, device, dtype)))
    with torch.no_grad():
        return tuple(net(batch["image"]).prototype_maps.shape[2:])


def score(
    net: Any,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    draws: int = 2,
    deletion_images: int | None = None,
    details: dict[str, Any] | None = None,
) -> list[Score]:
    """Scorecard rows of a PIP-Net ``net`` on ``datamodule``'s varied-pose held-out split.

    ``draws``: random-prototype draws averaged in the baseline; ``deletion_images``: images of the deletion
    test (each re-rendered once per part; default half of ``num_samples``).
    ``details``, if given, receives ``"unit_part_scores"``: one value per prototype ``(D,)`` (indexed by
    prototype number, what the report prints in its panels): the mean over the classes the prototype serves
    of the unit's normalised part purity ``(purity - random) / (ceiling - random)``; ``nan`` for an unused
    prototype. It also receives ``"units"``: the scored ``(prototype, class)`` pairs.
    """
    renderer = renderer_of(datamodule)
    ds = ground_truth_dataset(datamodule, num_samples, "test")
    pool = ground_truth_dataset(datamodule, min(num_samples, 500), "val")
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    protos, classes = used_units(net)
    k = renderer.num_slots
    grid = _grid(net, ds, device, dtype)
    if deletion_images is None:
        deletion_images = max(1, num_samples // 2)
    kw = {"deletion_images": deletion_images, "device": device, "dtype": dtype}
    n_cls = renderer.num_classes
    raw = part_scores(model_explainer(net, protos), ds, classes, n_cls, **kw)
    oracle_parts = cyclic_unit_parts(classes, k)
    ceiling = part_scores(
        oracle_explainer(oracle_parts, grid), ds, classes, n_cls, unit_parts=oracle_parts, **kw
    )
    randoms = [
        part_scores(
            random_explainer(net, protos, random_prototype_rows(net, pool, protos, classes, seed + d)),
            ds,
            classes,
            n_cls,
            **kw,
        )
        for d in range(draws)
    ]
    if details is not None:
        rnd_purity = sum(r["part_purity"] for r in randoms) / len(randoms)
        per_unit = torch.tensor(
            normalised_unit_scores(raw["unit_purity"], ceiling["part_purity"], rnd_purity)
        )
        per_proto = []
        for d in range(net.num_prototypes):
            mine = per_unit[protos == d]
            per_proto.append(float(mine.mean()) if mine.numel() else float("nan"))
        details["unit_part_scores"] = per_proto
        details["units"] = list(zip(protos.tolist(), classes.tolist()))
    rows = []
    for name in METRICS:
        rnd = sum(r[name] for r in randoms) / len(randoms)
        rows.append(
            Score(
                "pipnet",
                name,
                raw[name],
                ceiling[name],
                rnd,
                baseline=f"random own-class patches as prototypes ({draws} draws)",
                note=(
                    f"{num_samples} varied-pose test images, latent grid {grid[0]}x{grid[1]}, "
                    f"{protos.unique().numel()} used prototypes, {protos.numel()} (prototype, class) units"
                ),
            )
        )
    return rows
