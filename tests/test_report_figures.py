"""Report figures show the evidence (issue 13): heat overlays keep the image's colours, classes carry
readable names, and prototype/filter panels print their normalised part score when given one.

Figures are rendered with matplotlib's Agg canvas (``FigureCanvasAgg``), which selects no backend; colours
are read back from ``canvas.buffer_rgba()`` at the centres of known image pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from interpzoo.datamodules.partshapes import ALL_COLOURS, PartShapesDataset, PartShapesRenderer
from interpzoo.models import create_model
from interpzoo.models.explain import draw_prototype_explanation
from interpzoo.reports import common, concept_whitening, icnn, protopnet, soft_autoencoder
from interpzoo.reports.common import class_display_names, overlay_heat, part_score_label

ROOT = Path(__file__).resolve().parents[1]
PX = 10  # canvas pixels per image pixel in the rendered overlays


# -- helpers ------------------------------------------------------------------------------------
def _render(image: np.ndarray, heat: np.ndarray | None, **kw: Any) -> tuple[np.ndarray, Any]:
    """Draw ``image`` ``(H, W, 3)`` in ``[0, 1]`` with :func:`overlay_heat` on axes that fill the figure;
    returns the canvas ``(H * PX, W * PX, 4)`` uint8 and the axes."""
    h, w = image.shape[:2]
    fig = Figure(figsize=(w * PX / 100, h * PX / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    if heat is None or kw.pop("jet", False):  # the old wash, as a control of the measurement
        ax.imshow(image, vmin=0, vmax=1, interpolation="nearest")
        if heat is not None:
            ax.imshow(heat, cmap="jet", alpha=0.4, interpolation="bilinear")
        ax.set_axis_off()
    else:
        overlay_heat(ax, torch.from_numpy(image).permute(2, 0, 1), torch.from_numpy(heat), **kw)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy(), ax


def _at(canvas: np.ndarray, ax: Any, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``(n, 3)`` canvas RGB (0..255) at the centres of image pixels ``(rows[i], cols[i])``."""
    xy = ax.transData.transform(np.stack([cols, rows], 1).astype(float))
    x = np.clip(np.floor(xy[:, 0]).astype(int), 0, canvas.shape[1] - 1)
    y = np.clip(np.floor(canvas.shape[0] - xy[:, 1]).astype(int), 0, canvas.shape[0] - 1)
    return canvas[y, x, :3].astype(float)


def _erode(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` whose 4 neighbours are in it too (the interior, away from edge antialiasing)."""
    m = np.pad(mask, 1)
    return mask & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


def _two_squares() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A grey 32 px image with a red square (hot) and a blue square (cold), a Gaussian heat map on the red
    square, and the two squares' masks."""
    img = np.full((32, 32, 3), 0.5)
    red, blue = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    red[4:13, 4:13] = True
    blue[18:29, 18:29] = True
    img[red] = np.array(ALL_COLOURS["red"]) / 255
    img[blue] = np.array(ALL_COLOURS["blue"]) / 255
    yy, xx = np.mgrid[0:32, 0:32]
    heat = np.exp(-((xx - 8.0) ** 2 + (yy - 8.0) ** 2) / (2 * 5.0**2))
    return img, heat, red, blue


# -- overlays keep the image's colours ------------------------------------------------------------
def test_contour_overlay_keeps_the_part_colours_that_a_jet_wash_changes() -> None:
    img, heat, red, blue = _two_squares()
    canvas, ax = _render(img, heat)
    for mask in (red, blue, ~(red | blue)):
        r, c = np.nonzero(_erode(mask))
        got = np.median(_at(canvas, ax, r, c), axis=0)  # the median ignores the thin contour lines
        want = np.median(img[r, c] * 255, axis=0)
        assert np.abs(got - want).max() <= 3, (got, want)
    r, c = np.nonzero(_erode(red))
    assert (np.median(_at(canvas, ax, r, c), axis=0) == pytest.approx([220, 40, 40], abs=3)) is True
    # the same measurement on the old jet wash sees the colours move: the test can fail
    jet, ax_j = _render(img, heat, jet=True)
    shift = max(
        np.abs(np.median(_at(jet, ax_j, *np.nonzero(_erode(m))), 0) - np.median(img[m] * 255, 0)).max()
        for m in (red, blue, ~(red | blue))
    )
    assert shift > 40


def test_contour_lines_trace_the_heat_map_at_the_requested_levels() -> None:
    img, heat, _, _ = _two_squares()
    _, ax = _render(img, heat, levels=(0.5, 0.9))
    scaled = (heat - heat.min()) / (heat.max() - heat.min())
    sets = [c for c in ax.collections if hasattr(c, "levels")]
    assert len(sets) == 1 and list(sets[0].levels) == [0.5, 0.9]
    for level, path in zip(sets[0].levels, sets[0].get_paths()):
        v = path.vertices  # (x, y) in image-pixel coordinates
        assert len(v) > 4
        # bilinear interpolation of the heat map at each vertex, computed here independently
        x0 = np.clip(np.floor(v[:, 0]).astype(int), 0, 30)
        y0 = np.clip(np.floor(v[:, 1]).astype(int), 0, 30)
        fx, fy = v[:, 0] - x0, v[:, 1] - y0
        val = (
            scaled[y0, x0] * (1 - fx) * (1 - fy)
            + scaled[y0, x0 + 1] * fx * (1 - fy)
            + scaled[y0 + 1, x0] * (1 - fx) * fy
            + scaled[y0 + 1, x0 + 1] * fx * fy
        )
        assert np.abs(val - level).max() < 0.02
        # a Gaussian's level set is a circle around its centre (8, 8) of radius sigma * sqrt(2 ln(1/level))
        radius = np.hypot(v[:, 0] - 8, v[:, 1] - 8)
        s = 5.0 * np.sqrt(2 * np.log(1 / level)) if level < 1 else 0.0
        assert np.abs(radius - s).max() < 0.6 + 0.1 * s  # the map is min-max scaled, not exactly exp(...)


def test_low_resolution_heat_is_upsampled_to_the_image() -> None:
    img, heat, red, _ = _two_squares()
    small = heat.reshape(8, 4, 8, 4).mean((1, 3))  # a 4x4-pooled 8 x 8 map of the same bump
    _, ax = _render(img, small, levels=(0.9,))
    (cs,) = [c for c in ax.collections if hasattr(c, "levels")]
    v = cs.get_paths()[0].vertices
    assert v[:, 0].max() < 32 and v[:, 1].max() < 32  # image coordinates, not map coordinates
    centre = v.mean(0)
    assert np.hypot(centre[0] - 8, centre[1] - 8) < 2.5  # around the red square, where the bump is


def test_flat_heat_draws_the_image_only() -> None:
    img, _, red, _ = _two_squares()
    canvas, ax = _render(img, np.ones((32, 32)))
    assert not [c for c in ax.collections if hasattr(c, "levels")]
    r, c = np.nonzero(np.ones((32, 32), bool))
    np.testing.assert_allclose(_at(canvas, ax, r, c), img[r, c] * 255, atol=1.0)


def test_mask_overlay_dims_outside_the_region_and_keeps_every_hue() -> None:
    img, heat, red, blue = _two_squares()
    canvas, ax = _render(img, heat, mode="mask", levels=(0.5,), dim=0.4)
    scaled = (heat - heat.min()) / (heat.max() - heat.min())
    inside = _erode(red & (scaled > 0.6))  # clear of the outline drawn at 0.5
    outside = _erode(blue)
    for mask, factor in ((inside, 1.0), (outside, 0.4)):
        r, c = np.nonzero(mask)
        got = np.median(_at(canvas, ax, r, c), axis=0)
        want = np.median(img[r, c] * 255, axis=0) * factor
        assert np.abs(got - want).max() <= 3, (got, want, factor)
    with pytest.raises(ValueError, match="mode"):
        _render(img, heat, mode="jet")


def test_partshapes_red_part_stays_red_dominant_under_its_own_heat() -> None:
    """A rendered PartShapes sample whose heat map sits on its red part: the part still reads red."""
    ds = PartShapesDataset(PartShapesRenderer(image_size=32, noise_std=4.0), "test", 64)
    red = ds.renderer.colours.index("red")
    table = ds.renderer.class_table
    for i in range(len(ds)):
        item = ds[i]
        slots = [k for k in range(table.shape[1]) if table[int(item["label"]), k, 1] == red]
        masks = [item["part_masks"][k].numpy().astype(bool) for k in slots]
        masks = [_erode(m) for m in masks if _erode(m).sum() >= 6]
        if masks:
            break
    else:
        pytest.fail("no test sample with a visible red part")
    part = masks[0]
    img = item["image"].permute(1, 2, 0).numpy().astype(float)
    yy, xx = np.mgrid[0:32, 0:32]
    cy, cx = np.argwhere(part).mean(0)
    heat = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * 4.0**2))
    canvas, ax = _render(img, heat)
    r, c = np.nonzero(part)
    got = np.median(_at(canvas, ax, r, c), axis=0)
    assert got[0] > 1.5 * max(got[1], got[2]), got  # red-dominant
    assert np.abs(got - np.median(img[r, c] * 255, axis=0)).max() <= 4


# -- class display names --------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"num_classes": 40, "seed": 3}, {"num_classes": 12, "num_slots": 3}])
def test_display_names_name_each_class_by_its_least_shared_part(kw: dict[str, Any]) -> None:
    r = PartShapesRenderer(**kw)
    names = r.class_display_names
    assert len(names) == r.num_classes and len(set(names)) == len(names)
    assert names == PartShapesRenderer(**kw).class_display_names  # deterministic
    assert names == r.with_pose().class_display_names
    classes = r.class_definitions()["classes"]
    texture_word = {"solid": None, "hstripes": "h-striped", "vstripes": "v-striped", "checker": "checked"}
    for c, (name, cls) in enumerate(zip(names, classes)):
        parts = cls["parts"]
        # other classes with the same (shape, colour, texture) in each slot, counted from the definitions
        shared = {p: sum(o["parts"][p] == parts[p] for o in classes) - 1 for p in r.part_names}
        best = min(shared.values())
        slot = next(p for p in r.part_names if shared[p] == best)  # the first slot among the least shared
        prefix = f"c{c}: "
        assert name.startswith(prefix) and name.endswith(f" {slot}"), (name, slot, shared)
        words = name[len(prefix) :].split()
        assert words[0] == parts[slot]["colour"] and words[-2] == parts[slot]["shape"]
        tex = texture_word[parts[slot]["texture"]]
        assert (tex in words) if tex else len(words) == 3


def test_display_names_leave_class_names_and_the_bundle_hash_alone() -> None:
    r = PartShapesRenderer()
    before = hashlib.sha256(r.class_definitions_json().encode()).hexdigest()[:16]
    names = r.class_display_names
    assert r.class_names == [f"class_{c:02d}" for c in range(10)]
    assert r.class_hash == before
    assert not any(n in r.class_definitions_json() for n in names)
    for bundle in ("protopnet_resnet18s.partshapes_s0", "icnn_resnet18s.partshapes_s0"):
        config = json.loads((ROOT / "models" / "pretrained" / bundle / "config.json").read_text())
        assert config["data_config"]["class_hash"] == r.class_hash  # shipped bundles still load


def test_class_display_names_fall_back_gracefully() -> None:
    r = PartShapesRenderer()

    class DM:
        renderer = r
        class_names = r.class_names

    info = {"class_names": [f"n{c}" for c in range(10)], "class_hash": r.class_hash}
    assert class_display_names(10, DM(), info) == r.class_display_names
    assert class_display_names(10, DM(), None) == r.class_display_names
    # trained on other classes: the renderer's names would mislabel them, so the network's names win
    assert class_display_names(10, DM(), {**info, "class_hash": "other"}) == info["class_names"]
    assert class_display_names(3, DM(), {"class_names": ["a", "b", "c"]}) == ["a", "b", "c"]
    assert class_display_names(3, None, None) == ["0", "1", "2"]
    assert class_display_names(10, None, {"class_names": r.class_names}) == r.class_names


# -- part scores in panel titles --------------------------------------------------------------------
def _capture(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[Figure]:
    """Keep the figures ``module`` saves instead of writing them (the drawers return a path; the titles are
    on the figure, and rendering a PNG would only cost time)."""
    seen: list[Figure] = []

    def save(fig: Figure, path: Path, *args: Any, **kw: Any) -> Path:
        seen.append(fig)
        return Path(path)

    monkeypatch.setattr(module, "save_figure", save)
    return seen


def _titles(fig: Figure) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_part_score_label_format() -> None:
    assert part_score_label([0.834, float("nan")], 0) == "part 0.83"
    assert part_score_label([0.834, float("nan")], 1) == "part n/a"
    assert part_score_label(None, 0) == ""


def test_part_filter_figure_prints_each_filter_part_score(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _capture(monkeypatch, icnn)
    g = torch.Generator().manual_seed(0)
    images, features = torch.rand(6, 3, 32, 32, generator=g), torch.rand(6, 4, 4, 4, generator=g)
    scores = [0.83, 0.12, -0.05, 0.5]
    icnn.part_filter_figure(images, features, tmp_path / "a.png", filters=[0, 2], top_k=3, part_scores=scores)
    titles = _titles(seen[-1])
    assert "part 0.83" in titles[0] and "part -0.05" in titles[3]  # first panel of each filter's row
    assert sum("part" in t for t in titles) == 2
    assert not any("jet" in str(im.get_cmap().name) for ax in seen[-1].axes for im in ax.images)
    icnn.part_filter_figure(images, features, tmp_path / "b.png", filters=[0, 2], top_k=3)
    assert not any("part" in t for t in _titles(seen[-1]))  # nothing printed without scores
    with pytest.raises(ValueError, match="4 filters"):
        icnn.part_filter_figure(images, features, tmp_path / "c.png", part_scores=[0.1, 0.2])


def test_filter_and_concept_axis_panels_print_part_scores(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen = _capture(monkeypatch, soft_autoencoder)
    w = torch.randn(5, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    soft_autoencoder.filters_figure(w, tmp_path / "f.png", part_scores=[0.1, 0.2, 0.3, 0.77, 0.5])
    titles = [t for t in _titles(seen[-1]) if t]
    assert titles[3] == "3\npart 0.77" and len(titles) == 5
    soft_autoencoder.filters_figure(w, tmp_path / "g.png")
    assert [t for t in _titles(seen[-1]) if t] == ["0", "1", "2", "3", "4"]

    seen = _capture(monkeypatch, concept_whitening)
    images, acts = torch.rand(5, 3, 16, 16), torch.rand(5, 2)
    concept_whitening.top_activating_figure(
        images, acts, ["has_red", "head_shape_circle"], tmp_path / "t.png", k=2, part_scores=[0.61, 0.02]
    )
    fig = seen[-1]
    assert fig.axes[0].get_title().startswith("part 0.61") and fig.axes[2].get_title().startswith("part 0.02")
    assert [fig.axes[i].get_ylabel() for i in (0, 2)] == ["has_red", "head_shape_circle"]  # concept names


@pytest.fixture(scope="module")
def pushed_protopnet() -> tuple[Any, Any]:
    """A tiny ProtoPNet on a tiny PartShapes datamodule, its push provenance set by hand (the figures only
    read it: prototype ``j`` projected onto training image ``j``)."""
    from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

    # 4 classes: the gallery runs the network once per prototype, which dominates the test's time
    dm = PartShapesDataModule(num_classes=4, n_train=8, n_val=4, n_test=4, batch_size=4)
    torch.manual_seed(0)
    net = create_model(
        "protopnet_resnet18s",
        num_classes=4,
        backbone={"name": "resnet18s", "width": 8},
        prototypes_per_class=1,
        prototype_dim=8,
    ).eval()
    net.data_config = dict(dm.data_info)
    p = net.num_prototypes
    net.push_source_index.copy_(torch.arange(p))
    net.push_act_box.copy_(torch.tensor([8, 8, 20, 20]).expand(p, 4))
    net.push_rf_box.copy_(torch.tensor([4, 4, 24, 24]).expand(p, 4))
    return net, dm


def test_prototype_figures_print_part_scores_and_class_display_names(
    pushed_protopnet: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    net, dm = pushed_protopnet
    seen = _capture(monkeypatch, protopnet)
    scores = torch.linspace(0, 0.9, net.num_prototypes)
    protopnet.prototype_gallery(net, dm, tmp_path / "g.png", part_scores=scores)
    fig = seen[-1]
    classes = net.prototype_classes.tolist()
    for j, s in enumerate(scores.tolist()):
        assert any(t.startswith(f"p{j} ") and t.endswith(f"part {s:.2f}") for t in _titles(fig)), j
    labels = [ax.get_ylabel().replace("\n", " ") for ax in fig.axes if ax.get_ylabel()]
    assert labels == [dm.renderer.class_display_names[c] for c in classes]
    assert not any(im.get_cmap().name == "jet" for ax in fig.axes for im in ax.images)

    protopnet.explanation_figure(net, dm, tmp_path / "e.png", n_images=2, top_k=2, part_scores=scores)
    titles = _titles(seen[-1])
    looks = [t for t in titles if t.startswith("looks like p")]
    assert len(looks) == 4 and all("part " in t for t in looks)
    for t in looks:
        j = int(t.split("\n")[0].removeprefix("looks like p"))
        assert t.endswith(f"part {float(scores[j]):.2f}")
    trues = [t for t in titles if t.startswith("true ")]
    assert len(trues) == 2 and all(": " in t for t in trues)  # "true c3: green circle head"

    protopnet.prototype_gallery(net, dm, tmp_path / "h.png")
    assert not any("part" in t for t in _titles(seen[-1]))


def test_explanation_drawers_take_class_names_and_part_scores(pushed_protopnet: tuple[Any, Any]) -> None:
    net, dm = pushed_protopnet
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    ex = net.explain(x, top_k=2)[0]
    names = dm.renderer.class_display_names
    scores = [round(0.01 * j, 2) for j in range(net.num_prototypes)]
    fig = Figure()
    ax = fig.subplots()
    draw_prototype_explanation(ex, ax, x[0], class_names=names, part_scores=scores)
    assert ax.get_title().startswith(names[ex.target])
    texts = [t.get_text() for t in ax.texts]
    for j, t in zip(ex.prototypes.tolist(), texts):
        assert t.startswith(f"p{j} (") and t.endswith(f"part {scores[j]:.2f}")

    ic = create_model("icnn_resnet18s", num_classes=4, backbone={"name": "resnet18s", "width": 8}).eval()
    iex = ic.explain(x)
    c = iex.scores.shape[1]
    fig = iex.plot(class_names=names, part_scores=[0.5] * c, top_k=2)
    ax = fig.axes[0]
    assert names[int(iex.prediction[0])] in ax.get_title()
    assert [t.get_text().endswith("part 0.50") for t in ax.texts] == [True, True]


def test_confusion_matrix_is_labelled_with_display_names(
    pushed_protopnet: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    net, dm = pushed_protopnet
    seen = _capture(monkeypatch, common)

    class Module(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.data_info = dm.data_info
            self.device = torch.device("cpu")

        def forward(self, x: torch.Tensor) -> Any:
            return self.net(x)

    dm.setup("test")
    common.confusion_matrix_figure(Module(), dm, tmp_path / "cm.png", max_batches=1)
    ax = seen[-1].axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == dm.renderer.class_display_names


def test_senn_concept_rows_print_part_scores(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from interpzoo.reports import senn

    seen = _capture(monkeypatch, senn)
    k, t = 3, 2
    # the top-activating search runs the network over the push set; the figure only reads its result
    monkeypatch.setattr(
        senn, "top_activating", lambda *a, **kw: (torch.arange(k * t).view(k, t), torch.rand(k, t))
    )
    module = type("M", (), {"net": type("N", (), {"tabular": False})()})()
    dm = type("D", (), {"push_set": [{"image": torch.rand(3, 16, 16)} for _ in range(k * t)]})()
    senn.concept_prototypes_figure(module, dm, tmp_path / "c.png", top_k=t, part_scores=[0.4, 0.91, 0.0])
    titles = _titles(seen[-1])
    assert [titles[i * t].split("\n")[0] for i in range(k)] == ["part 0.40", "part 0.91", "part 0.00"]
    assert not any("part" in titles[i * t + 1] for i in range(k))
