"""CBM scorecard (issue 15): an oracle CBM that reads the ground truth scores 1 normalised, random concept
scores score about 0, and the AUC rows equal a brute-force pairwise AUC of the network's own probabilities."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.models import create_model
from interpzoo.models.cbm import CBMNet, CBMOutput
from interpzoo.scorecard import NoGroundTruth, evaluate
from interpzoo.scorecard import cbm as cbm_card
from interpzoo.scorecard.concept_edits import concept_carriers, concept_edit

N = 80  # held-out images: enough edits per concept for a stable share, small enough for one core
SMALL = {"name": "resnet18s", "width": 8}
CONCEPTS = ["has_red", "has_striped", "has_circle", "head_colour_red", "has_blue"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dm() -> PartShapesDataModule:
    return PartShapesDataModule()


def _key(image: torch.Tensor) -> bytes:
    return (image.float() * 255).round().to(torch.uint8).numpy().tobytes()


class TableCBM(CBMNet):
    """A CBM whose concept logits come from a table ``image -> scores`` (not from its trunk)."""

    def __init__(self, table: dict[bytes, torch.Tensor], **kwargs) -> None:
        super().__init__(**kwargs)
        self.table = table

    def forward(self, x: torch.Tensor) -> CBMOutput:
        logits = torch.stack([self.table[_key(img)] for img in x.cpu()]).to(x)
        return CBMOutput(logits=self.predictor(torch.sigmoid(logits)), features=x, concept_logits=logits)


def _all_images(dm: PartShapesDataModule) -> list[tuple[torch.Tensor, np.ndarray]]:
    """Every image the scorer can show (the held-out split and every concept edit of it), with its true
    concept vector, rendered here independently of the scorer's own edit code."""
    from interpzoo.datamodules.partshapes import image_to_tensor

    ds = dm.ground_truth_dataset(N, "test")
    out = [(ds[i]["image"], ds[i]["concepts"].numpy()) for i in range(len(ds))]
    names = list(dm.renderer.concept_names)
    for c in cbm_card.SCORECARD_CONCEPTS:
        col = names.index(c)
        carriers = concept_carriers(ds.renderer, col)
        for i in range(len(ds)):
            spec = ds.renderer.draw(ds.split, i)
            for seed in (0,):  # the seed the tests score with
                edit = concept_edit(carriers, spec.attrs, spec.present, np.random.default_rng([seed, col, i]))
                if edit is not None:
                    smp = ds.render(i, replace_part=edit[0])
                    out.append((image_to_tensor(smp.image, False), np.asarray(smp.concepts)))
    return out


@pytest.fixture(scope="module")
def images(dm: PartShapesDataModule) -> list[tuple[torch.Tensor, np.ndarray]]:
    return _all_images(dm)


def _table_net(dm, images, scores) -> TableCBM:
    cols = [list(dm.renderer.concept_names).index(c) for c in CONCEPTS]
    table = {
        _key(img): scores(torch.from_numpy(np.asarray(truth, dtype=np.float64)[cols]))
        for img, truth in images
    }
    torch.manual_seed(0)
    return TableCBM(table, num_classes=dm.renderer.num_classes, backbone=SMALL, concepts=CONCEPTS).eval()


def test_oracle_scores_one(dm, images) -> None:
    """Concept logits = +-5 from the true concepts: every row is at its ceiling (normalised 1)."""
    net = _table_net(dm, images, lambda t: (2 * t - 1) * 5.0)
    rows = cbm_card.score(net, dm, num_samples=N, seed=0)
    by = {r.metric: r for r in rows}
    for c in cbm_card.SCORECARD_CONCEPTS:
        for m in ("concept_auc", "concept_intervention_accuracy"):
            r = by[f"{m}/{c}"]
            assert r.raw == pytest.approx(1.0) and r.ceiling == pytest.approx(1.0), r
            assert r.normalised == pytest.approx(1.0), r
        eff = by[f"concept_intervention_effect/{c}"]
        # the logit moves by 10 and has std 5 * 2 sqrt(p(1-p)): the indicator's 1/sqrt(p(1-p)) exactly
        assert eff.raw == pytest.approx(eff.ceiling, rel=1e-9) and eff.normalised == pytest.approx(1.0)
    assert by["concept_auc"].normalised == pytest.approx(1.0)
    assert "5 concepts" in by["concept_auc"].note


def test_random_scores_about_zero(dm, images) -> None:
    """Concept logits that ignore the image (seeded noise): normalised about 0, and the baseline near 0.5."""
    g = torch.Generator().manual_seed(1)
    net = _table_net(dm, images, lambda t: torch.randn(t.shape, generator=g, dtype=torch.float64))
    by = {r.metric: r for r in cbm_card.score(net, dm, num_samples=N, seed=0)}
    for m in ("concept_auc", "concept_intervention_accuracy"):
        assert by[m].random == pytest.approx(0.5, abs=0.05), by[m]
        assert abs(by[m].normalised) < 0.25, by[m]
    assert abs(by["concept_intervention_effect"].random) < 0.15


def test_auc_equals_brute_force_and_evaluate_dispatches(dm) -> None:
    """A real (untrained) CBM through ``evaluate``: each AUC row equals the pairwise Mann-Whitney AUC of the
    network's own probabilities on the held-out images, and the accuracy row comes first."""
    torch.manual_seed(0)
    net = create_model(
        "cbm_resnet18s", num_classes=dm.renderer.num_classes, backbone=SMALL, concepts=CONCEPTS
    ).eval()
    rows = evaluate(net, dm, num_samples=N, seed=0)
    assert rows[0].metric == "gt_accuracy"
    by = {r.metric: r for r in rows}
    ds = dm.ground_truth_dataset(N, "test")
    x = torch.stack([ds[i]["image"] for i in range(len(ds))])
    truth = torch.stack([ds[i]["concepts"] for i in range(len(ds))])
    with torch.no_grad():
        p = torch.sigmoid(net(x).concept_logits.double())
    aucs = []
    for j, c in enumerate(CONCEPTS):
        t = truth[:, list(dm.renderer.concept_names).index(c)] > 0.5
        pos, neg = p[t, j], p[~t, j]
        if len(pos) == 0 or len(neg) == 0:
            aucs.append(float("nan"))
            continue
        diff = pos[:, None] - neg[None, :]
        aucs.append(float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean()))
        if c in cbm_card.SCORECARD_CONCEPTS:
            assert by[f"concept_auc/{c}"].raw == pytest.approx(aucs[-1], abs=1e-6)
    assert by["concept_auc"].raw == pytest.approx(float(np.nanmean(aucs)), abs=1e-6)
    assert not math.isnan(by["concept_intervention_accuracy"].raw)


def test_bad_inputs(dm) -> None:
    net = create_model("cbm_resnet18s", num_classes=3, backbone=SMALL, concepts=["not_a_concept"])
    with pytest.raises(NoGroundTruth, match="not_a_concept"):
        cbm_card.score(net, dm, num_samples=10)
    net = create_model("cbm_resnet18s", num_classes=3, backbone=SMALL, concepts=["has_red"])
    with pytest.raises(ValueError, match="has_blue.*not in this CBM"):
        cbm_card.score(net, dm, num_samples=10, concepts=["has_blue"])
