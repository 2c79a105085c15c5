"""Intrinsic dimension of a representation by TwoNN.

Facco, d'Errico, Rodriguez, Laio, "Estimating the intrinsic dimension of datasets by a minimal
neighborhood information", Sci. Rep. 7:12140 (2017); used on network layers by Ansuini, Laio, Macke,
Zoccolan, "Intrinsic dimension of data representations in deep neural networks", NeurIPS 2019.
"""

from __future__ import annotations

import math

import torch


def twonn_ratios(x: torch.Tensor) -> torch.Tensor:
    """``mu_i = r2(i) / r1(i)`` for every point, dropping duplicates (``r1 = 0``) and ties (``r1 = r2``).

    Args:
        x: ``(N, D)`` points.

    Returns:
        ``(N',)`` ratios ``>= 1``.
    """
    x = x.double()
    d = torch.cdist(x, x)
    d.fill_diagonal_(math.inf)
    r, _ = torch.topk(d, k=2, dim=1, largest=False)
    r1, r2 = r[:, 0], r[:, 1]
    # cdist's matmul route leaves ~1e-8 * |x| where the exact distance is 0 (the size depends on the CPU's
    # kernels): distances and ties below that are exact zeros and exact ties
    tol = 1e-6 * float(x.norm(dim=1).max()) if len(x) else 0.0
    keep = (r1 > tol) & (r2 - r1 > tol)
    return r2[keep] / r1[keep]


def twonn_dimension(x: torch.Tensor, fraction: float = 0.9, method: str = "fit") -> float:
    """TwoNN intrinsic-dimension estimate of the points ``x``.

    ``method="fit"`` (Facco et al. 2017, eq. 3; Ansuini's code): least squares through the origin of
    ``-log(1 - F(mu))`` against ``log mu`` over the smallest ``fraction`` of the ratios.
    ``method="mle"``: the Pareto maximum-likelihood estimate ``(N - 1) / sum(log mu)``.

    Args:
        x: ``(N, D)`` points; conv maps should be flattened (or pooled) by the caller.
        fraction: share of the sorted ratios kept by the fit (the largest are noisy).
    """
    if x.dim() != 2:
        raise ValueError(f"expected (N, D) points, got shape {tuple(x.shape)}")
    if x.shape[0] < 3:
        raise ValueError(f"TwoNN needs at least 3 points, got {x.shape[0]}")
    mu = twonn_ratios(x)
    n = mu.numel()
    if n < 2:
        return float("nan")
    if method == "mle":
        return float((n - 1) / torch.log(mu).sum())
    if method != "fit":
        raise ValueError(f"method must be 'fit' or 'mle', got {method!r}")
    mu, _ = torch.sort(mu)
    f_emp = torch.arange(1, n + 1, dtype=torch.float64) / n
    m = max(1, int(math.floor(n * fraction)))
    xs = torch.log(mu[:m])
    ys = -torch.log1p(-f_emp[:m].clamp(max=1 - 1e-12))
    return float((xs * ys).sum() / (xs * xs).sum())
