"""Real-data datamodules on tiny files written in their on-disk formats (offline, CPU, seconds)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from interpzoo.datamodules.base import DataError
from interpzoo.datamodules.cub import CUB200DataModule, flip_permutation
from interpzoo.datamodules.digits import DigitsDataModule
from interpzoo.datamodules.image_folder import ImageFolderDataModule
from interpzoo.datamodules.testing import (
    CUB_PART_NAMES,
    make_fake_cifar10,
    make_fake_cub,
    make_fake_image_folder,
    make_fake_mnist,
)
from interpzoo.datamodules.torchvision_sets import CIFAR10DataModule, MNISTDataModule

DATA_INFO_KEYS = {
    "task",
    "input_kind",
    "num_classes",
    "in_chans",
    "image_size",
    "mean",
    "std",
    "class_names",
    "concept_names",
    "part_names",
    "feature_names",
}


def check_item(item: dict, chans: int, size: tuple[int, int]) -> None:
    assert item["image"].shape == (chans, *size)
    assert item["image"].dtype == torch.float32
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    assert item["label"].dtype == torch.long and item["label"].dim() == 0
    assert item["index"].dtype == torch.long and item["index"].dim() == 0


def check_data_info(info: dict) -> None:
    assert set(info) == DATA_INFO_KEYS
    json.dumps(info)  # plain data only: it is saved beside checkpoints
    assert info["task"] == "classification" and info["input_kind"] == "image"
    assert len(info["class_names"]) == info["num_classes"]
    assert len(info["mean"]) == len(info["std"]) == info["in_chans"]


# -- digits ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=32, seed=3)
    dm.setup()
    return dm


def test_digits_split_is_stratified_disjoint_and_seeded(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    target = load_digits().target
    s = digits.split_indices
    assert [len(s[k]) for k in ("train", "val", "test")] == [1257, 180, 360]
    assert len(set(s["train"]) | set(s["val"]) | set(s["test"])) == 1797
    assert not set(s["train"]) & set(s["val"]) and not set(s["train"]) & set(s["test"])
    per_class = np.bincount(target[s["test"]], minlength=10)
    assert np.all(np.abs(per_class - 0.2 * np.bincount(target)) <= 1)
    assert [len(getattr(digits, f"{k}_set")) for k in ("train", "val", "test")] == [1257, 180, 360]

    again = DigitsDataModule(seed=3)
    again.setup()
    assert again.split_indices == s
    other = DigitsDataModule(seed=4)
    other.setup()
    assert other.split_indices["test"] != s["test"]


def test_digits_items_are_scaled_upsampled_digits(digits: DigitsDataModule) -> None:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    for i in (0, 100):
        item = digits.test_set[i]
        check_item(item, 1, (32, 32))
        src = digits.split_indices["test"][i]
        assert int(item["label"]) == bunch.target[src] and int(item["index"]) == i
        digit = torch.tensor(bunch.images[src] / 16.0, dtype=torch.float32)[None, None]
        expected = torch.nn.functional.interpolate(digit, size=(32, 32), mode="bilinear", align_corners=False)
        assert torch.allclose(item["image"], expected[0], atol=1e-5)
        # Upright, not transposed: nearest-neighbour 8x8 pixels agree with the digit's layout.
        assert (
            torch.corrcoef(torch.stack([item["image"][0, 1::4, 1::4].flatten(), digit.flatten()]))[0, 1] > 0.9
        )
    rgb = DigitsDataModule(image_size=[16, 24], rgb=True)
    rgb.setup()
    check_item(rgb.train_set[0], 3, (16, 24))
    assert rgb.data_info["in_chans"] == 3 and rgb.data_info["image_size"] == [16, 24]
    check_data_info(digits.data_info)


# -- CIFAR-10 -------------------------------------------------------------------------------------


def test_cifar10_reads_the_pickle_batches(tmp_path: Path) -> None:
    d = make_fake_cifar10(tmp_path, n_per_batch=8, n_test=6)
    dm = CIFAR10DataModule(str(tmp_path), verify_checksums=False, val_fraction=0.25, seed=1)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 6)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    assert list(dm.push_set.indices) == list(dm.train_set.indices)

    batches = []
    for i in range(1, 6):
        with open(d / f"data_batch_{i}", "rb") as f:
            batches.append(pickle.load(f, encoding="latin1"))
    data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    labels = sum((b["labels"] for b in batches), [])
    for k in (0, 7):
        item = dm.val_set[k]
        src = dm.val_set.indices[k]
        check_item(item, 3, (32, 32))
        assert int(item["index"]) == k and int(item["label"]) == labels[src]
        assert torch.equal((item["image"] * 255).round().to(torch.uint8), torch.from_numpy(data[src]))
    check_item(dm.train_set[3], 3, (32, 32))
    assert dm.data_info["class_names"][0] == "airplane"
    check_data_info(dm.data_info)

    with pytest.raises(DataError, match="verify_checksums"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar10_offline_error_names_directory_files_and_fixes(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        CIFAR10DataModule(str(tmp_path / "nowhere")).setup()
    msg = str(err.value)
    for part in (
        str(tmp_path / "nowhere" / "cifar-10-batches-py"),
        "data_batch_1",
        "test_batch",
        "batches.meta",
        "data.download=true",
        "copy",
    ):
        assert part in msg
    d = make_fake_cifar10(tmp_path)
    (d / "test_batch").unlink()
    with pytest.raises(DataError, match=r"missing: \['test_batch'\]"):
        CIFAR10DataModule(str(tmp_path), verify_checksums=False).setup()


# -- MNIST ----------------------------------------------------------------------------------------


def test_mnist_reads_idx_files_through_torchvision(tmp_path: Path) -> None:
    d = make_fake_mnist(tmp_path, n_train=20, n_test=10)
    dm = MNISTDataModule(str(tmp_path), val_fraction=0.2)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    raw = np.frombuffer((d / "t10k-images-idx3-ubyte").read_bytes()[16:], dtype=np.uint8).reshape(10, 28, 28)
    item = dm.test_set[5]
    check_item(item, 1, (28, 28))
    assert int(item["label"]) == 5
    assert torch.equal((item["image"][0] * 255).round().to(torch.uint8), torch.from_numpy(raw[5].copy()))

    big = MNISTDataModule(str(tmp_path), image_size=32, rgb=True, augment=True)
    big.setup()
    check_item(big.train_set[0], 3, (32, 32))
    check_item(big.test_set[0], 3, (32, 32))
    assert torch.equal(big.test_set[0]["image"][0], big.test_set[0]["image"][2])
    assert big.data_info["in_chans"] == 3 and big.data_info["image_size"] == [32, 32]
    check_data_info(big.data_info)


def test_mnist_offline_error_names_directory_and_files(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        MNISTDataModule(str(tmp_path)).setup()
    msg = str(err.value)
    for part in (
        str(tmp_path / "MNIST" / "raw"),
        "train-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
        "data.download=true",
    ):
        assert part in msg


# -- image folders --------------------------------------------------------------------------------


def test_image_folder_labels_follow_folders_and_val_is_carved(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, classes=("cat", "dog", "fox"), n_per_class=4, size=20)
    dm = ImageFolderDataModule(str(root), image_size=[16, 24], val_fraction=0.25)
    dm.setup()
    assert dm.data_info["class_names"] == ["cat", "dog", "fox"]  # .ipynb_checkpoints is not a class
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (9, 3, 12)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    for i in range(len(dm.test_set)):
        item = dm.test_set[i]
        check_item(item, 3, (16, 24))  # RGBA, L and P files all come out RGB
        path, _ = dm.test_set.samples[i]
        assert int(item["label"]) == ["cat", "dog", "fox"].index(path.parent.name)
    val_item = dm.val_set[1]
    assert int(val_item["index"]) == 1
    assert int(val_item["label"]) == ["cat", "dog", "fox"].index(
        dm.val_set.dataset.samples[dm.val_set.indices[1]][0].parent.name
    )
    check_item(dm.train_set[0], 3, (16, 24))
    check_data_info(dm.data_info)
    assert dm.data_info["concept_names"] is None

    with_val = make_fake_image_folder(tmp_path / "v", n_per_class=2, splits=("train", "val", "test"))
    dm = ImageFolderDataModule(str(with_val), image_size=16)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set)) == (6, 6)
    assert all(p.parts[-3] == "val" for p, _ in dm.val_set.samples)


def test_image_folder_rejects_differing_class_folders(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, classes=("cat", "dog"), n_per_class=1)
    (root / "test" / "cow").mkdir()
    with pytest.raises(DataError, match="cow") as err:
        ImageFolderDataModule(str(root), image_size=16).setup()
    assert str(root / "test") in str(err.value)


def test_image_folder_missing_folders_name_path_and_key(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, n_per_class=1, splits=("train",))
    with pytest.raises(DataError) as err:
        ImageFolderDataModule(str(root), image_size=16).setup()
    assert str(root / "test") in str(err.value) and "data.test_dir" in str(err.value)
    with pytest.raises(DataError, match="data.root"):
        ImageFolderDataModule(str(tmp_path / "absent")).setup()


def test_image_folder_concept_datasets(tmp_path: Path) -> None:
    root = make_fake_image_folder(tmp_path, n_per_class=2, with_concepts=["stripes", "dots", "wings"])
    dm = ImageFolderDataModule(
        str(root), image_size=16, concepts_train_dir="concepts_train", concepts_test_dir="concepts_test"
    )
    assert dm.data_info["concept_names"] == ["dots", "stripes", "wings"]
    for split in ("train", "test"):
        sets = dm.concept_datasets(split)
        assert list(sets) == ["dots", "stripes", "wings"]
        for k, (_, ds) in enumerate(sets.items()):
            assert len(ds) == 2
            item = ds[1]
            check_item(item, 3, (16, 16))
            assert int(item["label"]) == k and int(item["index"]) == 1
    loaders = dm.concept_dataloaders("test", batch_size=2)
    assert next(iter(loaders["wings"]))["label"].tolist() == [2, 2]

    only_train = ImageFolderDataModule(str(root), image_size=16, concepts_train_dir="concepts_train")
    with pytest.raises(DataError, match="data.concepts_test_dir"):
        only_train.concept_datasets("test")
    with pytest.raises(DataError, match="concepts_nope"):
        ImageFolderDataModule(str(root), concepts_train_dir="concepts_nope").concept_datasets("train")


# -- CUB-200-2011 ---------------------------------------------------------------------------------


def _rewrite_parts(cub: Path, img_id: int, parts: dict[int, tuple[float, float, int]]) -> None:
    """Set ``part index (0-based) -> (x, y, visible)`` of one image in parts/part_locs.txt."""
    lines = (cub / "parts/part_locs.txt").read_text().splitlines()
    out = []
    for line in lines:
        i, p, *_ = line.split()
        if int(i) == img_id and int(p) - 1 in parts:
            x, y, v = parts[int(p) - 1]
            line = f"{i} {p} {x} {y} {v}"
        out.append(line)
    (cub / "parts/part_locs.txt").write_text("\n".join(out) + "\n")


def _box(cub: Path, img_id: int) -> tuple[float, float, float, float]:
    for line in (cub / "bounding_boxes.txt").read_text().splitlines():
        i, *vals = line.split()
        if int(i) == img_id:
            return tuple(float(v) for v in vals)  # type: ignore[return-value]
    raise KeyError(img_id)


def _image_path(cub: Path, img_id: int) -> Path:
    for line in (cub / "images.txt").read_text().splitlines():
        i, rel = line.split()
        if int(i) == img_id:
            return cub / "images" / rel
    raise KeyError(img_id)


def test_cub_splits_labels_and_data_info(tmp_path: Path) -> None:
    cub = make_fake_cub(tmp_path, n_classes=3, n_per_class=4, size=40)
    dm = CUB200DataModule(str(tmp_path), image_size=32, val_fraction=0.34)  # parent of CUB_200_2011 works
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 6)
    assert not set(dm.train_set.indices) & set(dm.val_set.indices)
    classes = [line.split()[1] for line in (cub / "classes.txt").read_text().splitlines()]
    for i in range(len(dm.test_set)):
        item = dm.test_set[i]
        check_item(item, 3, (32, 32))  # image 1 is greyscale on disk
        assert classes[int(item["label"])] == dm.test_set.paths[i].parent.name
        assert item["landmarks"].shape == (15, 2) and item["landmarks"].dtype == torch.float32
        assert item["landmark_visible"].dtype == torch.bool
        assert not item["landmark_visible"][2::3].any()  # annotated as not visible
    batch = next(iter(dm.train_dataloader()))
    assert batch["landmarks"].shape == (4, 15, 2) and batch["landmark_visible"].shape == (4, 15)
    info = dm.data_info
    check_data_info(info)
    assert info["part_names"] == CUB_PART_NAMES and info["class_names"] == classes


def test_cub_landmarks_follow_crop_and_resize(tmp_path: Path) -> None:
    cub = make_fake_cub(tmp_path, n_classes=2, n_per_class=2, size=48)
    bx, by, bw, bh = _box(cub, 2)  # image 2 is the first test image
    w, h = Image.open(_image_path(cub, 2)).size
    _rewrite_parts(
        cub,
        2,
        {
            0: (bx + bw / 2, by + bh / 2, 1),  # box centre
            1: (bx + bw + 0.5, by + 1.0, 1),  # just right of the box, inside the image
            3: (bx + bw / 4, by + 3 * bh / 4, 1),
        },
    )
    item = CUB200DataModule(str(cub), image_size=[40, 56], augment=False).test_dataloader().dataset[0]
    lm, vis = item["landmarks"], item["landmark_visible"]
    assert torch.allclose(lm[0], torch.tensor([28.0, 20.0]), atol=1e-3) and vis[0]
    assert not vis[1]
    assert torch.allclose(lm[3], torch.tensor([14.0, 30.0]), atol=1e-3) and vis[3]

    whole = CUB200DataModule(str(cub), image_size=[40, 56], crop_to_bbox=False, augment=False)
    item = whole.test_dataloader().dataset[0]
    assert item["landmark_visible"][1]  # outside the box but inside the image
    expected = torch.tensor([(bx + bw + 0.5) * 56 / w, (by + 1.0) * 40 / h])
    assert torch.allclose(item["landmarks"][1], expected, atol=1e-3)


def test_cub_augmented_landmarks_track_the_image_content(tmp_path: Path) -> None:
    cub = make_fake_cub(tmp_path, n_classes=2, n_per_class=2, size=48)
    path = _image_path(cub, 1)  # the first training image
    w, h = Image.open(path).size
    bx, by, bw, bh = _box(cub, 1)
    lx, ly = bx + 0.4 * bw, by + 0.45 * bh
    canvas = np.zeros((h, w, 3), dtype=np.uint8)
    canvas[int(ly) - 2 : int(ly) + 3, int(lx) - 2 : int(lx) + 3] = 255  # a 5x5 dot centred on (lx, ly)
    Image.fromarray(canvas).save(path.with_suffix(".png"))
    shutil.move(path.with_suffix(".png"), path)  # keep the listed file name; Pillow sniffs the format
    centre = (int(lx) + 0.5, int(ly) + 0.5)
    # Left eye on the dot; right eye far away: after a flip the *right eye* landmark must sit on the dot.
    _rewrite_parts(cub, 1, {6: (*centre, 1), 10: (bx + 0.9 * bw, by + 0.9 * bh, 1)})
    assert flip_permutation(CUB_PART_NAMES)[6] == 10 and flip_permutation(CUB_PART_NAMES)[0] == 0

    dm = CUB200DataModule(str(cub), image_size=64, augment=True, val_fraction=0.0)
    dm.setup()
    torch.manual_seed(0)
    seen = set()
    for _ in range(10):
        item = dm.train_set[0]
        img = item["image"].mean(0)
        ys, xs = torch.nonzero(img > 0.25, as_tuple=True)
        if len(xs) == 0:
            continue  # the dot was cropped away
        wts = img[ys, xs]
        dot = torch.stack([((xs + 0.5) * wts).sum(), ((ys + 0.5) * wts).sum()]) / wts.sum()
        near = [int(k) for k in (6, 10) if torch.dist(item["landmarks"][k], dot) < 1.0]
        assert len(near) == 1, (dot, item["landmarks"][[6, 10]])
        assert item["landmark_visible"][near[0]]
        seen.add(near[0])
    assert seen == {6, 10}  # both flipped and unflipped draws were checked


def test_cub_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        CUB200DataModule(str(tmp_path)).setup()
    msg = str(err.value)
    for part in (str(tmp_path), "images.txt", "train_test_split.txt", "parts/part_locs.txt", "caltech"):
        assert part in msg

    cub = make_fake_cub(tmp_path / "c", n_classes=2, n_per_class=2, size=32)
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(DataError, match="bounding_boxes.txt") as err:
        CUB200DataModule(str(cub)).setup()
    assert "crop_to_bbox=false" in str(err.value)
    dm = CUB200DataModule(str(cub), crop_to_bbox=False, landmarks=False, image_size=16)
    dm.setup()
    assert "landmarks" not in dm.test_set[0] and dm.data_info["part_names"] is None

    _image_path(cub, 3).unlink()
    with pytest.raises(DataError, match="missing under"):
        CUB200DataModule(str(cub), crop_to_bbox=False).setup()
