"""Ground-truth scorecard of SENN (concepts vs PartShapes concepts) and the soft autoencoder (thresholds vs noise).

Every oracle is checked to score its ceiling (normalised 1), every random stand-in to score about its baseline
(normalised about 0), and each metric's ceiling against a value worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.senn import (
    auc_matrix,
    intervention_direction_scores,
    match_concepts,
    split_half_concept_auc,
)
from interpzoo.metrics.soft_autoencoder import (
    code_noise_std,
    noise_rejection,
    signal_retention,
    threshold_tracking,
    universal_factor,
)
from interpzoo.models.registry import build_model
from interpzoo.scorecard import NoGroundTruth, evaluate
from interpzoo.scorecard import senn as senn_card
from interpzoo.scorecard import soft_autoencoder as softae_card


@pytest.fixture(scope="module")
def rgb_dm() -> PartShapesDataModule:
    return PartShapesDataModule()


@pytest.fixture(scope="module")
def grey_dm() -> PartShapesDataModule:
    return PartShapesDataModule(grayscale=True)


def tiny_senn(seed: int = 0, in_chans: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model({"name": "senn", "num_classes": 10, "in_chans": in_chans, "image_size": 32}).eval()


# -- SENN metrics -------------------------------------------------------------------------------------
def test_auc_matrix_matches_sklearn_with_ties() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60, 3), generator=g).double()  # many ties
    labels = (torch.rand(60, 4, generator=g) < 0.4).double()
    labels[:, 3] = 0  # constant column: undefined
    auc = auc_matrix(scores, labels)
    for k in range(3):
        for j in range(3):
            assert auc[k, j].item() == pytest.approx(
                roc_auc_score(labels[:, j].numpy(), scores[:, k].numpy())
            )
    assert torch.isnan(auc[:, 3]).all()
    # a constant score is exactly chance
    assert auc_matrix(torch.ones(60, 1), labels[:, :1]).item() == pytest.approx(0.5)


def test_split_half_auc_oracle_is_one_and_random_is_chance() -> None:
    g = torch.Generator().manual_seed(1)
    labels = (torch.rand(400, 30, generator=g) < 0.5).double()
    # oracle: the concepts are label columns, some flipped (the sign is learned): AUC exactly 1 by hand
    oracle = labels[:, :6].clone()
    oracle[:, ::2] = 1 - oracle[:, ::2]
    res = split_half_concept_auc(oracle, labels, seed=0)
    assert torch.allclose(res["auc"], torch.ones(6, dtype=torch.float64))
    assert res["index"].tolist() == list(range(6))
    assert res["sign"].tolist() == [-1.0, 1.0, -1.0, 1.0, -1.0, 1.0]
    # random concepts: held-out AUC about 0.5, while the same-half best match is inflated (why we split)
    noise = torch.randn(400, 40, generator=g)
    res = split_half_concept_auc(noise, labels, seed=0)
    assert abs(res["auc"].mean().item() - 0.5) < 0.02
    a = res["match_rows"].numpy()
    s, y = noise.numpy()[a], labels.numpy()[a].astype(bool)
    # AUC by pair counting (no ties in Gaussian noise): P(score of a positive > score of a negative)
    greater = s[:, None, :] > s[None, :, :]  # (i, i', k)
    pairs = y[:, None, :, None] & ~y[None, :, :, None]  # (i, i', j, 1)
    auc_same = (greater[:, :, None, :] & pairs).sum((0, 1)) / pairs.sum((0, 1))  # (j, k)
    same_half_best = (np.abs(auc_same - 0.5).max(0) + 0.5).mean()
    assert same_half_best > 0.55


def test_match_concepts_picks_strongest_direction() -> None:
    labels = torch.tensor([[0, 1], [0, 1], [1, 0], [1, 0], [1, 1]], dtype=torch.float64)
    scores = torch.tensor([[5.0], [4.0], [1.0], [0.0], [2.0]])  # high when concept 0 is absent
    index, sign = match_concepts(scores, labels)
    assert index.tolist() == [0] and sign.tolist() == [-1.0]


def test_intervention_direction_scores_by_hand() -> None:
    acc, effect = intervention_direction_scores(
        torch.tensor([1.0, -1.0, 0.0, 2.0]),
        torch.tensor([1.0, 1.0, 1.0, -1.0]),
        torch.tensor([1.0, 1.0, 1.0, 2.0]),
    )
    assert acc == pytest.approx((1 + 0 + 0.5 + 0) / 4)
    assert effect == pytest.approx((1 - 1 + 0 - 1) / 4)


# -- SENN scorer ----------------------------------------------------------------------------------------
def test_concept_toggle_flips_each_concept(rgb_dm: PartShapesDataModule) -> None:
    ds = rgb_dm.ground_truth_dataset(6)
    toggle = senn_card.ConceptToggle(ds.renderer)
    rng = np.random.default_rng(0)
    names = ds.renderer.concept_names
    assert set(toggle.slot) | set(toggle.presence) == set(range(len(names)))
    for i in range(len(ds)):
        spec = ds.renderer.draw(ds.split, i)
        before = ds.renderer.sample_from_spec(spec).concepts
        for j in range(len(names)):
            edit = toggle.edit(spec, j, rng)
            after = ds.renderer.render(ds.split, i, **edit).concepts
            assert after[j] == 1 - before[j], names[j]


def test_senn_oracle_ceiling_by_hand(rgb_dm: PartShapesDataModule) -> None:
    ds = rgb_dm.ground_truth_dataset(80)
    images = torch.stack([ds[i]["image"] for i in range(len(ds))])
    concepts = torch.stack([ds[i]["concepts"] for i in range(len(ds))]).double()
    cols = senn_card.oracle_columns(concepts, 4)
    prevalence = concepts.mean(0).numpy()
    assert set(cols.tolist()) == set(np.argsort(np.abs(prevalence - 0.5), kind="stable")[:4].tolist())
    res = senn_card.score_concepts(senn_card._oracle_fn(cols), ds, images, concepts, seed=0, max_images=20)
    assert res["concept_auc"] == 1.0
    assert res["concept_intervention_accuracy"] == 1.0
    # every switch moves the oracle by exactly 1, in units of the column's std: mean_k 1 / std(c_k)
    by_hand = np.mean([1 / np.std(concepts[:, c].numpy(), ddof=1) for c in cols.tolist()])
    assert res["concept_intervention_effect"] == pytest.approx(by_hand)
    row = Score("senn", "concept_auc", res["concept_auc"], res["concept_auc"], 0.55)
    assert row.normalised == 1.0


def test_senn_encoder_concepts_equal_forward(rgb_dm: PartShapesDataModule) -> None:
    net = tiny_senn()
    x = torch.stack([rgb_dm.ground_truth_dataset(8)[i]["image"] for i in range(8)])
    fn = senn_card._encoder_concepts(net.normalize, net.conceptizer)
    assert torch.allclose(fn(x, torch.zeros(8, 1)).float(), net(x).concepts, atol=1e-6)


def test_senn_score_on_tiny_untrained_senn(rgb_dm: PartShapesDataModule) -> None:
    """An untrained SENN is itself a random conceptizer: finite rows, ceiling 1, normalised about 0."""
    net = tiny_senn()
    rows = evaluate(net, rgb_dm, num_samples=120, seed=0)
    assert rows[0].metric == "gt_accuracy"  # evaluate() adds the accuracy on the same images
    rows = rows[1:]
    by_metric = {r.metric: r for r in rows}
    assert list(by_metric) == list(senn_card.METRICS)
    for r in rows:
        assert math.isfinite(r.raw) and math.isfinite(r.random) and math.isfinite(r.normalised)
    assert by_metric["concept_auc"].ceiling == 1.0
    assert by_metric["concept_intervention_accuracy"].ceiling == 1.0
    assert abs(by_metric["concept_auc"].normalised) < 0.4
    assert abs(by_metric["concept_intervention_accuracy"].normalised) < 0.4
    assert 0.4 < by_metric["concept_auc"].random < 0.7


def test_senn_random_projection_baseline_for_input_concepts() -> None:
    net = build_model(
        {"name": "senn", "num_classes": 2, "in_chans": 1, "image_size": 16, "conceptizer": {"type": "input"}}
    )
    x = torch.rand(5, 1, 16, 16)
    fn = senn_card.random_conceptizer(net, seed=0)
    h = fn(x, torch.zeros(5, 1))
    assert h.shape == (5, net.n_concepts)
    assert torch.allclose(h, senn_card.random_conceptizer(net, seed=0)(x, torch.zeros(5, 1)))
    assert not torch.allclose(h, senn_card.random_conceptizer(net, seed=1)(x, torch.zeros(5, 1)))


def test_senn_no_ground_truth_on_digits_and_tables() -> None:
    from interpzoo.datamodules.digits import DigitsDataModule
    from interpzoo.datamodules.tabular import BreastCancerDataModule
    from interpzoo.models.bundle import load_pretrained

    for bundle, dm in (
        ("senn_lenet.digits_s0", DigitsDataModule()),
        ("senn_mlp.breast_cancer_s0", BreastCancerDataModule()),
    ):
        with pytest.raises(NoGroundTruth, match=r"PartShapes.*train.py model=senn data=partshapes"):
            evaluate(load_pretrained(bundle), dm, num_samples=10)


def test_senn_refuses_wrong_channels(grey_dm: PartShapesDataModule) -> None:
    with pytest.raises(ValueError, match="grayscale"):
        senn_card.score(tiny_senn(in_chans=3), grey_dm, num_samples=10)


# -- soft autoencoder metrics -----------------------------------------------------------------------------
def test_code_noise_std_matches_measured_noise() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(6, 2, 3, 3, generator=g)
    s = torch.tensor([0.5, 2.0])
    sigma = 0.1
    noise = torch.randn(64, 2, 40, 40, generator=g) * sigma
    u = F.conv2d(noise / s.view(1, -1, 1, 1), w)  # valid convolution: no border effects
    measured = u.transpose(0, 1).flatten(1).std(dim=1)
    assert torch.allclose(code_noise_std(w, sigma, s), measured, rtol=0.02)


def test_noise_rejection_on_zero_code_is_gaussian_tail() -> None:
    g = torch.Generator().manual_seed(0)
    sigma_k = torch.tensor([0.5, 1.0, 2.0])
    u_noise = torch.randn(200, 3, 20, 20, generator=g) * sigma_k.view(1, -1, 1, 1)
    for c in (0.5, 1.0, universal_factor(400)):
        got = noise_rejection(u_noise, torch.zeros_like(u_noise), c * sigma_k)
        assert got == pytest.approx(math.erf(c / math.sqrt(2)), abs=0.005)
    assert noise_rejection(u_noise, torch.zeros_like(u_noise), torch.zeros(3)) == 0.0
    # entries already active on the clean input do not count
    clean = torch.zeros(1, 1, 1, 2)
    clean[..., 1] = 5.0
    assert noise_rejection(torch.tensor([[[[0.1, 0.1]]]]), clean, torch.tensor([1.0])) == 1.0


def test_signal_retention_by_hand() -> None:
    signal = torch.tensor([[[[3.0, 1.0, 0.0, 2.0]]]])
    noisy = torch.tensor([[[[3.5, 0.5, 0.2, -2.5]]]])
    # threshold 1: keeps entries 0 and 3 -> (9 + 4) / (9 + 1 + 0 + 4)
    assert signal_retention(noisy, signal, torch.tensor([1.0])) == pytest.approx(13 / 14)
    assert signal_retention(noisy, signal, torch.tensor([0.0])) == 1.0
    assert signal_retention(noisy, signal, torch.tensor([10.0])) == 0.0
    assert math.isnan(signal_retention(noisy, torch.zeros_like(signal), torch.tensor([1.0])))


def test_threshold_tracking_by_hand() -> None:
    sigma_k = torch.tensor([0.1, 0.3, 0.2, 0.5])
    assert threshold_tracking(3.7 * sigma_k, sigma_k) == pytest.approx(1.0)
    assert threshold_tracking(-sigma_k + 1, sigma_k) == pytest.approx(-1.0)
    assert math.isnan(threshold_tracking(torch.full((4,), 0.2), sigma_k))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 3.0, 2.0])
    assert threshold_tracking(a, b) == pytest.approx(float(np.corrcoef(a, b)[0, 1]))


# -- soft autoencoder scorer ------------------------------------------------------------------------------
def _set_stage1(net: torch.nn.Module, values: torch.Tensor) -> None:
    net.backbone.stages[0].act.set_threshold(values)


def test_softae_oracle_thresholds_score_the_ceiling(grey_dm: PartShapesDataModule) -> None:
    torch.manual_seed(0)
    net = build_model(
        {"name": "softae", "in_chans": 1, "widths": [16, 8], "mean": [0.49], "std": [0.12]}
    ).eval()
    sigma = 0.1
    stage = net.backbone.stages[0]
    sigma_k = code_noise_std(stage.conv.weight, sigma, net.normalize.std)
    _set_stage1(net, universal_factor(32 * 32) * sigma_k)
    rows = softae_card.score(net, grey_dm, num_samples=40, noise_std=sigma)
    for r in rows:
        assert r.raw == pytest.approx(r.ceiling, abs=1e-6), r.metric
        assert r.normalised == pytest.approx(1.0, abs=1e-4), r.metric
    by_metric = {r.metric: r for r in rows}
    assert by_metric["threshold_tracking"].ceiling == pytest.approx(1.0)
    # the rejection ceiling is at most the Gaussian tail on a zero code (background codes are not all zero)
    assert (
        0.9 < by_metric["noise_rejection"].ceiling <= math.erf(universal_factor(1024) / math.sqrt(2)) + 1e-3
    )


def test_softae_random_thresholds_score_about_zero(grey_dm: PartShapesDataModule) -> None:
    torch.manual_seed(1)
    net = build_model(
        {"name": "softae", "in_chans": 1, "widths": [64, 8], "mean": [0.49], "std": [0.12]}
    ).eval()
    sigma_k = code_noise_std(net.backbone.stages[0].conv.weight, 0.1, net.normalize.std)
    g = torch.Generator().manual_seed(2)
    # thresholds of the oracle's size but unrelated to each unit's noise
    _set_stage1(
        net, torch.rand(64, generator=g, dtype=torch.float64) * 2 * universal_factor(1024) * sigma_k.mean()
    )
    rows = {r.metric: r for r in softae_card.score(net, grey_dm, num_samples=40, noise_std=0.1, draws=8)}
    for metric in softae_card.METRICS:
        assert abs(rows[metric].normalised) < 0.35, (metric, rows[metric])


def test_softae_shipped_bundle_rows_are_finite(grey_dm: PartShapesDataModule) -> None:
    from interpzoo.models.bundle import load_pretrained

    net = load_pretrained("softae.partshapes_grey_s0")
    assert softae_card.noise_std_of(net) == pytest.approx(25 / 255)
    rows = evaluate(net, grey_dm, num_samples=40, seed=0)
    assert [r.metric for r in rows] == list(softae_card.METRICS)
    for r in rows:
        for v in (r.raw, r.ceiling, r.random, r.normalised):
            assert math.isfinite(v), r
    # an independent reading of the same thresholds: the bundle's pixel thresholds in noise stds
    ratio = (net.pixel_thresholds() / (25 / 255)).median().item()
    assert f"median threshold = {ratio:.2f}" in rows[0].note


def test_softae_no_ground_truth() -> None:
    from interpzoo.datamodules.digits import DigitsDataModule

    net = build_model({"name": "softae", "in_chans": 1, "widths": [4]})
    with pytest.raises(NoGroundTruth, match="PartShapes"):
        evaluate(net, DigitsDataModule(), num_samples=10)
    relu = build_model({"name": "relu_ae", "in_chans": 1, "widths": [4]})
    with pytest.raises(NoGroundTruth, match="no soft threshold"):
        evaluate(relu, PartShapesDataModule(grayscale=True), num_samples=10)


def test_lit_module_tells_the_network_its_noise() -> None:
    from interpzoo.models.lit_soft_autoencoder import SoftAutoencoderModule

    module = SoftAutoencoderModule(
        net={"name": "softae", "widths": [4]},
        noise_std=0.05,
        data_info={"in_chans": 1, "mean": [0.5], "std": [0.2], "image_size": [32, 32], "input_kind": "image"},
    )
    assert softae_card.noise_std_of(module.net) == 0.05
