"""Every logged metric says what it is; the in-loop scores carry their oracle ceiling and random baseline.

* :mod:`interpzoo.metrics.catalog` classifies names (task, scored, descriptive, references) and the run
  writes ``metrics_kinds.json`` and folds ceiling/random/norm into one row of its summary;
* ProtoPNet's class purity and prune fraction: the label oracle's ceiling is known by hand
  (``min(n_class, k) / k``), random prototypes score about the class frequency;
* SENN's faithfulness: the oracle (relevance = the measured effect) scores 1, the random ordering of the
  model's own relevances about 0;
* a ProtoPNet and a SENN run log the references in-loop, and every metric of their ``metrics.json`` is
  classified (no ``unclassified``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interpzoo.metrics.calibration import normalised_score
from interpzoo.metrics.catalog import describe, kind_of, summary_rows
from interpzoo.metrics.protopnet import PrototypeClassPurity
from interpzoo.metrics.senn import (
    concept_faithfulness_references,
    concept_faithfulness_scores,
    concept_intervention_deltas,
    faithfulness_references,
)
from interpzoo.run import train
from tests.conftest import TINY_DATA


# -- the catalog ----------------------------------------------------------------------------------
def test_kinds_of_names() -> None:
    assert kind_of("test/acc")[0] == "task"
    assert kind_of("val/loss_cluster")[0] == "task"
    assert kind_of("test/prototype_consistency")[0] == "scored"
    assert kind_of("test/gt/part_iou")[0] == "scored"
    assert kind_of("test/concept_auc/has_red")[0] == "scored"
    assert kind_of("test/prototype_consistency_ceiling")[0] == "reference"
    assert kind_of("test/faithfulness_norm")[0] == "reference"
    assert kind_of("test/explanation_size")[0] == "descriptive"
    assert kind_of("test/code_sparsity/stage1")[0] == "descriptive"
    assert kind_of("test/concept_auc_cav/has_red")[0] == "baseline"
    assert kind_of("test/made_up_metric")[0] == "unclassified"


def test_describe_says_when_a_score_has_no_ceiling() -> None:
    with_gt = {"test/faithfulness": 0.4, "test/faithfulness_ceiling": 1.0, "test/faithfulness_random": 0.0}
    info = describe(with_gt)
    assert info["test/faithfulness"]["read"].startswith("normalised")
    # the same score on real data (no ceiling logged) is flagged as not comparable
    info = describe({"test/prototype_class_purity": 0.8, "test/global_size": 20.0})
    assert "no ceiling" in info["test/prototype_class_purity"]["read"]
    assert info["test/global_size"]["kind"] == "descriptive"
    assert "no ceiling" in info["test/global_size"]["read"]


def test_summary_folds_references_into_one_row() -> None:
    metrics = {
        "test/acc": 0.9,
        "test/faithfulness": 0.5,
        "test/faithfulness_ceiling": 1.0,
        "test/faithfulness_random": 0.1,
        "test/faithfulness_norm": normalised_score(0.5, 0.1, 1.0),
        "test/explanation_size": 3.0,
    }
    rows = {r[0]: r for r in summary_rows(metrics)}
    assert set(rows) == {"test/acc", "test/faithfulness", "test/explanation_size"}
    assert rows["test/faithfulness"][1:5] == ("0.5000", "1.0000", "0.1000", f"{(0.4 / 0.9):.4f}")
    assert rows["test/explanation_size"][2:] == ("-", "-", "-", "descriptive")


# -- ProtoPNet class purity: label oracle and random prototypes -----------------------------------
def _purity(scores: torch.Tensor, labels: torch.Tensor, classes: list[int], k: int) -> dict[str, float]:
    m = PrototypeClassPurity(classes, k=k)
    m.update(-scores, labels)  # the metric ranks images by -min_distance
    return {key: float(v) for key, v in m.compute().items()}


def test_class_purity_label_oracle_ceiling_is_known_by_hand() -> None:
    classes = [0, 0, 1, 2]
    labels = torch.tensor([0] * 10 + [1] * 7 + [2] * 2)  # class 2 has fewer images than k
    oracle = (labels.view(-1, 1) == torch.tensor(classes).view(1, -1)).float()
    got = _purity(oracle, labels, classes, k=6)
    # prototypes of classes 0, 0, 1 find 6 own-class images; the class-2 one finds only 2 of 6
    assert got["mean"] == pytest.approx((1 + 1 + 1 + 2 / 6) / 4)
    # ProtoPNet's pruning rule (fewer than 3 own-class neighbours of 6) removes only the class-2 prototype
    assert got["prune_fraction"] == pytest.approx(1 / 4)


def test_class_purity_of_random_prototypes_is_the_class_frequency() -> None:
    g = torch.Generator().manual_seed(0)
    classes = list(range(4)) * 50
    labels = torch.randint(0, 4, (400,), generator=g)
    scores = torch.rand(400, len(classes), generator=g)  # unrelated to the labels
    got = _purity(scores, labels, classes, k=6)
    assert got["mean"] == pytest.approx(0.25, abs=0.04)
    oracle = (labels.view(-1, 1) == torch.tensor(classes).view(1, -1)).float()
    assert _purity(oracle, labels, classes, k=6)["mean"] == 1.0


# -- SENN faithfulness references -----------------------------------------------------------------
def test_faithfulness_oracle_is_one_and_random_about_zero() -> None:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2000, 6, generator=g)
    theta = torch.randn(2000, 6, 3, generator=g)
    refs = concept_faithfulness_references(h, theta, seed=3)
    # the model's score is the existing faithfulness, unchanged
    torch.testing.assert_close(refs[""], concept_faithfulness_scores(h, theta), equal_nan=True)
    ok = ~torch.isnan(refs["_ceiling"])
    assert ok.float().mean() > 0.99
    torch.testing.assert_close(refs["_ceiling"][ok], torch.ones(int(ok.sum()), dtype=refs["_ceiling"].dtype))
    assert abs(float(refs["_random"].nanmean())) < 0.03
    # the oracle's relevance is minus the measured effect: an independent recomputation
    delta, pred, _ = concept_intervention_deltas(h, theta)
    assert torch.equal(refs["_ceiling"].isnan(), (delta.double().std(1) == 0))
    assert pred.shape == (2000,)


def test_faithfulness_random_baseline_uses_the_models_own_values() -> None:
    rel = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    delta = -rel.clone()  # a perfect explanation: the model scores 1 as well
    refs = faithfulness_references(rel, delta, seed=0)
    assert float(refs[""]) == pytest.approx(1.0)
    # the random baseline is a permutation of the same values
    perm_scores = [float(faithfulness_references(rel, delta, seed=s)["_random"]) for s in range(200)]
    assert min(perm_scores) < 0 < max(perm_scores)
    assert sum(perm_scores) / len(perm_scores) == pytest.approx(0.0, abs=0.1)


# -- in-loop references in real runs --------------------------------------------------------------
def _check_run(tmp_path: Path, metrics: dict[str, float], scored: list[str]) -> None:
    kinds = json.loads((tmp_path / "metrics_kinds.json").read_text())
    assert set(kinds) == set(metrics)
    unknown = sorted(k for k, v in kinds.items() if v["kind"] == "unclassified")
    assert not unknown, f"metrics missing from interpzoo.metrics.catalog: {unknown}"
    for name in scored:
        for stage in ("val", "test"):
            key = f"{stage}/{name}"
            ceiling, rnd = metrics[f"{key}_ceiling"], metrics[f"{key}_random"]
            if f"{key}_norm" in metrics:
                assert metrics[f"{key}_norm"] == pytest.approx(normalised_score(metrics[key], rnd, ceiling))
            assert kinds[key]["read"].startswith("normalised")


def test_protopnet_run_logs_class_purity_references(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg([*TINY_DATA, "trainer.max_epochs=1", "report=false", "export=false"])
    metrics = train(cfg)
    _check_run(tmp_path, metrics, ["prototype_class_purity", "prototype_prune_fraction"])
    for stage in ("val", "test"):
        # 64 images of 10 classes: every class has at least 1, the oracle finds min(n_class, 6) of 6
        assert 0.5 < metrics[f"{stage}/prototype_class_purity_ceiling"] <= 1.0
        assert metrics[f"{stage}/prototype_class_purity_random"] < 0.5
        assert (
            metrics[f"{stage}/prototype_prune_fraction_ceiling"]
            < metrics[f"{stage}/prototype_prune_fraction_random"]
        )


def test_senn_run_logs_faithfulness_references(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        [
            "model=senn",
            "data=digits",
            "trainer.max_epochs=1",
            "report=false",
            "export=false",
            "model.lipschitz.points=0",
        ]
    )
    metrics = train(cfg)
    _check_run(tmp_path, metrics, ["faithfulness", "faithfulness_median"])
    for stage in ("val", "test"):
        assert metrics[f"{stage}/faithfulness_ceiling"] == pytest.approx(1.0)
        assert abs(metrics[f"{stage}/faithfulness_random"]) < 0.2


def test_every_metric_of_the_shipped_bundles_is_classified() -> None:
    from interpzoo.models.registry import PRETRAINED_DIR, list_pretrained

    names = set()
    for bundle in list_pretrained():
        names |= set(json.loads((PRETRAINED_DIR / bundle / "config.json").read_text())["metrics"])
    assert len(names) > 50
    unknown = sorted(n for n in names if kind_of(n)[0] == "unclassified")
    assert not unknown, f"metrics missing from interpzoo.metrics.catalog: {unknown}"


def test_icnn_run_logs_location_instability_references(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        [
            *TINY_DATA,
            "model=icnn",
            "trainer.max_epochs=1",
            "report=false",
            "export=false",
            "~callbacks.scorecard",
        ]
    )
    metrics = train(cfg)
    _check_run(tmp_path, metrics, ["location_instability", "part_iou"])
    for stage in ("val", "test"):
        # lower is better: the part-mask oracle is far more stable than random directions of the layer
        assert (
            metrics[f"{stage}/location_instability_ceiling"] < metrics[f"{stage}/location_instability_random"]
        )
        assert metrics[f"{stage}/location_instability_ceiling"] < 0.05


def test_faithfulness_random_baseline_does_not_depend_on_sharding() -> None:
    g = torch.Generator().manual_seed(2)
    rel, delta = torch.randn(10, 5, generator=g), torch.randn(10, 5, generator=g)
    index = torch.arange(100, 110)
    whole = faithfulness_references(rel, delta, seed=0, index=index)["_random"]
    # two "ranks" holding the even and the odd samples, at other batch positions
    even = faithfulness_references(rel[::2], delta[::2], seed=0, index=index[::2])["_random"]
    odd = faithfulness_references(rel[1::2], delta[1::2], seed=0, index=index[1::2])["_random"]
    torch.testing.assert_close(whole[::2], even)
    torch.testing.assert_close(whole[1::2], odd)
    # and the orderings differ between samples
    assert (
        len({tuple(r.tolist()) for r in faithfulness_references(rel, delta, 0, index)["_random"][:, None]})
        > 3
    )
