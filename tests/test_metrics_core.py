"""TwoNN intrinsic dimension, optimiser/scheduler config, and the torchmetrics-backed metrics.

The AUC, correlation, PSNR and SSIM of ``interpzoo.metrics`` call torchmetrics; the tests below check
them against the hand-written formulas they replaced (or the paper's definition) on random data.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpzoo.metrics.concept_whitening import binary_auc
from interpzoo.metrics.intrinsic_dim import twonn_dimension, twonn_ratios
from interpzoo.metrics.senn import pearson_rows
from interpzoo.metrics.soft_autoencoder import psnr, ssim
from interpzoo.models.optim import build_optimizer, build_scheduler


@pytest.mark.parametrize("d", [2, 5])
def test_twonn_recovers_dimension_of_embedded_manifold(d: int) -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2000, d, generator=g, dtype=torch.float64)
    a = torch.randn(d, 64, generator=g, dtype=torch.float64)
    x = torch.tanh(z @ a / math.sqrt(d))  # a curved d-dimensional manifold in R^64
    for method in ("fit", "mle"):
        est = twonn_dimension(x, method=method)
        assert abs(est - d) < 0.25 * d + 0.3, (method, est)


def test_twonn_ratios_match_brute_force() -> None:
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    mu = twonn_ratios(x)
    ref = []
    for i in range(50):
        dist = sorted(float((x[i] - x[j]).norm()) for j in range(50) if j != i)
        ref.append(dist[1] / dist[0])
    assert torch.allclose(mu, torch.tensor(ref, dtype=torch.float64), rtol=1e-6)


def test_twonn_drops_duplicates() -> None:
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    x = torch.cat([x, x[:5]])
    # brute force, one difference at a time: the 10 duplicated points have r1 = 0, and a point whose two
    # nearest neighbours are the two copies of one point has r1 = r2 (a tie); both are dropped
    xd = x.double()
    kept = 0
    for i in range(len(xd)):
        r = sorted(float((xd[i] - xd[j]).norm()) for j in range(len(xd)) if j != i)
        kept += r[0] > 0 and r[1] > r[0]
    assert kept < 35  # ties exist in this set (the duplicates alone leave 35)
    assert twonn_ratios(x).numel() == kept


def test_optimizer_param_groups_and_errors() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = build_optimizer(
        net.named_parameters(), {"name": "adam", "lr": 1e-3, "param_groups": [{"params": "0.*", "lr": 1e-4}]}
    )
    assert [g["lr"] for g in opt.param_groups] == [1e-4, 1e-3]
    assert len(opt.param_groups[0]["params"]) == 2
    with pytest.raises(ValueError, match="did you mean 'adamw'"):
        build_optimizer(net.named_parameters(), {"name": "adamww"})
    with pytest.raises(ValueError, match="matches no trainable parameter"):
        build_optimizer(
            net.named_parameters(), {"name": "sgd", "lr": 0.1, "param_groups": [{"params": "head.*"}]}
        )
    sched = build_scheduler(opt, {"name": "cosine"}, max_epochs=10)
    assert sched["scheduler"].T_max == 10 and sched["interval"] == "epoch"


# -- torchmetrics-backed metrics against the formulas they replaced --------------------------------------
def _rank_auc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """The replaced implementation: Mann-Whitney U from average ranks (ties share their rank), float64."""
    from scipy.stats import rankdata

    s, p = scores.double().numpy(), positive.bool().numpy()
    n_pos, n_neg = int(p.sum()), int((~p).sum())
    ranks = rankdata(s)
    return float((ranks[p].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_binary_auc_equals_rank_formula_with_ties_and_large_scores() -> None:
    g = torch.Generator().manual_seed(0)
    for trial in range(40):
        n = int(torch.randint(5, 3000, (1,), generator=g))
        positive = torch.rand(n, generator=g) < 0.3
        positive[0], positive[1] = True, False
        # scale up to 1e4: a sigmoid of such scores saturates to 1.0, which would tie them
        scores = torch.randn(n, generator=g) * 10 ** float(torch.rand(1, generator=g) * 4) + positive.float()
        if trial % 2:
            scores = scores.round()  # many ties
        assert binary_auc(scores, positive) == pytest.approx(_rank_auc(scores, positive), abs=1e-6)
    big = torch.tensor([100.0, 200.0, 300.0, 400.0])
    assert binary_auc(big, torch.tensor([False, False, True, True])) == 1.0  # not 0.5 after a sigmoid
    assert binary_auc(torch.ones(4), torch.tensor([False, True, True, False])) == 0.5
    assert np.isnan(binary_auc(torch.randn(5), torch.zeros(5, dtype=torch.bool)))
    assert np.isnan(binary_auc(torch.tensor([0.0, float("nan")]), torch.tensor([True, False])))


def _pearson_rows_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The replaced implementation (without its NaN rule): centred dot product over the norms, float64."""
    a, b = a.double() - a.double().mean(1, keepdim=True), b.double() - b.double().mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


@pytest.mark.parametrize("n", [2, 3, 17, 785])
def test_pearson_rows_equals_hand_formula_and_flags_constant_rows(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    a = torch.randn(32, n, generator=g) * torch.rand(32, 1, generator=g) * 1e3
    b = torch.randn(32, n, generator=g) + 0.3 * a
    a[0], b[1] = 3.0, 0.0  # constant rows
    a[2] = torch.full((n,), 0.1) + torch.arange(n) * 1e-12  # constant up to round-off: relative spread < 1e-9
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # constant rows are answered with NaN, not with a torchmetrics warning
        got = pearson_rows(a, b)
    assert got.dtype == torch.float32 and got.shape == (32,)
    assert torch.isnan(got[:3]).all() and not torch.isnan(got[3:]).any()
    torch.testing.assert_close(got[3:].double(), _pearson_rows_hand(a, b)[3:], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        pearson_rows(a, b[:, :1])


def test_psnr_is_ten_log10_of_max_squared_over_mse() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 16, 16, generator=g)
    y = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    mse = float(((x.double() - y.double()) ** 2).mean())
    assert float(psnr(y, x)) == pytest.approx(10 * math.log10(1.0 / mse), abs=1e-4)
    assert float(psnr(2 * y, 2 * x, data_range=2.0)) == pytest.approx(
        10 * math.log10(4.0 / (4 * mse)), abs=1e-4
    )


def _ssim_wang(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Wang et al. 2004 Eq. 13: 11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, float64.

    Borders reflect-padded and the map averaged over every pixel, as torchmetrics does (Wang's MATLAB code
    averages the valid interior only, see ``ssim``'s docstring).
    """
    x, y = x.double(), y.double()
    c = x.shape[1]
    t = torch.arange(11, dtype=torch.float64) - 5
    w1 = torch.exp(-(t**2) / (2 * 1.5**2))
    w1 = w1 / w1.sum()
    window = torch.outer(w1, w1).expand(c, 1, 11, 11)

    def blur(z: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(z, (5, 5, 5, 5), mode="reflect"), window, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = blur(x), blur(y)
    vx = (blur(x * x) - mx**2).clamp(min=0)
    vy = (blur(y * y) - my**2).clamp(min=0)
    cxy = blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1).mean()


def test_ssim_equals_gaussian_window_formula() -> None:
    g = torch.Generator().manual_seed(2)
    for c in (1, 3):
        x = torch.rand(3, c, 24, 20, generator=g)
        y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
        assert float(ssim(y, x)) == pytest.approx(float(_ssim_wang(y, x)), abs=1e-6)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="11x11 window"):
        ssim(x[..., :8, :8], x[..., :8, :8])
