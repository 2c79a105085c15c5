"""Ground-truth scorecard of ICNN part filters: area-matched part IoU, detection rate, their oracle ceilings and
random baselines, location-instability ceiling, causal part deletion, and the scorer on the shipped bundle."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from interpzoo.metrics.calibration import Score
from interpzoo.metrics.icnn import (
    LocationInstability,
    area_matched_part_iou,
    oracle_part_maps,
    part_deletion_score,
    part_iou_scores,
    project_maps,
    random_directions,
)


@pytest.fixture(autouse=True)
def _one_thread():
    # Shared 2-core machine: one OpenMP thread per test process.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _square_parts(n: int, size: int, k: int, side: int, seed: int) -> torch.Tensor:
    """``(n, k, size, size)`` bool: ``k`` non-overlapping ``side x side`` squares at random places."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n, k, size, size, dtype=torch.bool)
    for i in range(n):
        taken = torch.zeros(size, size, dtype=torch.bool)
        for j in range(k):
            while True:
                y, x = torch.randint(0, size - side + 1, (2,), generator=g).tolist()
                if not taken[y : y + side, x : x + side].any():
                    break
            masks[i, j, y : y + side, x : x + side] = True
            taken[y : y + side, x : x + side] = True
    return masks


# -------------------------------------------------------------------------------------------------
# area-matched threshold and IoU
# -------------------------------------------------------------------------------------------------
def test_area_matched_threshold_leaves_exactly_the_part_pixel_count_on() -> None:
    n, size = 12, 16
    masks = _square_parts(n, size, 3, 3, seed=0)
    masks[:, 2, :5, :] = True  # a larger, overlapping part: a different area A_k
    area = masks.sum((0, 2, 3))
    g = torch.Generator().manual_seed(1)
    # full-resolution continuous maps (no upsampling, no ties): threshold and IoU by hand
    acts = torch.rand(n, 5, size, size, generator=g) + 0.01  # positive: every selected pixel is active
    res = area_matched_part_iou(acts, masks)
    assert res["part_area"].tolist() == area.tolist()
    assert torch.equal(res["num_on"], area.expand(5, 3))  # exactly A_k pixels on for every (unit, part)
    for u in range(5):
        flat = acts[:, u].flatten()
        for k in range(3):
            t = flat.sort(descending=True).values[int(area[k]) - 1]  # the A_k-th largest value
            assert float(res["threshold"][u, k]) == pytest.approx(float(t))
            on = acts[:, u] >= t
            assert int(on.sum()) == int(area[k])
            inter = (on & masks[:, k]).sum()
            union = (on | masks[:, k]).sum()
            assert float(res["iou"][u, k]) == pytest.approx(float(inter) / float(union), rel=1e-6)
    assert torch.equal(res["best_part"], res["iou"].argmax(1))
    # a 4x4 grid upsampled 4x has ties (clamped border pixels): ">= T" would turn on more pixels than the
    # part covers; the ranking still turns on exactly A_k
    coarse = torch.rand(n, 5, 4, 4, generator=g) + 0.01
    res = area_matched_part_iou(coarse, masks)
    assert torch.equal(res["num_on"], area.expand(5, 3))
    up = F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    over = [
        int((up[:, u] >= res["threshold"][u, k]).sum()) - int(area[k]) for u in range(5) for k in range(3)
    ]
    assert min(over) >= 0 and max(over) > 0


def test_silent_pixels_are_not_claimed() -> None:
    """A unit active on fewer pixels than the part covers keeps only its active pixels on."""
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True  # 16 pixels
    acts = torch.zeros(1, 1, 8, 8)
    acts[0, 0, 0, :4] = 1.0  # active on 4 pixels, all inside the part (full resolution: no upsampling)
    res = area_matched_part_iou(acts, masks)
    assert int(res["num_on"][0, 0]) == 4
    assert float(res["iou"][0, 0]) == pytest.approx(4 / 16)


def test_detection_rate_hand_values() -> None:
    """Units whose selected pixels overlap a 16-pixel part in 6 and 5 pixels: IoU 6/26 = 0.23 and 5/27 = 0.19."""
    masks = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
    masks[0, 0, :4, :4] = True
    acts = torch.full((1, 3, 8, 8), 1e-3)
    rows = torch.arange(64).view(8, 8)
    inside = rows[:4, :4].flatten()
    outside = rows[4:, :].flatten()
    for u, m in ((1, 6), (2, 5)):
        on = torch.cat([inside[:m], outside[: 16 - m]])
        acts[0, u].view(-1)[on] = 1.0
    acts[0, 0, :4, :4] = 1.0
    res = area_matched_part_iou(acts, masks, iou_threshold=0.2)
    assert res["best_iou"].tolist() == pytest.approx([1.0, 6 / 26, 5 / 27])
    assert float(res["detection_rate"]) == pytest.approx(2 / 3)
    assert float(area_matched_part_iou(acts, masks, iou_threshold=0.25)["detection_rate"]) == pytest.approx(
        1 / 3
    )
    # "exceeds" is strict: at a threshold equal to unit 1's IoU only unit 0 counts
    strict = area_matched_part_iou(acts, masks, iou_threshold=float(res["best_iou"][1]))
    assert float(strict["detection_rate"]) == pytest.approx(1 / 3)
    assert int(res["num_part_detectors"]) == 2 and int(res["num_unique_parts"]) == 1


# -------------------------------------------------------------------------------------------------
# oracle ceilings known by hand
# -------------------------------------------------------------------------------------------------
def _cell_parts(n: int, seed: int, cell: int = 4, grid: int = 4, quadrant: bool = False) -> torch.Tensor:
    """Two parts per image, each exactly one interior grid cell (or its top-left quadrant) of a
    ``grid * cell`` image; cells differ per image."""
    g = torch.Generator().manual_seed(seed)
    size = grid * cell
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool)
    interior = [(r, c) for r in range(1, grid - 1) for c in range(1, grid - 1)]
    for i in range(n):
        a, b = torch.randperm(len(interior), generator=g)[:2].tolist()
        for k, (r, c) in enumerate((interior[a], interior[b])):
            side = cell // 2 if quadrant else cell
            masks[i, k, r * cell : r * cell + side, c * cell : c * cell + side] = True
    return masks


def test_oracle_iou_is_one_where_the_grid_represents_the_mask() -> None:
    """A part that is exactly one cell of the filter's grid: pooled map 1 on that cell, 0 elsewhere; after
    bilinear upsampling every pixel inside the cell (>= 0.625^2) beats every pixel outside (<= 0.375), so the
    area-matched mask is the part: IoU 1, detection rate 1."""
    masks = _cell_parts(20, seed=0)
    oracle = oracle_part_maps(masks, (4, 4))
    assert set(oracle.unique().tolist()) == {0.0, 1.0}
    res = area_matched_part_iou(oracle, masks)
    assert res["best_iou"].tolist() == pytest.approx([1.0, 1.0])
    assert res["best_part"].tolist() == [0, 1]
    assert float(res["detection_rate"]) == 1.0


def test_oracle_ceiling_includes_the_grid_blur() -> None:
    """A 2x2 part in the top-left quadrant of a 4x4-pixel cell: the pooled map is 1/4 on the cell, the
    upsampled peak is the cell's 4 central pixels (0.875^2 each, the largest), which overlap the part in 1
    pixel: IoU = N / (4N + 4N - N) = 1/7, whatever the images."""
    masks = _cell_parts(15, seed=1, quadrant=True)
    res = area_matched_part_iou(oracle_part_maps(masks, (4, 4)), masks)
    assert res["best_iou"].tolist() == pytest.approx([1 / 7, 1 / 7])
    assert float(res["detection_rate"]) == 0.0  # 1/7 < 0.2: the grid cannot resolve this part


def test_location_instability_ceiling_is_zero_for_a_rigid_layout_on_the_grid() -> None:
    """Parts = grid cells, a rigid layout that moves by whole cells: the oracle unit's argmax is the part's
    cell, so its distance to every landmark is the same in every image; std 0, instability 0."""
    g = torch.Generator().manual_seed(0)
    n, cell, grid = 30, 4, 6
    size = cell * grid
    masks = torch.zeros(n, 2, size, size, dtype=torch.bool)
    landmarks = torch.zeros(n, 2, 2)
    for i in range(n):
        r, c = torch.randint(0, grid - 1, (2,), generator=g).tolist()
        for k, (rr, cc) in enumerate(((r, c), (r + 1, c + 1))):  # part 1 always one cell down-right
            masks[i, k, rr * cell : (rr + 1) * cell, cc * cell : (cc + 1) * cell] = True
            landmarks[i, k] = torch.tensor([cc * cell + (cell - 1) / 2, rr * cell + (cell - 1) / 2])
    oracle = oracle_part_maps(masks, (grid, grid))
    m = LocationInstability(2, 2, top_m=20)
    m.update(oracle, landmarks, torch.ones(n, 2, dtype=torch.bool), (size, size), index=torch.arange(n))
    assert float(m.compute()) == pytest.approx(0.0, abs=1e-6)
    # and random jitter of the layout makes the same oracle unstable
    landmarks[:, 1] += torch.rand(n, 2, generator=g) * 4
    m = LocationInstability(2, 2, top_m=20)
    m.update(oracle, landmarks, torch.ones(n, 2, dtype=torch.bool), (size, size), index=torch.arange(n))
    assert float(m.compute()) > 0.01


# -------------------------------------------------------------------------------------------------
# normalisation: oracle 1, random directions ~0
# -------------------------------------------------------------------------------------------------
def _layer(n: int = 40, channels: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Masks ``(n, 4, 32, 32)`` of off-grid 5x5 parts and an ``(n, channels, 8, 8)`` layer whose first four
    channels are the pooled parts and the rest noise."""
    masks = _square_parts(n, 32, 4, 5, seed)
    g = torch.Generator().manual_seed(seed + 100)
    acts = torch.rand(n, channels, 8, 8, generator=g) * 0.3
    acts[:, :4] += oracle_part_maps(masks, (8, 8))
    return masks, acts


def test_oracle_filters_normalise_to_one_and_random_directions_to_zero() -> None:
    masks, acts = _layer()
    oracle = oracle_part_maps(masks, (8, 8))
    # 128 directions (the scorer's default): the baseline's own sampling spread is ~0.02 normalised
    rand0 = project_maps(acts, random_directions(acts.shape[1], 128, seed=0))
    res = part_iou_scores(oracle, masks, rand0)
    for metric in ("part_iou", "part_detection_rate"):
        row = Score("t", metric, res["model"][metric], res["oracle"][metric], res["random"][metric])
        assert row.normalised == pytest.approx(1.0)
    # the ceiling is off-grid (5x5 parts on 4-pixel cells) and well below 1, yet far above chance
    assert 0.4 < res["oracle"]["part_iou"] < 0.95
    assert res["random"]["part_iou"] < 0.5 * res["oracle"]["part_iou"]
    # random directions of another seed, scored as if they were the filters: normalised ~0
    for seed in (1, 2, 3):
        rand = project_maps(acts, random_directions(acts.shape[1], 128, seed=seed))
        other = part_iou_scores(rand, masks, rand0)
        row = Score(
            "t",
            "part_iou",
            other["model"]["part_iou"],
            other["oracle"]["part_iou"],
            res["random"]["part_iou"],
        )
        assert abs(row.normalised) < 0.08, (seed, row)
    # the layer's own basis (4 part channels of 16) is far better than its random rotations
    own = part_iou_scores(acts, masks, rand0)
    assert own["model"]["result"]["best_iou"][:4].min() > 0.8 * res["oracle"]["part_iou"]


def test_random_directions_are_seeded_unit_vectors() -> None:
    w = random_directions(7, 5, seed=3)
    assert w.shape == (5, 7)
    assert torch.allclose(torch.linalg.vector_norm(w, dim=1), torch.ones(5), atol=1e-6)
    assert torch.equal(w, random_directions(7, 5, seed=3))
    assert not torch.equal(w, random_directions(7, 5, seed=4))
    acts = torch.rand(2, 7, 3, 3)
    assert torch.allclose(project_maps(acts, w)[:, 2], (acts * w[2].view(1, 7, 1, 1)).sum(1), atol=1e-6)


# -------------------------------------------------------------------------------------------------
# causal part deletion
# -------------------------------------------------------------------------------------------------
def _reference_deletion(resp, removed, part, visible) -> float:
    wins, total = 0.0, 0
    n, k, u = removed.shape
    for i in range(n):
        for f in range(u):
            q = int(part[f])
            if not visible[i, q]:
                continue
            for p in range(k):
                if p == q or not visible[i, p]:
                    continue
                dq, dp = float(resp[i, f] - removed[i, q, f]), float(resp[i, f] - removed[i, p, f])
                wins += 1.0 if dq > dp else 0.5 if dq == dp else 0.0
                total += 1
    return wins / total


def test_part_deletion_matches_a_loop_reference() -> None:
    g = torch.Generator().manual_seed(0)
    resp = torch.rand(9, 5, generator=g)
    removed = torch.rand(9, 3, 5, generator=g)
    removed[:, 1, 0] = resp[:, 0]  # ties
    removed[:, 2, 0] = resp[:, 0]
    part = torch.tensor([1, 0, 2, 2, 1])
    visible = torch.rand(9, 3, generator=g) > 0.3
    assert part_deletion_score(resp, removed, part, visible) == pytest.approx(
        _reference_deletion(resp, removed, part, visible)
    )


@pytest.fixture(scope="module")
def rendered() -> dict[str, torch.Tensor]:
    """Part masks of 40 varied-pose PartShapes images and of their re-renders with each part removed."""
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    ds = PartShapesDataModule().ground_truth_dataset(40)
    k = len(ds.part_names)
    masks = torch.stack([ds[i]["part_masks"] for i in range(len(ds))])
    removed = torch.stack(
        [
            torch.stack([torch.from_numpy(ds.render(i, remove_parts=[p]).part_masks) for p in range(k)])
            for i in range(len(ds))
        ]
    )  # (N, K removed, K parts, H, W)
    return {"masks": masks, "removed": removed}


def test_part_deletion_oracle_is_one_and_part_blind_units_are_at_chance(rendered) -> None:
    masks, removed = rendered["masks"], rendered["removed"]
    n, k = masks.shape[:2]
    visible = masks.flatten(2).any(-1)
    assert visible.sum(1).ge(2).all()  # every image has pairs to compare
    # oracle units: the pooled mask of each part on an 8x8 grid, response = spatial max
    resp = oracle_part_maps(masks, (8, 8)).amax((2, 3))  # (N, K)
    resp_removed = oracle_part_maps(removed.flatten(0, 1), (8, 8)).amax((2, 3)).view(n, k, k)
    own = torch.arange(k)
    assert part_deletion_score(resp, resp_removed, own, visible) == 1.0
    # a unit that sees only the amount of creature (total part area), assigned to every part in turn:
    # each (q, p) pair is counted both ways, so the score is exactly one half
    area = masks.flatten(1).sum(1).float()
    area_removed = removed.flatten(2).sum(2).float()  # (N, K)
    blind = area[:, None].expand(n, k)
    blind_removed = area_removed[:, :, None].expand(n, k, k)
    assert part_deletion_score(blind, blind_removed, own, visible) == pytest.approx(0.5)
    # a unit that does not respond to the creature at all: every drop is 0, every comparison a tie
    const = torch.ones(n, 3)
    assert part_deletion_score(const, torch.ones(n, k, 3), torch.tensor([0, 1, 2]), visible) == 0.5


# -------------------------------------------------------------------------------------------------
# the scorer on the shipped bundle
# -------------------------------------------------------------------------------------------------
def test_score_runs_on_the_shipped_bundle() -> None:
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
    from interpzoo.models.bundle import load_pretrained
    from interpzoo.scorecard import evaluate
    from interpzoo.scorecard.icnn import collect_maps, score

    net = load_pretrained("icnn_resnet18s.partshapes_s0").eval()
    dm = PartShapesDataModule()
    rows = evaluate(net, dm, num_samples=100, seed=0)
    # evaluate() puts the accuracy on the same images first (is the model in distribution there?)
    assert rows[0].metric == "gt_accuracy" and rows[0].ceiling == 1.0
    rows = rows[1:]
    by = {r.metric: r for r in rows}
    assert [r.metric for r in rows] == [
        "part_iou",
        "part_detection_rate",
        "location_instability",
        "part_deletion",
    ]
    assert all(r.method == "icnn" for r in rows)
    for r in rows:
        assert all(math.isfinite(v) for v in (r.raw, r.ceiling, r.random)), r
    # ceilings, independently: the oracle of the same held-out images on the filters' 8x8 grid
    data = collect_maps(net, dm.ground_truth_dataset(100), "icnn1")
    assert data["maps"].shape[1:] == (32, 8, 8)
    oracle = area_matched_part_iou(oracle_part_maps(data["part_masks"], (8, 8)), data["part_masks"])
    assert by["part_iou"].ceiling == pytest.approx(float(oracle["part_iou"]), rel=1e-6)
    assert by["part_iou"].ceiling > 0.6  # vs ~0.13 under the fixed 0.5 % quantile
    assert by["part_detection_rate"].ceiling == pytest.approx(float(oracle["detection_rate"]))
    assert by["part_deletion"].ceiling == 1.0
    assert by["location_instability"].ceiling < by["location_instability"].random  # lower is better
    filt = area_matched_part_iou(data["maps"], data["part_masks"])
    assert by["part_iou"].raw == pytest.approx(float(filt["part_iou"]), rel=1e-6)
    # a reference network adds plain_cnn_filters rows; the same weights give the same numbers
    twin = load_pretrained("icnn_resnet18s.partshapes_s0")
    both = score(net, dm, num_samples=40, seed=0, reference_net=twin)
    mine = [r for r in both if r.method == "icnn"]
    plain = [r for r in both if r.method == "plain_cnn_filters"]
    assert len(mine) == len(plain) == 4
    for a, b in zip(mine, plain, strict=True):
        assert (a.metric, a.raw, a.ceiling, a.random) == (b.metric, b.raw, b.ceiling, b.random)


def test_score_without_ground_truth_raises() -> None:
    from interpzoo.scorecard import NoGroundTruth
    from interpzoo.scorecard.icnn import score

    class NoParts:  # a datamodule of real images: no renderer, no part masks
        pass

    with pytest.raises(NoGroundTruth, match="no ground-truth parts"):
        score(torch.nn.Linear(1, 1), NoParts())
