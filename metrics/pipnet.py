"""PIP-Net sparsity metrics (Nauta et al., CVPR 2023, Sec. 4 "interpretability": global and local explanation
size, sparsity ratio). Tensors in, numbers out; no network is imported here.

* :func:`global_size`: prototypes with a non-zero weight to some class (the prototypes a user has to learn);
* :func:`sparsity_ratio`: the fraction of zero weights of the scoring sheet ``W`` (``K x D``);
* :func:`prototypes_per_class`: non-zero weights of each class;
* :func:`local_size`: per image, the prototypes with a non-zero score ``p_d W[c, d]`` for the explained class
  (``c`` the prediction), i.e. the size of the explanation a user reads; ``any_class=True`` counts the prototypes
  present with a non-zero weight to *any* class (the paper's "local size for all classes");
* :class:`LocalExplanationSize`: the mean of :func:`local_size` over a split (sum-reducible under DDP).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric

__all__ = ["LocalExplanationSize", "global_size", "local_size", "prototypes_per_class", "sparsity_ratio"]


def _check_weight(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 2:
        raise ValueError(f"weight must be the (K, D) class weights, got shape {tuple(weight.shape)}")
    return weight.detach()


def global_size(weight: torch.Tensor, eps: float = 0.0) -> int:
    """Number of prototypes ``d`` with ``W[c, d] > eps`` for some class ``c``.

    Args:
        weight: ``(K, D)`` non-negative class weights (``relu(W)``).
    """
    return int((_check_weight(weight) > eps).any(0).sum())


def sparsity_ratio(weight: torch.Tensor, eps: float = 0.0) -> float:
    """Fraction of the ``K x D`` weights that are ``<= eps`` (zero): 1 is the sparsest sheet."""
    w = _check_weight(weight)
    return float((w <= eps).float().mean())


def prototypes_per_class(weight: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``(K,)`` long: the number of prototypes with a weight ``> eps`` to each class."""
    return (_check_weight(weight) > eps).sum(1)


def local_size(
    presence: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor | None = None,
    any_class: bool = False,
) -> torch.Tensor:
    """``(B,)`` long explanation size per image.

    Args:
        presence: ``(B, D)`` presence scores (after the inference threshold).
        weight: ``(K, D)`` non-negative class weights.
        target: ``(B,)`` the explained class (the prediction); unused with ``any_class``.
        any_class: count prototypes present (``p_d > 0``) with a non-zero weight to any class.
    """
    w = _check_weight(weight)
    p = presence.detach()
    if p.dim() != 2 or p.shape[1] != w.shape[1]:
        raise ValueError(f"presence must be (B, D={w.shape[1]}), got shape {tuple(p.shape)}")
    if any_class:
        return ((p > 0) & (w > 0).any(0).unsqueeze(0)).sum(1)
    if target is None:
        raise ValueError("local_size needs target (the explained class per image) unless any_class=True")
    return ((p * w[target.long()]) > 0).sum(1)


class LocalExplanationSize(Metric):
    """Mean :func:`local_size` over the images seen (state: sum and count, summed across ranks)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, any_class: bool = False, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.any_class = bool(any_class)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("n", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(
        self, presence: torch.Tensor, weight: torch.Tensor, target: torch.Tensor | None = None
    ) -> None:
        k = local_size(presence, weight, target, self.any_class)
        self.total += k.sum().to(self.total.dtype)
        self.n += float(k.numel())

    def compute(self) -> torch.Tensor:
        return (self.total / self.n.clamp(min=1)).float()
