"""CIFAR-10 and MNIST in the torchvision on-disk layout, as dict-item datamodules.

Both download through torchvision when ``download=True`` (on rank 0, in :meth:`prepare_data`) and,
when the files are absent and downloading is off, raise a :class:`DataError` saying which files to
put where. MNIST is read by ``torchvision.datasets.MNIST``. CIFAR-10 batches are read here: the
format is the documented pickle one, and torchvision's reader insists on the official MD5 of every
file, which ``verify_checksums=False`` relaxes for re-packed or test copies.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import datasets as tvd
from torchvision import transforms as T
from torchvision.datasets.utils import check_md5
from torchvision.transforms import functional as TF

from interpzoo.datamodules.base import BaseDataModule, DataError, IndexedSubset, split_indices
from interpzoo.datamodules.image_folder import size_pair

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class ArrayImageDataset(Dataset):
    """Images held in memory, transformed on access.

    Args:
        images: ``(N, C, H, W)`` uint8 (scaled by 1/255) or float already in ``[0, 1]``.
        labels: ``(N,)`` integer labels.
        transform: ``(C, H, W)`` float tensor to ``(C', H', W')`` float tensor, or ``None``.

    Items: ``{"image": (C', H', W') float in [0, 1], "label": long, "index": long}``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dim() != 4 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"expected images (N, C, H, W) and labels (N,), got {tuple(images.shape)} "
                f"and {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img = self.images[idx]
        img = img.float().div(255.0) if img.dtype == torch.uint8 else img.float()
        if self.transform is not None:
            img = self.transform(img)
        return {"image": img, "label": self.labels[idx].clone(), "index": torch.tensor(idx, dtype=torch.long)}


class TensorPipeline:
    """Resize, channel repeat and tensor augmentations for ``(C, H, W)`` float images (picklable)."""

    def __init__(
        self,
        size: tuple[int, int] | None = None,
        rgb: bool = False,
        augment: Sequence[Callable[[torch.Tensor], torch.Tensor]] = (),
    ) -> None:
        self.size = size
        self.rgb = rgb
        self.augment = list(augment)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        if self.size is not None and tuple(img.shape[-2:]) != self.size:
            img = TF.resize(img, list(self.size), interpolation=T.InterpolationMode.BILINEAR, antialias=True)
        for t in self.augment:
            img = t(img)
        if self.rgb and img.shape[0] == 1:
            img = img.repeat(3, 1, 1)
        return img.clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"TensorPipeline(size={self.size}, rgb={self.rgb}, augment={self.augment})"


def _offline_error(
    name: str, root: Path, directory: Path, expected: Sequence[str], missing: Sequence[str], how: str
) -> DataError:
    return DataError(
        f"{name} not found: expected the files {list(expected)} in the directory '{directory}' "
        f"(missing: {list(missing)}). Either set data.download=true on a machine with internet access "
        f"(torchvision downloads {how}), or copy those files into '{directory}' (data.root='{root}')."
    )


class _InMemoryImageDataModule(BaseDataModule):
    """Shared split logic: the val split is carved from train; push/val never see augmentation."""

    def _load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(train_images, train_labels, test_images, test_labels)``, images ``(N, C, H, W)`` uint8."""
        raise NotImplementedError

    def _pipelines(self) -> tuple[TensorPipeline, TensorPipeline]:
        """``(train, eval)`` transforms."""
        raise NotImplementedError

    def _build(self) -> None:
        tr_x, tr_y, te_x, te_y = self._load_arrays()
        train_tf, eval_tf = self._pipelines()
        augmented = ArrayImageDataset(tr_x, tr_y, train_tf)
        plain = ArrayImageDataset(tr_x, tr_y, eval_tf)
        train_idx, val_idx = split_indices(len(plain), self.val_fraction, self.seed)
        self.train_set = IndexedSubset(augmented, train_idx)
        self.push_set = IndexedSubset(plain, train_idx)
        self.val_set = IndexedSubset(plain, val_idx)
        self.test_set = ArrayImageDataset(te_x, te_y, eval_tf)


class CIFAR10DataModule(_InMemoryImageDataModule):
    """CIFAR-10 (50,000 train / 10,000 test 32x32 RGB images, 10 classes).

    Args:
        root: folder holding ``cifar-10-batches-py/``.
        download: fetch the archive with torchvision when the files are missing.
        augment: random crop with 4 px zero padding and horizontal flip on train (the usual recipe).
        verify_checksums: compare every file with the official MD5 before loading.
        batch_size, num_workers, pin_memory, val_fraction, seed: see :class:`BaseDataModule`.

    Items: ``{"image": (3, 32, 32) float in [0, 1], "label": long, "index": long}``.
    """

    base_folder = "cifar-10-batches-py"
    train_files = [f"data_batch_{i}" for i in range(1, 6)]
    test_files = ["test_batch"]
    meta_file = "batches.meta"

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        augment: bool = True,
        verify_checksums: bool = True,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = download
        self.augment = augment
        self.verify_checksums = verify_checksums
        self.class_names: list[str] = list(CIFAR10_CLASSES)

    @property
    def directory(self) -> Path:
        return self.root / self.base_folder

    def _expected(self) -> list[str]:
        return [*self.train_files, *self.test_files, self.meta_file]

    def _missing(self) -> list[str]:
        return [f for f in self._expected() if not (self.directory / f).is_file()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            tvd.CIFAR10(str(self.root), train=True, download=True)

    def _check_files(self) -> None:
        if self._missing() and self.download:
            self.prepare_data()
        missing = self._missing()
        if missing:
            raise _offline_error(
                "CIFAR-10",
                self.root,
                self.directory,
                self._expected(),
                missing,
                f"{tvd.CIFAR10.url} and extracts it under data.root",
            )
        if self.verify_checksums:
            official = dict(tvd.CIFAR10.train_list + tvd.CIFAR10.test_list)
            official[tvd.CIFAR10.meta["filename"]] = tvd.CIFAR10.meta["md5"]
            for name in self._expected():
                if not check_md5(str(self.directory / name), official[name]):
                    raise DataError(
                        f"'{self.directory / name}' does not match the MD5 of the official CIFAR-10 file: "
                        "it is corrupted or not the official release. Delete it and set data.download=true, "
                        "or set data.verify_checksums=false to load it anyway."
                    )

    def _unpickle(self, name: str) -> dict[str, Any]:
        path = self.directory / name
        try:
            with open(path, "rb") as f:
                # latin1 reads the Python 2 pickles of the official release; same as torchvision.
                return pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as e:
            raise DataError(
                f"'{path}' is not a readable CIFAR pickle ({e}); delete it and re-download "
                "(data.download=true)."
            ) from e

    def _read(self, names: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = [], []
        for name in names:
            entry = self._unpickle(name)
            if "data" not in entry or not ({"labels", "fine_labels"} & entry.keys()):
                raise DataError(
                    f"'{self.directory / name}' lacks the 'data'/'labels' entries of a CIFAR batch."
                )
            images.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(entry.get("labels", entry.get("fine_labels")))
        return torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.long)

    def _load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        self._check_files()
        meta = self._unpickle(self.meta_file)
        if "label_names" in meta:
            self.class_names = [str(n) for n in meta["label_names"]]
        return (*self._read(self.train_files), *self._read(self.test_files))

    def _pipelines(self) -> tuple[TensorPipeline, TensorPipeline]:
        plain = TensorPipeline()
        if not self.augment:
            return plain, plain
        return TensorPipeline(augment=[T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]), plain

    @property
    def data_info(self) -> dict[str, Any]:
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": len(self.class_names),
            "in_chans": 3,
            "image_size": [32, 32],
            "mean": list(CIFAR10_MEAN),
            "std": list(CIFAR10_STD),
            "class_names": list(self.class_names),
            "concept_names": None,
            "part_names": None,
            "feature_names": None,
        }


class MNISTDataModule(_InMemoryImageDataModule):
    """MNIST (60,000 train / 10,000 test 28x28 greyscale digits), read by ``torchvision.datasets.MNIST``.

    Args:
        root: folder holding ``MNIST/raw/`` (torchvision's layout).
        download: fetch the files with torchvision when they are missing.
        image_size: output size (``int`` or ``[H, W]``), bilinear resize; 32 suits most CNN trunks.
        rgb: repeat the grey channel to 3 channels (ImageNet-pretrained trunks).
        augment: +-10 deg rotation and up to 10% translation on train (no flips: digits are chiral).
        batch_size, num_workers, pin_memory, val_fraction, seed: see :class:`BaseDataModule`.

    Items: ``{"image": (1 or 3, H, W) float in [0, 1], "label": long, "index": long}``.
    """

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        image_size: int | Sequence[int] = 28,
        rgb: bool = False,
        augment: bool = False,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.download = download
        self.image_size = size_pair(image_size)
        self.rgb = rgb
        self.augment = augment

    @property
    def directory(self) -> Path:
        return self.root / "MNIST" / "raw"

    def _expected(self) -> list[str]:
        # Derived from torchvision so the check follows whatever its reader opens.
        return [os.path.splitext(os.path.basename(name))[0] for name, _ in tvd.MNIST.resources]

    def _missing(self) -> list[str]:
        legacy = self.root / "MNIST" / "processed"
        if (legacy / tvd.MNIST.training_file).is_file() and (legacy / tvd.MNIST.test_file).is_file():
            return []
        return [f for f in self._expected() if not (self.directory / f).is_file()]

    def prepare_data(self) -> None:
        if self.download and self._missing():
            tvd.MNIST(str(self.root), train=True, download=True)

    def _load_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._missing() and self.download:
            self.prepare_data()
        missing = self._missing()
        if missing:
            raise _offline_error(
                "MNIST",
                self.root,
                self.directory,
                self._expected(),
                missing,
                "the four idx files from its MNIST mirrors into data.root/MNIST/raw",
            )
        out: list[torch.Tensor] = []
        for train in (True, False):
            try:
                ds = tvd.MNIST(str(self.root), train=train, download=False)
            except (RuntimeError, ValueError, AssertionError) as e:
                raise DataError(
                    f"MNIST files in '{self.directory}' could not be read ({e}); delete them and "
                    "re-download (data.download=true)."
                ) from e
            out += [ds.data.unsqueeze(1).contiguous(), ds.targets.long()]
        return out[0], out[1], out[2], out[3]

    def _pipelines(self) -> tuple[TensorPipeline, TensorPipeline]:
        plain = TensorPipeline(self.image_size, self.rgb)
        if not self.augment:
            return plain, plain
        affine = T.RandomAffine(degrees=10, translate=(0.1, 0.1))
        return TensorPipeline(self.image_size, self.rgb, [affine]), plain

    @property
    def data_info(self) -> dict[str, Any]:
        chans = 3 if self.rgb else 1
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": 10,
            "in_chans": chans,
            "image_size": list(self.image_size),
            "mean": [MNIST_MEAN] * chans,
            "std": [MNIST_STD] * chans,
            "class_names": [str(i) for i in range(10)],
            "concept_names": None,
            "part_names": None,
            "feature_names": None,
        }
