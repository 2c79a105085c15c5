"""Concept whitening metrics (Chen, Bei & Rudin, "Concept whitening for interpretable image recognition",
Nature Machine Intelligence 2(12):772-782, 2020). Tensors in, numbers out.

* :class:`ConceptAUC`: concept purity, the one-vs-all AUC of an axis score on held-out concept images
  (paper Fig. 4; reference ``plot_auc_cw``), exact (Mann-Whitney with ties) from
  all-gathered scores, plus the std over 5 random folds of the reference protocol;
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
    "concept_aucs",
    "linear_probe_auc",
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


def concept_aucs(
    scores: torch.Tensor, labels: torch.Tensor, num_concepts: int, folds: int = 5, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-concept one-vs-all AUC of ``scores[:, j]`` for ``labels == j``, and its std over folds.

    Args:
        scores: ``(N, K)`` axis scores.
        labels: ``(N,)`` concept index of each image.
        folds: the reference code shuffles and splits into 5 disjoint folds and reports mean +- std.

    Returns:
        ``(auc (K,), fold_std (K,))``: AUC on all images, std of the per-fold AUCs.
    """
    auc = torch.tensor(
        [binary_auc(scores[:, j], labels == j) for j in range(num_concepts)], dtype=torch.float64
    )
    std = torch.full((num_concepts,), float("nan"), dtype=torch.float64)
    if folds > 1 and len(labels) >= 2 * folds:
        perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
        parts = perm.chunk(folds)
        per_fold = torch.tensor(
            [[binary_auc(scores[idx, j], labels[idx] == j) for j in range(num_concepts)] for idx in parts],
            dtype=torch.float64,
        )
        std = torch.from_numpy(np.nanstd(per_fold.numpy(), axis=0))
    return auc, std


class ConceptAUC(Metric):
    """Concept purity of ``K`` axes (metrics A.1.1); ``update(scores (B, K), labels (B,))``.

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
        self.labels.append(labels.detach().long())
        if ids is not None:
            self.ids.append(ids.detach().long().reshape(-1))

    def compute(self) -> dict[str, torch.Tensor]:
        if isinstance(self.scores, list) and not self.scores:
            nan = torch.full((self.num_concepts,), float("nan"))
            return {"auc": nan, "fold_std": nan}
        scores, labels = dim_zero_cat(self.scores).cpu(), dim_zero_cat(self.labels).cpu()
        ids = dim_zero_cat(self.ids).cpu() if not (isinstance(self.ids, list) and not self.ids) else None
        if ids is not None and ids.numel() == labels.numel():
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

    Returns:
        ``(auc (K,), channel (K,))``. Selected on the evaluation images themselves, as the reference
        code does, so the baseline is optimistic.
    """
    aucs = torch.tensor(
        [[binary_auc(scores[:, c], labels == j) for c in range(scores.shape[1])] for j in range(num_concepts)]
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

    For each concept a logistic regression separates its training images from the other concepts'
    (features standardised); test images are scored by the probe's decision value ``x . cav + b``.
    The reference trains on the flattened map of 9 concept batches against 9 random Places batches;
    here the features are spatially averaged and the negatives are the other concepts (same labels
    as the AUC).

    Returns:
        ``(K,)`` AUC per concept.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, xte = train_x.double().cpu().numpy(), test_x.double().cpu().numpy()
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    out = []
    for j in range(num_concepts):
        ytr = (train_y == j).cpu().numpy()
        if ytr.all() or not ytr.any():
            out.append(float("nan"))
            continue
        probe = LogisticRegression(max_iter=2000, random_state=seed).fit(xtr, ytr)
        out.append(binary_auc(torch.from_numpy(probe.decision_function(xte)), test_y == j))
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
