"""Image folders: ``root/{train,val,test}/<class>/*.jpg`` plus optional concept probe folders.

The layout is torchvision's ``ImageFolder`` one, read by our own scanner so that hidden folders
(``.ipynb_checkpoints``) never become classes and every split is checked to have the same class
folders: ProtoPNet issue #10 was a test folder with a different class list, which silently shifted
every label after the first missing class.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from interpzoo.datamodules.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    DataError,
    IndexedSubset,
    split_indices,
)

log = logging.getLogger(__name__)

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def size_pair(image_size: int | Sequence[int]) -> tuple[int, int]:
    """``224`` or ``[224, 224]`` to ``(H, W)``."""
    if isinstance(image_size, int):
        h = w = image_size
    else:
        sizes = [int(s) for s in image_size]
        if len(sizes) != 2:
            raise ValueError(f"image_size must be an int or [H, W], got {image_size!r}")
        h, w = sizes
    if h < 1 or w < 1:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return h, w


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Open an image as RGB: greyscale is replicated, alpha is dropped (torchvision's convention)."""
    try:
        with Image.open(path) as im:
            # Palette images with a transparent index warn when converted straight to RGB.
            if im.mode == "P" and "transparency" in im.info:
                im = im.convert("RGBA")
            return im.convert("RGB")
    except OSError as e:
        raise DataError(f"cannot read image '{path}': {e}. Delete or replace the file.") from e


def pil_to_float(img: Image.Image) -> torch.Tensor:
    """PIL image to a ``(C, H, W)`` float tensor in ``[0, 1]``."""
    return TF.pil_to_tensor(img).float().div_(255.0)


def _is_hidden(name: str) -> bool:
    return name.startswith(".") or name.startswith("__")


def list_images(directory: Path) -> list[Path]:
    """Image files under ``directory`` (recursively, hidden entries skipped), in sorted order."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for f in sorted(filenames):
            if not _is_hidden(f) and f.lower().endswith(IMG_EXTENSIONS):
                found.append(Path(dirpath) / f)
    return found


def list_class_folders(directory: Path) -> list[str]:
    """Sorted names of the non-hidden sub-folders: class ``i`` is the ``i``-th name."""
    return sorted(e.name for e in os.scandir(directory) if e.is_dir() and not _is_hidden(e.name))


def scan_class_folders(directory: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    """``(class_names, [(image_path, class_index), ...])`` of a folder of class sub-folders."""
    classes = list_class_folders(directory)
    samples = [(p, i) for i, c in enumerate(classes) for p in list_images(directory / c)]
    return classes, samples


class ImageFileDataset(Dataset):
    """Images read from disk.

    Args:
        samples: ``(path, label)`` pairs.
        transform: PIL RGB image to ``(C, H, W)`` float tensor in ``[0, 1]``.

    Items: ``{"image": (C, H, W) float, "label": long, "index": long}``, ``index`` being the
    position in ``samples``.
    """

    def __init__(self, samples: Sequence[tuple[Path, int]], transform: Callable[[Image.Image], torch.Tensor]):
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict[str, Any]:
        path, label = self.samples[idx]
        return {
            "image": self.transform(load_rgb(path)),
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long),
        }


class PILPipeline:
    """PIL transforms followed by conversion to a ``[0, 1]`` float tensor.

    A class rather than a lambda so that DataLoader workers started with ``spawn`` can pickle it.
    """

    def __init__(self, pil_transforms: Sequence[Callable[[Image.Image], Image.Image]]):
        self.pil_transforms = T.Compose(list(pil_transforms))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return pil_to_float(self.pil_transforms(img))

    def __repr__(self) -> str:
        return f"PILPipeline({self.pil_transforms!r})"


def eval_pipeline(size: tuple[int, int]) -> PILPipeline:
    # Resize to (H, W) without keeping the aspect ratio (the ProtoPNet convention): no content is cut
    # away, which matters when a dataset is already cropped to the object.
    return PILPipeline([T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True)])


def train_pipeline(size: tuple[int, int]) -> PILPipeline:
    return PILPipeline(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomRotation(10),
        ]
    )


def _missing_dir(path: Path, key: str, what: str) -> DataError:
    return DataError(
        f"{what} folder '{path}' does not exist. Set data.{key} (relative to data.root or absolute) to "
        f"a folder with one sub-folder of images per {'concept' if 'concept' in key else 'class'}."
    )


def _class_mismatch(ref: str, ref_classes: list[str], other: str, other_classes: list[str]) -> DataError:
    only_ref = sorted(set(ref_classes) - set(other_classes))
    only_other = sorted(set(other_classes) - set(ref_classes))
    return DataError(
        f"class folders differ between '{ref}' and '{other}': only in the first {only_ref}, only in the "
        f"second {only_other}. Labels are indices into the sorted folder names, so every split must "
        "have the same class folders (an empty folder is allowed outside train), otherwise label i "
        "means a different class in each split."
    )


class ImageFolderDataModule(BaseDataModule):
    """Train/val/test folders of class sub-folders, with optional concept probe folders.

    Args:
        root: dataset root; the ``*_dir`` arguments are relative to it (or absolute).
        train_dir: training images, one sub-folder per class.
        val_dir: validation images; when ``None`` or absent, ``val_fraction`` of ``train_dir`` is
            held out instead (seeded by ``seed``).
        test_dir: test images with the same class sub-folders as ``train_dir``.
        image_size: output size, ``int`` or ``[H, W]``; images are resized without keeping the aspect.
        augment: random resized crop (scale 0.5-1), horizontal flip and +-10 deg rotation on train.
        mean, std: per-channel statistics the networks normalise with (default ImageNet).
        concepts_train_dir, concepts_test_dir: folders with one sub-folder of images per concept
            (concept whitening: train aligns the axes, test measures concept AUC).
        batch_size, num_workers, pin_memory, val_fraction, seed: see :class:`BaseDataModule`.

    Items: ``{"image": (3, H, W) float in [0, 1], "label": long, "index": long}``.
    """

    def __init__(
        self,
        root: str,
        train_dir: str = "train",
        val_dir: str | None = "val",
        test_dir: str = "test",
        image_size: int | Sequence[int] = 224,
        augment: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        concepts_train_dir: str | None = None,
        concepts_test_dir: str | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.train_dir = train_dir
        self.val_dir = val_dir
        self.test_dir = test_dir
        self.image_size = size_pair(image_size)
        self.augment = augment
        self.mean = [float(m) for m in (mean if mean is not None else IMAGENET_MEAN)]
        self.std = [float(s) for s in (std if std is not None else IMAGENET_STD)]
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {self.mean} and {self.std}")
        self.concepts_train_dir = concepts_train_dir
        self.concepts_test_dir = concepts_test_dir
        self._classes: list[str] | None = None
        self._concepts: list[str] | None = None

    # -- paths ------------------------------------------------------------------------------
    def _path(self, sub: str) -> Path:
        return self.root / os.path.expanduser(sub)

    def _required_dir(self, sub: str, key: str, what: str) -> Path:
        path = self._path(sub)
        if not path.is_dir():
            raise _missing_dir(path, key, what)
        return path

    def _class_names(self) -> list[str]:
        if self._classes is None:
            if not self.root.is_dir():
                raise DataError(
                    f"dataset root '{self.root}' does not exist; set data.root to the folder "
                    f"holding '{self.train_dir}/' and '{self.test_dir}/'."
                )
            train = self._required_dir(self.train_dir, "train_dir", "training")
            classes = list_class_folders(train)
            if not classes:
                raise DataError(
                    f"training folder '{train}' has no class sub-folders; put the images of "
                    "class c under <train_dir>/c/."
                )
            self._classes = classes
        return self._classes

    def _concept_names(self) -> list[str] | None:
        if self._concepts is None:
            names: dict[str, list[str]] = {}
            for key in ("concepts_train_dir", "concepts_test_dir"):
                sub = getattr(self, key)
                if sub is not None:
                    names[key] = list_class_folders(self._required_dir(sub, key, "concept"))
            if len(names) == 2 and names["concepts_train_dir"] != names["concepts_test_dir"]:
                raise _class_mismatch(
                    str(self._path(self.concepts_train_dir)),
                    names["concepts_train_dir"],
                    str(self._path(self.concepts_test_dir)),
                    names["concepts_test_dir"],
                )
            self._concepts = next(iter(names.values()), None)
        return self._concepts

    # -- building -----------------------------------------------------------------------------
    def _scan_split(self, sub: str, key: str, what: str) -> list[tuple[Path, int]]:
        path = self._required_dir(sub, key, what)
        classes, samples = scan_class_folders(path)
        if classes != self._class_names():
            raise _class_mismatch(str(self._path(self.train_dir)), self._class_names(), str(path), classes)
        if not samples:
            raise DataError(
                f"{what} folder '{path}' has class folders but no images "
                f"(extensions: {', '.join(IMG_EXTENSIONS)})."
            )
        return samples

    def _build(self) -> None:
        classes = self._class_names()
        train = self._scan_split(self.train_dir, "train_dir", "training")
        empty = sorted(set(range(len(classes))) - {label for _, label in train})
        if empty:
            raise DataError(
                f"training classes without images in '{self._path(self.train_dir)}': "
                f"{[classes[i] for i in empty]}; add images or remove those folders everywhere."
            )
        test = self._scan_split(self.test_dir, "test_dir", "test")
        plain = eval_pipeline(self.image_size)
        aug = train_pipeline(self.image_size) if self.augment else plain
        if self.val_dir is not None and self._path(self.val_dir).is_dir():
            val = self._scan_split(self.val_dir, "val_dir", "validation")
            self.train_set = ImageFileDataset(train, aug)
            self.push_set = ImageFileDataset(train, plain)
            self.val_set = ImageFileDataset(val, plain)
        else:
            log.info(
                "no validation folder under %s: holding out %.0f%% of the training images",
                self.root,
                100 * self.val_fraction,
            )
            train_idx, val_idx = split_indices(len(train), self.val_fraction, self.seed)
            self.train_set = IndexedSubset(ImageFileDataset(train, aug), train_idx)
            self.push_set = IndexedSubset(ImageFileDataset(train, plain), train_idx)
            self.val_set = IndexedSubset(ImageFileDataset(train, plain), val_idx)
        self.test_set = ImageFileDataset(test, plain)
        self._concept_names()  # fail at setup, not mid-training, on mismatched concept folders

    def concept_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """``{concept: dataset}`` of un-augmented concept images; items' ``label`` is the concept index.

        ``split``: "train" reads ``concepts_train_dir``, "test" reads ``concepts_test_dir``.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        key = f"concepts_{split}_dir"
        sub = getattr(self, key)
        if sub is None:
            raise DataError(
                f"no concept {split} folder: set data.{key} to a folder with one sub-folder of "
                "images per concept."
            )
        names = self._concept_names() or []
        path = self._required_dir(sub, key, "concept")
        plain = eval_pipeline(self.image_size)
        out: dict[str, Dataset] = {}
        for i, name in enumerate(names):
            images = list_images(path / name)
            if not images:
                raise DataError(f"concept folder '{path / name}' has no images.")
            out[name] = ImageFileDataset([(p, i) for p in images], plain)
        return out

    def concept_negative_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """``{concept: images without it}`` for contrastive concept whitening: a parallel folder tree.

        The negatives of ``<concepts dir>/<concept>/`` are the images in ``<concepts dir>_neg/<concept>/``
        (e.g. ``concepts_train/striped/`` and ``concepts_train_neg/striped/``): ideally the same scenes
        without the concept, else images that do not show it. Every concept needs its folder.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        key = f"concepts_{split}_dir"
        sub = getattr(self, key)
        if sub is None:
            raise DataError(f"no concept {split} folder: set data.{key} (its negatives go in '<it>_neg/')")
        names = self._concept_names() or []
        path = self._path(str(sub).rstrip("/\\") + "_neg")
        plain = eval_pipeline(self.image_size)
        out: dict[str, Dataset] = {}
        for i, name in enumerate(names):
            images = list_images(path / name) if (path / name).is_dir() else []
            if not images:
                raise DataError(
                    f"contrastive concept whitening needs images without concept {name!r} in '{path / name}/' "
                    f"(a folder parallel to '{self._path(sub) / name}/'); add them or set "
                    f"model.net.alignment=paper."
                )
            out[name] = ImageFileDataset([(p, i) for p in images], plain)
        return out

    @property
    def data_info(self) -> dict[str, Any]:
        classes = self._class_names()
        concepts = self._concept_names()
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": len(classes),
            "in_chans": 3,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(classes),
            "concept_names": list(concepts) if concepts is not None else None,
            "part_names": None,
            "feature_names": None,
        }
