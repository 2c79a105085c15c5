"""Concept bottleneck report figures (interpzoo.reports.cbm) and CBMNet.explain (Koh et al., ICML 2020)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from interpzoo.models import create_model
from interpzoo.models.cbm import CBMNet
from interpzoo.reports import cbm as report
from tests.conftest import ROOT, TINY_DATA

SMALL = {"name": "resnet18s", "width": 8}
CONCEPTS = ["wing_is_red", "head_is_round", "has_stripes", "tail_long", "body_checked"]
CLASSES = ["red bird", "striped fish", "round cat"]
PNG = b"\x89PNG"


def _net(bottleneck: str = "sigmoid", hidden: tuple[int, ...] = ()) -> CBMNet:
    torch.manual_seed(0)
    return create_model(
        "cbm_resnet18s",
        num_classes=3,
        backbone=SMALL,
        concepts=CONCEPTS,
        bottleneck=bottleneck,
        predictor_hidden=list(hidden),
    ).eval()


@pytest.fixture
def captured(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The figures the report module saves, by file name (drawn, then written as usual)."""
    figs: dict[str, Any] = {}
    real = report.save_figure

    def keep(fig: Any, path: Path, **kwargs: Any) -> Path:
        figs[Path(path).name] = fig
        return real(fig, path, **kwargs)

    monkeypatch.setattr(report, "save_figure", keep)
    return figs


def _ticks(ax: Any) -> list[str]:
    return [t.get_text() for t in ax.get_yticklabels()]


# -- explain --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bottleneck", ["sigmoid", "logit"])
def test_contributions_plus_bias_are_the_predicted_logit(bottleneck: str) -> None:
    net = _net(bottleneck)
    if bottleneck == "logit":
        net.set_intervention_values(torch.randn(50, len(CONCEPTS)))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ex = net.explain(x)
    with torch.no_grad():
        out = net(x)
    # independent: f's weights times the bottleneck f reads, from the module itself
    w, b = net.predictor.net.weight, net.predictor.net.bias
    pred = out.logits.argmax(1)
    torch.testing.assert_close(ex.contributions, w[pred] * out.concepts)
    torch.testing.assert_close(ex.bias, b[pred])
    torch.testing.assert_close(ex.contributions.sum(1) + ex.bias, out.logits.gather(1, pred[:, None])[:, 0])
    torch.testing.assert_close(ex.logits, out.logits)
    assert torch.equal(ex.prediction, pred)
    # the plot's title states the same decomposition
    fig = ex.plot(index=1, class_names=CLASSES, top_k=3)
    title = fig.axes[0].get_title()
    assert CLASSES[int(pred[1])] in title and f"logit {float(out.logits[1, pred[1]]):.2f}" in title
    assert all(t.split(" (p=")[0] in CONCEPTS for t in _ticks(fig.axes[0]))


def test_mlp_predictor_has_no_contributions() -> None:
    net = _net(hidden=(4,))
    ex = net.explain(torch.rand(2, 3, 32, 32))
    assert ex.contributions is None and ex.bias is None
    assert "probabilities" in ex.plot().axes[0].get_title()


# -- figures --------------------------------------------------------------------------------------
def test_intervention_figure_draws_the_curves_and_reference_lines(
    tmp_path: Path, captured: dict[str, Any]
) -> None:
    curves = {
        "counts": [0.0, 1.0, 2.0, 3.0],
        "random": [0.5, 0.6, 0.7, 0.9],
        "uncertainty": [0.5, 0.8, 0.88, 0.9],
    }
    path = report.intervention_figure(curves, tmp_path / "iv.png")
    assert path.read_bytes()[:4] == PNG
    ax = captured["iv.png"].axes[0]
    lines = {ln.get_label(): ln for ln in ax.get_lines()}
    assert list(lines["random order (mean of seeds)"].get_ydata()) == curves["random"]
    assert list(lines["uncertainty order"].get_ydata()) == curves["uncertainty"]
    # defaults: the dashed line is the last point (every concept true), the dotted one the first
    assert lines["true concepts (0.900)"].get_linestyle() == "--"
    assert lines["true concepts (0.900)"].get_ydata()[0] == pytest.approx(0.9)
    assert lines["no intervention (0.500)"].get_ydata()[0] == pytest.approx(0.5)
    assert "of 3" in ax.get_xlabel()
    with pytest.raises(ValueError, match="counts"):
        report.intervention_figure({"random": [0.1]}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="points"):
        report.intervention_figure({"counts": [0, 1], "random": [0.1]}, tmp_path / "bad.png")


def test_explanations_figure_uses_names_and_marks_wrong_concepts(
    tmp_path: Path, captured: dict[str, Any]
) -> None:
    net = _net()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ex = net.explain(x)
    p = ex.concept_probs
    # the truth: image 0 agrees with the rounded prediction except concept 2; image 1 disagrees on all
    truth = (p > 0.5).float()
    truth[0, 2] = 1 - truth[0, 2]
    truth[1] = 1 - truth[1]
    truth[1, 4] = float("nan")  # unknown: neither wrong nor given a true value
    labels = torch.tensor([2, 0])
    path = report.concept_explanations_figure(
        x, ex, tmp_path / "ex.png", true_concepts=truth, labels=labels, class_names=CLASSES, top_k=5
    )
    assert path.read_bytes()[:4] == PNG
    axes = captured["ex.png"].axes
    assert len(axes) == 6  # image, concepts, contributions per image
    for i in range(2):
        title = axes[3 * i].get_title()
        assert f"true {CLASSES[int(labels[i])]}" in title
        assert f"pred {CLASSES[int(ex.prediction[i])]}" in title
        ticks = _ticks(axes[3 * i + 1])
        assert len(ticks) == 5
        for t, lab in zip(ticks, axes[3 * i + 1].get_yticklabels()):
            name = t.removeprefix("x ").split(" (true")[0]
            j = CONCEPTS.index(name)
            is_wrong = not torch.isnan(truth[i, j]) and bool((p[i, j] > 0.5).float() != truth[i, j])
            assert t.startswith("x ") == is_wrong
            assert (lab.get_color() == "tab:red") == is_wrong
            assert ("(true" in t) == (not torch.isnan(truth[i, j]))
        # contributions: the bars are W[y, j] c_j of the listed concepts, largest |value| first
        bars = [r.get_width() for r in axes[3 * i + 2].patches]
        want = ex.contributions[i][[CONCEPTS.index(n) for n in _ticks(axes[3 * i + 2])]]
        torch.testing.assert_close(torch.tensor(bars, dtype=torch.float32), want.float())
        assert bars == sorted(bars, key=abs, reverse=True)
    assert sum(t.startswith("x ") for t in _ticks(axes[1])) == 1
    assert sum(t.startswith("x ") for t in _ticks(axes[4])) == 4


def test_explanations_figure_lists_wrong_concepts_beyond_the_top(
    tmp_path: Path, captured: dict[str, Any]
) -> None:
    net = _net()
    x = torch.rand(1, 3, 32, 32)
    ex = net.explain(x)
    truth = 1 - (ex.concept_probs > 0.5).float()  # every concept wrong
    report.concept_explanations_figure(x, ex, tmp_path / "ex.png", true_concepts=truth, top_k=2)
    ticks = _ticks(captured["ex.png"].axes[1])
    # the two largest |contributions|, then at most top_k = 2 of the other (all wrong) concepts, largest first
    listed = [CONCEPTS.index(t[2:].split(" (true")[0]) for t in ticks]
    assert len(ticks) == 4 and all(t.startswith("x ") for t in ticks)
    assert listed == ex.contributions[0].abs().argsort(descending=True)[:4].tolist()


def test_concept_auc_figure(tmp_path: Path, captured: dict[str, Any]) -> None:
    aucs = torch.tensor([0.99, 0.5, float("nan"), 0.8, 0.97], dtype=torch.float64)
    path = report.concept_auc_figure(aucs, CONCEPTS, tmp_path / "auc.png")
    assert path.read_bytes()[:4] == PNG
    ax = captured["auc.png"].axes[0]
    assert _ticks(ax) == CONCEPTS
    assert [r.get_width() for r in ax.patches] == pytest.approx([0.99, 0.5, 0.0, 0.8, 0.97])
    assert any("n/a" in t.get_text() for t in ax.texts)
    mean = (0.99 + 0.5 + 0.8 + 0.97) / 4
    assert any(ln.get_label() == f"mean {mean:.3f}" for ln in ax.get_lines())
    with pytest.raises(ValueError, match="concept names"):
        report.concept_auc_figure(aucs[:3], CONCEPTS, tmp_path / "bad.png")


def test_report_on_partshapes_matches_an_independent_pass(tmp_path: Path, captured: dict[str, Any]) -> None:
    """The whole report of an untrained module: files, names, and the curve's ends recomputed here."""
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
    from interpzoo.metrics.cbm import concept_aucs
    from interpzoo.models.lit_cbm import CBMModule
    from interpzoo.reports import write_report

    dm = PartShapesDataModule(n_train=32, n_val=32, n_test=64, batch_size=32, cache=False)
    dm.setup("test")
    names = ["has_red", "has_striped", "head_shape_circle", "wing_colour_blue"]
    torch.manual_seed(0)
    m = CBMModule(
        net={"name": "cbm", "backbone": SMALL},
        data_info=dm.data_info,
        concepts=names,
        intervention={"seeds": [0]},
    )
    paths = write_report(m, dm, tmp_path / "figures")  # no recorded curve: the report computes it
    assert sorted(p.name for p in paths) == sorted(
        ["confusion_matrix.png", "cbm_intervention.png", "cbm_explanations.png", "cbm_concept_auc.png"]
    )
    assert all(p.read_bytes()[:4] == PNG for p in paths)
    # independent pass: plain accuracy, accuracy of f on the true concepts, AUCs
    cols = [dm.data_info["concept_names"].index(n) for n in names]
    x = torch.stack([dm.test_set[i]["image"] for i in range(len(dm.test_set))])
    c = torch.stack([dm.test_set[i]["concepts"] for i in range(len(dm.test_set))])[:, cols]
    y = torch.tensor([int(dm.test_set[i]["label"]) for i in range(len(dm.test_set))])
    with torch.no_grad():
        out = m.net.eval()(x)
        plain = float((out.logits.argmax(1) == y).float().mean())
        true = float((m.net.predict_from_concepts(c).argmax(1) == y).float().mean())
    lines = {ln.get_label(): ln for ln in captured["cbm_intervention.png"].axes[0].get_lines()}
    assert lines[f"true concepts ({true:.3f})"].get_ydata()[0] == pytest.approx(true)
    assert lines[f"no intervention ({plain:.3f})"].get_ydata()[0] == pytest.approx(plain)
    for order in ("random order (mean of seeds)", "uncertainty order"):
        ys = lines[order].get_ydata()
        assert len(ys) == len(names) + 1
        assert ys[0] == pytest.approx(plain) and ys[-1] == pytest.approx(true)
    auc_ax = captured["cbm_concept_auc.png"].axes[0]
    assert _ticks(auc_ax) == names
    want = concept_aucs(torch.sigmoid(out.concept_logits), c)
    got = [r.get_width() for r in auc_ax.patches]
    assert got == pytest.approx([0.0 if torch.isnan(v) else float(v) for v in want])
    # class names, never indices: each image title names its classes by the renderer's display names
    display = dm.renderer.class_display_names
    titles = [captured["cbm_explanations.png"].axes[i].get_title() for i in range(0, 18, 3)]
    assert all("true c" in t and any(d[:10] in t for d in display) for t in titles)
    # a recorded test curve is used as it is
    m.intervention_curves["test"] = {"counts": [0.0, 1, 2, 3, 4], "random": [0.1, 0.2, 0.3, 0.4, 0.5]}
    report.cbm_report(m, dm, tmp_path / "again")
    rec = {ln.get_label(): ln for ln in captured["cbm_intervention.png"].axes[0].get_lines()}
    assert list(rec["random order (mean of seeds)"].get_ydata()) == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_train_py_writes_the_cbm_figures(tmp_path: Path) -> None:
    """`python train.py model=cbm` on tiny data writes the four report figures."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "model=cbm",
        *TINY_DATA,
        "trainer.max_epochs=2",
        "logger=[]",
        f"paths.log_dir={tmp_path}",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    figures = run_dir / "figures"
    want = {"confusion_matrix.png", "cbm_intervention.png", "cbm_explanations.png", "cbm_concept_auc.png"}
    assert {p.name for p in figures.iterdir()} == want
    assert all((figures / n).read_bytes()[:4] == PNG for n in want)
