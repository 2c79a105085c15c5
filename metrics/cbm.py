"""Concept bottleneck metrics (Koh et al., "Concept Bottleneck Models", ICML 2020). Tensors in, numbers out.

* :func:`concept_aucs`: per-concept ROC AUC of the concept predictor, rank-based (Mann-Whitney with average
  ranks for ties); ``NaN`` for a concept with no positive or no negative;
* :func:`intervention_ranks` and :func:`intervention_curve`: test-time intervention efficacy (paper Sec. 5,
  Fig. 4): task accuracy after replacing the first ``n`` concepts of each image's order by their true
  values, for ``n = 0..k``; the order is random (averaged over seeds, the paper's) or by uncertainty
  (``|p - 0.5|`` smallest first). ``n = 0`` is the plain accuracy and ``n = k`` the accuracy of ``f`` on the
  true concepts, whatever the order;
* :func:`soft_hard_accuracy` and :func:`probe_accuracy`: leakage checks. A bottleneck "leaks" when ``f``
  uses information in the soft concept values beyond what the concepts say (Mahinpei et al., "Promises and
  Pitfalls of Black-Box Concept Learning Models", 2021). Two measures:
  ``leakage_soft_hard = acc(f(soft)) - acc(f(hard))``: what ``f`` loses when each predicted concept is
  rounded to 0/1 (about 0 for an ``f`` that reads the concepts as concepts; large and positive when ``f``
  decodes fine differences of the probabilities); and
  ``leakage_probe = acc(probe(soft)) - acc(probe(true))``: a fresh linear probe fitted on the predicted
  probabilities versus one fitted on the true concepts (same training images). Above 0 the predictions
  carry class information that the true concepts do not, i.e. leakage;
* :class:`CBMEvalState`: the per-image concept logits, true concepts and labels of an epoch (DDP-gathered),
  from which the functions above are computed at epoch end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = [
    "INTERVENTION_ORDERS",
    "CBMEvalState",
    "average_ranks",
    "concept_aucs",
    "intervention_curve",
    "intervention_ranks",
    "probe_accuracy",
    "soft_hard_accuracy",
]

INTERVENTION_ORDERS = ("random", "uncertainty")


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..N`` of ``x`` ``(N,)`` in float64, tied values sharing the mean of their ranks."""
    sorted_x, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()
    mean_rank = ends - (counts.double() - 1.0) / 2.0  # (first + last) / 2 of each tie group
    ranks = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    ranks[order] = mean_rank[inverse]
    return ranks


def concept_aucs(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-concept ROC AUC ``(k,)`` float64 of scores ``(N, k)`` against 0/1 targets ``(N, k)``.

    Mann-Whitney: ``AUC_j = (R_j - n1 (n1 + 1) / 2) / (n1 n0)`` with ``R_j`` the sum of the positives'
    average ranks, i.e. ``P(s+ > s-) + P(s+ = s-) / 2``. ``NaN`` where a concept has no positive or no
    negative in the set (the AUC is undefined there).
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(
            f"scores and targets must both be (N, k), got {tuple(scores.shape)} and {tuple(targets.shape)}"
        )
    out = torch.full((scores.shape[1],), float("nan"), dtype=torch.float64)
    for j in range(scores.shape[1]):
        pos = targets[:, j] > 0.5
        n1 = int(pos.sum())
        n0 = pos.numel() - n1
        if n1 == 0 or n0 == 0:
            continue
        r = average_ranks(scores[:, j].double())
        out[j] = (float(r[pos].sum()) - n1 * (n1 + 1) / 2.0) / (n1 * n0)
    return out


def intervention_ranks(
    probs: torch.Tensor, order: str = "random", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Position ``(N, k)`` long of every concept in each image's intervention order (0 = first).

    ``random``: an independent random permutation per image (``generator`` seeds it); ``uncertainty``: the
    concepts whose predicted probability ``probs`` ``(N, k)`` is closest to 0.5 first (ties by index).
    Intervening on ``n`` concepts replaces those with position ``< n``.
    """
    if order == "random":
        key = torch.rand(probs.shape, generator=generator, dtype=torch.float64).to(probs.device)
    elif order == "uncertainty":
        key = (probs.double() - 0.5).abs()
    else:
        raise ValueError(f"intervention order must be one of {INTERVENTION_ORDERS}, got {order!r}")
    return key.argsort(dim=1, stable=True).argsort(dim=1)


@torch.no_grad()
def intervention_curve(
    predict: Callable[[torch.Tensor], torch.Tensor],
    predicted: torch.Tensor,
    targets: torch.Tensor,
    labels: torch.Tensor,
    counts: Sequence[int] | None = None,
    order: str = "random",
    probs: torch.Tensor | None = None,
    seeds: Sequence[int] = (0, 1, 2),
) -> torch.Tensor:
    """Task accuracy ``(len(counts),)`` float64 after intervening on ``n`` concepts, for each ``n`` in ``counts``.

    Koh et al. (2020), Sec. 5 / Fig. 4. Args:
        predict: the label predictor ``f``: bottleneck values ``(M, k)`` to class logits ``(M, C)``.
        predicted: ``(N, k)`` predicted bottleneck values.
        targets: ``(N, k)`` the bottleneck values standing for the true concepts
            (:func:`interpzoo.layers.cbm.intervention_targets`).
        labels: ``(N,)`` class indices.
        counts: numbers of intervened concepts (default ``0..k``).
        order: ``random`` (averaged over ``seeds``) or ``uncertainty`` (deterministic; needs ``probs``).
        probs: ``(N, k)`` predicted concept probabilities, for ``uncertainty``.
    """
    k = predicted.shape[1]
    counts = list(range(k + 1)) if counts is None else [int(n) for n in counts]
    if any(n < 0 or n > k for n in counts):
        raise ValueError(f"intervention counts must lie in 0..{k}, got {counts}")
    if order == "uncertainty":
        if probs is None:
            raise ValueError("order='uncertainty' needs the predicted concept probabilities probs=(N, k)")
        all_ranks = [intervention_ranks(probs, "uncertainty")]
    else:
        all_ranks = [
            intervention_ranks(predicted, order, torch.Generator().manual_seed(int(s))) for s in seeds
        ]
    acc = torch.zeros(len(counts), dtype=torch.float64)
    for ranks in all_ranks:
        for i, n in enumerate(counts):
            c = torch.where(ranks < n, targets, predicted)
            acc[i] += float((predict(c).argmax(1) == labels).double().mean())
    return acc / len(all_ranks)


@torch.no_grad()
def soft_hard_accuracy(
    predict: Callable[[torch.Tensor], torch.Tensor],
    soft: torch.Tensor,
    hard: torch.Tensor,
    labels: torch.Tensor,
) -> tuple[float, float]:
    """``(accuracy of f on the soft bottleneck (N, k), accuracy of f on the hardened one (N, k))``.

    ``hard`` is the bottleneck of the rounded predictions (for a sigmoid bottleneck ``(p > 0.5)``; for a
    logit bottleneck the 5th/95th percentile values of the rounded concepts). Their difference is the
    ``leakage_soft_hard`` measure described in the module docstring.
    """
    acc_soft = float((predict(soft).argmax(1) == labels).double().mean())
    acc_hard = float((predict(hard).argmax(1) == labels).double().mean())
    return acc_soft, acc_hard


def probe_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    weight_decay: float = 1e-4,
    max_iter: int = 200,
) -> float:
    """Test accuracy of a multinomial logistic-regression probe fitted on ``(train_x (N, d), train_y (N,))``.

    Deterministic: zero initialisation, full-batch L-BFGS on the mean cross-entropy plus ``weight_decay *
    ||W||^2``. The leakage probe compares one fitted on predicted concept probabilities with one fitted on
    the true concepts (module docstring).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = train_x.detach().double().clone()
        y = train_y.detach().long().clone()
        w = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
        b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ w + b, y) + weight_decay * (w**2).sum()
            loss.backward()
            return loss

        opt.step(closure)
    with torch.no_grad():
        pred = (test_x.double() @ w.detach() + b.detach()).argmax(1)
    return float((pred == test_y.to(pred.device)).double().mean())


class CBMEvalState(Metric):
    """The epoch's concept logits ``(N, k)``, true concepts ``(N, k)`` and labels ``(N,)``, all ranks gathered.

    ``compute()`` returns ``{"concept_logits", "concepts", "labels"}`` (empty tensors before any update);
    the CBM metrics are functions of these (the intervention curve needs whole images, not batch sums).
    """

    full_state_update = False

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.add_state("concept_logits", default=[], dist_reduce_fx="cat")
        self.add_state("concepts", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, concept_logits: torch.Tensor, concepts: torch.Tensor, labels: torch.Tensor) -> None:
        self.concept_logits.append(concept_logits.detach().float())
        self.concepts.append(concepts.detach().float())
        self.labels.append(labels.detach().long())

    def compute(self) -> dict[str, torch.Tensor]:
        if not self.concept_logits:
            return {
                "concept_logits": torch.empty(0, 0),
                "concepts": torch.empty(0, 0),
                "labels": torch.empty(0, dtype=torch.long),
            }
        return {
            "concept_logits": dim_zero_cat(self.concept_logits),
            "concepts": dim_zero_cat(self.concepts),
            "labels": dim_zero_cat(self.labels),
        }
