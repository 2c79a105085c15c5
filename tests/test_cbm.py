"""Concept bottleneck models (Koh et al., ICML 2020): layers, network, training modes, metrics, CUB attributes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from interpzoo.layers.cbm import concept_loss, intervene, intervention_targets
from interpzoo.metrics.cbm import (
    average_ranks,
    concept_aucs,
    intervention_curve,
    intervention_ranks,
    probe_accuracy,
    soft_hard_accuracy,
)
from interpzoo.models import create_model
from interpzoo.models.cbm import CBMNet
from interpzoo.models.lit_cbm import CBMModule
from tests.conftest import ROOT

SMALL = {"name": "resnet18s", "width": 8}
NAMES = ["c0", "c1", "c2", "c3", "c4"]
INFO = {"num_classes": 3, "in_chans": 3, "mean": [0.5] * 3, "std": [0.25] * 3, "concept_names": NAMES}


def _net(bottleneck: str = "sigmoid") -> CBMNet:
    torch.manual_seed(0)
    return create_model(
        "cbm_resnet18s", num_classes=3, backbone=SMALL, concepts=NAMES, bottleneck=bottleneck
    ).eval()


def _module(**kwargs) -> CBMModule:
    torch.manual_seed(0)
    return CBMModule(net={"name": "cbm", "backbone": SMALL}, data_info=INFO, **kwargs)


def _batch(b: int = 6, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.rand(b, 3, 32, 32, generator=g),
        "label": torch.randint(0, 3, (b,), generator=g),
        "concepts": (torch.rand(b, len(NAMES), generator=g) > 0.5).float(),
    }


# -- metrics ---------------------------------------------------------------------------------------
def test_concept_auc_matches_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score

    g = torch.Generator().manual_seed(1)
    n, k = 300, 6
    targets = (torch.rand(n, k, generator=g) > 0.6).float()
    # rounded scores: many ties, which the rank formula must average
    scores = (targets * 0.7 + torch.rand(n, k, generator=g)).mul(4).round() / 4
    targets[:, 5] = 0.0  # no positive: undefined
    aucs = concept_aucs(scores, targets)
    for j in range(5):
        assert aucs[j].item() == pytest.approx(
            roc_auc_score(targets[:, j].numpy(), scores[:, j].numpy()), abs=1e-12
        )
    assert torch.isnan(aucs[5])
    assert 0.6 < float(aucs[:5].mean()) < 1.0  # informative scores, not a trivial 0.5 or 1
    x = torch.tensor([3.0, 1.0, 3.0, 2.0])
    assert average_ranks(x).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(ValueError, match=r"\(N, k\)"):
        concept_aucs(scores[:, 0], targets[:, 0])


def test_intervention_ranks_pick_n_concepts_per_image_in_the_right_order() -> None:
    probs = torch.tensor([[0.9, 0.45, 0.1, 0.6], [0.52, 0.99, 0.3, 0.0]])
    ranks = intervention_ranks(probs, "uncertainty")
    # closest to 0.5 first: row 0 -> 0.45 (1), 0.6 (3), 0.9 / 0.1 tie by index (0, 2); row 1 -> 0.52, 0.3, ...
    assert ranks.tolist() == [[2, 0, 3, 1], [0, 2, 1, 3]]
    r = intervention_ranks(torch.rand(50, 7), "random", torch.Generator().manual_seed(0))
    for n in range(8):
        assert ((r < n).sum(1) == n).all()  # exactly n concepts intervened on every image
    assert not torch.equal(r[0], r[1])  # a permutation per image, not one for the batch


def test_curve_endpoints_are_plain_and_true_concept_accuracy() -> None:
    g = torch.Generator().manual_seed(2)
    n, k, c = 400, 8, 4
    true = (torch.rand(n, k, generator=g) > 0.5).float()
    w = torch.randn(k, c, generator=g)
    labels = (true @ w).argmax(1)  # f on the true concepts is right by construction
    probs = (true + 0.9 * torch.randn(n, k, generator=g)).clamp(0, 1)  # noisy predicted concepts

    def predict(z: torch.Tensor) -> torch.Tensor:
        return z @ w

    plain = float((predict(probs).argmax(1) == labels).double().mean())
    for order in ("random", "uncertainty"):
        curve = intervention_curve(predict, probs, true, labels, order=order, probs=probs)
        assert curve.shape == (k + 1,)
        assert curve[0].item() == pytest.approx(plain)
        assert curve[-1].item() == pytest.approx(1.0)
        assert plain < 0.8  # the curve has somewhere to rise to
    some = intervention_curve(predict, probs, true, labels, counts=[0, 4, 8], seeds=[0, 1])
    assert some[0] < some[1] < some[2]
    with pytest.raises(ValueError, match="0..8"):
        intervention_curve(predict, probs, true, labels, counts=[9])


def test_leakage_measures() -> None:
    g = torch.Generator().manual_seed(3)
    true = (torch.rand(200, 3, generator=g) > 0.5).float()
    labels = true[:, 0].long()
    # a "soft" bottleneck that hides the label in tiny offsets of concept 1 (leakage): f reads the offset
    soft = true * 0.8 + 0.1
    soft[:, 1] += 0.05 * (labels.float() - 0.5)

    def leaky_f(z: torch.Tensor) -> torch.Tensor:
        # the offset from the nominal 0.1 / 0.9: the label on soft inputs, noise on rounded ones
        offset = z[:, 1:2] - (0.1 + 0.8 * z[:, 1:2].round())
        return torch.cat([-offset, offset], 1)

    acc_soft, acc_hard = soft_hard_accuracy(leaky_f, soft, (soft > 0.5).float(), labels)
    assert acc_soft == pytest.approx(1.0) and acc_hard < 0.7
    # probes: the true concepts hold the label in concept 0, so both probes reach 1 on separable data
    acc = probe_accuracy(true[:150], labels[:150], true[150:], labels[150:], 2)
    assert acc == pytest.approx(1.0)
    shuffled = labels[torch.randperm(200, generator=g)]
    assert probe_accuracy(true[:150], shuffled[:150], true[150:], shuffled[150:], 2) < 0.75


# -- layers and network ------------------------------------------------------------------------------
def test_intervention_changes_exactly_the_intervened_concepts() -> None:
    net = _net()
    batch = _batch()
    x, c = batch["image"], batch["concepts"]
    mask = torch.rand(c.shape, generator=torch.Generator().manual_seed(4)) > 0.5
    with torch.no_grad():
        plain = net(x)
        out = net.intervene(x, c, mask)
    assert torch.equal(out.concepts[mask], c[mask])  # intervened: the true 0/1 values
    assert torch.equal(out.concepts[~mask], plain.concepts[~mask])  # the others: bit for bit the prediction
    assert torch.equal(out.concept_logits, plain.concept_logits)
    torch.testing.assert_close(out.logits, net.predictor(out.concepts))
    assert not torch.allclose(out.logits, plain.logits)  # the prediction did change
    # a (k,) mask intervenes on the same concepts of every image; an empty one changes nothing
    one = torch.zeros(len(NAMES), dtype=torch.bool)
    one[2] = True
    with torch.no_grad():
        out1 = net.intervene(x, c, one)
        out0 = net.intervene(x, c, torch.zeros_like(one))
    assert torch.equal(out1.concepts[:, 2], c[:, 2])
    assert torch.equal(out1.concepts[:, [0, 1, 3, 4]], plain.concepts[:, [0, 1, 3, 4]])
    assert torch.equal(out0.logits, plain.logits)
    with pytest.raises(ValueError, match="mask"):
        intervene(plain.concepts, c, torch.ones(3, dtype=torch.bool))


def test_logit_bottleneck_intervenes_with_training_percentiles() -> None:
    net = _net("logit")
    x, c = _batch()["image"], _batch()["concepts"]
    with pytest.raises(ValueError, match="5th/95th percentiles"):
        net.intervene(x, c, torch.ones_like(c, dtype=torch.bool))
    train_logits = torch.randn(101, len(NAMES), generator=torch.Generator().manual_seed(5)) * 3
    net.set_intervention_values(train_logits)
    low = np.percentile(train_logits.numpy(), 5, axis=0)
    high = np.percentile(train_logits.numpy(), 95, axis=0)
    np.testing.assert_allclose(net.concept_low.numpy(), low, rtol=1e-5)
    np.testing.assert_allclose(net.concept_high.numpy(), high, rtol=1e-5)
    mask = torch.zeros_like(c, dtype=torch.bool)
    mask[:, :3] = True
    with torch.no_grad():
        plain, out = net(x), net.intervene(x, c, mask)
    expected = torch.where(c[:, :3] > 0.5, net.concept_high[:3], net.concept_low[:3])
    assert torch.equal(out.concepts[:, :3], expected)
    assert torch.equal(out.concepts[:, 3:], plain.concept_logits[:, 3:])  # f reads logits there
    assert torch.equal(intervention_targets(c, "sigmoid"), c)


def test_network_contract_and_explanation() -> None:
    net = _net()
    x = _batch(2)["image"]
    out = net(x)
    assert out.logits.shape == (2, 3) and out.concept_logits.shape == (2, 5)
    torch.testing.assert_close(out.concepts, torch.sigmoid(out.concept_logits))
    ex = net.explain(x)
    # a linear f: the contributions sum to the predicted logit minus its bias
    bias = net.predictor.net.bias[ex.prediction]
    torch.testing.assert_close(
        ex.contributions.sum(1), out.logits.gather(1, ex.prediction[:, None])[:, 0] - bias
    )
    assert ex.concept_names == NAMES
    with pytest.raises(ValueError, match="concepts=\\[names\\]"):
        create_model("cbm_resnet18s", num_classes=3, backbone=SMALL)
    with pytest.raises(ValueError, match="bottleneck"):
        create_model("cbm_resnet18s", num_classes=3, backbone=SMALL, n_concepts=2, bottleneck="tanh")


# -- training modes --------------------------------------------------------------------------------
def test_joint_loss_equals_hand_computation() -> None:
    lam = 0.3
    m = _module(mode="joint", concept_weight=lam)
    batch = _batch()
    out = m(batch["image"])
    losses = m.compute_losses(out, batch, "train")
    logits, y = out.logits.detach().double(), batch["label"]
    ce = -(logits.log_softmax(1)[torch.arange(len(y)), y]).mean()
    p = torch.sigmoid(out.concept_logits.detach().double())
    c = batch["concepts"].double()
    bce_sum = (-(c * p.log() + (1 - c) * (1 - p).log())).mean(0).sum()
    assert losses["ce"].item() == pytest.approx(ce.item(), rel=1e-5)
    assert losses["concept"].item() == pytest.approx(lam * bce_sum.item(), rel=1e-5)
    assert set(losses) == {"ce", "concept"}


def test_concept_subset_selects_the_named_columns() -> None:
    m = _module(concepts=["c3", "c0"])
    batch = _batch()
    assert m.net.concepts == ["c3", "c0"] and m.net.n_concepts == 2
    assert torch.equal(m.true_concepts(batch), batch["concepts"][:, [3, 0]])
    with pytest.raises(ValueError, match="did you mean 'c1'"):
        _module(concepts=["c11"])
    with pytest.raises(ValueError, match="no 'concepts'"):
        m.true_concepts({"image": batch["image"], "label": batch["label"]})
    with pytest.raises(ValueError, match="mode must be one of"):
        _module(mode="jiont")


def test_independent_mode_f_sees_only_true_concepts() -> None:
    m = _module(mode="independent")
    seen: list[torch.Tensor] = []
    m.net.predictor.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    batch = _batch()
    out = m(batch["image"])
    seen.clear()  # the forward's own f(sigmoid(g(x))) is what the test-time prediction uses
    losses = m.compute_losses(out, batch, "train")
    assert len(seen) == 1 and torch.equal(seen[0], batch["concepts"])  # training f reads the truth only
    # f's gradient does not depend on the images at all; g's comes from the concept loss alone
    total = losses["ce"] + losses["concept"]
    grads = torch.autograd.grad(
        total, [m.net.predictor.net.weight, m.net.concept_head.net.weight], retain_graph=True
    )
    other = {**batch, "image": torch.rand_like(batch["image"])}
    out2 = m(other["image"])
    l2 = m.compute_losses(out2, other, "train")
    g_f2 = torch.autograd.grad(l2["ce"] + l2["concept"], m.net.predictor.net.weight)[0]
    torch.testing.assert_close(grads[0], g_f2)
    g_head = torch.autograd.grad(
        concept_loss(out.concept_logits, batch["concepts"]), m.net.concept_head.net.weight
    )
    torch.testing.assert_close(grads[1], g_head[0])
    with pytest.raises(ValueError, match="sigmoid"):
        CBMModule(
            net={"name": "cbm", "backbone": SMALL, "bottleneck": "logit"}, data_info=INFO, mode="independent"
        )


def test_sequential_mode_trains_g_then_only_f(tmp_path: Path) -> None:
    import pytorch_lightning as pl

    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    dm = PartShapesDataModule(n_train=64, n_val=32, n_test=32, batch_size=32, cache=False)
    info = dm.data_info
    names = ["has_red", "has_striped", "head_shape_circle"]
    torch.manual_seed(0)
    m = CBMModule(
        net={"name": "cbm", "backbone": SMALL},
        data_info=info,
        mode="sequential",
        concept_epochs=1,
        concepts=names,
        train_samples=32,
        intervention={"seeds": [0]},
    )
    snaps: list[dict[str, torch.Tensor]] = [{k: v.detach().clone() for k, v in m.state_dict().items()}]

    class Snap(pl.Callback):
        def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            snaps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[Snap()],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(m, datamodule=dm)
    f_keys = [k for k in snaps[0] if k.startswith("net.predictor.")]
    g_keys = [k for k in snaps[0] if k.startswith(("net.backbone.", "net.concept_head."))]
    assert f_keys and g_keys and any("running_mean" in k for k in g_keys)
    # epoch 0: g moved, f untouched; epoch 1: f moved, g (weights and BatchNorm statistics) untouched
    assert all(torch.equal(snaps[0][k], snaps[1][k]) for k in f_keys)
    assert not all(torch.equal(snaps[0][k], snaps[1][k]) for k in g_keys)
    assert all(torch.equal(snaps[1][k], snaps[2][k]) for k in g_keys)
    assert not all(torch.equal(snaps[1][k], snaps[2][k]) for k in f_keys)
    res = trainer.test(m, datamodule=dm, verbose=False)[0]
    assert 0.0 <= res["test/concept_auc_mean"] <= 1.0
    curve = m.intervention_curves["test"]
    assert len(curve["random"]) == len(names) + 1
    assert curve["random"][0] == pytest.approx(res["test/acc"], abs=1e-6)
    assert curve["random"][-1] == pytest.approx(res["test/true_concept_acc"], abs=1e-6)
    assert curve["uncertainty"][-1] == pytest.approx(res["test/true_concept_acc"], abs=1e-6)
    with pytest.raises(ValueError, match="no epoch for f"):
        _check_sequential_epochs(info)


def _check_sequential_epochs(info: dict) -> None:
    import pytorch_lightning as pl

    m = CBMModule(net={"name": "cbm", "backbone": SMALL}, data_info=info, mode="sequential", concept_epochs=2)
    m.trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False)
    m.setup("fit")


# -- CUB attributes --------------------------------------------------------------------------------
def _votes_by_hand(cub: Path) -> tuple[np.ndarray, np.ndarray]:
    """(image labels (N, A), class-level majority votes (C, A)) parsed from the fake tree's text files."""
    rows = [ln.split() for ln in (cub / "attributes/image_attribute_labels.txt").read_text().splitlines()]
    n_img, n_attr = max(int(r[0]) for r in rows), max(int(r[1]) for r in rows)
    lab = np.zeros((n_img, n_attr))
    for r in rows:
        lab[int(r[0]) - 1, int(r[1]) - 1] = float(r[2])
    cls = np.array(
        [int(ln.split()[1]) - 1 for ln in (cub / "image_class_labels.txt").read_text().splitlines()]
    )
    train = np.array([ln.split()[1] == "1" for ln in (cub / "train_test_split.txt").read_text().splitlines()])
    votes = np.stack([lab[train & (cls == c)].mean(0) > 0.5 for c in range(cls.max() + 1)])
    return lab, votes


def test_cub_attributes_majority_vote_and_filter(tmp_path: Path) -> None:
    from interpzoo.datamodules.base import DataError
    from interpzoo.datamodules.cub import CUB200DataModule
    from interpzoo.datamodules.testing import make_fake_cub

    cub = make_fake_cub(tmp_path, n_classes=4, n_per_class=6, size=32, n_attributes=12)
    lab, votes = _votes_by_hand(cub)
    keep = np.flatnonzero(votes.sum(0) >= 2)
    assert 0 < keep.size < 12  # the filter keeps some attributes and drops others
    dm = CUB200DataModule(str(cub), image_size=32, augment=False, concepts=True, concept_min_classes=2)
    names = dm.data_info["concept_names"]
    assert names == [f"has_part_{a // 4}::value_{a % 4}" for a in keep]
    dm.setup()
    test_ids = [
        i for i, ln in enumerate((cub / "train_test_split.txt").read_text().splitlines()) if ln.endswith(" 0")
    ]
    cls = [int(ln.split()[1]) - 1 for ln in (cub / "image_class_labels.txt").read_text().splitlines()]
    for j in range(len(dm.test_set)):
        img = test_ids[j]
        assert dm.test_set[j]["concepts"].tolist() == votes[cls[img], keep].astype(float).tolist()
    raw = CUB200DataModule(
        str(cub), image_size=32, concepts=True, concept_min_classes=0, concept_majority_vote=False
    )
    raw.setup()
    assert raw.test_set[0]["concepts"].tolist() == lab[test_ids[0]].tolist()  # all 12, per-image labels
    plain = CUB200DataModule(str(cub), image_size=32, augment=False)
    plain.setup()
    assert "concepts" not in plain.test_set[0] and plain.data_info["concept_names"] is None
    with pytest.raises(DataError, match="concept_min_classes"):
        _ = CUB200DataModule(str(cub), concepts=True, concept_min_classes=5).data_info
    (cub / "attributes/image_attribute_labels.txt").unlink()
    with pytest.raises(DataError, match=r"attributes/image_attribute_labels.txt.*data.concepts=false"):
        CUB200DataModule(str(cub), concepts=True).setup()
    (cub.parent / "attributes.txt").unlink()
    cub2 = make_fake_cub(tmp_path / "b", n_classes=2, n_per_class=2, size=32)
    (cub2.parent / "attributes.txt").unlink()
    with pytest.raises(DataError, match="attributes.txt"):
        CUB200DataModule(str(cub2), concepts=True).setup()


@pytest.mark.slow
def test_cub_recipe_fast_dev_run_as_a_user_types_it(tmp_path: Path) -> None:
    """`python train.py experiment=cbm_cub_resnet34 ... debug=fdr` on a fake CUB tree, as a subprocess."""
    from tests.conftest import fake_cub_fdr_overrides

    overrides = fake_cub_fdr_overrides("cbm_cub_resnet34", tmp_path)
    # 3 fake classes: the paper's ">= 10 classes" filter would drop every attribute
    overrides += [
        "data.concept_min_classes=1",
        f"hydra.run.dir={tmp_path / 'run'}",
        "callbacks.intrinsic_dim.num_samples=8",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "val/concept_acc" in metrics
    assert "test/intervention/random_n000" in metrics and "test/true_concept_acc" in metrics
