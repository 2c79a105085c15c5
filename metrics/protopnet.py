"""Prototype interpretability metrics of ProtoPNet-family networks (Chen et al., NeurIPS 2019).

torchmetrics ``Metric`` objects with DDP-reducible states (sums, or top-k buffers merged at
``compute``), plus a few functions of the weights and push records:

* :class:`PrototypeConsistency`, :class:`PrototypeStability` (Huang et al., "Evaluation and Improvement
  of Interpretability for Self-Explainable Part-Prototype Networks", ICCV 2023, code
  ``hqhQAQ/EvalProtoPNet``);
* :class:`PrototypePartPurity` (PIP-Net, Nauta et al. CVPR 2023, ``util/eval_cub_csv.py``);
* :class:`PrototypeClassPurity` (k-NN class purity, the quantity ProtoPNet's pruning thresholds);
* :class:`ExplanationSize` (k@80 %: prototypes needed for 80 % of the positive evidence);
* :func:`global_size`, :func:`prototype_unique`.

**Adaptations to datasets other than CUB** (where they differ from the papers):

* *Parts.* CUB has 15 keypoints; a dataset supplies its own ``landmarks`` ``(B, Q, 2)`` ``(x, y)`` and
  ``landmark_visible`` ``(B, Q)``. On PartShapes these are the ``Q = 4`` part centres (head, body,
  wing, tail), so "keypoint inside the box" means "part centre inside the box". Huang et al. use the
  15 CUB parts without merging left/right.
* *Box size.* Huang et al. use a 72 x 72 box (half-size 36) on 224 px images; here the half-size is a
  fraction of the image side, ``half_fraction = 36 / 224`` by default (5 px at 32 px).
* *Part purity with masks.* With ground-truth ``part_masks`` ``(B, Q, H, W)`` (PartShapes) a patch
  "contains" part ``q`` when the map's high-activation region (pixels above the 95th percentile of the
  upsampled map) lies mostly on ``q`` (:func:`region_part_hits`), and part ``q`` is "visible" when its
  mask is non-empty; with keypoints (CUB) the patch is the box above and
  contains ``q`` when the visible keypoint lies in it. PIP-Net merges CUB's left/right parts and uses
  a patch-sized box; we use the same box as consistency and do not merge parts.
* *Noise.* Stability adds ``clip(N(0, 0.2^2), -0.25, 0.25)`` in *normalised* input space, as Huang
  et al.; interpzoo networks normalise internally, so the noise is multiplied by the per-channel
  ``std`` and added to the ``[0, 1]`` image (the same perturbation; pixel values are not clipped).
* *Class purity* is computed on the split being evaluated (the prototypes' ``k`` nearest validation or
  test images, one patch per image), i.e. a held-out version of the training-set k-NN purity that
  pruning uses (:func:`interpzoo.models.protopnet_push.nearest_patches`).

Tensors in, numbers out: the functions and metrics take similarity maps, distances, weights, labels and
push records, never a network.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from interpzoo.layers.protopnet import upsample_maps

__all__ = [
    "ExplanationSize",
    "PrototypeClassPurity",
    "PrototypeConsistency",
    "PrototypePartPurity",
    "PrototypeStability",
    "box_half_size",
    "explanation_size",
    "global_size",
    "landmark_hits",
    "prototype_unique",
    "region_part_hits",
    "stability_noise",
]

HUANG_HALF_FRACTION = 36 / 224


def box_half_size(image_size: Sequence[int], half_fraction: float = HUANG_HALF_FRACTION) -> int:
    """Half-size in pixels of the part box: 36 at 224 px (Huang et al.), scaled with the image side."""
    return max(1, int(round(half_fraction * min(int(image_size[0]), int(image_size[1])))))


def _argmax_locations(maps: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
    """``(N, 2)`` ``(row, col)`` argmax of each ``(N, h, w)`` map after bicubic upsampling to ``image_size``."""
    if maps.shape[0] == 0:
        return torch.zeros((0, 2), dtype=torch.long, device=maps.device)
    out = []
    for part in maps.split(256):
        up = upsample_maps(part, image_size)
        flat = up.flatten(1).argmax(1)
        out.append(torch.stack([flat // up.shape[2], flat % up.shape[2]], 1))
    return torch.cat(out)


def landmark_hits(
    locations: torch.Tensor,
    landmarks: torch.Tensor,
    visible: torch.Tensor,
    half: int,
    image_size: Sequence[int],
) -> torch.Tensor:
    """``(N, Q)`` bool: visible keypoint ``q`` lies in the box ``[r - half, r + half) x [c - half, c + half)``.

    Args:
        locations: ``(N, 2)`` ``(row, col)`` box centres.
        landmarks: ``(N, Q, 2)`` ``(x, y)`` keypoints.
        visible: ``(N, Q)`` bool.
    """
    h, w = int(image_size[0]), int(image_size[1])
    r, c = locations[:, 0:1].float(), locations[:, 1:2].float()
    r0, r1 = (r - half).clamp(min=0), (r + half).clamp(max=h)
    c0, c1 = (c - half).clamp(min=0), (c + half).clamp(max=w)
    x, y = landmarks[..., 0].float(), landmarks[..., 1].float()
    return visible.bool() & (x >= c0) & (x < c1) & (y >= r0) & (y < r1)


def stability_noise(
    image: torch.Tensor,
    index: torch.Tensor,
    std: Sequence[float],
    seed: int = 0,
    sigma: float = 0.2,
    clip: float = 0.25,
) -> torch.Tensor:
    """Huang et al.'s perturbation, seeded per sample so that ranks and reruns agree.

    ``clip(N(0, sigma^2), -clip, clip)`` in normalised space, i.e. times ``std`` in ``[0, 1]`` pixel space.

    Args:
        image: ``(B, C, H, W)`` images in ``[0, 1]``.
        index: ``(B,)`` sample ids (seed of each sample's noise).
        std: per-channel normalisation std.
    """
    noise = torch.empty_like(image, device="cpu", dtype=torch.float32)
    for i, idx in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(idx))
        noise[i] = torch.randn(image.shape[1:], generator=g)
    noise = (noise * sigma).clamp(-clip, clip)
    scale = torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1)
    return image + (noise * scale).to(image.device, image.dtype)


def region_part_hits(
    maps: torch.Tensor,
    part_masks: torch.Tensor,
    image_size: Sequence[int],
    percentile: float = 95.0,
    min_share: float = 0.2,
) -> torch.Tensor:
    """``(N, Q)`` bool: the part that the map's high-activation region lies on.

    The region is the top ``100 - percentile`` % of the pixels of the bicubically upsampled map (ProtoPNet's
    ``find_high_activation_crop`` keeps the pixels above the 95th percentile, Chen et al. 2019, Sec. 2.4; we
    count pixels so that ties cannot grow the region). Part ``q``
    is hit when it has the largest overlap with the region among the parts and covers at least ``min_share``
    of it. Reading the region rather than one argmax pixel removes a cap: on a coarse latent grid (4 x 4 at
    32 px) the argmax of an ideal part detector's map often falls just outside a small part.

    Args:
        maps: ``(N, h, w)`` similarity or attribution maps.
        part_masks: ``(N, Q, H, W)`` bool ground-truth part masks.
    """
    n, q = part_masks.shape[:2]
    if n == 0:
        return torch.zeros((0, q), dtype=torch.bool, device=maps.device)
    out = []
    for lo in range(0, n, 256):
        up = upsample_maps(maps[lo : lo + 256], image_size).flatten(1)
        # the top (100 - percentile) % of the pixels by count, so a flat or binary map (an exact mask on the
        # pixel grid) still gets a region of that size instead of every pixel tied at its percentile
        top = max(1, int(round((1.0 - percentile / 100.0) * up.shape[1])))
        region = torch.zeros_like(up, dtype=torch.bool).scatter_(1, up.topk(top, dim=1).indices, True)
        pm = part_masks[lo : lo + 256].flatten(2).to(region.device)
        overlap = (region.unsqueeze(1) & pm.bool()).sum(2).float()  # (n, Q)
        best, idx = overlap.max(1)
        hit = best >= min_share * region.sum(1).float()
        out.append(torch.nn.functional.one_hot(idx, q).bool() & hit.unsqueeze(1))
    return torch.cat(out)


class _PerPrototypeMetric(Metric):
    """Shared: prototype classes and the active mask (pruned prototypes are excluded from the means)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, prototype_classes: Sequence[int] | torch.Tensor, **kwargs: object) -> None:
        super().__init__(**kwargs)
        classes = torch.as_tensor(prototype_classes, dtype=torch.long).clone()
        self.register_buffer("prototype_classes", classes, persistent=False)
        self.register_buffer("active", torch.ones(classes.numel(), dtype=torch.bool), persistent=False)
        self.num_prototypes = classes.numel()

    def set_active(self, mask: torch.Tensor) -> None:
        """Only prototypes with ``mask > 0`` enter :meth:`compute` (pruned ones are skipped)."""
        self.active = (mask > 0).to(self.active.device)

    def _own_pairs(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(b, j)`` index pairs with ``class(j) == labels[b]``."""
        own = labels.view(-1, 1) == self.prototype_classes.view(1, -1).to(labels.device)
        b, j = own.nonzero(as_tuple=True)
        return b, j


class PrototypeConsistency(_PerPrototypeMetric):
    """Huang et al. consistency: % of prototypes that hit the same part on ``>= threshold`` of their class's images.

    For prototype ``j`` of class ``c`` and each image ``x`` of class ``c``: upsample ``S_j(x)`` bicubically,
    take the argmax, put a ``2 half`` box around it; ``o_j(x)[q] = 1`` if visible keypoint ``q`` is in it.
    ``f_jq = sum_x o_j(x)[q] / sum_x visible_q(x)``; ``j`` is consistent if ``max_q f_jq >= threshold``.

    State (sum-reducible): ``hits`` ``(P, Q)`` and ``visible`` ``(K, Q)``.
    """

    def __init__(
        self,
        prototype_classes: Sequence[int] | torch.Tensor,
        num_classes: int,
        num_parts: int,
        threshold: float = 0.8,
        half_fraction: float = HUANG_HALF_FRACTION,
        **kwargs: object,
    ) -> None:
        super().__init__(prototype_classes, **kwargs)
        self.threshold = threshold
        self.half_fraction = half_fraction
        self.add_state("hits", torch.zeros(self.num_prototypes, num_parts), dist_reduce_fx="sum")
        self.add_state("visible", torch.zeros(num_classes, num_parts), dist_reduce_fx="sum")

    def update(
        self,
        similarity_maps: torch.Tensor,
        labels: torch.Tensor,
        landmarks: torch.Tensor,
        visible: torch.Tensor,
        image_size: Sequence[int],
    ) -> None:
        """``similarity_maps`` ``(B, P, h, w)``, ``labels`` ``(B,)``, ``landmarks`` ``(B, Q, 2)``, ``visible`` ``(B, Q)``."""
        b, j = self._own_pairs(labels)
        loc = _argmax_locations(similarity_maps[b, j].detach(), image_size)
        o = landmark_hits(
            loc, landmarks[b], visible[b], box_half_size(image_size, self.half_fraction), image_size
        )
        self.hits.index_add_(0, j, o.float())
        self.visible.index_add_(0, labels, visible.float())

    def per_prototype(self) -> torch.Tensor:
        """``(P, Q)`` hit fractions ``f_jq``."""
        vis = self.visible[self.prototype_classes]
        return torch.where(vis > 0, self.hits / vis.clamp(min=1), torch.zeros_like(self.hits))

    def compute(self) -> torch.Tensor:
        f = self.per_prototype()
        consistent = (f.max(1).values >= self.threshold).float()
        return 100.0 * consistent[self.active].mean() if self.active.any() else torch.tensor(0.0)


class PrototypeStability(_PerPrototypeMetric):
    """Huang et al. stability: % of (image, own-class prototype) pairs whose part vector ``o_j(x)`` is unchanged
    by input noise, averaged per prototype then over prototypes. State: ``same`` and ``count`` ``(P,)`` sums."""

    def __init__(
        self,
        prototype_classes: Sequence[int] | torch.Tensor,
        half_fraction: float = HUANG_HALF_FRACTION,
        **kwargs: object,
    ) -> None:
        super().__init__(prototype_classes, **kwargs)
        self.half_fraction = half_fraction
        self.add_state("same", torch.zeros(self.num_prototypes), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(self.num_prototypes), dist_reduce_fx="sum")

    def update(
        self,
        maps_clean: torch.Tensor,
        maps_noisy: torch.Tensor,
        labels: torch.Tensor,
        landmarks: torch.Tensor,
        visible: torch.Tensor,
        image_size: Sequence[int],
    ) -> None:
        b, j = self._own_pairs(labels)
        half = box_half_size(image_size, self.half_fraction)
        o1 = landmark_hits(
            _argmax_locations(maps_clean[b, j].detach(), image_size),
            landmarks[b],
            visible[b],
            half,
            image_size,
        )
        o2 = landmark_hits(
            _argmax_locations(maps_noisy[b, j].detach(), image_size),
            landmarks[b],
            visible[b],
            half,
            image_size,
        )
        self.same.index_add_(0, j, (o1 == o2).all(1).float())
        self.count.index_add_(0, j, torch.ones_like(j, dtype=torch.float))

    def compute(self) -> torch.Tensor:
        seen = self.active & (self.count > 0)
        if not seen.any():
            return torch.tensor(0.0)
        return 100.0 * (self.same[seen] / self.count[seen]).mean()


class _TopKBuffer(_PerPrototypeMetric):
    """Per-prototype top-k buffer of scores with payload tensors; ``dist_reduce_fx=None`` stacks the ranks'
    buffers, which :meth:`_merged` re-ranks (a top-k merge: the result equals the single-process one)."""

    def __init__(self, prototype_classes: Sequence[int] | torch.Tensor, k: int, **kwargs: object) -> None:
        super().__init__(prototype_classes, **kwargs)
        self.k = int(k)
        self.add_state(
            "top_score", torch.full((self.num_prototypes, self.k), float("-inf")), dist_reduce_fx=None
        )

    def _select(self, new_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Merge ``(P, B)`` scores into the buffer; returns ``(order (P, k), from_batch (P, k) bool)``."""
        scores = torch.cat([self.top_score, new_scores.to(self.top_score)], 1)
        order = scores.topk(self.k, dim=1).indices
        self.top_score = scores.gather(1, order)
        return order, order >= self.k

    def _merged(self, *payload: torch.Tensor) -> tuple[torch.Tensor, ...]:
        score = self.top_score
        if score.dim() == 2:
            return (score, *payload)
        # synced: (world, P, k, ...) -> (P, world * k, ...) -> top-k again
        world = score.shape[0]
        score = score.permute(1, 0, 2).reshape(self.num_prototypes, world * self.k)
        flat = [p.transpose(0, 1).reshape(self.num_prototypes, world * self.k, *p.shape[3:]) for p in payload]
        order = score.topk(self.k, dim=1).indices
        out = [score.gather(1, order)]
        for p in flat:
            idx = order.view(*order.shape, *([1] * (p.dim() - 2))).expand(-1, -1, *p.shape[2:])
            out.append(p.gather(1, idx))
        return tuple(out)


class PrototypePartPurity(_TopKBuffer):
    """PIP-Net part purity: for each prototype's top-``k`` most similar patches (one per image) of the
    evaluated split, ``P_jq`` = fraction of patches (among those where part ``q`` is visible) containing
    ``q``; ``purity_j = max_q P_jq``. :meth:`compute` returns ``{"mean", "std", "part_related"}`` (the
    number of prototypes with purity > 0.5).
    """

    def __init__(
        self,
        prototype_classes: Sequence[int] | torch.Tensor,
        num_parts: int,
        k: int = 10,
        half_fraction: float = HUANG_HALF_FRACTION,
        region_percentile: float = 95.0,
        **kwargs: object,
    ) -> None:
        super().__init__(prototype_classes, k, **kwargs)
        self.half_fraction = half_fraction
        self.region_percentile = region_percentile
        self.add_state("top_hits", torch.zeros(self.num_prototypes, self.k, num_parts), dist_reduce_fx=None)
        self.add_state(
            "top_visible", torch.zeros(self.num_prototypes, self.k, num_parts), dist_reduce_fx=None
        )

    def update(
        self,
        similarities: torch.Tensor,
        similarity_maps: torch.Tensor,
        image_size: Sequence[int],
        part_masks: torch.Tensor | None = None,
        landmarks: torch.Tensor | None = None,
        visible: torch.Tensor | None = None,
    ) -> None:
        """``similarities`` ``(B, P)`` pooled scores; parts from ``part_masks`` ``(B, Q, H, W)`` or keypoints."""
        if part_masks is None and (landmarks is None or visible is None):
            raise ValueError("part purity needs part_masks or landmarks + visible")
        order, new = self._select(similarities.detach().t())
        j, slot = new.nonzero(as_tuple=True)
        hits = self.top_hits.gather(
            1, order.clamp(max=self.k - 1)[..., None].expand(-1, -1, self.top_hits.shape[2])
        )
        vis = self.top_visible.gather(
            1, order.clamp(max=self.k - 1)[..., None].expand(-1, -1, self.top_hits.shape[2])
        )
        if j.numel():
            b = order[j, slot] - self.k
            if part_masks is not None:
                h_new = region_part_hits(
                    similarity_maps[b, j].detach(), part_masks[b], image_size, self.region_percentile
                ).float()
                v_new = part_masks[b].flatten(2).any(2).float()
            else:
                loc = _argmax_locations(similarity_maps[b, j].detach(), image_size)
                half = box_half_size(image_size, self.half_fraction)
                h_new = landmark_hits(loc, landmarks[b], visible[b], half, image_size).float()
                v_new = visible[b].float()
            hits[j, slot] = h_new.to(hits)
            vis[j, slot] = v_new.to(vis)
        self.top_hits, self.top_visible = hits, vis

    def per_prototype(self) -> torch.Tensor:
        score, hits, vis = self._merged(self.top_hits, self.top_visible)
        valid = torch.isfinite(score).unsqueeze(2).float()
        num, den = (hits * valid).sum(1), (vis * valid).sum(1)
        frac = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
        return frac.max(1).values

    def compute(self) -> dict[str, torch.Tensor]:
        purity = self.per_prototype()[self.active]
        if purity.numel() == 0:
            z = torch.tensor(0.0)
            return {"mean": z, "std": z, "part_related": z}
        return {
            "mean": purity.mean(),
            "std": purity.std(unbiased=False),
            "part_related": (purity > 0.5).sum().float(),
        }


class PrototypeClassPurity(_TopKBuffer):
    """k-NN class purity: fraction of each prototype's ``k`` nearest images (one patch each) of its class.

    :meth:`compute` returns ``{"mean", "prune_fraction"}``: the mean purity over prototypes and the
    fraction with fewer than ``threshold`` own-class neighbours (ProtoPNet's pruning rule, ``k=6``,
    ``threshold=3``).
    """

    def __init__(
        self,
        prototype_classes: Sequence[int] | torch.Tensor,
        k: int = 6,
        threshold: int = 3,
        **kwargs: object,
    ) -> None:
        super().__init__(prototype_classes, k, **kwargs)
        self.threshold = threshold
        self.add_state(
            "top_label", torch.full((self.num_prototypes, self.k), -1, dtype=torch.long), dist_reduce_fx=None
        )

    def update(self, min_distances: torch.Tensor, labels: torch.Tensor) -> None:
        """``min_distances`` ``(B, P)``, ``labels`` ``(B,)``."""
        order, new = self._select(-min_distances.detach().t())
        lab = torch.cat(
            [self.top_label, labels.view(1, -1).expand(self.num_prototypes, -1).to(self.top_label)], 1
        )
        self.top_label = lab.gather(1, order)
        del new

    def compute(self) -> dict[str, torch.Tensor]:
        score, lab = self._merged(self.top_label)
        valid = torch.isfinite(score)
        own = ((lab == self.prototype_classes.view(-1, 1)) & valid).sum(1).float()
        n = valid.sum(1).float().clamp(min=1)
        act = self.active
        if not act.any():
            z = torch.tensor(0.0)
            return {"mean": z, "prune_fraction": z}
        return {"mean": (own / n)[act].mean(), "prune_fraction": (own < self.threshold).float()[act].mean()}


def explanation_size(
    similarities: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, fraction: float = 0.8
) -> torch.Tensor:
    """``(B,)`` k@X %: smallest ``k`` whose top-``k`` positive contributions ``W[t, j] s_j`` reach ``fraction``
    of the sum of positive contributions (0 when there is no positive evidence)."""
    c = (weight[target] * similarities).clamp(min=0)
    sorted_c = c.sort(dim=1, descending=True).values
    total = sorted_c.sum(1, keepdim=True)
    reached = sorted_c.cumsum(1) >= fraction * total - 1e-12 * total.abs()
    k = reached.float().argmax(1) + 1
    return torch.where(total.squeeze(1) > 0, k, torch.zeros_like(k)).float()


class ExplanationSize(Metric):
    """Mean k@X % over images (sum-reducible); see :func:`explanation_size`."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, fraction: float = 0.8, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.fraction = fraction
        self.add_state("total", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, similarities: torch.Tensor, weight: torch.Tensor, target: torch.Tensor) -> None:
        k = explanation_size(similarities.detach(), weight.detach(), target, self.fraction)
        self.total += k.sum()
        self.n += k.numel()

    def compute(self) -> torch.Tensor:
        return self.total / self.n.clamp(min=1)


def global_size(weight: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-3) -> int:
    """Number of (unpruned) prototypes with some last-layer weight ``|w| > eps`` (PIP-Net's global size)."""
    used = (weight.detach().abs() > eps).any(0)
    if mask is not None:
        used = used & (mask > 0)
    return int(used.sum())


def prototype_unique(
    mask: torch.Tensor,
    source_index: torch.Tensor,
    source_location: torch.Tensor,
    prototype_vectors: torch.Tensor,
    tol: float = 1e-6,
) -> float:
    """Fraction of distinct prototypes among the active ones: ``|{(i(j), l(j))}| / M``.

    Push (Chen et al., NeurIPS 2019, Sec. 2.2 step 2) replaces prototype ``j`` by the latent patch at
    location ``l(j)`` of training image ``i(j)``; prototypes pushed onto the same patch are duplicates
    (the redundancy that ProtoPShare, Rymarczyk et al., KDD 2021, merges). After push: distinct
    sources ``(image, location)``; before push (or while some active prototype has no source): distinct
    vectors up to ``tol`` (Euclidean distance).

    Args:
        mask: ``(P,)`` prototype mask, ``> 0`` for active (unpruned) prototypes.
        source_index: ``(P,)`` long, dataset index of each prototype's push source (``-1``: none yet).
        source_location: ``(P, L)`` long, its latent location (e.g. ``(row, col)``).
        prototype_vectors: ``(P, ...)`` the prototypes.

    For a ProtoPNet ``net``: ``prototype_unique(net.prototype_mask, net.push_source_index,
    net.push_source_location, net.prototype_layer.prototype_vectors)``.
    """
    active = mask > 0
    n = int(active.sum())
    if n == 0:
        return 0.0
    src = source_index[active]
    if bool((src >= 0).all()):
        keys = torch.cat([src.view(-1, 1), source_location[active].view(n, -1)], 1)
        return int(torch.unique(keys, dim=0).shape[0]) / n
    vecs = prototype_vectors.detach()[active].flatten(1)
    d = torch.cdist(vecs, vecs)
    dup = (d < tol).triu(1).any(0)  # j duplicates some earlier prototype
    return float((~dup).sum()) / n
