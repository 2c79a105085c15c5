"""Metrics of interpretable CNN part filters (Zhang, Wu & Zhu, "Interpretable convolutional neural
networks", CVPR 2018). Tensors in, numbers out; the report figure is in :mod:`interpzoo.reports.icnn`.

* :class:`LocationInstability` (Zhang, Wu, Zhu, CVPR 2018, Sec. 4.2; official ``computeStability`` /
  ``getDistSqrtVar``): for each filter and landmark, the standard deviation of the distance between
  the landmark and the filter's inferred part position over the filter's top-M images, averaged
  over landmarks and filters and divided by the image diagonal. Streaming with a top-M buffer per
  (filter, landmark); under DDP the buffers are gathered and merged (``topk-merge``), so the value
  is the single-process one.
* :func:`part_dissection` (Network Dissection, Bau et al., CVPR 2017; ICNN's "part
  interpretability"): per-unit top-0.5% threshold over all pixels of a probe set, dataset-level IoU
  with every ground-truth part mask, detectors with IoU > 0.04. Not batch-decomposable (global
  quantile): run it on a fixed, seeded subset, where every rank gets the same value without a
  collective.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics import Metric


def inferred_positions(
    features: torch.Tensor, image_size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score and image position of every filter's strongest unit.

    The position is the centre of the argmax cell in image pixels, ``x = (j + 0.5) W / w``,
    ``y = (i + 0.5) H / h`` (the receptive-field centre of a same-padded layer; the official code's
    ``targetCenter + (idx - 1) targetStride``).

    Args:
        features: ``(B, C, h, w)`` maps; image_size: ``(H, W)`` of the input images.

    Returns:
        ``(scores (B, C), positions (B, C, 2) as (x, y))``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, h, w), got shape {tuple(features.shape)}")
    b, c, h, w = features.shape
    score, idx = features.detach().flatten(2).max(-1)
    i, j = (idx // w).float(), (idx % w).float()
    H, W = image_size
    pos = torch.stack([(j + 0.5) * (W / w), (i + 0.5) * (H / h)], -1)
    return score.float(), pos


def _topm_merge(
    scores: torch.Tensor, dists: torch.Tensor, index: torch.Tensor, m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep the ``m`` best entries along the last dim: score descending, ties by smaller sample index."""
    order = torch.sort(index, dim=-1, stable=True).indices
    s1 = scores.gather(-1, order)
    order = order.gather(-1, torch.sort(-s1, dim=-1, stable=True).indices)[..., :m]
    return scores.gather(-1, order), dists.gather(-1, order), index.gather(-1, order)


class LocationInstability(Metric):
    """Location instability of part filters (Zhang et al. CVPR 2018, Sec. 4.2). Lower is better.

    ``inst = mean_f [ mean_k std_{I in TopM(f, k)} ||p_k(I) - p_hat_f(I)|| ] / sqrt(H^2 + W^2)``, where
    ``TopM(f, k)`` are the ``top_m`` images with landmark ``k`` annotated that activate filter ``f``
    most, ``p_hat_f(I)`` is the inferred part position (:func:`inferred_positions`) and the std is
    unbiased. A (filter, landmark) pair with fewer than 2 images is skipped; a filter with no valid
    landmark is dropped (the official code drops NaN filters). ``select_ratio < 1`` averages only
    the most stable filters (official ``selectPatternRatio``, 1.0 there).

    Deviation: images where the filter's maximum is ``<= min_score`` (silent filter) are not
    candidates; the official code ranks them too, so a dead filter (argmax always at cell 0) scores a
    perfect 0 there.

    Ties in activation are broken by the smaller sample ``index`` (pass the batch's global
    ``"index"``), so the result does not depend on how the data is sharded over ranks.

    Args:
        num_filters: ``C``; num_landmarks: ``K``.
        top_m: images per filter and landmark (100 in the paper).
        select_ratio: fraction of filters averaged.
        min_score: an image counts for a filter only when the filter's maximum exceeds this.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(
        self,
        num_filters: int,
        num_landmarks: int,
        top_m: int = 100,
        select_ratio: float = 1.0,
        min_score: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.min_score = float(min_score)
        if top_m < 2:
            raise ValueError(f"top_m must be >= 2 (a standard deviation needs two images), got {top_m}")
        if not 0 < select_ratio <= 1:
            raise ValueError(f"select_ratio must be in (0, 1], got {select_ratio}")
        self.num_filters, self.num_landmarks, self.top_m = int(num_filters), int(num_landmarks), int(top_m)
        self.select_ratio = float(select_ratio)
        shape = (self.num_filters, self.num_landmarks, self.top_m)
        # dist_reduce_fx=None: the buffers are gathered (stacked by rank) and merged in compute().
        self.add_state("scores", torch.full(shape, float("-inf")), dist_reduce_fx=None)
        self.add_state("dists", torch.zeros(shape), dist_reduce_fx=None)
        self.add_state(
            "index", torch.full(shape, torch.iinfo(torch.long).max, dtype=torch.long), dist_reduce_fx=None
        )
        self.add_state("diag", torch.tensor(0.0), dist_reduce_fx="max")

    def update(
        self,
        features: torch.Tensor,
        landmarks: torch.Tensor,
        visible: torch.Tensor,
        image_size: tuple[int, int],
        index: torch.Tensor | None = None,
        candidates: torch.Tensor | None = None,
    ) -> None:
        """Add a batch.

        Args:
            features: ``(B, C, h, w)`` maps of the evaluated layer.
            landmarks: ``(B, K, 2)`` ``(x, y)`` pixels; visible: ``(B, K)`` bool (annotated).
            image_size: ``(H, W)`` of the images the landmarks refer to.
            index: ``(B,)`` global sample ids (tie-breaks); candidates: optional ``(B, C)`` bool
                restricting which images count for which filter (e.g. the filter's category).
        """
        b, c = features.shape[:2]
        if c != self.num_filters:
            raise ValueError(f"LocationInstability was built for {self.num_filters} filters, got {c}")
        if landmarks.shape != (b, self.num_landmarks, 2) or visible.shape != (b, self.num_landmarks):
            raise ValueError(
                f"landmarks must be (B, {self.num_landmarks}, 2) and visible (B, {self.num_landmarks}); got "
                f"{tuple(landmarks.shape)} and {tuple(visible.shape)}"
            )
        score, pos = inferred_positions(features, image_size)
        d = torch.linalg.vector_norm(
            landmarks[:, None, :, :].float() - pos[:, :, None, :], dim=-1
        )  # (B, C, K)
        # An image where the filter is silent (max <= 0, e.g. a dead ReLU filter) has no inferred part: its
        # argmax would sit at cell (0, 0) every time and fake a perfectly stable filter.
        ok = visible.bool()[:, None, :] & (score > self.min_score)[:, :, None]
        if candidates is not None:
            ok = ok & candidates.bool()[:, :, None]
        s = score[:, :, None].expand(b, c, self.num_landmarks).masked_fill(~ok, float("-inf"))
        idx = torch.arange(b, device=s.device) if index is None else index.to(s.device).long()
        idx = idx.view(b, 1, 1).expand(b, c, self.num_landmarks)
        self.scores, self.dists, self.index = _topm_merge(
            torch.cat([self.scores, s.permute(1, 2, 0)], -1),
            torch.cat([self.dists, d.permute(1, 2, 0).to(self.dists.dtype)], -1),
            torch.cat([self.index, idx.permute(1, 2, 0)], -1),
            self.top_m,
        )
        self.diag = torch.maximum(self.diag, torch.tensor(math.hypot(*image_size), device=self.diag.device))

    def per_filter(self) -> torch.Tensor:
        """``(C,)`` un-normalised instability of each filter (NaN when undefined), after a sync."""
        scores, dists, index = self.scores, self.dists, self.index
        if scores.dim() == 4:  # gathered from ranks: (world, C, K, M) -> merge
            scores, dists, index = (t.permute(1, 2, 0, 3).flatten(2) for t in (scores, dists, index))
            scores, dists, index = _topm_merge(scores, dists, index, self.top_m)
        valid = torch.isfinite(scores)
        n = valid.sum(-1)
        dv = torch.where(valid, dists, torch.zeros_like(dists)).double()
        mean = dv.sum(-1) / n.clamp(min=1)
        var = (((dv - mean[..., None]) ** 2) * valid).sum(-1) / (n - 1).clamp(min=1)
        std = torch.where(n >= 2, var.sqrt(), torch.full_like(var, float("nan")))
        return torch.nanmean(std, dim=-1).float()

    def compute(self) -> torch.Tensor:
        inst = self.per_filter()
        inst = inst[~torch.isnan(inst)]
        if inst.numel() == 0 or float(self.diag) == 0:
            return torch.tensor(float("nan"), device=self.diag.device)
        keep = max(1, round(inst.numel() * self.select_ratio))
        return inst.sort().values[:keep].mean() / self.diag


@torch.no_grad()
def part_dissection(
    activations: torch.Tensor,
    part_masks: torch.Tensor,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    max_elements: int = 1 << 24,
) -> dict[str, torch.Tensor]:
    """Network-Dissection part IoU of every unit (Bau et al. CVPR 2017, Sec. 2.2; ICNN Sec. 4.2).

    Each unit's maps are bilinearly upsampled to the mask size; its threshold ``T_u`` is the top
    ``quantile`` of all its upsampled values over the probe set (``P(A_u > T_u) = quantile``); the
    unit's mask is ``A_u >= T_u`` (and ``> 0``, so a unit that is silent on most pixels does not
    claim them); ``IoU_{u,k} = sum |M_u & L_k| / sum |M_u | L_k|`` over the whole set.

    Args:
        activations: ``(N, C, h, w)``; part_masks: ``(N, K, H, W)`` bool.
        quantile: top fraction of pixels kept per unit (0.005 in Network Dissection).
        iou_threshold: a unit is a detector of its best part above this IoU (0.04 in Bau et al.).
        max_elements: memory bound of one upsampled chunk (units are processed in chunks).

    Returns:
        ``iou`` ``(C, K)``, ``best_iou`` ``(C,)``, ``best_part`` ``(C,)``, scalars ``part_iou`` (mean best
        IoU over units), ``num_part_detectors`` (units above the threshold) and ``num_unique_parts``.
    """
    if activations.dim() != 4 or part_masks.dim() != 4 or activations.shape[0] != part_masks.shape[0]:
        raise ValueError(
            f"activations must be (N, C, h, w) and part_masks (N, K, H, W) for the same N; got "
            f"{tuple(activations.shape)} and {tuple(part_masks.shape)}"
        )
    n, c = activations.shape[:2]
    k, H, W = part_masks.shape[1:]
    masks = part_masks.bool()
    mask_area = masks.sum((0, 2, 3)).double()  # (K,)
    iou = torch.zeros(c, k, dtype=torch.float64)
    chunk = max(1, max_elements // max(1, n * H * W))
    total = n * H * W
    top = max(1, math.ceil(quantile * total))
    for start in range(0, c, chunk):
        a = F.interpolate(
            activations[:, start : start + chunk].float(), size=(H, W), mode="bilinear", align_corners=False
        )
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)
        thr = flat.kthvalue(total - top + 1, dim=1).values  # the top-quantile value per unit
        unit = (a >= thr.view(1, -1, 1, 1)) & (a > 0)  # (N, c', H, W)
        inter = torch.einsum("nuhw,nkhw->uk", unit.float(), masks.float()).double()
        area = unit.sum((0, 2, 3)).double()
        union = area[:, None] + mask_area[None, :] - inter
        iou[start : start + chunk] = torch.where(
            union > 0, inter / union.clamp(min=1), torch.zeros_like(inter)
        )
    best, part = iou.max(1)
    det = best > iou_threshold
    return {
        "iou": iou.float(),
        "best_iou": best.float(),
        "best_part": part,
        "part_iou": best.mean().float(),
        "num_part_detectors": det.sum(),
        "num_unique_parts": torch.unique(part[det]).numel() * torch.ones((), dtype=torch.long),
    }
