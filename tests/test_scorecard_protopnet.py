"""Ground-truth scorecard of part-location explanations (ProtoPNet prototypes, post-hoc class maps).

The oracle, a fixed-location fake, random prototypes and hand cases are scored with the same code as the
model (:mod:`interpzoo.scorecard.parts`), on the varied-pose held-out split.
"""

from __future__ import annotations

import math

import pytest
import torch

from interpzoo.datamodules.partshapes import PartShapesDataset
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.metrics.calibration import Score, normalised_score
from interpzoo.metrics.protopnet import region_part_hits
from interpzoo.models.bundle import load_pretrained
from interpzoo.scorecard import NoGroundTruth, evaluate
from interpzoo.scorecard.parts import oracle_explainer, part_scores, pooled_part_maps
from interpzoo.scorecard.protopnet import model_explainer, random_patch_prototypes

K = 4


@pytest.fixture(scope="module")
def dm() -> PartShapesDataModule:
    return PartShapesDataModule()


@pytest.fixture(scope="module")
def varied(dm: PartShapesDataModule) -> PartShapesDataset:
    return dm.ground_truth_dataset(200)


def _two_units_per_class(num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(num_classes).repeat_interleave(2)
    parts = torch.tensor([0, 2] * num_classes)
    return classes, parts


def fixed_location_explainer(num_units: int, grid: tuple[int, int], cell: tuple[int, int]):
    """A fake prototype with no part information: it always fires at one latent cell."""

    def explain(batch):
        b = batch["image"].shape[0]
        maps = torch.zeros(b, num_units, *grid)
        maps[:, :, cell[0], cell[1]] = 1.0
        return maps, maps.flatten(2).amax(2)

    return explain


def test_normalised_score_reads_one_at_the_ceiling_and_zero_at_chance() -> None:
    assert normalised_score(0.9, 0.5, 0.9) == pytest.approx(1.0)
    assert normalised_score(0.5, 0.5, 0.9) == pytest.approx(0.0)
    # lower is better: the ceiling lies below the random value and the ratio keeps its meaning
    assert normalised_score(0.1, 0.4, 0.0) == pytest.approx(0.75)
    assert math.isnan(normalised_score(0.3, 0.5, 0.5))
    row = Score("m", "x", 0.7, 0.9, 0.5)
    assert row.logged("test/gt/") == {
        "test/gt/x": 0.7,
        "test/gt/x_ceiling": 0.9,
        "test/gt/x_random": 0.5,
        "test/gt/x_norm": pytest.approx(0.5),
    }


def test_region_part_hits_by_hand() -> None:
    # 8 x 8 image, two parts; a map whose top 5 % (3 pixels) lie on part 1 hits part 1 only
    masks = torch.zeros(1, 2, 8, 8, dtype=torch.bool)
    masks[0, 0, :2, :2] = True
    masks[0, 1, 5:, 5:] = True
    heat = torch.zeros(1, 8, 8)
    heat[0, 6, 6], heat[0, 6, 7], heat[0, 7, 6] = 3.0, 2.0, 1.0
    assert region_part_hits(heat, masks, (8, 8)).tolist() == [[False, True]]
    # the region on background only: no part is hit
    heat = torch.zeros(1, 8, 8)
    heat[0, 3, 3], heat[0, 3, 4], heat[0, 4, 3] = 3.0, 2.0, 1.0
    assert region_part_hits(heat, masks, (8, 8)).tolist() == [[False, False]]


def test_pose_varies_on_the_ground_truth_split(dm: PartShapesDataModule, varied: PartShapesDataset) -> None:
    fixed = PartShapesDataset(dm.renderer, "test", 200)
    spread_fixed = torch.stack([fixed[i]["landmarks"] for i in range(200)]).std(0).mean()
    spread_varied = torch.stack([varied[i]["landmarks"] for i in range(200)]).std(0).mean()
    assert spread_fixed < 2.5 < 5.0 < spread_varied  # px: the default layout barely moves a part
    # same classes: the renderer's class table and hash are those of the training data
    assert varied.renderer.class_hash == dm.renderer.class_hash


def test_oracle_on_the_pixel_grid_scores_the_known_maximum(varied: PartShapesDataset) -> None:
    # on the pixel grid the oracle's map is the part mask itself: its argmax lies on the part (so its centre is
    # within Huang's box), its region lies on the part, and deleting the part removes all of its response
    classes, parts = _two_units_per_class()
    out = part_scores(
        oracle_explainer(parts, (32, 32)), varied, classes, 10, unit_parts=parts, deletion_images=40
    )
    assert out["part_consistency"] == pytest.approx(100.0)
    assert out["part_purity"] == pytest.approx(1.0)
    assert out["part_deletion"] == pytest.approx(100.0)
    assert out["unit_parts"] == parts.tolist()


def test_oracle_on_the_latent_grid_is_the_ceiling_and_a_fixed_location_fake_scores_chance(
    dm: PartShapesDataModule, varied: PartShapesDataset
) -> None:
    classes, parts = _two_units_per_class()
    grid = (4, 4)
    oracle = part_scores(
        oracle_explainer(parts, grid), varied, classes, 10, unit_parts=parts, deletion_images=40
    )
    # the caps of the old protocol (20-60 % consistency, 0.59-1.0 purity on a 4 x 4 grid) are gone
    assert oracle["part_consistency"] >= 80.0
    assert oracle["part_purity"] >= 0.95
    assert oracle["part_deletion"] == pytest.approx(100.0)
    fake = fixed_location_explainer(20, grid, (1, 2))
    fake_scores = part_scores(fake, varied, classes, 10, deletion_images=40)
    assert fake_scores["part_consistency"] == pytest.approx(0.0)
    # deleting a part never changes a fixed map: every comparison is a tie, i.e. chance
    assert fake_scores["part_deletion"] == pytest.approx(50.0)
    assert fake_scores["part_purity"] < 0.7
    # on the default (fixed) layout the same fake looks like a part detector: the reason for the varied split
    fixed = PartShapesDataset(dm.renderer, "test", 200)
    best = max(
        part_scores(fixed_location_explainer(20, grid, cell), fixed, classes, 10, deletion_images=0)[
            "part_consistency"
        ]
        for cell in [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2), (1, 0), (1, 3), (2, 0), (2, 3)]
    )
    assert best >= 50.0


@pytest.fixture(scope="module")
def protopnet() -> torch.nn.Module:
    torch.set_num_threads(1)
    return load_pretrained("protopnet_resnet18s.partshapes_s0")


@pytest.fixture(scope="module")
def protopnet_dm(protopnet: torch.nn.Module) -> PartShapesDataModule:
    """The data the shipped ProtoPNet bundle was trained on: PartShapes at its image size (part scale, 64 px)."""
    return PartShapesDataModule(image_size=protopnet.data_config["image_size"][0])


def test_a_bundle_is_not_scored_on_images_of_another_size(protopnet: torch.nn.Module) -> None:
    size = protopnet.data_config["image_size"][0]
    other = PartShapesDataModule(image_size=32 if size != 32 else 48)
    with pytest.raises(
        ValueError, match=rf"trained on {size}x{size} images.*PartShapesDataModule\(image_size={size}\)"
    ):
        evaluate(protopnet, other, num_samples=10)
    shuffled = PartShapesDataModule(image_size=size, class_seed=1)
    assert shuffled.class_hash != protopnet.data_config["class_hash"]
    with pytest.raises(ValueError, match="another PartShapes class table"):
        evaluate(protopnet, shuffled, num_samples=10)


def test_random_prototypes_score_about_zero_and_the_model_row_is_consistent(
    protopnet: torch.nn.Module, protopnet_dm: PartShapesDataModule
) -> None:
    dm = protopnet_dm
    rows = {r.metric: r for r in evaluate(protopnet, dm, num_samples=120)}
    assert set(rows) == {"gt_accuracy", "part_consistency", "part_purity", "part_deletion"}
    acc = rows["gt_accuracy"]
    assert acc.ceiling == 1.0 and acc.random == pytest.approx(0.1) and 0.0 <= acc.raw <= 1.0
    for name in ("part_consistency", "part_purity", "part_deletion"):
        r = rows[name]
        assert r.ceiling > r.random, name
        assert all(math.isfinite(v) for v in (r.raw, r.ceiling, r.random)), name
    # a fresh draw of random own-class patches (seeds the baseline did not use) scores about 0 normalised
    varied = dm.ground_truth_dataset(120)
    pool = dm.ground_truth_dataset(120, "val")
    classes = protopnet.prototype_classes
    fresh = part_scores(
        model_explainer(protopnet, random_patch_prototypes(protopnet, pool, classes, seed=1234)),
        varied,
        classes,
        10,
        deletion_images=40,
    )
    assert abs(normalised_score(fresh["part_deletion"], rows["part_deletion"].random, 100.0)) < 0.25
    assert abs(normalised_score(fresh["part_purity"], rows["part_purity"].random, 1.0)) < 0.25


def test_random_patch_prototypes_are_real_patches_of_their_class(
    protopnet: torch.nn.Module, protopnet_dm: PartShapesDataModule
) -> None:
    dm = protopnet_dm
    pool = dm.ground_truth_dataset(60, "val")
    classes = protopnet.prototype_classes
    protos = random_patch_prototypes(protopnet, pool, classes, seed=0)
    assert protos.shape == protopnet.prototype_layer.prototype_vectors.shape
    with torch.no_grad():
        x = torch.stack([pool[i]["image"] for i in range(len(pool))])
        z = protopnet.latent(protopnet.features(x))  # (N, D, h, w)
    labels = torch.tensor([int(pool[i]["label"]) for i in range(len(pool))])
    patches = z.permute(0, 2, 3, 1).reshape(z.shape[0], -1, z.shape[1])  # (N, h*w, D)
    for j in range(protos.shape[0]):
        own = patches[labels == classes[j]].reshape(-1, z.shape[1])
        # brute force: the prototype equals some latent patch of an image of its class
        assert (own - protos[j].flatten()).norm(dim=1).min() < 1e-5


def test_pooled_part_maps_by_hand() -> None:
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :2] = True  # half of the top-left 4 x 4 cell
    pooled = pooled_part_maps(masks, (2, 2))
    assert pooled[0, 0].tolist() == [[0.5, 0.0], [0.0, 0.0]]


def test_no_ground_truth_is_said_not_scored() -> None:
    net = load_pretrained("senn_mlp.breast_cancer_s0")

    class Tabular:
        pass

    with pytest.raises(NoGroundTruth, match="no ground-truth parts or concepts"):
        evaluate(net, Tabular())


def test_posthoc_gradcam_rows_on_the_matched_black_box(dm: PartShapesDataModule) -> None:
    from interpzoo.scorecard import posthoc

    torch.set_num_threads(1)
    net = load_pretrained("baseline_resnet18s.partshapes_s0")
    rows = posthoc.score(net, dm, num_samples=60, explainers=("gradcam",), deletion_images=20)
    assert {r.metric for r in rows} == {"part_consistency", "part_purity", "part_deletion"}
    assert {r.method for r in rows} == {"gradcam"}
    for r in rows:
        assert r.ceiling >= r.random and math.isfinite(r.raw), r
    twin = posthoc.random_twin(net, 0)
    # the random baseline's network has the same architecture and other weights
    assert type(twin) is type(net)
    assert not torch.equal(next(twin.parameters()), next(net.parameters()))


def test_callback_logs_rows_on_partshapes_and_nothing_without_ground_truth(
    protopnet_dm: PartShapesDataModule,
) -> None:
    from types import SimpleNamespace

    from interpzoo.scorecard.callback import GroundTruthScorecard

    class Module:
        def __init__(self, net: torch.nn.Module) -> None:
            self.net, self.logged = net, {}

        def log(self, key: str, value: float, sync_dist: bool = False) -> None:
            self.logged[key] = value

    torch.set_num_threads(1)
    cb = GroundTruthScorecard(num_samples=30)
    module = Module(load_pretrained("protopnet_resnet18s.partshapes_s0"))
    cb.on_test_epoch_end(SimpleNamespace(datamodule=protopnet_dm), module)
    assert module.logged["test/gt/part_deletion_ceiling"] == pytest.approx(100.0)
    assert {"test/gt/part_purity", "test/gt/part_purity_random", "test/gt/part_purity_norm"} <= set(
        module.logged
    )
    assert len(module.scorecard_unit_scores) == module.net.num_prototypes  # one panel score per prototype
    # digits, tabular data, CUB: no ground truth, nothing logged
    other = Module(load_pretrained("senn_lenet.digits_s0"))
    cb.on_test_epoch_end(SimpleNamespace(datamodule=SimpleNamespace(num_classes=10)), other)
    assert other.logged == {}
    assert not hasattr(other, "scorecard_unit_scores")


def test_icnn_filters_get_one_normalised_part_score_each(dm: PartShapesDataModule) -> None:
    torch.set_num_threads(1)
    net = load_pretrained("icnn_resnet18s.partshapes_s0")
    details: dict = {}
    rows = {r.metric: r for r in evaluate(net, dm, num_samples=40, details=details)}
    scores = torch.tensor(details["unit_part_scores"])
    iou = rows["part_iou"]
    assert torch.isfinite(scores).all()
    # their mean is the part_iou row's normalised score (the row is the mean of the filters' best IoU)
    assert float(scores.mean()) == pytest.approx(iou.normalised, abs=1e-5)
