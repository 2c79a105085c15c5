"""Interpretable CNN part filters: templates, mask, filter loss, metrics, model, runs and DDP."""

from __future__ import annotations

import math
import os
import socket
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from interpzoo.layers.icnn import (
    FilterAssignment,
    InterpretableConv2d,
    PartFilterMask,
    filter_loss,
    filter_mi_terms,
    gather_batch,
    locate_parts,
    official_filter_grad,
    part_mask,
    part_templates,
    supervised_filter_terms,
    template_priors,
    template_scores,
    template_shapes,
)
from interpzoo.metrics.icnn import LocationInstability, inferred_positions, part_dissection
from tests.conftest import TINY_DATA


@pytest.fixture(autouse=True)
def _one_thread():
    # On the shared 2-core CI machine, two OpenMP threads spin against other processes (steps ~20x slower).
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -------------------------------------------------------------------------------------------------
# templates and priors
# -------------------------------------------------------------------------------------------------
def _template_by_hand(n: int, mu: tuple[int, int], beta: float, tau: float) -> torch.Tensor:
    t = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            t[i, j] = tau * max(1 - beta * (abs(i - mu[0]) + abs(j - mu[1])) / n, -1)
    return t


@pytest.mark.parametrize("n, positive_cells", [(7, 5), (14, 25)])
def test_templates_values_counts_and_symmetry(n: int, positive_cells: int) -> None:
    tau = 0.5 / n**2
    t = part_templates(n).double()
    assert t.shape == (n * n + 1, n, n)
    assert torch.allclose(t[-1], torch.full((n, n), -tau, dtype=torch.float64))  # the negative template
    for mu in [(0, 0), (n // 2, n // 2), (1, n - 2)]:
        k = mu[0] * n + mu[1]
        assert torch.allclose(t[k], _template_by_hand(n, mu, 4.0, tau), atol=1e-9)
        assert t[k][mu] == pytest.approx(tau) and t[k].max() == pytest.approx(tau)
    assert t.min() == pytest.approx(-tau)
    centre = t[(n // 2) * n + n // 2]
    c0, r = n // 2, min(n // 2, n - 1 - n // 2)
    sub = centre[
        c0 - r : c0 + r + 1, c0 - r : c0 + r + 1
    ]  # window centred on mu: symmetric under flips, transpose
    assert torch.equal(sub, sub.flip(0)) and torch.equal(sub, sub.flip(1)) and torch.equal(sub, sub.T)
    assert ((template_shapes(n)[(n // 2) * n + n // 2] > 0).sum()) == positive_cells


def test_priors_sum_to_one_and_are_uniform() -> None:
    for n in (4, 7, 14):
        p = template_priors(n)
        assert p.shape == (n * n + 1,) and float(p.sum()) == pytest.approx(1.0)
        assert torch.allclose(p, torch.full_like(p, 1 / (1 + n * n)))
    p = template_priors(5, alpha=0.3)
    assert float(p[-1]) == pytest.approx(0.7) and float(p[:-1].sum()) == pytest.approx(0.3)
    with pytest.raises(ValueError, match="alpha"):
        template_priors(5, alpha=1.5)


# -------------------------------------------------------------------------------------------------
# the mask
# -------------------------------------------------------------------------------------------------
def test_mask_peak_support_and_official_row() -> None:
    n, beta = 7, 4.0
    x = torch.rand(2, 3, n, n) * 0.5
    peaks = [[1, 5], [3, 3], [6, 0]]
    for c, (i, j) in enumerate(peaks):
        x[:, c, i, j] = 2.0
    assert locate_parts(x).tolist() == [peaks, peaks]
    mask = part_mask(x, beta)
    masked = F.relu(x * mask)
    for c, (i, j) in enumerate(peaks):
        assert masked[:, c].flatten(1).argmax(1).tolist() == [i * n + j] * 2  # the peak survives, unchanged
        assert torch.all(masked[:, c, i, j] == 2.0)  # mask value 1 at the peak
        ii, jj = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
        far = (ii - i).abs() + (jj - j).abs() >= n / beta
        assert torch.all(masked[:, c][:, far] == 0)  # zero outside the L1 radius n / beta
    # the reference code's mask (coordinates linspace(-1, 1, n), a_f = 2): its centre row for n = 7
    off = part_mask(x[:, 1:2], 2.0, style="official")[0, 0, 3]
    assert torch.allclose(off, torch.tensor([-1, -1 / 3, 1 / 3, 1, 1 / 3, -1 / 3, -1]), atol=1e-6)
    x14 = torch.zeros(1, 1, 14, 14)
    x14[0, 0, 7, 7] = 1
    assert int((part_mask(x14, 2.0, style="official") > 0).sum()) == 25


def test_centroid_location_of_symmetric_blob() -> None:
    n = 9
    ii, jj = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
    blob = torch.exp(-((ii - 5) ** 2 + (jj - 3) ** 2) / 4.0)
    blob[5, 3] = 0.5 * blob.max()  # the argmax is no longer the centre, the centroid still is
    x = blob.expand(1, 1, n, n).clone()
    assert locate_parts(x, "centroid").tolist() == [[[5, 3]]]
    assert locate_parts(x, "argmax").tolist() != [[[5, 3]]]
    assert locate_parts(torch.zeros(1, 1, n, n), "centroid").tolist() == [[[0, 0]]]  # silent map: no NaN


def test_gradient_through_mask_is_masked_and_mask_is_detached() -> None:
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    m = PartFilterMask(3)
    mask = m.mask(x)
    assert not mask.requires_grad
    out = m(x)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    expected = g * mask.clamp(min=0) * (x.detach() * mask > 0)
    assert torch.allclose(x.grad, expected)


# -------------------------------------------------------------------------------------------------
# the filter loss
# -------------------------------------------------------------------------------------------------
def _brute_force_mi(x: torch.Tensor, n: int) -> torch.Tensor:
    """MI(X; T) per filter straight from the definitions, with explicit loops (float64)."""
    b, c = x.shape[:2]
    templates = [_template_by_hand(n, (k // n, k % n), 4.0, 0.5 / n**2) for k in range(n * n)]
    templates.append(torch.full((n, n), -0.5 / n**2, dtype=torch.float64))
    prior = 1 / (n * n + 1)
    out = torch.zeros(c, dtype=torch.float64)
    for f in range(c):
        like = torch.zeros(len(templates), b, dtype=torch.float64)
        for t, tmpl in enumerate(templates):
            e = torch.tensor([math.exp(float((x[i, f].double() * tmpl).sum())) for i in range(b)])
            like[t] = e / e.sum()
        px = (prior * like).sum(0)
        out[f] = sum(
            prior * like[t, i] * math.log(like[t, i] / px[i]) for t in range(len(templates)) for i in range(b)
        )
    return out


def test_mi_matches_brute_force_and_decomposes() -> None:
    torch.manual_seed(0)
    n, b = 4, 5
    x = torch.rand(b, 2, n, n, dtype=torch.float64) * 40
    scores = template_scores(x, part_templates(n).double())
    terms = filter_mi_terms(scores, template_priors(n).log())
    assert torch.allclose(terms["mi"], _brute_force_mi(x, n), atol=1e-9)
    assert torch.allclose(terms["loss"], -terms["mi"], atol=1e-9)  # -MI = -H(T) + H(T'|X) + spatial
    assert torch.allclose(terms["prior_entropy"], torch.full((2,), math.log(n * n + 1), dtype=torch.float64))


def test_mi_zero_for_zero_maps_and_bounded() -> None:
    out = filter_loss(torch.zeros(8, 3, 7, 7))
    assert float(out.mi) == pytest.approx(0.0, abs=1e-7) and float(out.loss) == pytest.approx(0.0, abs=1e-6)
    torch.manual_seed(1)
    for n, b, scale in [(8, 32, 1.0), (8, 32, 1e4), (3, 64, 1e4), (7, 4, 1e3)]:
        x = torch.rand(b, 4, n, n) ** 4 * 50
        out = filter_loss(x, template_scale=scale, reduction="sum")
        per = -filter_loss(x, template_scale=scale).per_filter
        bound = min(math.log(n * n + 1), math.log(b))
        assert torch.all(per >= -1e-6) and torch.all(per <= bound + 1e-5), (n, b, scale, per)
        assert float(out.mi) == pytest.approx(float(per.sum()), rel=1e-5)


def _ideal_and_diffuse(n: int = 7, b: int = 32, c: int = 4, height: float = 50.0):
    g = torch.Generator().manual_seed(0)
    ideal = torch.zeros(b, c, n, n)
    for i in range(b // 2):  # positives: one sharp peak at a random place; negatives: silent
        for f in range(c):
            r, s = torch.randint(0, n, (2,), generator=g).tolist()
            ideal[i, f, r, s] = height
    diffuse = torch.rand(b, c, n, n, generator=g) * height / n  # activation everywhere, on every image
    positive = torch.arange(b) < b // 2
    return ideal, diffuse, positive


def test_ideal_batch_has_lower_loss_than_diffuse() -> None:
    ideal, diffuse, positive = _ideal_and_diffuse()
    lo, hi = filter_loss(ideal), filter_loss(diffuse)
    assert float(lo.loss) < float(hi.loss) < 0  # paper scale: tiny values (measured -0.0166 vs -0.0098)
    assert float(lo.loss) == pytest.approx(-0.0166, abs=0.003)
    lo, hi = filter_loss(ideal, template_scale=100), filter_loss(diffuse, template_scale=100)
    assert float(lo.loss) < float(hi.loss) - 0.5  # with a template scale the gap is large
    # label-aware loss: correct labels score better than swapped ones, and better than a diffuse batch
    good = filter_loss(ideal, positive, template_scale=1000, normalize="max")
    swapped = filter_loss(ideal, ~positive, template_scale=1000, normalize="max")
    diff = filter_loss(diffuse, positive, template_scale=1000, normalize="max")
    assert float(good.loss) < float(diff.loss) and float(good.loss) < float(swapped.loss)
    assert float(good.inter_category_entropy) < 0.2 < float(swapped.inter_category_entropy)


def test_normalize_max_makes_the_loss_scale_free() -> None:
    ideal, _, positive = _ideal_and_diffuse()
    a = filter_loss(ideal, positive, template_scale=50, normalize="max")
    b = filter_loss(ideal * 123.0, positive, template_scale=50, normalize="max")
    assert float(a.loss) == pytest.approx(float(b.loss), rel=1e-5)


def test_supervised_terms_by_hand_for_two_images() -> None:
    # one filter, 1x1 maps: templates T_0 = tau, T- = -tau; scores +-tau x
    x = torch.tensor([[[[2.0]]], [[[0.0]]]], dtype=torch.float64)
    pos = torch.tensor([[True], [False]])
    s = template_scores(x, part_templates(1).double(), 1.0)
    t = supervised_filter_terms(s, pos)
    a = 0.5  # half of the images are positive
    lik_pos = torch.softmax(s[:, 0, 0], 0)
    lik_neg = torch.softmax(s[:, 0, 1], 0)
    post_pos = a * lik_pos / (a * lik_pos + (1 - a) * lik_neg)
    expected = -(torch.log(post_pos[0]) + torch.log(1 - post_pos[1])) / 2
    assert float(t["inter"][0]) == pytest.approx(float(expected))
    assert float(t["spatial"][0]) == pytest.approx(0.0)  # one location: no spatial uncertainty


def test_filter_loss_gradcheck() -> None:
    torch.manual_seed(0)
    x = (torch.rand(5, 2, 3, 3, dtype=torch.float64) * 3).requires_grad_()
    pos = torch.tensor([[1, 0], [0, 1], [1, 1], [0, 0], [1, 0]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda t: filter_loss(t, template_scale=20.0).loss, (x,))
    assert torch.autograd.gradcheck(lambda t: filter_loss(t, pos, template_scale=20.0).loss, (x,))
    # normalize="max" divides by a *detached* max: its gradient is that of the loss of x / const
    c = x.detach().amax((0, 2, 3)).view(1, -1, 1, 1)
    assert torch.autograd.gradcheck(lambda t: filter_loss(t / c, pos, template_scale=20.0).loss, (x,))
    g1 = torch.autograd.grad(filter_loss(x, pos, template_scale=20.0, normalize="max").loss, x)[0]
    g2 = torch.autograd.grad(filter_loss(x / c, pos, template_scale=20.0).loss, x)[0]
    assert torch.allclose(g1, g2)


def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        filter_loss(torch.rand(3, 7, 7))
    with pytest.raises(ValueError, match="positive must be"):
        filter_loss(torch.rand(2, 3, 4, 4), torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="learn_sharpness needs style='official'"):
        PartFilterMask(4, learn_sharpness=True)
    with pytest.raises(ValueError, match="normalize"):
        filter_loss(torch.rand(2, 3, 4, 4), normalize="l2")


# -------------------------------------------------------------------------------------------------
# procedures: sharpness, assignment, official gradient
# -------------------------------------------------------------------------------------------------
def test_learned_sharpness_moves_towards_three_over_spread() -> None:
    m = PartFilterMask(2, style="official", learn_sharpness=True, sharpness_momentum=0.5)
    assert torch.allclose(m.sharpness, torch.full((2,), 2.0))
    x = torch.zeros(4, 2, 5, 5)
    x[:, 0, 2, 2] = 1.0  # a point: spread 0 -> target clamps at 3
    x[:, 1] = 1.0  # uniform: spread sqrt(E[u^2] + E[v^2]) in [-1, 1] coordinates
    m.update_sharpness(x)
    u = torch.linspace(-1, 1, 5)
    spread = float(torch.sqrt(2 * (u**2).mean()))
    target1 = min(max(3 / spread, 1.5), 3.0)
    assert torch.allclose(m.sharpness, torch.tensor([2 + 0.5 * (3 - 2), 2 + 0.5 * (target1 - 2)]), atol=1e-5)


def test_dynamic_assignment_follows_class_responses() -> None:
    a = FilterAssignment(3, num_classes=2, mode="dynamic", momentum=0.9, floor=0.1)
    assert a.filter_class.tolist() == [0, 1, 0]  # round-robin before any statistics
    x = torch.zeros(4, 3, 2, 2)
    labels = torch.tensor([0, 0, 1, 1])
    x[2:, 0, 0, 0] = 5.0  # filter 0 fires on class 1
    x[:2, 1, 1, 1] = 3.0  # filter 1 fires on class 0
    a.update(x, labels)
    assert torch.allclose(a.response, torch.tensor([[0.1, 5.0], [3.0, 0.1], [0.1, 0.1]]))
    assert a.filter_class.tolist()[:2] == [1, 0]
    a.update(torch.zeros_like(x), labels)  # zero responses keep the old value (reference code)
    assert torch.allclose(a.response, torch.tensor([[0.1, 5.0], [3.0, 0.1], [0.1, 0.1]]))
    assert a.positive(labels).tolist()[0] == [False, True, a.filter_class[2].item() == 0]
    single = FilterAssignment(4, 2, mode="single", target=1)
    assert single.positive(torch.tensor([1, 0])).tolist() == [[True] * 4, [False] * 4]


def test_official_gradient_injection_by_hand() -> None:
    x = torch.rand(4, 2, 3, 3, requires_grad=True)
    mask = part_mask(x.detach(), 4.0)
    pos = torch.tensor([True, True, False, False])
    y = official_filter_grad(x, mask, pos, weight=1.0)
    assert torch.equal(y, x)
    (y * 0).sum().backward()
    g = x.grad
    a = 0.5
    xd = x.detach()
    s = (xd * mask).mean((2, 3))
    logz = torch.log(torch.exp(s / a).mean(0))
    st = torch.exp(s / a) * (s - a * logz + a)
    st_pos = st[:2] / st[:2].mean(0)
    m = xd.mean((2, 3))
    logzn = torch.log(torch.exp(-m / a).mean(0))
    stn = torch.exp(-m / a) * (-m - a * logzn + a)
    st_neg = stn[2:] / stn[2:].mean(0)
    assert torch.allclose(g[:2], -mask[:2] * st_pos[..., None, None], atol=1e-5)
    assert torch.allclose(g[2:], st_neg[..., None, None].expand(2, 2, 3, 3), atol=1e-5)


# -------------------------------------------------------------------------------------------------
# metrics
# -------------------------------------------------------------------------------------------------
def _maps_peaking_at(points: torch.Tensor, h: int, w: int, scores: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) maps whose argmax cell is ``points[b, c] = (row, col)`` with value ``scores[b, c]``."""
    b, c = points.shape[:2]
    x = torch.zeros(b, c, h, w)
    for i in range(b):
        for f in range(c):
            x[i, f, points[i, f, 0], points[i, f, 1]] = scores[i, f]
    return x


def test_location_instability_zero_for_constant_offset_and_grows_with_jitter() -> None:
    g = torch.Generator().manual_seed(0)
    b, c, k = 60, 3, 2  # 16 x 16 maps over 64 x 64 images
    rows = torch.randint(2, 14, (b, c), generator=g)
    cols = torch.randint(2, 14, (b, c), generator=g)
    scores = torch.rand(b, c, generator=g) + 0.1
    x = _maps_peaking_at(torch.stack([rows, cols], -1), 16, 16, scores)
    _, pos = inferred_positions(x, (64, 64))
    vis = torch.ones(b, k, dtype=torch.bool)

    def inst(jitter: float, filt: int = 0) -> float:
        # landmarks at a constant offset from filter `filt`'s inferred part, plus Gaussian jitter
        lm = (
            pos[:, filt, None, :]
            + torch.tensor([[3.0, -5.0], [10.0, 2.0]])
            + jitter * torch.randn(b, k, 2, generator=g)
        )
        m = LocationInstability(c, k, top_m=40)
        m.update(x, lm, vis, (64, 64))
        return float(m.per_filter()[filt]), float(m.compute())

    assert inst(0.0)[0] == pytest.approx(0.0, abs=1e-4)
    values = [inst(s)[0] for s in (0.5, 2.0, 8.0)]
    assert values[0] < values[1] < values[2]
    # scale invariance: twice the image, the maps and the landmarks -> same normalised value
    lm = pos[:, 0, None, :] + 4.0 * torch.randn(b, k, 2, generator=g)
    m1 = LocationInstability(c, k, top_m=40)
    m1.update(x, lm, vis, (64, 64))
    x2 = _maps_peaking_at(torch.stack([rows * 2, cols * 2], -1), 32, 32, scores)
    m2 = LocationInstability(c, k, top_m=40)
    m2.update(x2, 2 * lm + 0.0, vis, (128, 128))
    _, pos2 = inferred_positions(x2, (128, 128))
    assert torch.allclose(pos2, 2 * pos + torch.tensor([-2.0, -2.0]))  # cell centres of the finer grid
    assert float(m1.compute()) == pytest.approx(float(m2.compute()), rel=0.05)


def _reference_instability(x, lm, vis, size, top_m):
    """The official getDistSqrtVar recipe with plain loops (top-M by score, unbiased std, mean)."""
    score, pos = inferred_positions(x, size)
    b, c = score.shape
    per = []
    for f in range(c):
        vals = []
        for k in range(lm.shape[1]):
            idx = [i for i in score[:, f].argsort(descending=True).tolist() if vis[i, k] and score[i, f] > 0][
                :top_m
            ]
            if len(idx) >= 2:
                d = torch.tensor([float(torch.dist(lm[i, k], pos[i, f])) for i in idx], dtype=torch.float64)
                vals.append(float(d.std(unbiased=True)))
        if vals:
            per.append(sum(vals) / len(vals))
    return sum(per) / len(per) / math.hypot(*size)


def test_location_instability_streaming_matches_reference() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(50, 4, 6, 6, generator=g) ** 3
    x[:, 3] = 0  # a dead filter is dropped, not "perfectly stable"
    lm = torch.rand(50, 3, 2, generator=g) * 48
    vis = torch.rand(50, 3, generator=g) > 0.3
    m = LocationInstability(4, 3, top_m=12)
    for s in range(0, 50, 7):  # uneven batches
        m.update(x[s : s + 7], lm[s : s + 7], vis[s : s + 7], (48, 48), index=torch.arange(s, min(s + 7, 50)))
    assert torch.isnan(m.per_filter()[3])
    assert float(m.compute()) == pytest.approx(_reference_instability(x, lm, vis, (48, 48), 12), rel=1e-5)


def test_part_dissection_detects_the_part_a_unit_fires_on() -> None:
    n, size = 20, 16
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool)
    acts = torch.rand(n, 3, size, size, generator=g) * 0.1
    for i in range(n):
        r, s = torch.randint(0, size - 4, (2,), generator=g).tolist()
        masks[i, 0, r : r + 4, s : s + 4] = True  # part 0: a 4x4 square
        masks[i, 1, :2, :] = True  # part 1: the top band
        acts[i, 0, r : r + 4, s : s + 4] += 1.0  # unit 0 fires exactly on part 0
    res = part_dissection(acts, masks, quantile=16 / (size * size), iou_threshold=0.5)
    assert res["best_part"][0] == 0 and float(res["iou"][0, 0]) == pytest.approx(1.0)
    assert float(res["best_iou"][1]) < 0.5 and float(res["best_iou"][2]) < 0.5  # noise units detect nothing
    assert int(res["num_part_detectors"]) == 1 and int(res["num_unique_parts"]) == 1
    # IoU by hand for unit 1 and part 1 (dataset-level sums)
    flat = acts[:, 1].flatten()
    thr = flat.kthvalue(flat.numel() - 16 * n + 1).values
    unit = acts[:, 1] >= thr
    inter = (unit & masks[:, 1]).sum()
    union = (unit | masks[:, 1]).sum()
    assert float(res["iou"][1, 1]) == pytest.approx(float(inter) / float(union), rel=1e-5)


# -------------------------------------------------------------------------------------------------
# layer and network
# -------------------------------------------------------------------------------------------------
def test_append_interpretable_layer_to_a_torchvision_resnet() -> None:
    import torchvision

    from interpzoo.models.icnn import attach_part_filters

    net = torchvision.models.resnet18(weights=None, num_classes=3)
    (block,) = attach_part_filters(net, "layer3")
    assert block.in_channels == 256
    x = torch.rand(4, 3, 64, 64)
    y = torch.tensor([0, 1, 2, 1])
    logits = net(x)
    loss = F.cross_entropy(logits, y) + block.filter_loss(positive=y == 1).loss
    loss.backward()
    assert block.conv.weight.grad is not None and block.conv.weight.grad.abs().sum() > 0
    assert block.last_features["output"].shape == (4, 256, 4, 4)
    with pytest.raises(RuntimeError, match="forward pass first"):
        InterpretableConv2d(8).filter_loss()


def test_icnn_network_placement_names_and_state() -> None:
    from interpzoo.models import create_model, list_models

    assert {"icnn_resnet18s", "icnn_vgg16_bn", "icnn_resnet50"} <= set(list_models("icnn_*"))
    net = create_model("icnn_resnet18s", num_classes=5, num_layers=2, mask_input=True)
    assert net.placement == "layer3"
    out = net(torch.rand(3, 3, 32, 32))
    assert set(out.part_features) == {"icnn1_input", "icnn1", "icnn2"} and out.logits.shape == (3, 5)
    assert out.part_features["icnn2"].shape == (3, 64, 8, 8) and set(out.part_masks) == set(out.part_features)
    keys = net.state_dict().keys()
    assert "assignments.icnn2.filter_class" in keys and any(
        k.endswith("icnn1.part_mask.sharpness") for k in keys
    )
    assert "masked_features" in out.as_dict() and "part_features/icnn1" in out.as_dict()
    vgg = create_model("icnn_vgg16_bn", num_classes=2)
    assert vgg.placement == "42"  # after the conv5_3 ReLU, before the last max-pool
    assert vgg(torch.rand(1, 3, 64, 64)).part_features["icnn1"].shape == (1, 512, 4, 4)
    with pytest.raises(ValueError, match="did you mean 'layer3'"):
        create_model("icnn_resnet18s", num_classes=2, placement="layer33")
    plain = create_model("icnn_resnet18s", num_classes=2, use_mask=False)
    assert plain(torch.rand(1, 3, 32, 32)).part_masks == {}


def test_bundle_keeps_assignment_and_sharpness(tmp_path) -> None:
    from interpzoo.models import create_model, load_pretrained, save_pretrained

    net = create_model("icnn_resnet18s", num_classes=4, mask_style="official", learn_sharpness=True)
    net.assignments["icnn1"].filter_class.fill_(3)
    net.blocks()["icnn1"].part_mask.sharpness.fill_(2.7)
    save_pretrained(net, tmp_path / "b")
    back = load_pretrained(tmp_path / "b")
    assert back.assignments["icnn1"].filter_class.unique().tolist() == [3]
    assert torch.allclose(back.blocks()["icnn1"].part_mask.sharpness, torch.tensor(2.7))


# -------------------------------------------------------------------------------------------------
# runs through the real configs
# -------------------------------------------------------------------------------------------------
def test_fdr_multi_and_single_category(make_cfg, tmp_path) -> None:
    from interpzoo.run import train

    metrics = train(make_cfg(["model=icnn", "debug=fdr", *TINY_DATA]))
    for key in (
        "test/acc",
        "test/filter_loss",
        "test/filter_mi",
        "test/inter_category_entropy",
        "test/spatial_entropy",
        "test/location_instability",
        "test/part_iou",
        "test/part_iou_ceiling",
        "test/part_iou_random",
        "test/part_iou_norm",
        "test/part_detection_rate",
        "test/part_detection_rate_ceiling",
        "test/num_part_detectors",
    ):
        assert key in metrics, key
    # the oracle (pooled part masks) beats the network on the area-matched part IoU
    assert metrics["test/part_iou_ceiling"] > metrics["test/part_iou"]
    metrics = train(
        make_cfg(
            [
                "model=icnn",
                "debug=fdr",
                "model.mode=single",
                "model.target_class=2",
                "model.loss_impl=official_grad",
                *TINY_DATA,
            ]
        )
    )
    assert "test/acc" in metrics and "test/filter_mi" in metrics


def test_single_category_module_round_trips_hparams() -> None:
    from interpzoo.models.lit_icnn import ICNNModule

    info = {"num_classes": 10, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "part_names": ["a", "b"]}
    m = ICNNModule(net={"name": "icnn"}, data_info=info, mode="single", target_class=4)
    assert m.net.num_classes == 2 and m.task_labels(torch.tensor([4, 1])).tolist() == [1, 0]
    again = ICNNModule(**dict(m.hparams))
    assert again.net.num_classes == 2 and again.target_class == 4
    again.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="target_class 12"):
        ICNNModule(net={"name": "icnn"}, data_info=info, mode="single", target_class=12)
    with pytest.raises(ValueError, match="did you mean 'template_scale'"):
        ICNNModule(net={"name": "icnn"}, data_info=info, filter_loss={"template_scal": 2.0})


def test_cub_vgg16_experiment_composes_and_runs_fast_dev_run(make_cfg, tmp_path) -> None:
    from interpzoo.run import train
    from tests.conftest import fake_cub_fdr_overrides

    cfg = make_cfg(fake_cub_fdr_overrides("icnn_cub_vgg16", tmp_path))
    assert cfg.model.net.backbone.name == "vgg16_bn" and cfg.model.metrics.landmark_ids == [0, 5, 13]
    metrics = train(cfg)
    assert "test/acc" in metrics and "val/location_instability" in metrics  # CUB parts reach the metric


@pytest.mark.slow
def test_short_training_learns_and_writes_part_figure(make_cfg, tmp_path) -> None:
    from interpzoo.run import train

    metrics = train(
        make_cfg(
            [
                "model=icnn",
                "trainer.max_epochs=2",
                "data.n_train=640",
                "data.n_val=64",
                "data.n_test=128",
                "data.batch_size=64",
                "model.metrics.part_iou_samples=64",
                "model.metrics.report_samples=64",
                "callbacks.intrinsic_dim.num_samples=32",
            ]
        )
    )
    assert metrics["test/acc"] > 0.3  # 10 classes: chance 0.1
    assert metrics["val/filter_mi"] > 0
    assert (tmp_path / "figures" / "part_filters.png").is_file()


# -------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes (gloo)
# -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_data():
    g = torch.Generator().manual_seed(0)
    inputs = torch.rand(12, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (12,), generator=g)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * 0.5)
        conv.bias.copy_(torch.randn(4, generator=g) * 0.1)
    lm = torch.rand(12, 2, 2, generator=g) * 8
    return inputs, labels, conv.state_dict(), lm


def _loss_and_grad(conv: nn.Module, inputs, labels, sync: bool = True):
    x = F.relu(conv(inputs))
    pos = labels[:, None] == (torch.arange(4) % 3)[None]
    out = filter_loss(x, pos, template_scale=30.0, normalize="max", sync=sync)
    return x, out


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        inputs, labels, state, lm = _ddp_data()
        half = slice(rank * 6, rank * 6 + 6)
        conv = nn.Conv2d(3, 4, 3, padding=1)
        conv.load_state_dict(state)
        ddp = nn.parallel.DistributedDataParallel(conv)
        x, out = _loss_and_grad(ddp, inputs[half], labels[half])
        out.loss.backward()
        local = _loss_and_grad(conv, inputs[half], labels[half], sync=False)[1]
        metric = LocationInstability(4, 2, top_m=5)
        metric.update(
            x.detach(), lm[half], torch.ones(6, 2, dtype=torch.bool), (8, 8), index=torch.arange(12)[half]
        )
        assign = FilterAssignment(4, 3, "dynamic")
        assign.update(x.detach(), labels[half])
        uneven = gather_batch(torch.arange(3 + 2 * rank, dtype=torch.float32)[:, None], with_grad=False)
        torch.save(
            {
                "loss": out.loss.detach(),
                "mi": out.mi.detach(),
                "grad": conv.weight.grad.clone(),
                "local": local.loss.detach(),
                "inst": metric.compute(),
                "response": assign.response.clone(),
                "uneven": uneven,
            },
            Path(out_dir) / f"rank{rank}.pt",
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
@pytest.mark.slow
def test_filter_loss_and_metrics_global_under_two_process_ddp() -> None:
    """Global statistics (sync=True): loss, MI and DDP-averaged gradients equal one process with the whole
    batch; sync=False gives each rank the loss of its own shard; location instability merges top-M buffers
    exactly; the dynamic assignment is all-reduced."""
    import torch.multiprocessing as mp

    inputs, labels, state, lm = _ddp_data()
    conv = nn.Conv2d(3, 4, 3, padding=1)
    conv.load_state_dict(state)
    x, ref = _loss_and_grad(conv, inputs, labels)
    ref.loss.backward()
    ref_metric = LocationInstability(4, 2, top_m=5)
    ref_metric.update(x.detach(), lm, torch.ones(12, 2, dtype=torch.bool), (8, 8), index=torch.arange(12))
    ref_assign = FilterAssignment(4, 3, "dynamic")
    ref_assign.update(x.detach(), labels)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_ddp_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        res = [torch.load(Path(d) / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r, out in enumerate(res):
        assert float(out["loss"]) == pytest.approx(float(ref.loss.detach()), rel=1e-5)
        assert float(out["mi"]) == pytest.approx(float(ref.mi.detach()), rel=1e-5)
        assert torch.allclose(out["grad"], conv.weight.grad, rtol=1e-4, atol=1e-6)
        shard = _loss_and_grad(conv, inputs[r * 6 : r * 6 + 6], labels[r * 6 : r * 6 + 6], sync=False)[1]
        assert float(out["local"]) == pytest.approx(float(shard.loss.detach()), rel=1e-5)
        assert float(out["inst"]) == pytest.approx(float(ref_metric.compute()), rel=1e-5)
        assert torch.allclose(out["response"], ref_assign.response)
        assert out["uneven"].flatten().tolist() == [0, 1, 2, 0, 1, 2, 3, 4]
    assert float(res[0]["local"]) != pytest.approx(float(res[1]["local"]))  # per-rank values do differ


@pytest.mark.ddp
@pytest.mark.slow
def test_icnn_pipeline_under_ddp_sim(make_cfg, tmp_path) -> None:
    """The LightningModule under 2-process ddp_spawn: global filter loss (all-gather in the training step),
    all-reduced assignment updates, merged location-instability buffers, part IoU on the shared subset."""
    from interpzoo.run import train

    metrics = train(
        make_cfg(
            [
                "model=icnn",
                "trainer=ddp_sim",
                "trainer.max_epochs=1",
                "report=false",
                "export=false",
                "callbacks.intrinsic_dim.num_samples=32",
                "model.metrics.part_iou_samples=64",
                *TINY_DATA,
            ]
        )
    )
    for key in (
        "test/acc",
        "test/filter_loss",
        "test/location_instability",
        "test/part_iou",
        "val/filter_mi",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] > 0
    assert ckpt["state_dict"]["net.assignments.icnn1.response"].sum() > 0  # the dynamic assignment ran
