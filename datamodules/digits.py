"""scikit-learn's handwritten digits: the one real labelled image set that ships offline.

1,797 greyscale 8x8 images (values 0-16, the UCI optdigits test set), 10 classes. Upsampled with
bilinear interpolation so CNN trunks have room to down-sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms as T

from interpzoo.datamodules.base import BaseDataModule
from interpzoo.datamodules.image_folder import size_pair
from interpzoo.datamodules.torchvision_sets import ArrayImageDataset, TensorPipeline


def load_digits_images(image_size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(N, 1, H, W)`` float in ``[0, 1]`` and ``(N,)`` long labels."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(np.asarray(bunch.images), dtype=torch.float32).div_(16.0).unsqueeze(1)
    if tuple(images.shape[-2:]) != image_size:
        images = F.interpolate(images, size=image_size, mode="bilinear", align_corners=False)
    return images.clamp_(0.0, 1.0).contiguous(), torch.as_tensor(bunch.target, dtype=torch.long)


def stratified_split(
    labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int
) -> tuple[list[int], list[int], list[int]]:
    """Sorted ``(train, val, test)`` indices with every class in the same proportions in each split."""
    from sklearn.model_selection import train_test_split

    if not 0.0 < test_fraction < 1.0 or not 0.0 <= val_fraction < 1.0 or val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"need 0 < test_fraction, 0 <= val_fraction and val + test < 1, got "
            f"val_fraction={val_fraction}, test_fraction={test_fraction}"
        )
    idx = np.arange(len(labels))
    rest, test = train_test_split(idx, test_size=test_fraction, stratify=labels, random_state=seed)
    if val_fraction == 0.0:
        return sorted(rest.tolist()), [], sorted(test.tolist())
    # val_fraction is of the whole set, hence the rescaling to the remaining part.
    train, val = train_test_split(
        rest, test_size=val_fraction / (1.0 - test_fraction), stratify=labels[rest], random_state=seed
    )
    return sorted(train.tolist()), sorted(val.tolist()), sorted(test.tolist())


class DigitsDataModule(BaseDataModule):
    """scikit-learn ``load_digits`` with a deterministic stratified train/val/test split.

    Args:
        image_size: output size, ``int`` or ``[H, W]`` (bilinear from 8x8).
        rgb: repeat the grey channel to 3 channels.
        augment: +-10 deg rotation and up to 10% translation on train.
        test_fraction: fraction of all images held out for test (default 20%).
        val_fraction: fraction of all images held out for validation (default 10%).
        batch_size, num_workers, pin_memory, seed: see :class:`BaseDataModule`; ``seed`` fixes the split.

    Items: ``{"image": (1 or 3, H, W) float in [0, 1], "label": long, "index": long}``.
    Attributes after setup: ``split_indices`` ``{"train"|"val"|"test": [indices into load_digits]}``.
    """

    def __init__(
        self,
        image_size: int | Sequence[int] = 32,
        rgb: bool = False,
        augment: bool = False,
        test_fraction: float = 0.2,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.image_size = size_pair(image_size)
        self.rgb = rgb
        self.augment = augment
        self.test_fraction = test_fraction
        self.split_indices: dict[str, list[int]] = {}
        self._stats: tuple[float, float] | None = None

    def _build(self) -> None:
        images, labels = load_digits_images(self.image_size)
        train, val, test = stratified_split(labels.numpy(), self.val_fraction, self.test_fraction, self.seed)
        self.split_indices = {"train": train, "val": val, "test": test}
        plain = TensorPipeline(rgb=self.rgb)
        aug = TensorPipeline(rgb=self.rgb, augment=[T.RandomAffine(degrees=10, translate=(0.1, 0.1))])

        def subset(idx: list[int], tf: TensorPipeline) -> ArrayImageDataset:
            # Materialised per split so that "index" is the position in the split without a wrapper.
            return ArrayImageDataset(images[idx], labels[idx], tf)

        self.train_set = subset(train, aug if self.augment else plain)
        self.push_set = subset(train, plain)
        self.val_set = subset(val, plain)
        self.test_set = subset(test, plain)

    def _mean_std(self) -> tuple[float, float]:
        # Computed on the resized images (bilinear smoothing lowers the std), all splits: a fixed
        # dataset constant rather than something that moves with the split seed.
        if self._stats is None:
            images, _ = load_digits_images(self.image_size)
            self._stats = (round(float(images.mean()), 4), round(float(images.std()), 4))
        return self._stats

    @property
    def data_info(self) -> dict[str, Any]:
        chans = 3 if self.rgb else 1
        mean, std = self._mean_std()
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": 10,
            "in_chans": chans,
            "image_size": list(self.image_size),
            "mean": [mean] * chans,
            "std": [std] * chans,
            "class_names": [str(i) for i in range(10)],
            "concept_names": None,
            "part_names": None,
            "feature_names": None,
        }
