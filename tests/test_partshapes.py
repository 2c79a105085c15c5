"""PartShapes: determinism, ground truth, classes, interventions, probes, datamodule (32 px, small)."""

from __future__ import annotations

import itertools
import json
import time

import numpy as np
import pytest
import torch

from interpzoo.datamodules.partshapes import ALL_COLOURS, PartShapesDataset, PartShapesRenderer
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule

N = 200


@pytest.fixture(scope="module")
def renderer() -> PartShapesRenderer:
    return PartShapesRenderer(image_size=32, num_distractors=2, part_dropout=0.5, seed=3)


@pytest.fixture(scope="module")
def clean() -> PartShapesRenderer:
    """No noise, so pixel colours are exact."""
    return PartShapesRenderer(image_size=32, num_distractors=2, part_dropout=0.5, noise_std=0.0, seed=5)


def _shades(r: PartShapesRenderer, colour_idx: int) -> np.ndarray:
    light = np.array(ALL_COLOURS[r.colours[colour_idx]], dtype=np.float64)
    return np.stack([light, np.round(light * (1 - r.texture_contrast))]).astype(np.uint8)


# -- determinism -------------------------------------------------------------------------------


def test_determinism(renderer: PartShapesRenderer) -> None:
    other = PartShapesRenderer(image_size=32, num_distractors=2, part_dropout=0.5, seed=3)
    for i in (0, 7, 123):
        a, b = renderer.render("train", i), other.render("train", i)
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.part_map, b.part_map)
        np.testing.assert_array_equal(a.concepts, b.concepts)
        np.testing.assert_array_equal(a.landmarks, b.landmarks)
        np.testing.assert_array_equal(a.image, renderer.render("train", i).image)
    base = renderer.render("train", 5).image
    assert not np.array_equal(base, renderer.render("test", 5).image)
    assert not np.array_equal(base, renderer.render("val", 5).image)
    assert not np.array_equal(base, renderer.render("train", 6).image)
    assert not np.array_equal(base, PartShapesRenderer(seed=4).render("train", 5).image)
    # two torch datasets agree, lazily and cached
    d1 = PartShapesDataset(renderer, "val", 16)
    d2 = PartShapesDataset(other, "val", 16, cache=True)
    for i in (0, 15):
        x, y = d1[i], d2[i]
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


# -- ground truth ------------------------------------------------------------------------------


def test_masks_landmarks_colours(clean: PartShapesRenderer) -> None:
    k = clean.num_slots
    n_dropped = n_distractor = 0
    yy, xx = np.mgrid[0:32, 0:32]
    for i in range(N):
        s = clean.render("train", i)
        pm = s.part_masks
        assert pm.shape == (k, 32, 32) and pm.dtype == bool
        assert s.part_map.max() <= k + clean.num_distractors
        for j in range(k):
            if not s.landmark_visible[j]:
                n_dropped += 1
                assert not pm[j].any()
                block = s.concepts[j * clean._block : (j + 1) * clean._block]
                assert not block.any(), "dropped part must have zero one-hots"
                continue
            assert pm[j].any()
            # one-hot per family for a present part
            block = s.concepts[j * clean._block : (j + 1) * clean._block]
            assert block.sum() == 3
            # landmark inside (or within 1 px of) its mask
            x, y = s.landmarks[j]
            d = np.sqrt((xx[pm[j]] - x) ** 2 + (yy[pm[j]] - y) ** 2).min()
            assert d <= 1.0, (i, j, d)
            # part pixels carry the part's colour (light or dark shade)
            pix = s.image[pm[j]]
            shades = _shades(clean, int(s.spec.attrs[j, 1]))
            ok = (pix[:, None, :] == shades[None]).all(-1).any(-1)
            assert ok.all(), (i, j)
            # box contains the mask
            x0, y0, x1, y1 = s.part_boxes[j]
            assert (xx[pm[j]] >= x0).all() and (xx[pm[j]] < x1).all()
            assert (yy[pm[j]] >= y0).all() and (yy[pm[j]] < y1).all()
        # distractors: labels > K, their colour too
        n_distractor += s.spec.d_attrs.shape[0]
        for j in range(s.spec.d_attrs.shape[0]):
            m = s.part_map == k + 1 + j
            if m.any():
                shades = _shades(clean, int(s.spec.d_attrs[j, 1]))
                assert (s.image[m][:, None, :] == shades[None]).all(-1).any(-1).all()
        # background pixels are the background colour
        assert (s.image[s.part_map == 0] == s.spec.bg.astype(np.uint8)).all()
        # presence concepts agree with the present parts
        for name in ("has_red", "has_triangle", "has_checker"):
            fam, val = {
                "has_red": (1, "red"),
                "has_triangle": (0, "triangle"),
                "has_checker": (2, "checker"),
            }[name]
            vocab = (clean.shapes, clean.colours, clean.textures)[fam]
            want = any(s.spec.attrs[j, fam] == vocab.index(val) for j in range(k) if s.landmark_visible[j])
            assert s.concepts[clean.concept_index(name)] == float(want)
    assert n_dropped > 0 and n_distractor > 0  # both code paths were exercised


def test_concept_masks(clean: PartShapesRenderer) -> None:
    s = clean.render("test", 3)
    cm = clean.concept_masks(s)
    assert cm.shape == (len(clean.concept_names), 32, 32)
    # a concept mask is non-empty iff the concept is on
    np.testing.assert_array_equal(cm.reshape(len(cm), -1).any(1), s.concepts > 0)
    head_colour = clean.colours[int(s.spec.attrs[0, 1])]
    np.testing.assert_array_equal(cm[clean.concept_index(f"head_colour_{head_colour}")], s.part_masks[0])
    assert cm[clean.concept_index(f"has_{head_colour}")][s.part_masks[0]].all()


# -- classes -----------------------------------------------------------------------------------


def test_classes_hamming_and_hash() -> None:
    r = PartShapesRenderer(num_classes=30, h_min=3, seed=1)
    t = r.class_table
    assert t.shape == (30, 4, 3)
    for a, b in itertools.combinations(range(30), 2):
        assert (t[a] != t[b]).any(-1).sum() >= 3
    h = r.class_hash
    assert len(h) == 16 and h == PartShapesRenderer(num_classes=30, h_min=3, seed=1).class_hash
    assert h != PartShapesRenderer(num_classes=30, h_min=3, seed=1, class_seed=2).class_hash
    # class definitions do not depend on sample-level settings
    assert h == PartShapesRenderer(num_classes=30, h_min=3, seed=1, noise_std=0, image_size=64).class_hash
    defs = json.loads(r.class_definitions_json())
    assert len(defs["classes"]) == 30 and defs["part_names"] == ["head", "body", "wing", "tail"]
    with pytest.raises(ValueError):
        PartShapesRenderer(num_classes=5, h_min=5)


def _slot_distance_without(t: np.ndarray, attr: int) -> np.ndarray:
    """``(C, C)`` slots in which two classes differ once attribute ``attr`` is ignored (brute force)."""
    keep = [a for a in range(3) if a != attr]
    c = len(t)
    return np.array([[(t[i][:, keep] != t[j][:, keep]).any(-1).sum() for j in range(c)] for i in range(c)])


def test_plain_table_makes_shape_redundant_and_minimal_pairs_make_every_attribute_necessary() -> None:
    plain = PartShapesRenderer(image_size=16, seed=0, noise_tiles=1).class_table
    d = _slot_distance_without(plain, 0)
    # the default table: with shape ignored every two classes still differ in >= h_min = 2 slots
    assert d[~np.eye(10, dtype=bool)].min() >= 2
    pairs = ("shape", "shape", "colour", "texture", "texture")
    r = PartShapesRenderer(image_size=16, seed=0, noise_tiles=1, minimal_pairs=pairs)
    t = r.class_table
    for a, b in itertools.combinations(range(10), 2):
        assert (t[a] != t[b]).any(-1).sum() >= 2  # h_min still holds
    for i, attr in enumerate(pairs):
        a = ("shape", "colour", "texture").index(attr)
        base, twin = t[2 * i], t[2 * i + 1]
        differ = base != twin  # (K, 3)
        assert differ[:, a].sum() == 2 and differ.sum() == 2, (attr, base, twin)  # that attribute only
        assert _slot_distance_without(t, a)[2 * i, 2 * i + 1] == 0  # ignoring it merges the pair
    # the plain table is unchanged by the option's existence, the class hash tells the two apart
    assert np.array_equal(
        plain, PartShapesRenderer(image_size=16, seed=0, noise_tiles=1, minimal_pairs=()).class_table
    )
    assert r.class_hash != PartShapesRenderer(image_size=16, seed=0, noise_tiles=1).class_hash
    assert json.loads(r.class_definitions_json())["minimal_pairs"] == list(pairs)
    with pytest.raises(ValueError, match=r"'size'.*not among the attributes"):
        PartShapesRenderer(minimal_pairs=("size",))
    with pytest.raises(ValueError, match=r"need 12 classes; num_classes=10"):
        PartShapesRenderer(minimal_pairs=("shape",) * 6)
    dm = PartShapesDataModule(n_train=4, n_val=2, n_test=2, minimal_pairs=["colour"])
    assert dm.renderer.minimal_pairs == ("colour",)
    # a bare name (data.minimal_pairs=colour on the command line) is one pair, not a sequence of letters
    assert PartShapesRenderer(image_size=16, noise_tiles=1, minimal_pairs="colour").minimal_pairs == (
        "colour",
    )


def test_minimal_sufficient_part_sets() -> None:
    r = PartShapesRenderer(
        num_classes=12,
        h_min=2,
        seed=0,
        shapes=["circle", "square"],
        colours=["red", "blue"],
        textures=["solid", "checker"],
    )
    t = r.class_table
    msp = r.minimal_sufficient_part_sets()
    for c, name in enumerate(r.class_names):
        assert msp[name], name
        for sub in msp[name]:
            others = np.delete(t, c, axis=0)[:, sub]
            assert not (others == t[c, sub]).all(-1).all(-1).any()  # sufficient
            for drop in sub:  # minimal
                smaller = [s for s in sub if s != drop]
                if smaller:
                    assert (np.delete(t, c, axis=0)[:, smaller] == t[c, smaller]).all(-1).all(-1).any()


# -- interventions -----------------------------------------------------------------------------


def test_remove_part(renderer: PartShapesRenderer) -> None:
    checked = 0
    for i in range(40):
        s = renderer.render("test", i)
        for j in range(renderer.num_slots):
            if not s.landmark_visible[j]:
                continue
            r = renderer.render("test", i, remove_parts=[j])
            diff = (r.image != s.image).any(-1)
            assert not (diff & ~s.part_masks[j]).any(), "change outside the removed part"
            assert diff[s.part_masks[j]].mean() > 0.5
            assert not r.part_masks[j].any() and not r.landmark_visible[j]
            assert r.concepts[j * renderer._block : (j + 1) * renderer._block].sum() == 0
            np.testing.assert_array_equal(r.landmarks, s.landmarks)  # same layout
            checked += 1
    assert checked > 0


def test_replace_part_and_remove_distractors(clean: PartShapesRenderer) -> None:
    s = clean.render("val", 11)
    old = clean.colours[int(s.spec.attrs[1, 1])]
    new = next(c for c in clean.colours if c != old)
    r = clean.render("val", 11, replace_part={"body": {"colour": new, "shape": "triangle"}})
    assert r.concepts[clean.concept_index(f"body_colour_{new}")] == 1
    assert r.concepts[clean.concept_index(f"body_colour_{old}")] == 0
    assert r.concepts[clean.concept_index("body_shape_triangle")] == 1
    assert r.concepts[clean.concept_index("has_triangle")] == 1
    assert r.label == s.label
    shades = _shades(clean, clean.colours.index(new))
    assert (r.image[r.part_masks[1]][:, None] == shades[None]).all(-1).any(-1).all()
    unchanged = ~(s.part_masks[1] | r.part_masks[1])
    np.testing.assert_array_equal(r.image[unchanged], s.image[unchanged])

    found = False
    for i in range(50):
        s = clean.render("test", i)
        if not s.distractor_mask.any():
            continue
        found = True
        r = clean.render("test", i, remove_distractors=True)
        assert not r.distractor_mask.any()
        diff = (r.image != s.image).any(-1)
        assert diff[s.distractor_mask].any() and not (diff & ~s.distractor_mask).any()
        np.testing.assert_array_equal(
            r.part_map[s.part_map <= clean.num_slots], s.part_map[s.part_map <= clean.num_slots]
        )
    assert found


# -- concept probes ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "concept", ["has_red", "has_triangle", "has_checker", "has_striped", "wing_colour_blue"]
)
def test_concept_probes(renderer: PartShapesRenderer, concept: str) -> None:
    ci = renderer.concept_index(concept)
    ds = PartShapesDataset(renderer, "train", 1).concept_probe_dataset(concept, "train", 24)
    test_ds = PartShapesDataset(renderer, "train", 1).concept_probe_dataset(concept, "test", 24)
    assert len(ds) == 24
    for i in range(24):
        item = ds[i]
        assert item["label"].item() == ci
        assert item["concepts"][ci] == 1
        assert item["image"].shape == (3, 32, 32) and item["concept_mask"].any()
        assert int(item["concepts"][: renderer.n_slot_concepts].sum()) == 3  # exactly one part
    assert not torch.equal(ds[0]["image"], test_ds[0]["image"])
    assert torch.equal(ds[3]["image"], ds[3]["image"])


# -- datamodule --------------------------------------------------------------------------------


def test_datamodule_batches_and_info() -> None:
    dm = PartShapesDataModule(
        n_train=64, n_val=32, n_test=32, batch_size=16, n_concept_train=8, n_concept_test=8
    )
    dm.setup("fit")
    info = dm.data_info
    json.dumps(info)
    assert info["num_classes"] == 10 and info["in_chans"] == 3 and info["image_size"] == [32, 32]
    assert len(info["mean"]) == 3 and all(0 < v < 1 for v in info["mean"] + info["std"])
    assert info["part_names"] == ["head", "body", "wing", "tail"]
    assert len(info["concept_names"]) == len(dm.concept_names) and info["feature_names"] is None
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader(), dm.push_dataloader()):
        b = next(iter(loader))
        assert b["image"].shape == (16, 3, 32, 32) and b["image"].dtype == torch.float32
        assert b["image"].min() >= 0 and b["image"].max() <= 1
        assert b["label"].dtype == torch.long and b["index"].dtype == torch.long
        assert b["concepts"].shape == (16, len(info["concept_names"]))
        assert b["part_masks"].shape == (16, 4, 32, 32) and b["part_masks"].dtype == torch.bool
        assert b["landmarks"].shape == (16, 4, 2) and b["landmarks"].dtype == torch.float32
        assert b["landmark_visible"].shape == (16, 4) and b["landmark_visible"].dtype == torch.bool
    b = next(iter(dm.push_dataloader()))
    assert b["index"].tolist() == list(range(16))
    cds = dm.concept_datasets("test")
    assert set(cds) == set(dm.concepts) and "has_red" in cds
    loaders = dm.concept_dataloaders("train", batch_size=4)
    cb = next(iter(loaders["has_red"]))
    assert (cb["label"] == dm.concept_names.index("has_red")).all()


def test_datamodule_grayscale_and_options() -> None:
    dm = PartShapesDataModule(
        n_train=8,
        n_val=8,
        n_test=8,
        batch_size=4,
        grayscale=True,
        image_size=48,
        num_slots=5,
        concepts=["has_green", "has_square"],
        return_concept_masks=True,
        cache=True,
    )
    dm.setup()
    info = dm.data_info
    assert info["in_chans"] == 1 and len(info["mean"]) == 1 and info["image_size"] == [48, 48]
    assert info["part_names"] == [f"slot_{i}" for i in range(5)]
    b = next(iter(dm.val_dataloader()))
    assert b["image"].shape == (4, 1, 48, 48)
    assert b["concept_masks"].shape == (4, len(info["concept_names"]), 48, 48)
    assert list(dm.concept_datasets("train")) == ["has_green", "has_square"]
    with pytest.raises(ValueError):
        PartShapesDataModule(concepts=["has_purple"])


def test_spurious_background_train_only() -> None:
    r = PartShapesRenderer(spurious_rho=1.0, seed=2)
    for i in range(20):
        assert r.draw("train", i).spurious and abs(r.draw("train", i).hue - (i % 10) / 10) < 1e-9
        assert not r.draw("test", i).spurious


def test_render_speed_printed() -> None:
    """Prints the render rate; no timing assertion (shared CPU)."""
    r = PartShapesRenderer(image_size=32)
    t = time.perf_counter()
    for i in range(2000):
        r.render("train", i)
    dt = time.perf_counter() - t
    print(f"PartShapes 32 px: 2000 images in {dt:.2f} s ({dt / 2000 * 1e6:.0f} us/image)")
    assert dt > 0
