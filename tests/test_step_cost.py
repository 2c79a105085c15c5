"""The cheaper training-step computations of ProtoPNet and ICNN equal the computations they replace.

Each fused or reorganised piece (issue 16) is compared, in float64, with the straightforward evaluation it
replaced (written out here as it was) or with brute force: values and gradients.

* ICNN (Zhang, Wu, Zhu 2018): the label-aware filter-loss terms and the monitored MI (closed-form backward),
  the filter loss with the scale and normalisation folded into one factor, the part mask from a distance
  table;
* ProtoPNet (Chen et al. 2019): the ``1 x 1`` prototype distances by one ``baddbmm``, the cluster and
  separation costs from one mask without host synchronisation.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interpzoo.layers.icnn import (
    filter_loss,
    filter_mi_terms,
    locate_parts,
    mask_distance,
    normalize_maps,
    part_mask,
    part_templates,
    supervised_filter_terms,
    template_priors,
    template_scores,
)
from interpzoo.layers.protopnet import (
    cluster_cost,
    cluster_separation_costs,
    prototype_class_identity,
    separation_cost,
    squared_l2_distances,
)


# ---------------------------------------------------------------------------------------------------
# ICNN: the previous evaluation, written out
# ---------------------------------------------------------------------------------------------------
def _previous_supervised_terms(
    scores: torch.Tensor, pos: torch.Tensor, alpha: float | None = None
) -> dict[str, torch.Tensor]:
    """The posterior-by-posterior evaluation the fused terms replaced (autograd through every step)."""
    b, c, t = scores.shape
    a = pos.to(scores.dtype).mean(0) if alpha is None else torch.full((c,), float(alpha), dtype=scores.dtype)
    a = a.clamp(0.5 / b, 1.0 - 0.5 / b)
    lp = torch.cat([(a / (t - 1)).log()[:, None].expand(c, t - 1), (1.0 - a).log()[:, None]], 1)
    log_joint = torch.log_softmax(scores, dim=0) + lp
    log_post = log_joint - torch.logsumexp(log_joint, dim=2, keepdim=True)
    log_neg, log_pos = log_post[..., -1], torch.logsumexp(log_post[..., :-1], dim=-1)
    inter = -torch.where(pos, log_pos, log_neg).mean(0)
    log_q = log_post[..., :-1] - log_pos[..., None]
    spatial = (pos.to(scores.dtype) * -(log_q.exp() * log_q).sum(-1)).mean(0)
    return {"inter": inter, "spatial": spatial, "loss": inter + spatial}


def _previous_filter_loss(x: torch.Tensor, pos: torch.Tensor, scale: float, normalize: bool) -> dict:
    """normalize_maps -> template_scores -> terms, as filter_loss composed them before (one process)."""
    b, c, h, w = x.shape
    xn = normalize_maps(x, "max" if normalize else "none", sync=False)
    scores = template_scores(xn, part_templates(h, w), scale)
    terms = _previous_supervised_terms(scores, pos)
    mi = filter_mi_terms(scores, template_priors(h, w).log())["mi"]
    return {"loss": terms["loss"].mean(), "inter": terms["inter"].mean(), "mi": mi.mean()}


def _random_case(seed: int, b: int = 9, c: int = 5, t: int = 10, spread: float = 6.0):
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(b, c, t, generator=g, dtype=torch.float64) * spread).requires_grad_()
    pos = torch.rand(b, c, generator=g) < 0.4
    pos[:, 0] = True  # a filter every image is positive for
    pos[:, 1] = False  # and one with no positives (the clamped priors must match)
    return scores, pos


@pytest.mark.parametrize("seed, alpha, spread", [(0, None, 6.0), (1, 0.3, 2.0), (2, None, 200.0)])
def test_fused_supervised_terms_equal_the_previous_evaluation(
    seed: int, alpha: float | None, spread: float
) -> None:
    scores, pos = _random_case(seed, spread=spread)
    new = supervised_filter_terms(scores, pos, alpha)
    old = _previous_supervised_terms(scores, pos, alpha)
    w = torch.rand(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    for k in ("inter", "spatial", "loss"):
        assert torch.allclose(new[k], old[k], rtol=1e-10, atol=1e-12), k
    # gradients of a generic combination of both terms (so both backward inputs are exercised)
    gn = torch.autograd.grad((w[0] * new["inter"] + w[1] * new["spatial"]).sum(), scores)[0]
    go = torch.autograd.grad((w[0] * old["inter"] + w[1] * old["spatial"]).sum(), scores)[0]
    assert torch.allclose(gn, go, rtol=1e-9, atol=1e-12)
    # the monitored MI equals the paper's MI (Eq. 3) under uniform priors, and carries no gradient
    mi = filter_mi_terms(scores.detach(), template_priors(1, scores.shape[2] - 1).log())["mi"]
    assert torch.allclose(new["mi"], mi, rtol=1e-9, atol=1e-12) and not new["mi"].requires_grad


def test_fused_supervised_terms_gradcheck_and_monitor_priors() -> None:
    scores, pos = _random_case(3, b=5, c=3, t=5, spread=2.0)
    assert torch.autograd.gradcheck(lambda s: supervised_filter_terms(s, pos)["inter"], (scores,))
    assert torch.autograd.gradcheck(lambda s: supervised_filter_terms(s, pos)["spatial"], (scores,))
    # MI under non-uniform paper priors (alpha of template_priors)
    new = supervised_filter_terms(scores, pos, monitor_alpha=0.7)["mi"]
    h, w = 2, 2  # T = 5 = 2 * 2 + 1 templates
    ref = filter_mi_terms(scores.detach(), template_priors(h, w, 0.7).log())["mi"]
    assert torch.allclose(new, ref, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="positive must be"):
        supervised_filter_terms(scores, pos[:, :2])


@pytest.mark.parametrize("normalize, scale", [(True, 128.0), (False, 1.0), (False, 40.0)])
def test_filter_loss_equals_the_previous_composition(normalize: bool, scale: float) -> None:
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(8, 4, 5, 6, generator=g, dtype=torch.float64) ** 3 * 5).requires_grad_()
    pos = torch.rand(8, 4, generator=g) < 0.5
    new = filter_loss(x, pos, template_scale=scale, normalize="max" if normalize else "none")
    old = _previous_filter_loss(x, pos, scale, normalize)
    assert float(new.loss.detach()) == pytest.approx(float(old["loss"].detach()), rel=1e-10, abs=1e-12)
    assert float(new.inter_category_entropy.detach()) == pytest.approx(
        float(old["inter"].detach()), rel=1e-10, abs=1e-12
    )
    assert float(new.mi) == pytest.approx(float(old["mi"].detach()), rel=1e-9, abs=1e-12)
    assert float(new.prior_entropy) == pytest.approx(math.log(5 * 6 + 1), rel=1e-12)
    gn = torch.autograd.grad(new.loss, x)[0]
    go = torch.autograd.grad(old["loss"], x)[0]
    assert torch.allclose(gn, go, rtol=1e-9, atol=1e-12)


def test_fused_terms_float32_close_to_float64_on_a_real_batch_size() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.rand(32, 16, 8, 8, generator=g, dtype=torch.float64).relu()
    pos = torch.rand(32, 16, generator=g) < 0.1
    ref = filter_loss(x, pos, template_scale=128.0, normalize="max")
    low = filter_loss(x.float(), pos, template_scale=128.0, normalize="max")
    assert float(low.loss) == pytest.approx(float(ref.loss), rel=1e-4)
    assert float(low.mi) == pytest.approx(float(ref.mi), rel=1e-3, abs=1e-5)


def _previous_part_mask(x: torch.Tensor, sharpness, locate: str, style: str) -> torch.Tensor:
    b, c, h, w = x.shape
    d = mask_distance(locate_parts(x, locate), h, w, style)
    a = torch.as_tensor(sharpness, dtype=d.dtype)
    if a.dim() == 1:
        a = a.view(1, c, 1, 1)
    return (1.0 - a * d).clamp(min=-1.0).to(x.dtype)


@pytest.mark.parametrize("locate", ["argmax", "centroid"])
@pytest.mark.parametrize("style", ["paper", "official"])
def test_part_mask_from_the_distance_table_equals_the_formula(locate: str, style: str) -> None:
    g = torch.Generator().manual_seed(6)
    x = torch.rand(4, 3, 5, 7, generator=g) ** 4
    x[0, 0] = 0.0  # an all-zero map (centroid falls back to the argmax)
    for sharpness in (4.0, torch.tensor([1.5, 2.0, 3.0])):
        new = part_mask(x, sharpness, locate, style)
        assert torch.equal(new, _previous_part_mask(x, sharpness, locate, style))
        assert not new.requires_grad
    big = torch.rand(2, 3, 33, 32, generator=g)  # above the table size: the per-map route
    assert torch.equal(part_mask(big, 4.0, locate, style), _previous_part_mask(big, 4.0, locate, style))
    with pytest.raises(ValueError, match="mask style"):
        part_mask(x, 4.0, locate, "nope")


# ---------------------------------------------------------------------------------------------------
# ProtoPNet
# ---------------------------------------------------------------------------------------------------
def _brute_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``||z_patch - p||^2`` summed directly, ``(B, P, H, W)`` (1 x 1 prototypes)."""
    return ((z.unsqueeze(1) - p.view(1, p.shape[0], p.shape[1], 1, 1)) ** 2).sum(2)


def test_pointwise_distances_equal_brute_force_with_gradients() -> None:
    g = torch.Generator().manual_seed(7)
    z = torch.rand(3, 6, 4, 5, generator=g, dtype=torch.float64).requires_grad_()
    p = torch.rand(7, 6, 1, 1, generator=g, dtype=torch.float64).requires_grad_()
    d = squared_l2_distances(z, p)
    ref = _brute_distances(z, p)
    assert d.shape == (3, 7, 4, 5) and torch.allclose(d, ref, rtol=1e-12, atol=1e-12)
    w = torch.rand(d.shape, generator=g, dtype=torch.float64)
    gn = torch.autograd.grad((d * w).sum(), (z, p))
    go = torch.autograd.grad((ref * w).sum(), (z, p))
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(gn, go, strict=True))
    # a prototype placed on a latent vector (a pushed one) is at distance ~0 there in float32
    z32 = torch.rand(2, 64, 4, 4, generator=g)
    p32 = z32[1, :, 2, 3].reshape(1, 64, 1, 1).clone()
    assert float(squared_l2_distances(z32, p32)[1, 0, 2, 3]) < 1e-4


def test_cluster_separation_costs_equal_the_single_costs_and_brute_force() -> None:
    g = torch.Generator().manual_seed(8)
    k, m, b = 4, 3, 10
    ident = prototype_class_identity(k, m)
    md = (torch.rand(b, k * m, generator=g, dtype=torch.float64) * 5).requires_grad_()
    y = torch.randint(0, k, (b,), generator=g)
    y[:3] = 2
    active = torch.ones(k * m)
    active[6:9] = 0  # class 2 fully pruned: its samples have no own-class prototype (skipped in Clst)
    for act in (None, active):
        clst, sep = cluster_separation_costs(md, y, ident, act)
        assert clst.item() == pytest.approx(cluster_cost(md, y, ident, act).item(), rel=1e-12)
        assert sep.item() == pytest.approx(separation_cost(md, y, ident, act).item(), rel=1e-12)
        on = torch.ones(k * m, dtype=torch.bool) if act is None else act.bool()
        cls = torch.arange(k * m) // m
        own = [min(md[i, j].item() for j in range(k * m) if cls[j] == y[i] and on[j]) for i in range(b)
               if any(cls[j] == y[i] and on[j] for j in range(k * m))]  # fmt: skip
        other = [min(md[i, j].item() for j in range(k * m) if cls[j] != y[i] and on[j]) for i in range(b)]
        assert clst.item() == pytest.approx(sum(own) / len(own), rel=1e-12)
        assert sep.item() == pytest.approx(sum(other) / len(other), rel=1e-12)
        g_new = torch.autograd.grad(0.8 * clst - 0.08 * sep, md)[0]
        g_old = torch.autograd.grad(
            0.8 * cluster_cost(md, y, ident, act) - 0.08 * separation_cost(md, y, ident, act), md
        )[0]
        assert torch.allclose(g_new, g_old, rtol=1e-12, atol=1e-15)
    # nothing valid (every prototype pruned): 0, graph intact, zero gradient
    clst, _ = cluster_separation_costs(md, y, ident, torch.zeros(k * m))
    assert clst.item() == 0.0
    assert torch.count_nonzero(torch.autograd.grad(clst, md)[0]) == 0


def test_protopnet_losses_make_no_host_synchronisation() -> None:
    """The joint-step losses read no value back from the device (``.item()``, boolean indexing)."""
    from interpzoo.models.protopnet import ProtoPNet

    torch.manual_seed(0)
    net = ProtoPNet(
        3, backbone={"name": "resnet18s", "stage": "layer4"}, prototypes_per_class=2, prototype_dim=8
    )
    out = net(torch.rand(4, 3, 32, 32))
    y = torch.tensor([0, 1, 2, 1])
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        clst, sep = cluster_separation_costs(
            out.min_distances, y, net.prototype_class_identity, net.prototype_mask
        )
        (clst + F.relu(sep)).backward()
    names = {e.key for e in prof.key_averages()}
    assert not names & {"aten::item", "aten::_local_scalar_dense", "aten::nonzero"}, names
