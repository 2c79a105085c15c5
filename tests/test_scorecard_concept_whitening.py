"""Concept-whitening scorecard (issue 13): oracle ceilings, random-direction baselines, causal interventions,
concept-vector probe labels and ``pool_max`` coverage, each against an independent computation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.layers.concept_whitening import ConceptWhitening2d, pool_axes
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.concept_whitening import (
    binary_auc,
    concept_auc_ceiling,
    concept_aucs,
    intervention_accuracy,
    intervention_effect,
    project_and_pool,
    random_direction_aucs,
    random_directions,
)
from interpzoo.models import create_model
from interpzoo.models.lit_concept_whitening import ConceptWhiteningModule
from interpzoo.scorecard import NoGroundTruth
from interpzoo.scorecard.concept_whitening import concept_carriers, concept_edit, score, score_linear_probe

CONCEPTS = ["has_red", "has_striped", "has_circle"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices on a shared 2-core machine
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dm() -> PartShapesDataModule:
    return PartShapesDataModule(concepts=CONCEPTS, n_concept_train=60, n_concept_test=60)


def _probe_truth(dm: PartShapesDataModule, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """``(probe set index (N,), concept vectors of the aligned concepts (N, K))`` of the probe sets."""
    cols = [dm.renderer.concept_index(c) for c in CONCEPTS]
    probe, truth = [], []
    for j, ds in enumerate(dm.concept_datasets(split).values()):
        for i in range(len(ds)):
            probe.append(j)
            truth.append(ds[i]["concepts"][cols])
    return torch.tensor(probe), torch.stack(truth)


# -- the AUC's ceiling -----------------------------------------------------------------------------
def test_auc_ceiling_by_hand() -> None:
    # probe sets 0 (images 0, 1) and 1 (images 2..5); image 2, a probe of concept 1, also shows concept 0
    probe = torch.tensor([0, 0, 1, 1, 1, 1])
    truth = torch.tensor([[1, 0], [1, 0], [1, 1], [0, 1], [0, 1], [0, 1]])
    # by probe set: concept 0's 4 negatives include one tie with both positives: (2*3 + 2*0.5) / 8
    assert concept_auc_ceiling(truth, probe)[0] == pytest.approx(7 / 8)
    assert concept_auc_ceiling(truth, probe)[1] == pytest.approx(1.0)
    # labels from the concept vectors: the oracle is perfect
    assert concept_auc_ceiling(truth).tolist() == [1.0, 1.0]
    # ConceptAUC's function takes the same multi-hot labels
    assert concept_aucs(truth.double(), truth, 2, folds=0)[0].tolist() == [1.0, 1.0]


def test_probe_index_labels_cap_the_oracle_at_one_minus_half_the_contamination(dm) -> None:
    """The issue's measurement: by probe set, a perfect detector scores ``1 - q/2`` (q = share of the other
    probe sets' images that show the concept); with concept-vector labels it scores 1."""
    probe, truth = _probe_truth(dm)
    for j, name in enumerate(CONCEPTS):
        negatives = truth[probe != j, j]
        q = float(negatives.float().mean())
        assert concept_auc_ceiling(truth, probe)[j] == pytest.approx(1 - q / 2, abs=1e-6), name
        assert truth[probe == j, j].all()  # every probe of the concept shows it
    assert (truth[probe != 0, 0] > 0).any()  # the cap is real on this data (red appears in other probes)
    assert torch.all(concept_auc_ceiling(truth) == 1.0)


def test_probe_negatives_never_contain_the_concept(dm) -> None:
    """The in-loop labels (``ConceptWhiteningModule._concept_targets``) against the rendered pixels: a
    negative has no pixel of the concept (``renderer.concept_masks``), a positive has some."""
    r = dm.renderer
    cols = [r.concept_index(c) for c in CONCEPTS]
    stub = SimpleNamespace(device=torch.device("cpu"), concept_names=CONCEPTS)
    for j, (concept, ds) in enumerate(dm.concept_datasets("test").items()):
        batch = {"concepts": torch.stack([ds[i]["concepts"] for i in range(20)])}
        targets = ConceptWhiteningModule._concept_targets(stub, batch, j, 20, cols)
        for i in range(20):
            masks = r.concept_masks(r.render_probe(concept, "test", i))
            for k, col in enumerate(cols):
                assert bool(targets[i, k]) == bool(masks[col].any()), (concept, i, CONCEPTS[k])
    # without concept vectors (image folders): one-vs-all by probe set, the reference protocol
    one_vs_all = ConceptWhiteningModule._concept_targets(stub, {}, 1, 4, cols)
    assert one_vs_all.tolist() == [[0, 1, 0]] * 4


# -- oracle = 1, random directions = 0 ---------------------------------------------------------------
def _planted(n: int = 400, c: int = 128, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Whitened maps ``(N, C, 6, 6)`` whose axis ``k`` lights up in one cell where concept ``k`` is shown."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.rand(n, len(CONCEPTS), generator=g) < 0.4
    z = torch.randn(n, c, 6, 6, generator=g, dtype=torch.float64)
    for k in range(len(CONCEPTS)):
        z[truth[:, k], k, 2, 3] += 4.0
    return z, truth


def test_oracle_scores_one_and_random_directions_about_zero() -> None:
    z, truth = _planted()
    k = len(CONCEPTS)
    chance = random_direction_aucs(
        project_and_pool(z, random_directions(128, 16, seed=0), "pool_max"), truth, k
    )
    ceiling = concept_auc_ceiling(truth)
    oracle = [binary_auc(truth[:, j].double(), truth[:, j]) for j in range(k)]
    aligned = concept_aucs(pool_axes(z[:, :k], "pool_max"), truth, k, folds=0)[0]
    other = random_direction_aucs(
        project_and_pool(z, random_directions(128, 16, seed=1), "pool_max"), truth, k
    )
    for j in range(k):
        assert Score("cw", "concept_auc", oracle[j], float(ceiling[j]), float(chance[j])).normalised == 1.0
        assert Score("cw", "concept_auc", float(aligned[j]), 1.0, float(chance[j])).normalised > 0.8
        # another draw of random directions is no better than the baseline
        assert abs(Score("cw", "concept_auc", float(other[j]), 1.0, float(chance[j])).normalised) < 0.15
    # the baseline itself against a brute-force AUC of each direction
    u = random_directions(128, 4, seed=3)
    direct = [
        [
            binary_auc(
                pool_axes((u[d, :, None, None] * z).sum(1, keepdim=True), "pool_max")[:, 0], truth[:, j]
            )
            for d in range(4)
        ]
        for j in range(k)
    ]
    got = random_direction_aucs(project_and_pool(z, u, "pool_max"), truth, k)
    assert torch.allclose(got, torch.tensor(direct, dtype=torch.float64).mean(1), atol=1e-6)


def test_random_directions_are_unit_antithetic_and_seeded() -> None:
    u = random_directions(32, 16, seed=7)
    assert u.shape == (16, 32) and torch.allclose(u.norm(dim=1), torch.ones(16, dtype=torch.float64))
    assert torch.equal(u[8:], -u[:8]) and torch.equal(u, random_directions(32, 16, seed=7))
    # mean pooling is odd in the direction: each antithetic pair's AUCs sum to 1, so the baseline is 1/2
    z, truth = _planted(200, 32)
    assert torch.allclose(
        random_direction_aucs(project_and_pool(z, u, "mean"), truth, 3),
        torch.full((3,), 0.5, dtype=torch.float64),
        atol=1e-6,
    )


# -- intervention metrics ----------------------------------------------------------------------------
def test_intervention_metrics_by_hand() -> None:
    before = torch.tensor([0.0, 1.0, 2.0, 3.0])
    after = torch.tensor([1.0, 0.0, 2.0, 5.0])
    sign = torch.tensor([1, -1, 1, -1])
    # right, right, tie (1/2), wrong
    assert intervention_accuracy(before, after, sign) == pytest.approx(2.5 / 4)
    assert intervention_effect(before, after, sign, scale=2.0) == pytest.approx((1 + 1 + 0 - 2) / 4 / 2)
    # a dead (constant) axis did not move: effect 0, accuracy 1/2 (all ties)
    assert intervention_effect(before * 0, after * 0, sign, scale=0.0) == 0.0
    assert intervention_accuracy(before * 0, after * 0, sign) == 0.5
    # a score that ignores the edits: about one half, effect about 0
    g = torch.Generator().manual_seed(0)
    noise_b, noise_a = torch.rand(4000, generator=g), torch.rand(4000, generator=g)
    signs = torch.where(torch.rand(4000, generator=g) < 0.5, 1, -1)
    assert abs(intervention_accuracy(noise_b, noise_a, signs) - 0.5) < 0.03
    assert abs(intervention_effect(noise_b, noise_a, signs, float(noise_b.std()))) < 0.1


def test_concept_edits_flip_the_ground_truth_and_change_one_attribute(dm) -> None:
    """The oracle's intervention accuracy is 1: every edit adds (or removes) the concept in the rendered
    concept vector and in the pixels; an edit changes one attribute of each edited part."""
    ds = dm.ground_truth_dataset(40)
    r = ds.renderer
    for concept in CONCEPTS:
        col = r.concept_index(concept)
        carriers = concept_carriers(r, col)
        before, after, signs = [], [], []
        for i in range(len(ds)):
            spec = r.draw(ds.split, i)
            edit = concept_edit(carriers, spec.attrs, spec.present, np.random.default_rng([0, col, i]))
            assert edit is not None
            replace, sign = edit
            sample = ds.render(i, replace_part=replace)
            for slot, change in replace.items():
                assert len(change) == 1 and (sample.spec.attrs[slot] != spec.attrs[slot]).sum() == 1
            assert bool(r.concept_masks(sample)[col].any()) == (sign > 0)
            before.append(float(ds[i]["concepts"][col]))
            after.append(float(sample.concepts[col]))
            signs.append(sign)
        b, a, s = torch.tensor(before), torch.tensor(after), torch.tensor(signs)
        assert intervention_accuracy(b, a, s) == 1.0
        assert torch.equal(s > 0, b == 0)  # added where absent, removed where present
        p = float(b.mean())
        assert intervention_effect(b, a, s, float(b.std(unbiased=False))) == pytest.approx(
            1 / math.sqrt(p * (1 - p))
        )


# -- pool_max covers the whole map ---------------------------------------------------------------------
@pytest.mark.parametrize("h,w", [(8, 8), (7, 8), (9, 9)])
def test_pool_max_covers_the_last_row_and_column(h: int, w: int) -> None:
    z = torch.zeros(1, 2, h, w, dtype=torch.float64)
    z[0, 0, h - 1, w - 1] = 9.0  # a peak in the last row and column
    blocks = math.ceil(h / 3) * math.ceil(w / 3)
    assert float(pool_axes(z, "pool_max")[0, 0]) == pytest.approx(9.0 / blocks)
    # brute force: pad with -inf to a multiple of 3, block max, mean over blocks
    g = torch.Generator().manual_seed(h * w)
    z = torch.randn(3, 4, h, w, generator=g, dtype=torch.float64)
    padded = F.pad(z, (0, -w % 3, 0, -h % 3), value=float("-inf"))
    expect = padded.unfold(2, 3, 3).unfold(3, 3, 3).amax((-1, -2)).mean((2, 3))
    assert torch.allclose(pool_axes(z, "pool_max"), expect)


def test_pool_max_alignment_gradient_reads_the_last_row() -> None:
    """The concept gradient (sum_G) sees a peak in the last row: autograd of the pooled axis agrees."""
    c, j = 4, 1
    x = torch.randn(2, c, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x[:, :, 7, :] += 5.0  # the largest responses lie in row 7, outside the reference code's 6x6 crop
    cw = ConceptWhitening2d(
        c, momentum=1.0, activation_mode="pool_max", dtype=torch.float64, rot_dtype="float64"
    )
    cw.eval()
    with cw.concept_mode(j):
        cw(x)
    r = torch.eye(c, dtype=torch.float64, requires_grad=True)
    pool_axes(torch.einsum("dc,bchw->bdhw", r, x), "pool_max")[:, j].mean().backward()
    assert torch.allclose(cw.sum_G[j], -r.grad[j], atol=1e-10)
    cropped = F.max_pool2d(x[:, j : j + 1, :6, :6], 3, 3).mean()
    assert float(pool_axes(x, "pool_max")[:, j].mean()) > float(cropped)


# -- the scorers ----------------------------------------------------------------------------------------
def _check_rows(rows: list[Score], metrics: set[str]) -> dict[str, Score]:
    by = {r.metric: r for r in rows}
    assert metrics <= set(by)
    for r in rows:
        assert all(math.isfinite(v) for v in (r.raw, r.ceiling, r.random, r.normalised)), r
    return by


def test_score_on_the_shipped_bundle() -> None:
    from interpzoo.models.bundle import load_pretrained

    net = load_pretrained("cw_resnet18s.partshapes_s0").eval()
    rows = score(net, PartShapesDataModule(), num_samples=100, seed=0)
    names = {"concept_auc", "concept_intervention_accuracy", "concept_intervention_effect"}
    by = _check_rows(rows, names | {f"{m}/{c}" for m in names for c in net.concepts})
    for m in names:
        assert by[m].normalised > 0, by[m]
    assert by["concept_auc"].ceiling == 1.0 and by["concept_intervention_accuracy"].ceiling == 1.0
    # the effect's ceiling is the indicator's 1 / sqrt(p (1 - p)) for the concept's prevalence p
    ds = PartShapesDataModule().ground_truth_dataset(100)
    for c in net.concepts:
        p = float(np.mean([float(ds[i]["concepts"][ds.renderer.concept_index(c)]) for i in range(len(ds))]))
        assert by[f"concept_intervention_effect/{c}"].ceiling == pytest.approx(1 / math.sqrt(p * (1 - p)))
    # the mean row is the mean of the concept rows
    assert by["concept_auc"].raw == pytest.approx(np.mean([by[f"concept_auc/{c}"].raw for c in net.concepts]))


def test_random_directions_under_mean_pooling_score_one_half_by_construction(dm) -> None:
    """Untrained net, mean pooling: antithetic directions give random AUC and intervention accuracy of
    exactly 1/2 and effect 0 (each pair's values cancel), the ceilings 1."""
    torch.manual_seed(0)
    net = create_model("cw_resnet18s", num_classes=10, concepts=CONCEPTS, activation_mode="mean").eval()
    rows = score(net, dm, num_samples=30, seed=0)
    by = _check_rows(rows, {"concept_auc", "concept_intervention_accuracy", "concept_intervention_effect"})
    for c in CONCEPTS:
        assert by[f"concept_auc/{c}"].random == pytest.approx(0.5, abs=1e-6)
        assert by[f"concept_intervention_accuracy/{c}"].random == pytest.approx(0.5, abs=1e-6)
        assert by[f"concept_intervention_effect/{c}"].random == pytest.approx(0.0, abs=1e-6)
        assert by[f"concept_auc/{c}"].ceiling == 1.0


def test_score_needs_ground_truth() -> None:
    net = create_model("cw_resnet18s", num_classes=10, concepts=CONCEPTS).eval()
    with pytest.raises(NoGroundTruth, match="no ground-truth"):
        score(net, SimpleNamespace(), num_samples=10)


def test_linear_probe_matches_sklearn(dm) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from interpzoo.models.concept_whitening import forward_until

    net = create_model("baseline_resnet18s", num_classes=10).eval()
    rows = score_linear_probe(net, dm, CONCEPTS, num_samples=60, seed=0)
    by = _check_rows(rows, {"concept_auc"} | {f"concept_auc/{c}" for c in CONCEPTS})
    assert {r.method for r in rows} == {"linear_probe_cav"} and by["concept_auc"].ceiling == 1.0
    # independently: features of layer3.0.bn1, standardised logistic regression, sklearn's AUC
    cols = [dm.renderer.concept_index(c) for c in CONCEPTS]
    feats = {}
    for split in ("train", "test"):
        items = [ds[i] for ds in dm.concept_datasets(split).values() for i in range(len(ds))]
        x = torch.stack([it["image"] for it in items])
        with torch.no_grad():
            f = forward_until(net, "backbone.body.layer3.0.bn1", x).mean((2, 3)).double().numpy()
        feats[split] = (f, torch.stack([it["concepts"][cols] for it in items]).numpy() > 0.5)
    scaler = StandardScaler().fit(feats["train"][0])
    for j, c in enumerate(CONCEPTS):
        probe = LogisticRegression(max_iter=2000, random_state=0).fit(
            scaler.transform(feats["train"][0]), feats["train"][1][:, j]
        )
        want = roc_auc_score(
            feats["test"][1][:, j], probe.decision_function(scaler.transform(feats["test"][0]))
        )
        # float32 features in batches of another size and an iterative solver: a few of the ~3000
        # positive/negative pairs may swap order (one pair moves the AUC by ~3e-4)
        assert by[f"concept_auc/{c}"].raw == pytest.approx(want, abs=2e-3)
