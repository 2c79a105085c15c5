"""Population ("precise") whitening statistics: the running mean and W re-estimated on the data seen, checked
against a brute-force mean and covariance, in the layer, through a network with two whitening layers, and in a
training run (``model.precise_statistics_batches``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from interpzoo.layers.concept_whitening import ConceptWhitening2d
from interpzoo.models.concept_whitening import precise_whitening_statistics
from interpzoo.run import train
from tests.conftest import TINY_DATA

# a CW run with exact whitening (T=40 through eigh) and alignment every batch
EXACT_CW = ["model=cw", "model.align_every=1", "model.net.T=40", "model.net.solver=eigh"]


def _batches(d: int = 12, n: int = 5, seed: int = 0) -> list[torch.Tensor]:
    """``n`` batches ``(8, d, 3, 4)`` of correlated features with a large common mean (cond ~ 100)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) @ torch.diag(
        torch.logspace(0, 1, d, dtype=torch.float64)
    )
    out = []
    for _ in range(n):
        p = mix @ torch.randn(d, 8 * 12, generator=g, dtype=torch.float64) + 5.0
        out.append(p.T.reshape(8, 12, d).permute(0, 2, 1).reshape(8, d, 3, 4).float())
    return out


def _pixels(xs: list[torch.Tensor]) -> torch.Tensor:
    """``(C, m)`` float64 of every pixel of every batch."""
    return torch.cat([x.transpose(0, 1).reshape(x.shape[1], -1) for x in xs], 1).double()


def _inv_sqrt_poly(sigma: torch.Tensor, T: int | None) -> torch.Tensor:
    """``p_T(Sigma_N) / sqrt(tr Sigma)`` by eigenvalues (``T=None``: the exact ``Sigma^{-1/2}``)."""
    lam, v = torch.linalg.eigh(sigma)
    if T is None:
        return v @ torch.diag(lam.rsqrt()) @ v.T
    tr = sigma.diagonal().sum()
    ln, p = lam / tr, torch.ones_like(lam)
    for _ in range(T):
        p = 1.5 * p - 0.5 * p**3 * ln
    return v @ torch.diag(p) @ v.T / tr.sqrt()


@pytest.mark.parametrize("T", [10, 40])
def test_population_statistics_equal_the_brute_force_moments(T: int) -> None:
    xs = _batches()
    d = xs[0].shape[1]
    cw = ConceptWhitening2d(d, T=T).train()
    for x in xs[:2]:  # some exponential running averages to start from
        cw(x)
    tracked = int(cw.num_batches_tracked)
    with cw.population_statistics():
        for x in xs:
            out = cw(x)  # train mode, but inside the block: running statistics, no update
            assert torch.allclose(out, cw.eval()(x), atol=1e-5)
            cw.train()
        assert int(cw.num_batches_tracked) == tracked
    p = _pixels(xs)
    mean = p.mean(1)
    sigma = torch.cov(p, correction=0) + cw.eps * torch.eye(d, dtype=torch.float64)
    assert torch.allclose(cw.running_mean.double(), mean, atol=1e-5)
    expected = _inv_sqrt_poly(sigma, T)
    assert torch.allclose(cw.running_wm.double(), expected, atol=1e-5 * float(expected.abs().max()))
    if T == 40:  # numerically the exact ZCA: the eval output of the data seen is white
        assert torch.allclose(expected, _inv_sqrt_poly(sigma, None), atol=1e-6 * float(expected.abs().max()))
        z = _pixels([cw.eval()(x) for x in xs])
        assert (torch.cov(z, correction=0) - torch.eye(d, dtype=torch.float64)).abs().max() < 1e-3
        assert z.mean(1).abs().max() < 1e-3


def test_population_block_changes_nothing_on_error_and_needs_data() -> None:
    xs = _batches()
    cw = ConceptWhitening2d(xs[0].shape[1]).train()
    cw(xs[0])
    before = {k: v.clone() for k, v in cw.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), cw.population_statistics():
        cw(xs[1])
        raise RuntimeError("boom")
    with pytest.raises(ValueError, match="run forward passes inside the block"), cw.population_statistics():
        pass
    for k, v in cw.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert cw._population is None
    cw(xs[1])  # ordinary training passes still update the running statistics
    assert not torch.equal(cw.running_wm, before["running_wm"])
    with (
        pytest.raises(ValueError, match="track_running_stats"),
        ConceptWhitening2d(4, track_running_stats=False).population_statistics(),
    ):
        pass


def test_precise_statistics_through_a_network_layer_by_layer() -> None:
    """Two whitening layers: each gets the population statistics of its input as the network computes it
    in eval mode with the earlier layer already re-estimated."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        ConceptWhitening2d(6, T=40),
        nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1),
        ConceptWhitening2d(5, T=40),
        nn.Flatten(),
        nn.Linear(5 * 16, 2),
    ).train()
    images = [torch.rand(8, 3, 4, 4) * 4 + 1 for _ in range(4)]
    for x in images[:2]:
        net(x)  # running averages that are not the population ones
    seen = precise_whitening_statistics(net, lambda: iter(images))
    assert seen == 32 and net.training  # the mode is restored
    net.eval()
    with torch.no_grad():
        first = [net[0](x) for x in images]
        second = [net[3](net[2](net[1](f))) for f in first]
    for layer, inputs in ((net[1], first), (net[4], second)):
        p = _pixels(inputs)
        sigma = torch.cov(p, correction=0) + layer.eps * torch.eye(p.shape[0], dtype=torch.float64)
        assert torch.allclose(layer.running_mean.double(), p.mean(1), atol=1e-5)
        expected = _inv_sqrt_poly(sigma, 40)
        assert torch.allclose(layer.running_wm.double(), expected, atol=1e-4 * float(expected.abs().max()))
    with pytest.raises(ValueError, match="no concept-whitening layer"):
        precise_whitening_statistics(nn.Conv2d(3, 3, 1), lambda: iter(images))


def test_training_with_precise_statistics_whitens_the_eval_features(make_cfg) -> None:
    """``model.precise_statistics_batches``: the eval-mode whitened covariance of the validation images is
    closer to I than with the running averages (same seed, same data)."""
    common = [*EXACT_CW, "debug=fdr", *TINY_DATA]
    plain = train(make_cfg(common))
    precise = train(make_cfg([*common, "model.precise_statistics_batches=4"]))
    # one validation batch of 32 images (sampling noise ~0.2 alone) after 4 training batches of statistics
    assert precise["val/whitening_cov_error"] < 0.8 * plain["val/whitening_cov_error"]
    with pytest.raises(Exception, match="precise_statistics_batches must be >= 0"):
        train(make_cfg([*common, "model.precise_statistics_batches=-1"]))


def test_precise_statistics_without_validation_run_at_the_end_of_training(make_cfg) -> None:
    """With validation off, the statistics are re-estimated once training ends, so the test split (same
    distribution as training) sees whitened features closer to I than with the running averages."""
    common = [
        *EXACT_CW,
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
        "+trainer.limit_val_batches=0",
        "logger=none",
        "report=false",
        "export=false",
        "model.baselines=false",
        "model.permutation_importance=false",
        *TINY_DATA,
    ]
    plain = train(make_cfg(common))
    precise = train(make_cfg([*common, "model.precise_statistics_batches=4"]))
    assert precise["test/whitening_cov_error"] < 0.8 * plain["test/whitening_cov_error"]
