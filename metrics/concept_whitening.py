"""Concept whitening metrics (Chen, Bei & Rudin, "Concept whitening for interpretable image recognition",
Nature Machine Intelligence 2(12):772-782, 2020). Tensors in, numbers out.

* :class:`ConceptAUC`: concept purity, the AUC of an axis score on held-out concept images
  (paper Fig. 4; reference ``plot_auc_cw``), exact (Mann-Whitney with ties) from
  all-gathered scores, plus the std over 5 random folds of the reference protocol. Labels are either the
  probe set's index (the reference protocol: one-vs-all) or, better, each image's multi-hot concept vector
  ``(N, K)``: with index labels a probe "negative" can show the concept (a PartShapes ``has_striped`` probe
  of ``has_red`` is red 15 % of the time), which caps a perfect detector's AUC at ``1 - q/2`` for a
  fraction ``q`` of such negatives (:func:`concept_auc_ceiling`);
* the scorecard's reference points (:mod:`interpzoo.metrics.calibration`): :func:`concept_auc_ceiling`
  (the ground-truth indicator as the score), :func:`random_directions`, :func:`project_and_pool` and
  :func:`random_direction_aucs` (random unit directions in the whitened space, the chance level of an
  axis), :func:`intervention_accuracy` / :func:`intervention_effect` (does an axis follow a causal
  intervention on the rendered concept);
* :func:`best_filter_auc` and :func:`linear_probe_auc`: the baselines on the matched BN model
  (reference ``plot_auc_filter`` and ``plot_auc_lm``, a TCAV-style concept activation vector);
* :class:`ConceptSimilarity`: the inter-concept cosine-similarity matrix and its mean off-diagonal
  (reference ``intra_concept_dot_product_vs_inter_concept_dot_product``), exact from per-concept sums;
* :class:`WhiteningCorrelation`: decorrelation of the whitened layer from ``sum z``, ``sum z z^T``, ``n``;
* :func:`rotation_orthogonality_error`;
* :class:`PermutationImportance`: loss / error increase when one axis is permuted across the batch
  (reference ``concept_permutation_importance``; Fisher, Rudin & Dominici's model reliance).

The report figures (top-activating images, correlation heatmaps) are in
:mod:`interpzoo.reports.concept_whitening`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.functional.classification import binary_auroc
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "ConceptAUC",
    "ConceptSimilarity",
    "PermutationImportance",
    "WhiteningCorrelation",
    "best_filter_auc",
    "binary_auc",
    "concept_auc_ceiling",
    "concept_aucs",
    "concept_targets",
    "intervention_accuracy",
    "intervention_effect",
    "linear_probe_auc",
    "project_and_pool",
    "random_direction_aucs",
    "random_directions",
    "rotation_orthogonality_error",
]


def binary_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Mann-Whitney AUC ``P(s(p) > s(n)) + P(s(p) = s(n)) / 2`` over positive/negative pairs.

    Computed by ``torchmetrics.functional.classification.binary_auroc`` (exact ROC, ties handled by the
    trapezoid, which equals the pairwise definition with half credit for ties). ``nan`` when a class is
    empty or a score is NaN.

    torchmetrics reads scores outside ``[0, 1]`` as logits and applies a sigmoid, which saturates (ties
    large scores) in floating point; the scores are therefore first mapped to ``[0, 1]`` by an increasing
    affine map, which leaves the ROC unchanged. The AUC is accumulated in float32 by torchmetrics (about
    1e-7 from the float64 rank formula).

    Args:
        scores: ``(N,)`` scores; positive: ``(N,)`` bool (or 0/1) labels.
    """
    s = scores.detach().double().cpu().flatten()
    p = positive.detach().bool().cpu().flatten()
    n_pos = int(p.sum())
    if n_pos == 0 or n_pos == p.numel() or bool(torch.isnan(s).any()):
        return float("nan")
    lo, hi = s.min(), s.max()
    s = (s - lo) / (hi - lo) if hi > lo else torch.zeros_like(s)
    return float(binary_auroc(s, p.long(), validate_args=False))


def concept_targets(labels: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """``(N, K)`` bool positives per concept from ``(N,)`` probe-set indices (one-hot, the reference
    protocol) or from ``(N, K)`` multi-hot concept vectors (returned as bool)."""
    if labels.dim() == 1:
        return torch.nn.functional.one_hot(labels.long(), num_concepts).bool()
    if labels.dim() != 2 or labels.shape[1] != num_concepts:
        raise ValueError(f"labels must be (N,) or (N, {num_concepts}), got {tuple(labels.shape)}")
    return labels.bool()


def concept_aucs(
    scores: torch.Tensor, labels: torch.Tensor, num_concepts: int, folds: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept AUC of ``scores[:, j]`` for the positives of concept ``j``, and its std over folds.

    Args:
        scores: ``(N, K)`` axis scores.
        labels: ``(N,)`` concept (probe set) index of each image, one-vs-all; or ``(N, K)`` multi-hot
            concept vectors: the positives of concept ``j`` are the images that show it, the negatives
            those that do not (see :func:`concept_auc_ceiling` for why this matters).
        folds: the reference code shuffles and splits into 5 disjoint folds and reports mean +- std.

    Returns:
        ``(auc (K,), fold_std (K,))``: AUC on all images, std of the per-fold AUCs.
    """
    targets = concept_targets(labels, num_concepts)
    auc = torch.tensor(
        [binary_auc(scores[:, j], targets[:, j]) for j in range(num_concepts)], dtype=torch.float64
    )
    std = torch.full((num_concepts,), float("nan"), dtype=torch.float64)
    if folds > 1 and len(labels) >= 2 * folds:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        parts = perm.chunk(folds)
        per_fold = torch.tensor(
            [[binary_auc(scores[idx, j], targets[idx, j]) for j in range(num_concepts)] for idx in parts],
            dtype=torch.float64,
        )
        std = torch.from_numpy(np.nanstd(per_fold.numpy(), axis=0))
    return auc, std


class ConceptAUC(Metric):
    """Concept purity of ``K`` axes (metrics A.1.1); ``update(scores (B, K), labels (B,) or (B, K))``.

    ``labels`` are probe-set indices (one-vs-all, the reference protocol) or multi-hot concept vectors
    (positives = images that show the concept); both are kept as ``(B, K)`` targets.

    Exact AUROC keeps every score (``cat`` states, all-gathered under DDP; fine for probe sets of up to
    ~50k images). ``compute()`` returns ``{"auc": (K,), "fold_std": (K,)}``. Give ``update`` the images'
    ``ids`` (unique per image) to make the folds independent of the order the images arrive in: under DDP
    the gathered states are rank-major, so without ids the folds (not the AUC) depend on the process count.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_concepts: int, folds: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_concepts = num_concepts
        self.folds = folds
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("ids", default=[], dist_reduce_fx="cat")

    def update(self, scores: torch.Tensor, labels: torch.Tensor, ids: torch.Tensor | None = None) -> None:
        if scores.dim() != 2 or scores.shape[1] != self.num_concepts:
            raise ValueError(f"scores must be (B, {self.num_concepts}), got {tuple(scores.shape)}")
        self.scores.append(scores.detach().float())
        self.labels.append(concept_targets(labels.detach(), self.num_concepts).long())
        if ids is not None:
            self.ids.append(ids.detach().long().reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.scores, list) and not self.scores:
            nan = torch.full((self.num_concepts,), float("nan"))
            return {"auc": nan, "fold_std": nan}
        scores, labels = dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.labels).cpu()
        ids = dim_zero_cat(self.ids).cpu() if not (isinstance(self.ids, list) and not self.ids) else None
        if ids is not None and ids.numel() == labels.shape[0]:
            order = ids.argsort(stable=True)  # a canonical order: the folds do not depend on the ranks
            scores, labels = scores[order], labels[order]
        auc, std = concept_aucs(scores, labels, self.num_concepts, self.folds)
        return {"auc": auc, "fold_std": std}


class ConceptSimilarity(Metric):
    """Inter-concept similarity ``R_ij = |S_ij| / sqrt(|S_ii| |S_jj|)`` (metrics A.1.2).

    ``S_ij`` is the mean cosine similarity between spatially averaged latent vectors of concept ``i``
    and ``j`` images (self-pairs included), computed exactly from per-concept sums of unit vectors.
    ``update(latents (B, D), labels (B,))``; ``compute()`` returns ``{"matrix": (K, K),
    "offdiag_mean": scalar}`` (lower = better separated concepts). State: ``K x D + K`` sums.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_concepts: int, dim: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_concepts = num_concepts
        self.add_state(
            "sums", default=torch.zeros(num_concepts, dim, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("counts", default=torch.zeros(num_concepts, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        u = torch.nn.functional.normalize(latents.detach().double(), dim=1)
        self.sums.index_add_(0, labels, u)
        self.counts += torch.bincount(labels, minlength=self.num_concepts).to(self.counts)

    def compute(self) -> dict[str, torch.Tensor]:
        k = self.num_concepts
        if self.counts.sum() == 0:
            return {"matrix": torch.full((k, k), float("nan")), "offdiag_mean": torch.tensor(float("nan"))}
        means = self.sums / self.counts.clamp(min=1)[:, None]
        s = means @ means.T
        d = s.diagonal().abs()
        r = s.abs() / (d[:, None] * d[None, :]).sqrt().clamp(min=1e-12)
        off = ~torch.eye(k, dtype=torch.bool, device=r.device)
        offdiag = r[off].mean() if k > 1 else torch.tensor(float("nan"))
        return {"matrix": r, "offdiag_mean": offdiag}


class WhiteningCorrelation(Metric):
    """Decorrelation of a layer's per-pixel channel vectors (metrics A.1.3).

    ``update(z (B, C, H, W))`` keeps ``sum z``, ``sum z z^T`` and ``n`` (float64, sum-reducible;
    ``C`` = ``num_features``).
    ``compute()``: ``offdiag_mean`` (mean ``|rho_ij|``, ``i != j``), ``offdiag_max`` and ``cov_error``
    (``||Sigma - I||_F / sqrt(C)``), plus the correlation ``matrix``.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, num_features: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        c = num_features
        self.add_state("s1", default=torch.zeros(c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("s2", default=torch.zeros(c, c, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, z: torch.Tensor) -> None:
        p = z.detach().transpose(0, 1).reshape(z.shape[1], -1).double()
        self.s1 += p.sum(1)
        self.s2 += p @ p.T
        self.n += p.shape[1]

    def compute(self) -> dict[str, torch.Tensor]:
        nan = torch.tensor(float("nan"))
        if self.n < 2:
            return {"offdiag_mean": nan, "offdiag_max": nan, "cov_error": nan, "matrix": nan}
        mean = self.s1 / self.n
        cov = self.s2 / self.n - torch.outer(mean, mean)
        sd = cov.diagonal().clamp(min=1e-12).sqrt()
        rho = cov / torch.outer(sd, sd)
        c = cov.shape[0]
        off = ~torch.eye(c, dtype=torch.bool, device=cov.device)
        eye = torch.eye(c, dtype=cov.dtype, device=cov.device)
        return {
            "offdiag_mean": rho[off].abs().mean(),
            "offdiag_max": rho[off].abs().max(),
            "cov_error": (cov - eye).norm() / c**0.5,
            "matrix": rho,
        }


def rotation_orthogonality_error(rotation: torch.Tensor) -> float:
    """``max |R R^T - I|`` (float64); near 0 for a healthy Cayley-updated rotation."""
    r = rotation.detach().double()
    return float((r @ r.T - torch.eye(r.shape[0], dtype=r.dtype, device=r.device)).abs().amax())


def best_filter_auc(
    scores: torch.Tensor, labels: torch.Tensor, num_concepts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Baseline "best filter": for each concept, the single channel with the highest one-vs-all AUC.

    Args:
        scores: ``(N, C)`` pooled channel activations of the matched BN model at the same layer.
        labels: ``(N,)`` probe-set indices or ``(N, K)`` multi-hot concept vectors (:func:`concept_aucs`).

    Returns:
        ``(auc (K,), channel (K,))``. Selected on the evaluation images themselves, as the reference
        code does, so the baseline is optimistic.
    """
    targets = concept_targets(labels, num_concepts)
    aucs = torch.tensor(
        [
            [binary_auc(scores[:, c], targets[:, j]) for c in range(scores.shape[1])]
            for j in range(num_concepts)
        ]
    )
    best = aucs.nan_to_num(-1.0).argmax(1)
    return aucs.gather(1, best[:, None]).squeeze(1), best


def linear_probe_auc(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_concepts: int,
    seed: int = 0,
) -> torch.Tensor:
    """Baseline "linear probe / CAV" (TCAV, Kim et al. 2018; reference ``plot_auc_lm``).

    For each concept a logistic regression separates its positive training images from the rest
    (features standardised); test images are scored by the probe's decision value ``x . cav + b``.
    The reference trains on the flattened map of 9 concept batches against 9 random Places batches;
    here the features are spatially averaged and the labels are the AUC's: ``(N,)`` probe-set indices
    (negatives = the other concepts' probes) or ``(N, K)`` multi-hot concept vectors (negatives = the
    probe images that do not show the concept).

    Returns:
        ``(K,)`` AUC per concept.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_t = concept_targets(train_y, num_concepts).cpu()
    test_t = concept_targets(test_y, num_concepts).cpu()
    xtr, xte = train_x.double().cpu().numpy(), test_x.double().cpu().numpy()
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    out = []
    for j in range(num_concepts):
        ytr = train_t[:, j].numpy()
        if ytr.all() or not ytr.any():
            out.append(float("nan"))
            continue
        probe = LogisticRegression(max_iter=2000, random_state=seed).fit(xtr, ytr)
        out.append(binary_auc(torch.from_numpy(probe.decision_function(xte)), test_t[:, j]))
    return torch.tensor(out, dtype=torch.float64)


class PermutationImportance(Metric):
    """Model reliance on each concept axis: increase of loss and error when it is permuted.

    ``update(base_loss (B,), base_err (B,), perm_loss (B, K), perm_err (B, K))`` with per-sample
    values of the unpermuted and the axis-``j``-permuted network. ``compute()`` returns
    ``{"loss_increase": (K,), "error_increase": (K,)}`` (means over samples; sum-reducible).
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, num_concepts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        k = num_concepts
        self.add_state("d_loss", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("d_err", default=torch.zeros(k, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, base_loss: torch.Tensor, base_err: torch.Tensor, perm_loss: torch.Tensor, perm_err: torch.Tensor
    ) -> None:
        self.d_loss += (perm_loss - base_loss[:, None]).double().sum(0)
        self.d_err += (perm_err - base_err[:, None]).double().sum(0)
        self.n += base_loss.shape[0]

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.n.clamp(min=1)
        return {"loss_increase": self.d_loss / n, "error_increase": self.d_err / n}


# ---------------------------------------------------------------------------------------------
# Scorecard reference points: oracle ceiling, random directions, causal interventions
# ---------------------------------------------------------------------------------------------
def concept_auc_ceiling(truth: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """``(K,)`` AUC of the oracle: the ground-truth concept indicator ``truth`` ``(N, K)`` used as the score.

    With the labels taken from the concept vectors (``labels=None``: ``truth`` itself) the oracle separates
    every positive from every negative: 1 wherever both classes occur. With probe-set index labels
    ``(N,)`` a fraction ``q`` of concept ``j``'s negatives show the concept too and tie with the positives,
    so the oracle scores ``1 - q/2`` (the cap the concept-vector labels remove).
    """
    k = truth.shape[1]
    targets = concept_targets(truth if labels is None else labels, k)
    return torch.tensor(
        [binary_auc(truth[:, j].double(), targets[:, j]) for j in range(k)], dtype=torch.float64
    )


def random_directions(dim: int, num: int = 16, seed: int = 0, antithetic: bool = True) -> torch.Tensor:
    """``(num, dim)`` float64 random unit vectors (uniform on the sphere), seeded.

    ``antithetic``: the second half are the negatives of the first. A random direction and its negative are
    equally likely, so this is an unbiased draw of the chance level with less variance; for a score that is
    odd in the direction (``mean`` pooling) each pair's AUCs sum to 1 and its intervention accuracies to 1.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    g = torch.Generator().manual_seed(int(seed))
    half = (num + 1) // 2 if antithetic else num
    u = torch.nn.functional.normalize(torch.randn(half, dim, generator=g, dtype=torch.float64), dim=1)
    return torch.cat([u, -u])[:num] if antithetic else u


def project_and_pool(z: torch.Tensor, directions: torch.Tensor, mode: str) -> torch.Tensor:
    """``phi(u_d . z)`` of each direction: ``z`` ``(B, C, H, W)``, ``directions`` ``(D, C)`` to ``(B, D)``.

    The axis score of the concept-whitening layer (``pool_axes`` with the layer's activation mode, Chen,
    Bei & Rudin 2020 Sec. 3) read along arbitrary unit directions instead of the aligned axes.
    """
    from interpzoo.layers.concept_whitening import pool_axes

    proj = torch.einsum("dc,bchw->bdhw", directions.to(z), z)
    return pool_axes(proj, mode)


def random_direction_aucs(scores: torch.Tensor, labels: torch.Tensor, num_concepts: int) -> torch.Tensor:
    """``(K,)`` mean over ``D`` random directions of the AUC of ``scores[:, d]`` for concept ``j``.

    Args:
        scores: ``(N, D)`` pooled scores of the random directions (:func:`project_and_pool`).
        labels: ``(N,)`` probe-set indices or ``(N, K)`` multi-hot concept vectors.
    """
    targets = concept_targets(labels, num_concepts)
    aucs = torch.tensor(
        [
            [binary_auc(scores[:, d], targets[:, j]) for d in range(scores.shape[1])]
            for j in range(num_concepts)
        ],
        dtype=torch.float64,
    )
    return torch.from_numpy(np.nanmean(aucs.numpy(), axis=1)) if aucs.numel() else aucs.sum(1)


def intervention_accuracy(before: torch.Tensor, after: torch.Tensor, sign: torch.Tensor) -> float:
    """Share of interventions that move a score the intended way; a tie (no change) counts one half.

    Args:
        before, after: ``(M,)`` score of each image before and after its intervention.
        sign: ``(M,)`` +1 where the concept was added, -1 where it was removed.

    A score that ignores the concept (changes at random) scores 0.5, the ground-truth indicator 1.
    """
    d = sign.double() * (after.double() - before.double())
    if d.numel() == 0:
        return float("nan")
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def intervention_effect(before: torch.Tensor, after: torch.Tensor, sign: torch.Tensor, scale: float) -> float:
    """Mean signed change ``mean(sign * (after - before)) / scale`` (a standardised effect size).

    ``scale``: the std of the score over the un-intervened images, so that scores of any unit compare; the
    ground-truth indicator with prevalence ``p`` moves by exactly 1 and has ``scale = sqrt(p (1 - p))``.
    A score that did not move at all (a dead axis: constant, ``scale = 0``) has effect 0; ``nan`` when
    there is nothing to measure or a score that moved has no spread to measure it in.
    """
    if before.numel() == 0:
        return float("nan")
    change = float((sign.double() * (after.double() - before.double())).mean())
    if bool((after == before).all()):
        return 0.0
    return change / float(scale) if scale > 0 else float("nan")
