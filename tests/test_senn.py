"""SENN: robustness loss (cheap form == full Jacobian == per-sample brute force), faithfulness,
local Lipschitz, BatchNorm guard, networks, and runs through the real configs
(``conf/experiment/senn_*.yaml``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from interpzoo.layers.senn import (
    BatchCouplingError,
    concept_sparsity_loss,
    robustness_loss,
    robustness_residual,
    subbatch_robustness_loss,
)
from interpzoo.metrics.senn import (
    ConceptSparsity,
    DeadConcepts,
    LocalLipschitz,
    MeanScore,
    concept_faithfulness_scores,
    concept_intervention_deltas,
    input_faithfulness_scores,
    local_lipschitz,
    pearson_rows,
)
from interpzoo.models import create_model
from interpzoo.models.senn import SENN

# The CPUs here are shared: one thread avoids OpenMP oversubscription (10x+ faster under load).
torch.set_num_threads(1)


class ConstTheta(nn.Module):
    """A parametrizer whose relevances do not depend on the input."""

    def __init__(self, k: int, c: int, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.theta = nn.Parameter(torch.randn(k, c, generator=g))
        self.backbone = nn.Identity()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.theta.expand(z.shape[0], -1, -1)


def _tabular_net(k_classes: int = 3, f: int = 6, **kw) -> SENN:
    torch.manual_seed(0)
    mean = torch.randn(f).tolist()
    std = (torch.rand(f) + 0.5).tolist()
    return create_model("senn", num_classes=k_classes, num_features=f, mean=mean, std=std, **kw)


def _brute_force_residual(net: nn.Module, x: torch.Tensor, target: str) -> torch.Tensor:
    """Per-sample ``J_x f - theta^T J_x h`` with torch.autograd.functional.jacobian, one sample at a time."""
    from torch.autograd.functional import jacobian

    rows = []
    for b in range(x.shape[0]):
        xb = x[b].detach()

        def f(v: torch.Tensor) -> torch.Tensor:
            logits = net(v[None]).logits[0]
            return logits if target == "logits" else torch.log_softmax(logits, 0)

        jf = jacobian(f, xb)  # (C, *in)
        jh = jacobian(lambda v: net(v[None]).concepts[0], xb)  # (k, *in)
        theta = net(xb[None]).relevances[0].detach()  # (k, C)
        rows.append(jf - torch.einsum("kc,k...->c...", theta, jh))
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------------
# Robustness loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["stopgrad", "jacobian"])
def test_identity_concepts_constant_theta_zero_penalty_on_logits(method: str) -> None:
    net = _tabular_net(conceptizer={"type": "input"}).eval()
    net.parametrizer = ConstTheta(net.n_concepts, 3)
    x = torch.randn(8, 6, requires_grad=True)
    out = net(x)
    scale = net.input_scale()
    for red in ("mean", "rms", "batch_fro"):
        loss = robustness_loss(
            x,
            out.concepts,
            out.relevances,
            out.logits,
            target="logits",
            reduction=red,
            method=method,
            input_scale=scale,
        )
        # The cheap form never builds J_f - theta^T J_h, so it is exactly 0; the full formula
        # cancels two equal Jacobians and is 0 up to float round-off.
        assert loss.item() == 0.0 if method == "stopgrad" else abs(loss.item()) < 1e-6
    # The reference's log-prob target penalises even this exactly linear model: closed form
    # grad_z log p_c - theta_c = -sum_j p_j theta_j (input part), in normalised units.
    res = (
        robustness_residual(x, out.concepts, out.relevances, out.logits, target="log_probs", method=method)
        * scale
    )
    p = out.logits.softmax(1).detach()
    theta = net.parametrizer.theta.detach()[:6]  # bias row has no input gradient
    expected = -(p @ theta.T)  # (B, d), identical for every class c
    assert torch.allclose(res, expected[:, None, :].expand_as(res), atol=1e-6)
    assert res.abs().max() > 1e-3


@pytest.mark.parametrize("target", ["logits", "log_probs"])
@pytest.mark.parametrize("kind", ["image", "tabular"])
def test_cheap_penalty_equals_full_jacobian_and_brute_force(kind: str, target: str) -> None:
    torch.manual_seed(1)
    if kind == "image":
        net = create_model(
            "senn",
            num_classes=4,
            in_chans=1,
            image_size=16,
            mean=[0.4],
            std=[0.3],
            conceptizer={"type": "cnn_ae", "n_concepts": 3},
        )
        x = torch.rand(3, 1, 16, 16)
    else:
        net = _tabular_net(conceptizer={"type": "mlp_ae", "n_concepts": 4})
        x = torch.randn(5, 6)
    net.eval()
    x = x.requires_grad_(True)
    out = net(x)
    cheap = robustness_residual(x, out.concepts, out.relevances, out.logits, target=target, method="stopgrad")
    full = robustness_residual(x, out.concepts, out.relevances, out.logits, target=target, method="jacobian")
    brute = _brute_force_residual(net, x, target)
    assert cheap.shape == brute.shape == (x.shape[0], out.logits.shape[1], *x.shape[1:])
    assert brute.abs().max() > 1e-3
    torch.testing.assert_close(cheap, brute, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(full, brute, atol=2e-5, rtol=1e-4)
    # reductions, computed by hand from the brute-force residual
    per = brute.flatten(1).norm(dim=1)
    kw = dict(target=target, method="stopgrad")
    assert robustness_loss(
        x, out.concepts, out.relevances, out.logits, reduction="mean", **kw
    ).item() == pytest.approx(per.mean().item(), rel=1e-4)
    assert robustness_loss(
        x, out.concepts, out.relevances, out.logits, reduction="batch_fro", **kw
    ).item() == (pytest.approx(brute.norm().item(), rel=1e-4))
    assert robustness_loss(
        x, out.concepts, out.relevances, out.logits, reduction="rms", **kw
    ).item() == pytest.approx(brute.norm().item() / x.shape[0] ** 0.5, rel=1e-4)


@pytest.mark.parametrize("target", ["logits", "log_probs"])
def test_cheap_penalty_gives_the_same_parameter_gradients(target: str) -> None:
    """Same value *and* same gradients for theta and the conceptizer (h enters as a VJP vector, not detached)."""
    net = _tabular_net(conceptizer={"type": "mlp_ae", "n_concepts": 4}).eval()
    x = torch.randn(6, 6)
    grads = {}
    for method in ("stopgrad", "jacobian"):
        net.zero_grad()
        xx = x.clone().requires_grad_(True)
        out = net(xx)
        robustness_loss(
            xx,
            out.concepts,
            out.relevances,
            out.logits,
            target=target,
            method=method,
            input_scale=net.input_scale(),
        ).backward()
        grads[method] = [p.grad.clone() for p in net.parameters() if p.grad is not None]
    assert len(grads["stopgrad"]) == len(grads["jacobian"]) > 0
    assert any(g.abs().sum() > 0 for g in grads["stopgrad"][:2])  # the conceptizer's encoder is trained
    for a, b in zip(grads["stopgrad"], grads["jacobian"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_penalty_needs_input_grad_and_reductions_are_batch_size_free() -> None:
    net = _tabular_net().eval()
    x = torch.randn(4, 6)
    out = net(x)
    with pytest.raises(ValueError, match="requires_grad_"):
        robustness_loss(x, out.concepts, out.relevances)
    xx = x.repeat(3, 1).requires_grad_(True)  # same rows three times: per-sample reductions unchanged
    o3 = net(xx)
    x1 = x.clone().requires_grad_(True)
    o1 = net(x1)
    for red, factor in (("mean", 1.0), ("rms", 1.0), ("batch_fro", 3**0.5)):
        a = robustness_loss(xx, o3.concepts, o3.relevances, reduction=red).item()
        b = robustness_loss(x1, o1.concepts, o1.relevances, reduction=red).item()
        assert a == pytest.approx(b * factor, rel=1e-5)
    h = torch.randn(4, 5)
    assert concept_sparsity_loss(h.repeat(2, 1)).item() == pytest.approx(h.abs().sum(1).mean().item())


def test_batchnorm_policies() -> None:
    x = torch.rand(2, 3, 16, 16)
    # default: BatchNorms of the trunk become GroupNorms, so per-sample Jacobians stay exact
    net = create_model(
        "senn_resnet18s", num_classes=3, in_chans=3, image_size=16, backbone={"name": "resnet18s", "width": 8}
    )
    assert not [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert any(isinstance(m, nn.GroupNorm) for m in net.modules())
    # keep: the loss refuses to run in training mode, naming the fix
    from interpzoo.models.lit_senn import SENNModule

    mod = SENNModule(
        net={"name": "senn_resnet18s", "batchnorm": "keep", "backbone": {"name": "resnet18s", "width": 8}},
        data_info={"num_classes": 3, "in_chans": 3, "image_size": [16, 16]},
        lipschitz={"points": 0},
    )
    mod.train()
    xx = x.clone().requires_grad_(True)
    with pytest.raises(BatchCouplingError, match="groupnorm"):
        mod.robustness_penalty(xx, mod.net(xx))
    mod.eval()  # eval-mode BatchNorm is per-sample: allowed
    assert mod.robustness_penalty(xx, mod.net(xx), create_graph=False).item() >= 0
    # frozen: running statistics even in training mode, and the cheap penalty matches brute force
    frozen = create_model(
        "senn_resnet18s",
        num_classes=3,
        in_chans=3,
        image_size=16,
        batchnorm="frozen",
        backbone={"name": "resnet18s", "width": 8},
        parametrizer={"type": "backbone", "dropout": 0.0},
    )
    frozen.train()
    bns = [m for m in frozen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    xx = x.clone().requires_grad_(True)
    out = frozen(xx)
    cheap = robustness_residual(xx, out.concepts, out.relevances, out.logits)
    torch.testing.assert_close(cheap, _brute_force_residual(frozen, xx, "logits"), atol=5e-5, rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Faithfulness
# ------------------------------------------------------------------------------------------------
def test_intervening_on_zero_relevance_concept_leaves_probability_unchanged() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g)
    theta = torch.randn(5, 4, 3, generator=g)
    theta[:, 2, :] = 0.0
    for baseline in (None, torch.randn(4, generator=g)):
        delta, pred, p = concept_intervention_deltas(h, theta, baseline)
        assert torch.all(delta[:, 2] == 0)
        assert delta[:, [0, 1, 3]].abs().min() > 0
        # brute force: recompute the aggregator with h_i replaced, theta fixed
        b = torch.zeros(4) if baseline is None else baseline
        for i in range(4):
            h2 = h.clone()
            h2[:, i] = b[i]
            p2 = torch.einsum("bk,bkc->bc", h2, theta).softmax(1).gather(1, pred[:, None]).squeeze(1)
            torch.testing.assert_close(delta[:, i], p2 - p, atol=1e-6, rtol=1e-5)
    # binary single-logit SENN: theta_i = 0 -> P unchanged, through the real network
    net = _tabular_net(k_classes=2, single_logit_binary=True, conceptizer={"type": "input"}).eval()
    x = torch.randn(6, 6)
    with torch.no_grad():
        net.parametrizer.head.weight[
            3 :: net.n_concepts
        ].zero_()  # concept 3's relevance (one output per concept)
        net.parametrizer.head.bias[3] = 0.0
        out = net(x)
    assert torch.all(out.relevances[:, 3] == 0)
    torch.testing.assert_close(
        out.logits.softmax(1)[:, 1], torch.sigmoid(out.logits[:, 1] - out.logits[:, 0])
    )
    delta, _, _ = concept_intervention_deltas(out.concepts, out.relevances)
    assert torch.all(delta[:, 3] == 0) and delta[:, :3].abs().min() > 0


def test_faithfulness_scores_match_numpy_and_nan_for_constant() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    ref = [np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(4)]
    np.testing.assert_allclose(pearson_rows(a, b).numpy(), ref, rtol=1e-5)
    a[1] = 2.0
    assert torch.isnan(pearson_rows(a, b)[1]) and not torch.isnan(pearson_rows(a, b)[0])
    # concept faithfulness = corr(theta_{.,y}, -delta) by hand
    h, theta = torch.randn(3, 5, generator=g), torch.randn(3, 5, 4, generator=g)
    delta, pred, _ = concept_intervention_deltas(h, theta)
    rel = theta[torch.arange(3), :, pred]
    ref = [np.corrcoef(rel[i].numpy(), -delta[i].numpy())[0, 1] for i in range(3)]
    np.testing.assert_allclose(concept_faithfulness_scores(h, theta).numpy(), ref, rtol=1e-5)
    m = MeanScore()
    m.update(torch.tensor([0.5, float("nan"), 1.0]))
    assert m.compute().item() == pytest.approx(0.75) and m.undefined_fraction().item() == pytest.approx(1 / 3)


def test_input_faithfulness_brute_force() -> None:
    net = _tabular_net(conceptizer={"type": "input"}).eval()
    x, med = torch.randn(4, 6), torch.randn(6)
    got = input_faithfulness_scores(net, x, med, chunk=4)
    with torch.no_grad():
        out = net(x)
        pred = out.logits.argmax(1)
        p = out.logits.softmax(1)[torch.arange(4), pred]
        deltas = []
        for j in range(6):
            x2 = x.clone()
            x2[:, j] = med[j]
            deltas.append(net(x2).logits.softmax(1)[torch.arange(4), pred] - p)
        delta = torch.stack(deltas, 1)
    rel = out.relevances[torch.arange(4), :6, pred]
    ref = [np.corrcoef(rel[i].numpy(), -delta[i].numpy())[0, 1] for i in range(4)]
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-4)


# ------------------------------------------------------------------------------------------------
# Stability
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["sample", "gradient"])
def test_lipschitz_of_constant_theta_model_is_zero(method: str) -> None:
    net = _tabular_net(conceptizer={"type": "mlp_ae", "n_concepts": 4})
    net.parametrizer = ConstTheta(4, 3)
    x = torch.randn(5, 6)
    lip = local_lipschitz(net, x, range(5), method=method, eps=0.1, samples=8, steps=3)
    assert torch.all(lip == 0)


def test_lipschitz_of_linear_theta_is_bounded_by_its_spectral_norm() -> None:
    """theta(x) = A z with input concepts: ||d theta|| / ||d z|| <= sigma_max(A), and ascent gets close."""

    class LinearTheta(nn.Module):
        def __init__(self, d: int, k: int, c: int) -> None:
            super().__init__()
            self.lin = nn.Linear(d, k * c, bias=False)
            self.k, self.c = k, c
            self.backbone = nn.Identity()

        def forward(self, z: torch.Tensor) -> torch.Tensor:
            return self.lin(z).view(-1, self.k, self.c)

    net = _tabular_net(conceptizer={"type": "input", "add_bias": False})
    net.parametrizer = LinearTheta(6, 6, 3)
    sigma = torch.linalg.matrix_norm(net.parametrizer.lin.weight.detach(), ord=2).item()
    x = torch.randn(4, 6)
    scale = net.input_scale()
    sampled = local_lipschitz(net, x, range(4), method="sample", eps=0.05, scale=scale, samples=32)
    ascended = local_lipschitz(
        net, x, range(4), method="gradient", eps=0.05, scale=scale, steps=30, step_size=0.1
    )
    assert torch.all(sampled <= sigma * (1 + 1e-4)) and torch.all(ascended <= sigma * (1 + 1e-4))
    assert torch.all(ascended >= 0.5 * sigma)
    # input mode divides by the normalised input distance: identical here (h = z)
    torch.testing.assert_close(
        local_lipschitz(net, x, range(4), mode="input", eps=0.05, scale=scale, samples=32), sampled
    )
    # seeded per key: the same point gets the same estimate in another batch
    again = local_lipschitz(net, x[2:3], [2], method="sample", eps=0.05, scale=scale, samples=32)
    torch.testing.assert_close(again, sampled[2:3])


def test_concept_statistics_metrics() -> None:
    h = torch.tensor([[0.0, 1.0, 1e-4], [0.0, -2.0, 0.5]])
    dead = DeadConcepts(3)
    dead.update(h)
    assert dead.compute().item() == pytest.approx(1 / 3)
    sp = ConceptSparsity()
    sp.update(h)
    assert sp.compute().item() == pytest.approx(3 / 6)
    lip = LocalLipschitz()
    lip.update(torch.tensor([1.0, 3.0, float("nan")]))
    res = lip.compute()
    assert (
        res["mean"].item() == 2.0
        and res["max"].item() == 3.0
        and res["undefined"].item() == pytest.approx(1 / 3)
    )


# -- the sub-batch estimate (penalty_method=subbatch) ------------------------------------------------
@pytest.mark.parametrize("reduction", ["mean", "rms", "batch_fro"])
def test_subbatch_penalty_is_an_unbiased_estimate(reduction: str) -> None:
    """Over many draws the estimate (its square for rms / batch_fro) averages to the exact penalty, within
    4 standard errors of the sampling-without-replacement variance ``(1 - s/B) S^2 / s``."""
    net = _tabular_net(k_classes=3, f=6).eval()
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(1)) * 2
    xg = x.clone().requires_grad_()
    out = net(xg)
    norms = robustness_loss(xg, out.concepts, out.relevances, out.logits, reduction="none").detach().double()
    batch, size, n = 16, 4, 400
    # per-sample terms whose batch mean the (squared) estimate targets, and the matching exact value
    terms = norms if reduction == "mean" else norms**2 * (batch if reduction == "batch_fro" else 1)
    exact = {"mean": norms.mean(), "rms": (norms**2).mean(), "batch_fro": (norms**2).sum()}[reduction]
    assert torch.allclose(terms.mean(), exact)

    def forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = net(z)
        return o.concepts, o.relevances, o.logits

    est = torch.tensor(
        [
            float(
                subbatch_robustness_loss(
                    forward,
                    x,
                    size / batch,
                    generator=torch.Generator().manual_seed(i),
                    reduction=reduction,
                    create_graph=False,
                )
            )
            for i in range(n)
        ],
        dtype=torch.float64,
    )
    est = est if reduction == "mean" else est**2
    se = ((1 - size / batch) * terms.var() / size / n).sqrt()
    assert est.std() > 0.1 * terms.std()  # a real estimate, not the exact value every time
    assert abs(float(est.mean() - exact)) < 4 * float(se), (float(est.mean()), float(exact), float(se))


def test_subbatch_penalty_gradient_is_unbiased_and_fraction_one_is_exact() -> None:
    net = _tabular_net(k_classes=3, f=6).eval()
    x = torch.randn(12, 6, generator=torch.Generator().manual_seed(2))
    weight = net.parametrizer.head.weight

    def forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        o = net(z)
        return o.concepts, o.relevances, o.logits

    xg = x.clone().requires_grad_()
    out = net(xg)
    exact_value = robustness_loss(xg, out.concepts, out.relevances, out.logits)
    (exact,) = torch.autograd.grad(exact_value, weight)
    full = subbatch_robustness_loss(forward, x, 1.0, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(full, exact_value, atol=1e-6)  # the whole batch, permuted: the exact penalty
    grads = torch.stack(
        [
            torch.autograd.grad(
                subbatch_robustness_loss(forward, x, 0.25, generator=torch.Generator().manual_seed(i)), weight
            )[0]
            for i in range(300)
        ]
    ).double()
    err = float(torch.linalg.vector_norm(grads.mean(0) - exact.double()))
    se = float((grads.var(0).sum() / grads.shape[0]).sqrt())  # E||mean - exact||^2 = tr Cov / n
    assert se > 0 and err < 3 * se, (err, se)
    with pytest.raises(ValueError, match="fraction"):
        subbatch_robustness_loss(forward, x, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        subbatch_robustness_loss(forward, x, 0.5, reduction="none")


def test_senn_module_penalty_method_subbatch() -> None:
    from interpzoo.datamodules.tabular import WineDataModule
    from interpzoo.models.lit_senn import SENNModule

    dm = WineDataModule(seed=0)
    dm.setup()
    torch.manual_seed(0)
    module = SENNModule(data_info=dm.data_info, penalty_method="subbatch", penalty_subbatch=0.25).eval()
    x = dm.train_set.features[:32].clone().requires_grad_()
    out = module.net(x)
    exact = robustness_loss(x, out.concepts, out.relevances, out.logits, input_scale=module.net.input_scale())
    # evaluation logs the exact value; training gets the estimate, differentiable in the parameters
    assert torch.allclose(module.robustness_penalty(x, out, create_graph=False), exact)
    est = module.robustness_penalty(x, out)
    assert est.requires_grad and not torch.allclose(est, exact)
    with pytest.raises(ValueError, match="penalty_method must be one of"):
        SENNModule(data_info=dm.data_info, penalty_method="hutchinson")
