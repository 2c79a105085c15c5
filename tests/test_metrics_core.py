"""TwoNN intrinsic dimension and optimiser/scheduler config."""

from __future__ import annotations

import math

import pytest
import torch

from interpzoo.metrics.intrinsic_dim import twonn_dimension, twonn_ratios
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
    assert twonn_ratios(x).numel() == 30  # the 10 duplicated points have r1 = 0


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
