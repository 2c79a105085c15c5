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
  collective. A fixed 0.5 % quantile caps a perfect detector of a part that covers 3.5 % of the pixels
  near 0.13, so the default is now:
* :func:`area_matched_part_iou`: the same IoU with an **area-matched** threshold per (unit, part) (as many
  pixels on as the part covers over the set), and the **detection rate** (best-part IoU > 0.2, ICNN
  Sec. 4.2). :func:`part_iou_scores` adds the **oracle ceiling** (:func:`oracle_part_maps`: part masks
  pooled onto the unit's grid) and the **random baseline** (:func:`random_directions` of the same layer).
* :func:`part_deletion_score`: causal test with a re-renderer, does removing a unit's own part lower its
  response more than removing another part.
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
def _check_dissection_inputs(activations: torch.Tensor, part_masks: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming both shapes unless they are ``(N, C, h, w)`` and ``(N, K, H, W)``."""
    if activations.dim() != 4 or part_masks.dim() != 4 or activations.shape[0] != part_masks.shape[0]:
        raise ValueError(
            f"activations must be (N, C, h, w) and part_masks (N, K, H, W) for the same N; got "
            f"{tuple(activations.shape)} and {tuple(part_masks.shape)}"
        )


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
    _check_dissection_inputs(activations, part_masks)
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


# ---------------------------------------------------------------------------------------------------
# Area-matched part IoU, detection rate, their oracle and random baselines, and causal part deletion
# ---------------------------------------------------------------------------------------------------
def oracle_part_maps(part_masks: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The oracle part detector on a filter's grid: each part mask average-pooled onto ``grid``.

    Cell ``(i, j)`` of oracle unit ``k`` is the fraction of that cell covered by part ``k``
    (``adaptive_avg_pool2d``), so the best a ``h x w`` map can say about the part. Fed to the same
    metric as a filter's map (bilinear upsampling back to the image), it gives the **ceiling** of the
    metric on that grid: the blur of the grid is included, nothing else.

    Args:
        part_masks: ``(N, K, H, W)`` bool; grid: ``(h, w)`` of the filters' maps.

    Returns:
        ``(N, K, h, w)`` float maps in ``[0, 1]``.
    """
    if part_masks.dim() != 4:
        raise ValueError(f"part_masks must be (N, K, H, W), got shape {tuple(part_masks.shape)}")
    return F.adaptive_avg_pool2d(part_masks.float(), tuple(grid))


def random_directions(num_channels: int, num: int, seed: int = 0) -> torch.Tensor:
    """``(num, C)`` random unit vectors (isotropic Gaussian, normalised), seeded on the CPU.

    A row ``w`` defines the unit ``sum_c w_c A_c`` of a layer (Bau et al. CVPR 2017, Sec. 4.1: random
    rotations of a layer's basis lose most of its interpretability): the random baseline of a
    per-filter metric in the same trained network.
    """
    if num_channels < 1 or num < 1:
        raise ValueError(f"need num_channels >= 1 and num >= 1, got {num_channels} and {num}")
    g = torch.Generator().manual_seed(int(seed))
    w = torch.randn(num, num_channels, generator=g, dtype=torch.float64)
    return (w / torch.linalg.vector_norm(w, dim=1, keepdim=True)).float()


def project_maps(activations: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """Maps of the units ``directions`` (``(R, C)``) of a layer with maps ``(N, C, h, w)``: ``(N, R, h, w)``."""
    return torch.einsum("nchw,rc->nrhw", activations.float(), directions.to(activations.device).float())


@torch.no_grad()
def area_matched_part_iou(
    activations: torch.Tensor,
    part_masks: torch.Tensor,
    iou_threshold: float = 0.2,
    max_elements: int = 1 << 24,
) -> dict[str, torch.Tensor]:
    """Part IoU of every unit with an **area-matched** threshold per (unit, part) pair.

    Network Dissection (Bau et al. CVPR 2017, Sec. 2.2) thresholds every unit at its top-0.5 % quantile;
    a part that covers ``~3.5 %`` of the pixels then caps the IoU of a perfect detector at ``~0.14``.
    Here the unit's maps are bilinearly upsampled to the mask size (``align_corners=False``, as
    Network Dissection) and, **for each part k**, the unit's mask is the ``A_k`` pixels of the whole
    probe set with the largest upsampled activation, where ``A_k = sum_{n,y,x} L_k`` is the number of
    pixels the part covers over the set. Equivalently the threshold ``T_{u,k}`` is the
    ``1 - A_k / (N H W)`` quantile of the unit's upsampled activations (the ``A_k``-th largest value),
    and ties at ``T_{u,k}`` are broken by ``torch.topk``'s order, so exactly ``A_k`` pixels are
    selected. Pixels where the unit is not active (value ``<= 0``) are dropped from that selection (a
    unit silent on most pixels does not claim them), so at most ``A_k`` pixels are on.
    ``IoU_{u,k} = sum |M_{u,k} & L_k| / sum |M_{u,k} | L_k|`` over the set; a part absent from the whole
    set has IoU 0. A unit is a detector when its best IoU exceeds ``iou_threshold`` (0.2: the
    "part interpretability" of ICNN, Zhang et al. CVPR 2018, Sec. 4.2).

    Args:
        activations: ``(N, C, h, w)`` unit maps; part_masks: ``(N, K, H, W)`` bool.
        iou_threshold: detection threshold on the best-part IoU.
        max_elements: memory bound of one upsampled chunk of units.

    Returns:
        ``iou`` ``(C, K)``, ``threshold`` ``(C, K)`` (``T_{u,k}``), ``num_on`` ``(C, K)`` (pixels on),
        ``part_area`` ``(K,)``, ``best_iou`` ``(C,)``, ``best_part`` ``(C,)``, scalars ``part_iou`` (mean best
        IoU over units), ``detection_rate`` (fraction of units above ``iou_threshold``),
        ``num_part_detectors`` and ``num_unique_parts``.
    """
    _check_dissection_inputs(activations, part_masks)
    n, c = activations.shape[:2]
    k, H, W = part_masks.shape[1:]
    masks = part_masks.bool().transpose(0, 1).reshape(k, -1).cpu()  # (K, N*H*W) in the unit's pixel order
    area = masks.sum(1)  # (K,)
    top = int(area.max()) if k else 0
    iou = torch.zeros(c, k, dtype=torch.float64)
    thr = torch.full((c, k), float("nan"))
    num_on = torch.zeros(c, k, dtype=torch.long)
    chunk = max(1, max_elements // max(1, n * H * W))
    for start in range(0, c, chunk):
        a = F.interpolate(
            activations[:, start : start + chunk].float().cpu(),
            size=(H, W),
            mode="bilinear",
            align_corners=False,
        )
        flat = a.transpose(0, 1).reshape(a.shape[1], -1)  # (c', N*H*W)
        if top == 0:
            continue
        val, idx = flat.topk(top, dim=1, sorted=True)
        for j in range(k):
            ak = int(area[j])
            if ak == 0:
                continue
            on = val[:, :ak] > 0  # the A_k largest, active pixels
            inter = (masks[j][idx[:, :ak]] & on).sum(1)
            cnt = on.sum(1)
            union = cnt + ak - inter
            iou[start : start + chunk, j] = inter.double() / union.double()
            thr[start : start + chunk, j] = val[:, ak - 1]
            num_on[start : start + chunk, j] = cnt
    best, part = iou.max(1)
    det = best > iou_threshold
    return {
        "iou": iou.float(),
        "threshold": thr,
        "num_on": num_on,
        "part_area": area,
        "best_iou": best.float(),
        "best_part": part,
        "part_iou": best.mean().float(),
        "detection_rate": det.double().mean().float(),
        "num_part_detectors": det.sum(),
        "num_unique_parts": torch.unique(part[det]).numel() * torch.ones((), dtype=torch.long),
    }


@torch.no_grad()
def part_iou_scores(
    activations: torch.Tensor,
    part_masks: torch.Tensor,
    random_activations: torch.Tensor,
    iou_threshold: float = 0.2,
    quantile: float | None = None,
) -> dict[str, dict[str, Any]]:
    """``part_iou`` and ``part_detection_rate`` of a layer's units with their oracle ceiling and random baseline.

    * raw: the units' maps ``activations`` (``(N, C, h, w)``);
    * ceiling: the oracle units :func:`oracle_part_maps` on the same ``(h, w)`` grid (one per part
      present in the set), through the same upsampling, threshold and IoU;
    * random: ``random_activations`` ``(N, R, h, w)``, e.g. :func:`project_maps` of
      :func:`random_directions` of the same layer.

    ``quantile=None`` uses :func:`area_matched_part_iou`; a number uses the fixed top-``quantile``
    threshold of :func:`part_dissection` (Network Dissection; capped well below 1 for small parts).

    Returns:
        ``{"model" | "oracle" | "random": {"part_iou", "part_detection_rate", "result"}}`` (floats and the
        full result dict of the metric).
    """
    present = part_masks.flatten(2).any(-1).any(0)  # (K,) parts seen in the set
    oracle = oracle_part_maps(part_masks[:, present], activations.shape[-2:])

    def run(maps: torch.Tensor, masks: torch.Tensor) -> dict[str, Any]:
        if quantile is None:
            res = area_matched_part_iou(maps, masks, iou_threshold)
        else:
            res = part_dissection(maps, masks, quantile, iou_threshold)
            res["detection_rate"] = (res["best_iou"] > iou_threshold).float().mean()
        return {
            "part_iou": float(res["part_iou"]),
            "part_detection_rate": float(res["detection_rate"]),
            "result": res,
        }

    return {
        "model": run(activations, part_masks),
        # the oracle of part k is scored against the parts present (its best part is its own)
        "oracle": run(oracle, part_masks[:, present]),
        "random": run(random_activations, part_masks),
    }


def part_deletion_score(
    response: torch.Tensor,
    removed_response: torch.Tensor,
    assigned_part: torch.Tensor,
    visible: torch.Tensor,
) -> float:
    """Causal part deletion: does a unit lose more when its own part is removed than when another is?

    For unit ``u`` with assigned part ``q_u`` (its best-IoU part) and image ``i`` with its response
    ``r_u(i)`` (the spatial max of the unit's map), ``d_{u,p}(i) = r_u(i) - r_u(i without part p)``
    (the image re-rendered with part ``p`` removed, same layout and noise). The score is the fraction
    of triples ``(u, i, p)``, ``p != q_u``, with both ``q_u`` and ``p`` visible in ``i``, where
    ``d_{u,q_u}(i) > d_{u,p}(i)``; ties count one half. A unit that ignores the parts (same drop
    for every part, e.g. silent) scores 0.5; the oracle unit of part ``q`` (its pooled mask) scores
    1: removing ``q`` takes its whole response away, removing another part can only uncover ``q``.
    An interventional version of ICNN's claim that a filter represents one part (Zhang et al.
    CVPR 2018, Sec. 3).

    Args:
        response: ``(N, U)`` responses on the original images.
        removed_response: ``(N, K, U)`` responses with part ``k`` removed.
        assigned_part: ``(U,)`` long, the part of each unit.
        visible: ``(N, K)`` bool, part ``k`` visible in image ``n``.

    Returns:
        the fraction in ``[0, 1]`` (``nan`` when no triple qualifies).
    """
    n, k, u = removed_response.shape
    if response.shape != (n, u) or assigned_part.shape != (u,) or visible.shape != (n, k):
        raise ValueError(
            f"shapes must be response (N, U), removed_response (N, K, U), assigned_part (U,), visible (N, K); "
            f"got {tuple(response.shape)}, {tuple(removed_response.shape)}, {tuple(assigned_part.shape)}, "
            f"{tuple(visible.shape)}"
        )
    drop = response.double()[:, None, :] - removed_response.double()  # (N, K, U)
    q = assigned_part.long().to(drop.device)
    own = drop.gather(1, q.view(1, 1, u).expand(n, 1, u))  # (N, 1, U)
    vis = visible.bool().to(drop.device)
    valid = vis[:, q][:, None, :] & vis[:, :, None]  # (N, K, U): own part and part p visible
    valid &= torch.arange(k, device=drop.device).view(1, k, 1) != q.view(1, 1, u)
    win = (own > drop).double() + 0.5 * (own == drop).double()
    total = valid.sum()
    return float((win * valid).sum() / total) if int(total) > 0 else float("nan")
