"""PIP-Net on the ground-truth scorecard (:mod:`interpzoo.scorecard.pipnet`) and its report figures.

Each check is against an independent computation: the oracle through the scorer reads 1.0 normalised, a
second random draw reads about 0, a fixed-location fake scores chance, the random baseline's maps equal PIP-Net's
own softmax recomputed with the prototype row swapped, and the units are the non-zero weights counted by hand.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch

from interpzoo.datamodules.partshapes import PartShapesDataset
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.models.pipnet import PIPNet, PIPNetOutput
from interpzoo.scorecard import evaluate, scorer_module
from interpzoo.scorecard import pipnet as sc
from interpzoo.scorecard.parts import cyclic_unit_parts, oracle_explainer, part_scores

NUM_CLASSES = 10
N = 80  # scorecard images: enough for stable rates, small enough for one core


@pytest.fixture(scope="module")
def dm() -> PartShapesDataModule:
    return PartShapesDataModule(n_train=40, n_val=20, n_test=20)


@pytest.fixture(scope="module")
def varied(dm: PartShapesDataModule) -> PartShapesDataset:
    return dm.ground_truth_dataset(N)


def _net(num_prototypes: int = 8) -> PIPNet:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    net = PIPNet(NUM_CLASSES, backbone={"name": "resnet18s", "width": 8}, num_prototypes=num_prototypes)
    with torch.no_grad():
        # a sparse scoring sheet as training leaves it: prototype d serves classes d and d + 5 (mod 10) only
        w = torch.zeros(NUM_CLASSES, num_prototypes)
        for d in range(num_prototypes - 1):  # the last prototype is unused
            w[d % NUM_CLASSES, d] = 1.0
            w[(d + 5) % NUM_CLASSES, d] = 0.5
        net.classifier.weight.copy_(w)
    return net.eval()


@pytest.fixture(scope="module")
def net() -> PIPNet:
    return _net()


def test_registered_and_units_are_the_nonzero_weights(net: PIPNet) -> None:
    assert scorer_module(net) is sc
    protos, classes = sc.used_units(net)
    # brute force over the weight matrix
    want = [
        (d, c)
        for d in range(8)
        for c in range(NUM_CLASSES)
        if float(net.classifier.weight[c, d].detach()) > 0
    ]
    assert list(zip(protos.tolist(), classes.tolist())) == want
    assert 7 not in protos.tolist() and len(want) == 14
    empty = _net()
    with torch.no_grad():
        empty.classifier.weight.fill_(-1.0)  # relu(W) = 0: nothing is used
    with pytest.raises(ValueError, match="no positive weight"):
        sc.used_units(empty)


def test_cyclic_oracle_parts_by_hand() -> None:
    assert cyclic_unit_parts(torch.tensor([0, 0, 1, 0, 1, 0, 0]), 3).tolist() == [0, 1, 0, 2, 1, 0, 1]


def test_oracle_on_the_8x8_grid_reaches_the_known_maximum(varied: PartShapesDataset) -> None:
    # on the 8 x 8 grid of 32 px images every part centre falls inside its pooled mask's argmax cell:
    # consistency 100 %, purity 1, deletion 100 % (removing the part zeroes the oracle's map), known by hand
    classes = torch.arange(NUM_CLASSES).repeat_interleave(4)
    parts = cyclic_unit_parts(classes, 4)
    out = part_scores(
        oracle_explainer(parts, (8, 8)), varied, classes, NUM_CLASSES, unit_parts=parts, deletion_images=20
    )
    assert out["part_consistency"] == pytest.approx(100.0)
    assert out["part_purity"] == pytest.approx(1.0)
    assert out["part_deletion"] == pytest.approx(100.0)


def test_random_maps_are_pipnet_softmax_with_the_row_swapped(net: PIPNet, dm: PartShapesDataModule) -> None:
    pool = dm.ground_truth_dataset(30, "val")
    protos, classes = sc.used_units(net)
    rows = sc.random_prototype_rows(net, pool, protos, classes, seed=3)
    w = net.prototypes.conv.weight[:, :, 0, 0].detach()
    # each row is an own-class patch's trunk feature vector, rescaled to the trained row's norm
    with torch.no_grad():
        x = torch.stack([pool[i]["image"] for i in range(len(pool))])
        f = net.features(x)
    labels = torch.tensor([int(pool[i]["label"]) for i in range(len(pool))])
    patches = f.permute(0, 2, 3, 1).reshape(f.shape[0], -1, f.shape[1])
    for u in range(rows.shape[0]):
        d, c = int(protos[u]), int(classes[u])
        assert float(rows[u].norm()) == pytest.approx(float(w[d].norm()), rel=1e-4)
        own = patches[labels == c].reshape(-1, f.shape[1])
        own = own / own.norm(dim=1, keepdim=True).clamp_min(1e-12)
        assert (own - rows[u] / rows[u].norm()).norm(dim=1).min() < 1e-4
    # brute force: a copy of the network with conv row d replaced, its own patch softmax
    batch = {"image": x[:6]}
    maps, resp = sc.random_explainer(net, protos, rows)(batch)
    for u in (0, 5, 13):
        d = int(protos[u])
        other = copy.deepcopy(net)
        with torch.no_grad():
            other.prototypes.conv.weight[d, :, 0, 0] = rows[u]
            want = other(batch["image"]).prototype_maps[:, d]
        torch.testing.assert_close(maps[:, u], want, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(resp[:, u], want.flatten(1).amax(1), atol=1e-5, rtol=1e-4)


def test_rows_and_oracle_through_the_scorer_read_one(
    net: PIPNet, dm: PartShapesDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    details: dict = {}
    rows = {r.metric: r for r in evaluate(net, dm, num_samples=N, details=details)}
    assert set(rows) == {"gt_accuracy", "part_consistency", "part_purity", "part_deletion"}
    for name in ("part_consistency", "part_purity", "part_deletion"):
        r = rows[name]
        assert all(math.isfinite(v) for v in (r.raw, r.ceiling, r.random)), name
        assert r.ceiling > r.random, name
    assert rows["part_consistency"].ceiling == pytest.approx(100.0)
    assert rows["part_purity"].ceiling == pytest.approx(1.0)
    # one part score per prototype, nan for the unused one
    scores = details["unit_part_scores"]
    assert len(scores) == 8 and math.isnan(scores[7]) and all(math.isfinite(s) for s in scores[:7])
    assert len(details["units"]) == 14

    # the oracle in place of the model (same units, same cyclic parts) reads exactly 1.0 normalised
    def oracle_model(net_, protos):
        _, classes = sc.used_units(net_)
        return oracle_explainer(cyclic_unit_parts(classes, 4), (8, 8))

    monkeypatch.setattr(sc, "model_explainer", oracle_model)
    for r in sc.score(net, dm, num_samples=N):
        assert r.normalised == pytest.approx(1.0), r.metric


def test_a_fresh_random_draw_scores_about_zero(
    net: PIPNet, dm: PartShapesDataModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the model replaced by random own-class patches of a seed the baseline never draws: chance level
    pool = dm.ground_truth_dataset(N, "val")

    def fresh(net_, protos):
        _, classes = sc.used_units(net_)
        return sc.random_explainer(net_, protos, sc.random_prototype_rows(net_, pool, protos, classes, 99))

    monkeypatch.setattr(sc, "model_explainer", fresh)
    rows = {r.metric: r for r in sc.score(net, dm, num_samples=N, draws=3)}
    for name in ("part_purity", "part_deletion"):
        assert abs(rows[name].normalised) < 0.3, (name, rows[name])
    assert abs(rows["part_consistency"].normalised) < 0.3, rows["part_consistency"]


class _FixedCellPIPNet(PIPNet):
    """A fake PIP-Net whose prototypes always fire at one latent cell: no part information at all."""

    cell = (3, 4)

    def forward(self, x: torch.Tensor) -> PIPNetOutput:
        out = super().forward(x)
        maps = torch.zeros_like(out.prototype_maps)
        maps[:, :, self.cell[0], self.cell[1]] = 1.0
        out.prototype_maps = maps
        out.presence_raw = maps.flatten(2).amax(2)
        return out


def test_a_fixed_location_fake_scores_chance_on_the_varied_split(dm: PartShapesDataModule) -> None:
    real = _net()
    fake = _FixedCellPIPNet(NUM_CLASSES, backbone={"name": "resnet18s", "width": 8}, num_prototypes=8).eval()
    fake.load_state_dict(real.state_dict())
    rows = {r.metric: r for r in sc.score(fake, dm, num_samples=N, deletion_images=30)}
    # parts move on the varied split: one fixed cell is on the same part for no unit
    assert rows["part_consistency"].raw == pytest.approx(0.0)
    assert rows["part_consistency"].normalised <= 0.05
    # deleting a part never changes a fixed map: every comparison is a tie, i.e. exactly chance
    assert rows["part_deletion"].raw == pytest.approx(50.0)


def test_report_writes_the_figures_with_names_and_scores(dm: PartShapesDataModule, tmp_path: Path) -> None:
    from interpzoo.models.lit_pipnet import PIPNetModule
    from interpzoo.reports import write_report
    from interpzoo.reports.pipnet import top_images

    torch.manual_seed(0)
    module = PIPNetModule(
        net={"name": "pipnet", "backbone": {"name": "resnet18s", "width": 8}, "num_prototypes": 6},
        data_info={"num_classes": NUM_CLASSES},
    )
    module.scorecard_unit_scores = [0.5] * 6
    paths = write_report(module, dm, tmp_path)
    assert sorted(p.name for p in paths) == [
        "confusion_matrix.png",
        "local_explanation.png",
        "prototype_gallery.png",
    ]
    assert all(p.stat().st_size > 5000 for p in paths)
    # top images are the argmax presence, checked by sorting all of them
    dm.setup("fit")
    net = module.net.eval()
    tops = top_images(net, dm.train_set, [2], k=3, max_images=40)
    with torch.no_grad():
        pres = net(torch.stack([dm.train_set[i]["image"] for i in range(40)])).presence_raw[:, 2]
    assert tops[2] == pres.argsort(descending=True)[:3].tolist()
    module.scorecard_unit_scores = [0.5] * 5  # one per prototype is required
    with pytest.raises(ValueError, match="one score for each"):
        write_report(module, dm, tmp_path / "bad")
