"""SENN metrics: faithfulness, local Lipschitz stability and concept diagnostics. Tensors in, numbers out.

Alvarez-Melis & Jaakkola, NeurIPS 2018, Section 5 ("faithfulness" and "stability"), with the
definitions of the authors' evaluation code (``dmelis/robust_interpret``, ``SENN/eval_utils``):

* **faithfulness** (concept level): for a point with prediction ``y`` and ``p = P(y | x)``, set one
  concept ``h_i`` to a baseline (0, or its training median) *keeping theta(x) fixed*, recompute
  the prediction with the aggregator and take ``Delta_i = P(y | do(h_i = b_i)) - p``; the score is
  the Pearson correlation over concepts of ``theta_{i,y}(x)`` and ``-Delta_i``. The *input-level*
  variant (input conceptizer) sets input feature ``i`` to its training median and re-runs the whole
  network (theta changes too).
* **stability**: the local Lipschitz estimate ``L(x) = max_{x' in B_eps(x)} ||theta(x) - theta(x')|| /
  ||h(x) - h(x')||`` ("mode 2"; ``mode="input"`` divides by the normalised input distance instead),
  maximised by seeded sampling in the box or by projected gradient ascent.
* ``concept_sparsity``, ``dead_concepts``: how often concepts are (always) near zero.

Every metric is a torchmetrics ``Metric`` with sum/max states, so DDP reduction is exact.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchmetrics import Metric
from torchmetrics.functional import pearson_corrcoef

ZERO_TOL = 1e-3  # |h_i| below this counts as "off" (dead concepts)


# ------------------------------------------------------------------------------------------------
# Faithfulness
# ------------------------------------------------------------------------------------------------
def pearson_rows(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each row of ``a`` with the same row of ``b``; NaN for a constant row.

    The correlation is ``torchmetrics.functional.pearson_corrcoef`` in float64. A row counts as constant
    when its centred norm is at most ``1e-9`` times its norm (or zero), so float round-off in an
    otherwise constant row is not read as signal; such rows are NaN without a torchmetrics warning.

    Shape:
        ``(B, n)`` and ``(B, n)`` to ``(B,)``.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"pearson_rows needs two (B, n) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    a0, b0 = a.double(), b.double()
    na = (a0 - a0.mean(dim=1, keepdim=True)).norm(dim=1)
    nb = (b0 - b0.mean(dim=1, keepdim=True)).norm(dim=1)
    constant = (na <= 1e-9 * a0.norm(dim=1)) | (nb <= 1e-9 * b0.norm(dim=1)) | (na == 0) | (nb == 0)
    corr = torch.full((a0.shape[0],), float("nan"), dtype=torch.float64, device=a0.device)
    ok = ~constant
    if ok.any():
        with warnings.catch_warnings():  # torchmetrics warns about near-constant columns; NaN is the answer
            warnings.filterwarnings(
                "ignore", message="The variance of predictions or target is close to zero"
            )
            corr[ok] = pearson_corrcoef(a0[ok].T, b0[ok].T).reshape(-1)
    return corr.float()


def concept_intervention_deltas(
    concepts: torch.Tensor, relevances: torch.Tensor, baseline: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probability change of the predicted class when each concept is set to its baseline, theta fixed.

    With the sum aggregator, setting ``h_i`` to ``b_i`` changes the logits by
    ``(b_i - h_i) theta_{i,:}``, so all ``k`` interventions cost one softmax each.

    Args:
        concepts: ``(B, k)``; relevances: ``(B, k, C)``.
        baseline: ``(k,)`` values to set (``None`` = 0, i.e. "remove the concept").

    Returns:
        ``(delta, pred, p)``: ``delta`` ``(B, k)`` = ``P(y | do(h_i = b_i)) - P(y | x)``, the predicted
        class ``(B,)`` and its probability ``(B,)``.
    """
    logits = torch.einsum("bk,bkc->bc", concepts, relevances)
    probs = torch.softmax(logits.double(), dim=1)
    pred = probs.argmax(dim=1)
    p = probs.gather(1, pred[:, None]).squeeze(1)
    b = torch.zeros_like(concepts) if baseline is None else baseline.to(concepts).expand_as(concepts)
    shifted = logits[:, None, :] + (b - concepts)[:, :, None] * relevances  # (B, k, C)
    p_new = torch.softmax(shifted.double(), dim=2).gather(
        2, pred[:, None, None].expand(-1, concepts.shape[1], 1)
    )
    return (p_new.squeeze(2) - p[:, None]).float(), pred, p.float()


def concept_faithfulness_scores(
    concepts: torch.Tensor,
    relevances: torch.Tensor,
    baseline: torch.Tensor | None = None,
    relevance: str = "theta",
) -> torch.Tensor:
    """Per-sample concept-level faithfulness: ``corr_i(relevance_i, -Delta_i)``.

    Args:
        concepts, relevances, baseline: see :func:`concept_intervention_deltas`.
        relevance: ``theta`` (``theta_{i,y}``, the paper's) or ``contribution`` (``theta_{i,y} h_i``).

    Returns:
        ``(B,)`` correlations, NaN where undefined (constant relevances or no probability change).
    """
    if relevance not in ("theta", "contribution"):
        raise ValueError(f"relevance must be 'theta' or 'contribution', got {relevance!r}")
    delta, pred, _ = concept_intervention_deltas(concepts, relevances, baseline)
    rel = relevances.gather(2, pred[:, None, None].expand(-1, relevances.shape[1], 1)).squeeze(2)
    if relevance == "contribution":
        rel = rel * concepts
    return pearson_rows(rel, -delta)


def _sample_keys(index: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """``(B, k)`` pseudo-random keys in [0, 1) that depend only on each sample's dataset index, the
    concept and ``seed``: the same sample gets the same random ordering on any rank of any sharding."""
    i = index.detach().to(torch.float64).view(-1, 1)
    j = torch.arange(k, dtype=torch.float64, device=index.device).view(1, -1)
    x = torch.sin(i * 12.9898 + j * 78.233 + float(seed) * 37.719) * 43758.5453
    return x - x.floor()


def faithfulness_references(
    relevance: torch.Tensor, delta: torch.Tensor, seed: int = 0, index: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-sample faithfulness of the model and of its two references, on the same interventions.

    * ``""``: ``corr_i(relevance_i, -Delta_i)``, the model's score;
    * ``"_ceiling"``: the oracle explanation, whose relevance of concept ``i`` *is* the effect of removing
      it (``-Delta_i``): 1 wherever the effects are not all equal;
    * ``"_random"``: the model's own relevance values dealt to the concepts in a seeded random order per
      sample. Averaged over orderings, ``corr(perm(r), -Delta)`` is exactly 0 (every position receives
      the mean of ``r``), so it is chance at the model's own relevance distribution.

    With ``index`` (the samples' dataset indices, ``(B,)``) each sample's ordering depends on its index
    only, so the baseline is the same under any DDP sharding; without it, on ``seed`` and the batch position.

    Shape:
        ``relevance`` ``(B, k)``, ``delta`` ``(B, k)`` to ``{name: (B,)}`` (NaN where undefined).
    """
    if index is not None:
        keys = _sample_keys(index, relevance.shape[1], seed)
    else:
        keys = torch.rand(relevance.shape, generator=torch.Generator().manual_seed(int(seed)))
    order = keys.argsort(dim=1).to(relevance.device)
    return {
        "": pearson_rows(relevance, -delta),
        "_ceiling": pearson_rows(-delta, -delta),
        "_random": pearson_rows(relevance.gather(1, order), -delta),
    }


def concept_faithfulness_references(
    concepts: torch.Tensor,
    relevances: torch.Tensor,
    baseline: torch.Tensor | None = None,
    relevance: str = "theta",
    seed: int = 0,
    index: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`concept_faithfulness_scores` with its oracle ceiling and random baseline
    (:func:`faithfulness_references`), from one set of interventions."""
    if relevance not in ("theta", "contribution"):
        raise ValueError(f"relevance must be 'theta' or 'contribution', got {relevance!r}")
    delta, pred, _ = concept_intervention_deltas(concepts, relevances, baseline)
    rel = relevances.gather(2, pred[:, None, None].expand(-1, relevances.shape[1], 1)).squeeze(2)
    if relevance == "contribution":
        rel = rel * concepts
    return faithfulness_references(rel, delta, seed, index)


@torch.no_grad()
def input_faithfulness_scores(
    net: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    medians: torch.Tensor,
    out: Any | None = None,
    chunk: int = 256,
    references: bool = False,
    seed: int = 0,
    index: torch.Tensor | None = None,
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Per-sample input-level faithfulness for the input conceptizer (median intervention).

    Every input entry ``j`` is set to its training median and the *whole* network is re-run
    (theta is recomputed, unlike the concept-level variant); the score is
    ``corr_j(theta_{j,y}(x), -Delta_j)`` over the ``d`` input entries (the bias concept is left out).

    Args:
        net: the SENN network (returns ``concepts`` and ``relevances``); called in its current mode.
        x: ``(B, *input)`` raw inputs; medians: ``(*input)`` training medians in the same space.
        out: ``net(x)`` if already computed.
        chunk: interventions evaluated per forward pass and sample.
        references: return ``{"", "_ceiling", "_random"}`` scores (:func:`faithfulness_references`).
        seed, index: the random baseline's orderings (:func:`faithfulness_references`).

    Returns:
        ``(B,)``, or the dict of three with ``references``.
    """
    out = net(x) if out is None else out
    probs = torch.softmax(out.logits.double(), dim=1)
    pred = probs.argmax(dim=1)
    p = probs.gather(1, pred[:, None])
    flat = x.flatten(1)
    d = flat.shape[1]
    med = medians.to(x).flatten()
    if med.numel() != d:
        raise ValueError(f"medians have {med.numel()} entries, inputs {d}")
    deltas = []
    for start in range(0, d, chunk):
        idx = torch.arange(start, min(start + chunk, d), device=x.device)
        n = idx.numel()
        xs = flat[:, None, :].repeat(1, n, 1)  # (B, n, d)
        xs[:, torch.arange(n, device=x.device), idx] = med[idx]
        o = net(xs.view(-1, *x.shape[1:]))
        pn = torch.softmax(o.logits.double(), dim=1).view(x.shape[0], n, -1)
        deltas.append(pn.gather(2, pred[:, None, None].expand(-1, n, 1)).squeeze(2) - p)
    delta = torch.cat(deltas, dim=1)
    rel = out.relevances[:, :d, :].gather(2, pred[:, None, None].expand(-1, d, 1)).squeeze(2)
    if references:
        return faithfulness_references(rel, delta, seed, index)
    return pearson_rows(rel, -delta)


# ------------------------------------------------------------------------------------------------
# Stability: local Lipschitz estimate
# ------------------------------------------------------------------------------------------------
LIPSCHITZ_METHODS = ("sample", "gradient")
LIPSCHITZ_MODES = ("concepts", "input")


def _sample_noise(keys: Sequence[int], n: int, shape: Sequence[int], seed: int) -> torch.Tensor:
    """Uniform ``[-1, 1]`` noise ``(B, n, *shape)`` seeded per sample key (rank- and batch-independent)."""
    out = []
    for key in keys:
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(key))
        out.append(torch.rand(n, *shape, generator=g) * 2 - 1)
    return torch.stack(out)


def local_lipschitz(
    net: Callable[[torch.Tensor], Any],
    x: torch.Tensor,
    keys: Sequence[int] | torch.Tensor | None = None,
    *,
    method: str = "sample",
    mode: str = "concepts",
    eps: float = 0.01,
    scale: torch.Tensor | None = None,
    samples: int = 16,
    steps: int = 10,
    step_size: float = 0.25,
    clip: tuple[float, float] | None = None,
    seed: int = 0,
    tol: float = 1e-8,
    chunk: int = 1024,
) -> torch.Tensor:
    """Local Lipschitz estimate of the explanation ``theta`` around each point of ``x``.

    ``L(x) = max_{x'} ||theta(x') - theta(x)||_2 / ||h(x') - h(x)||_2`` over ``x'`` in the box
    ``x +- eps * scale`` (the ``box_std`` box of the authors' evaluation code: pass the per-feature
    or per-channel training std as ``scale``), clipped to ``clip``. ``mode="input"`` divides by
    ``||(x' - x) / scale||`` (normalised input units) instead. ``theta`` is the full ``(k, C)``
    relevance matrix.

    Methods:
        ``sample``: the max over ``samples`` uniform draws in the box.
        ``gradient``: projected sign-gradient ascent on the ratio from one uniform draw, ``steps``
        steps of ``step_size * eps * scale`` (a PGD version of the reference's SGD with a penalty
        for leaving the ball); the best ratio seen is kept.

    Both give lower bounds on the true local constant. Noise is seeded per sample ``key`` (its
    dataset index), so results do not depend on batching, rank or world size. The network is
    evaluated in eval mode (dropout changes theta).

    Returns:
        ``(B,)``; NaN where every candidate left ``h`` (or ``x``) unchanged (ratio undefined).
    """
    if method not in LIPSCHITZ_METHODS:
        raise ValueError(f"lipschitz method must be one of {LIPSCHITZ_METHODS}, got {method!r}")
    if mode not in LIPSCHITZ_MODES:
        raise ValueError(f"lipschitz mode must be one of {LIPSCHITZ_MODES}, got {mode!r}")
    if keys is None:
        keys = range(x.shape[0])
    keys = [int(k) for k in (keys.tolist() if isinstance(keys, torch.Tensor) else keys)]
    shape = tuple(x.shape[1:])
    s = torch.ones(shape, device=x.device) if scale is None else scale.to(x).expand(shape)
    radius = eps * s
    lower, upper = x - radius, x + radius
    if clip is not None:
        lower, upper = lower.clamp(*clip), upper.clamp(*clip)

    was_training = getattr(net, "training", False)
    if hasattr(net, "eval"):
        net.eval()
    try:
        with torch.no_grad():
            base = net(x)
            theta0, h0 = base.relevances.flatten(1), base.concepts

        def ratios(z: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            """Ratio of every row of ``z`` (``(N, *shape)``) against its source point ``idx``."""
            o = net(z)
            num = (o.relevances.flatten(1) - theta0[idx]).norm(dim=1)
            if mode == "concepts":
                den = (o.concepts - h0[idx]).norm(dim=1)
            else:
                den = ((z - x[idx]) / s).flatten(1).norm(dim=1)
            return num / den.clamp_min(tol), den > tol

        noise = _sample_noise(keys, samples if method == "sample" else 1, shape, seed).to(x)
        start = (x[:, None] + noise * radius).clamp(lower[:, None], upper[:, None])
        if method == "sample":
            flat = start.reshape(-1, *shape)
            idx = torch.arange(x.shape[0], device=x.device).repeat_interleave(samples)
            vals = []
            with torch.no_grad():
                for i in range(0, flat.shape[0], chunk):
                    r, ok = ratios(flat[i : i + chunk], idx[i : i + chunk])
                    vals.append(torch.where(ok, r, torch.full_like(r, float("nan"))))
            return _nanmax(torch.cat(vals).view(x.shape[0], samples), dim=1)

        idx = torch.arange(x.shape[0], device=x.device)
        z = start[:, 0].detach()
        best = torch.full((x.shape[0],), float("nan"), device=x.device)
        with torch.enable_grad():
            for _ in range(steps):
                z.requires_grad_(True)
                r, ok = ratios(z, idx)
                best = _nanmax(
                    torch.stack([best, torch.where(ok, r.detach(), torch.full_like(best, float("nan")))], 1),
                    1,
                )
                (g,) = torch.autograd.grad(r.sum(), z)
                z = torch.max(torch.min(z.detach() + step_size * radius * g.sign(), upper), lower)
        with torch.no_grad():
            r, ok = ratios(z, idx)
        return _nanmax(torch.stack([best, torch.where(ok, r, torch.full_like(best, float("nan")))], 1), 1)
    finally:
        if hasattr(net, "train"):
            net.train(was_training)


def _nanmax(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Max ignoring NaN; NaN where a slice is all NaN."""
    filled = torch.nan_to_num(t, nan=float("-inf"))
    out = filled.amax(dim=dim)
    return torch.where(torch.isinf(out) & (out < 0), torch.full_like(out, float("nan")), out)


# ------------------------------------------------------------------------------------------------
# torchmetrics Metrics (sum/max states: exact under DDP)
# ------------------------------------------------------------------------------------------------
class MeanScore(Metric):
    """Mean of per-sample scores, skipping NaN (counted as ``undefined``).

    ``compute()`` gives the mean (NaN if no defined score); :meth:`undefined_fraction` the share
    of NaN scores. Used for faithfulness correlations.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("undefined", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, scores: torch.Tensor) -> None:
        scores = scores.detach().flatten().double()
        ok = ~torch.isnan(scores)
        self.total += scores[ok].sum()
        self.count += ok.sum()
        self.undefined += (~ok).sum()

    def compute(self) -> torch.Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"))
        return (self.total / self.count).float()

    def undefined_fraction(self) -> torch.Tensor:
        n = self.count + self.undefined
        return (self.undefined / n).float() if n > 0 else torch.tensor(float("nan"))


class LocalLipschitz(Metric):
    """Mean, max and undefined share of per-point local Lipschitz estimates.

    ``compute()`` returns ``{"mean", "max", "undefined"}`` (max-reduced across ranks for ``max``).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("undefined", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("largest", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, values: torch.Tensor) -> None:
        values = values.detach().flatten().double()
        ok = ~torch.isnan(values)
        self.total += values[ok].sum()
        self.count += ok.sum()
        self.undefined += (~ok).sum()
        if ok.any():
            self.largest = torch.maximum(self.largest, values[ok].max())

    def compute(self) -> dict[str, torch.Tensor]:
        n = self.count + self.undefined
        nan = torch.tensor(float("nan"))
        return {
            "mean": (self.total / self.count).float() if self.count > 0 else nan,
            "max": self.largest.float() if self.count > 0 else nan,
            "undefined": (self.undefined / n).float() if n > 0 else nan,
        }


class DeadConcepts(Metric):
    """Fraction of concepts with ``|h_i| < threshold`` on every sample seen (never-active concepts)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, n_concepts: int, threshold: float = ZERO_TOL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("max_abs", torch.zeros(n_concepts, dtype=torch.float64), dist_reduce_fx="max")
        self.add_state("seen", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, concepts: torch.Tensor) -> None:
        if concepts.shape[0] == 0:
            return
        self.max_abs = torch.maximum(self.max_abs, concepts.detach().abs().amax(dim=0).double())
        self.seen += concepts.shape[0]

    def compute(self) -> torch.Tensor:
        if self.seen == 0:
            return torch.tensor(float("nan"))
        return (self.max_abs < self.threshold).double().mean().float()


class ConceptSparsity(Metric):
    """Share of concept activations with ``|h_i| < threshold`` (the complement of the active fraction)."""

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(self, threshold: float = ZERO_TOL, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = threshold
        self.add_state("near_zero", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, concepts: torch.Tensor) -> None:
        self.near_zero += (concepts.detach().abs() < self.threshold).sum()
        self.total += concepts.numel()

    def compute(self) -> torch.Tensor:
        return (self.near_zero / self.total).float() if self.total > 0 else torch.tensor(float("nan"))


# ------------------------------------------------------------------------------------------------
# Ground-truth concepts (the scorecard, :mod:`interpzoo.scorecard.senn`)
# ------------------------------------------------------------------------------------------------
def average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks ``1..n`` of each column of ``values`` ``(n, k)``, ties given their average rank, ``(n, k)`` float64."""
    v = values.detach().double()
    n, k = v.shape
    out = torch.empty_like(v)
    for j in range(k):
        col = v[:, j]
        order = torch.argsort(col, stable=True)
        _, counts = torch.unique_consecutive(col[order], return_counts=True)
        ends = torch.cumsum(counts, 0).double()  # last 1-based rank of each tie group
        avg = ends - (counts.double() - 1) / 2  # mean of ranks (end - count + 1) .. end
        out[order, j] = torch.repeat_interleave(avg, counts)
    return out


def auc_matrix(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC of every score column against every binary label column (Mann-Whitney U / (n1 n0)).

    ``AUC = (sum of the ranks of the positives - n1 (n1 + 1) / 2) / (n1 n0)`` with average ranks for
    ties (Hanley & McNeil, Radiology 1982, Eq. 1), so a constant score gives exactly 0.5.

    Shape:
        ``scores`` ``(n, k)``, ``labels`` ``(n, N)`` in {0, 1} to ``(k, N)``; NaN for a label column that
        is constant (no positives or no negatives: AUC undefined).
    """
    if scores.dim() != 2 or labels.dim() != 2 or scores.shape[0] != labels.shape[0]:
        raise ValueError(
            f"auc_matrix needs scores (n, k) and labels (n, N), got {tuple(scores.shape)} and {tuple(labels.shape)}"
        )
    y = (labels.detach().double() > 0.5).double()
    ranks = average_ranks(scores)  # (n, k)
    n1 = y.sum(0)  # (N,)
    n0 = y.shape[0] - n1
    u = ranks.T @ y - (n1 * (n1 + 1) / 2)[None]  # (k, N)
    auc = u / (n1 * n0)[None]
    return torch.where(((n1 > 0) & (n0 > 0))[None].expand_as(auc), auc, torch.full_like(auc, float("nan")))


def match_concepts(scores: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Best-matching ground-truth concept of each learned concept, and the direction of the match.

    For learned concept ``h_k`` the match is ``argmax_j |AUC(h_k, c_j) - 0.5|`` (the sign of a learned
    concept is arbitrary, so ``h_k`` may encode ``c_j`` by going down); ``sign_k = +1`` if
    ``AUC >= 0.5`` else ``-1``. Label columns that are constant here are never chosen.

    Shape:
        ``scores`` ``(n, k)``, ``labels`` ``(n, N)`` to ``(index (k,) long, sign (k,) float)``.
    """
    auc = auc_matrix(scores, labels)
    strength = torch.nan_to_num((auc - 0.5).abs(), nan=-1.0)
    index = strength.argmax(dim=1)
    picked = auc.gather(1, index[:, None]).squeeze(1)
    sign = torch.where(torch.nan_to_num(picked, nan=0.5) >= 0.5, 1.0, -1.0).double()
    return index, sign


def matched_concept_auc(
    scores: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, sign: torch.Tensor
) -> torch.Tensor:
    """AUC of ``sign_k * h_k`` against its matched label column ``c_{index_k}``.

    Shape:
        ``scores`` ``(n, k)``, ``labels`` ``(n, N)``, ``index``/``sign`` ``(k,)`` to ``(k,)`` (NaN where the
        matched label is constant on these samples).
    """
    signed = scores.detach().double() * sign.to(scores.device).double()[None]
    auc = auc_matrix(signed, labels.index_select(1, index.to(labels.device)))
    return auc.diagonal()


def split_half_concept_auc(
    scores: torch.Tensor, labels: torch.Tensor, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Concept AUC against ground-truth concepts with matching and scoring on disjoint halves.

    The samples are split in two by a seeded permutation: the matching half picks each learned concept's
    ground-truth concept and direction (:func:`match_concepts`), the scoring half measures the AUC of that
    pair (:func:`matched_concept_auc`). Choosing the best of ``N`` concepts and scoring on the same images
    would inflate every score, the random baseline's most (the max of ``N`` noisy AUCs sits well above 0.5);
    on held-out images a chance-level concept scores 0.5 in expectation. Concept-based evaluation in this
    style: Koh et al., "Concept Bottleneck Models", ICML 2020 (concept AUC), with the held-out matching
    that the SENN paper (Alvarez-Melis & Jaakkola 2018, Sec. 3 "concepts ... should be grounded") lacks.

    Shape:
        ``scores`` ``(n, k)``, ``labels`` ``(n, N)``.

    Returns:
        ``{"auc" (k,), "index" (k,), "sign" (k,), "match_rows" (n_a,), "score_rows" (n_b,)}``; ``auc`` is
        NaN where the matched concept is constant on the scoring half.
    """
    n = scores.shape[0]
    if n < 4:
        raise ValueError(f"split_half_concept_auc needs at least 4 samples, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    a, b = perm[: n // 2].sort().values, perm[n // 2 :].sort().values
    s, y = scores.detach().cpu(), labels.detach().cpu()
    index, sign = match_concepts(s[a], y[a])
    auc = matched_concept_auc(s[b], y[b], index, sign)
    return {"auc": auc, "index": index, "sign": sign, "match_rows": a, "score_rows": b}


def intervention_direction_scores(
    delta: torch.Tensor, expected: torch.Tensor, scale: torch.Tensor
) -> tuple[float, float]:
    """Score concept interventions: does ``h_k`` move the way its matched ground-truth concept moved?

    Args:
        delta: ``(m,)`` ``h_k(x') - h_k(x)`` for ``m`` (image, concept) interventions ``x -> x'``.
        expected: ``(m,)`` ``+-1``: ``sign_k * (c_j(x') - c_j(x))``, the direction ``h_k`` should move.
        scale: ``(m,)`` ``std(h_k)`` over the images, so the effect is in units of the concept's spread.

    Returns:
        ``(accuracy, effect)``: the share of interventions with ``sign(delta) == expected`` (no movement
        counts half, as a coin flip would), and the mean of ``expected * delta / scale`` (a signed
        standardised effect size; 0 for a concept that ignores the intervention).
    """
    if delta.numel() == 0:
        return float("nan"), float("nan")
    d, e = delta.detach().double().flatten(), expected.detach().double().flatten()
    agree = torch.sign(d) * e
    accuracy = float(((agree > 0).double() + 0.5 * (agree == 0).double()).mean())
    effect = float((e * d / scale.detach().double().flatten().clamp_min(1e-12)).mean())
    return accuracy, effect
