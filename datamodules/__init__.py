"""LightningDataModules. Every module yields dict batches (see :mod:`datamodules.base`)."""

from interpzoo.datamodules.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    DataError,
    IndexedSubset,
    split_indices,
)
from interpzoo.datamodules.cub import CUB200DataModule
from interpzoo.datamodules.digits import DigitsDataModule
from interpzoo.datamodules.image_folder import ImageFolderDataModule
from interpzoo.datamodules.partshapes import PartShapesConceptDataset, PartShapesDataset, PartShapesRenderer
from interpzoo.datamodules.partshapes_dm import PartShapesDataModule
from interpzoo.datamodules.torchvision_sets import CIFAR10DataModule, MNISTDataModule

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BaseDataModule", "DataError", "IndexedSubset", "split_indices"]
__all__ += ["PartShapesConceptDataset", "PartShapesDataModule", "PartShapesDataset", "PartShapesRenderer"]
__all__ += [
    "CIFAR10DataModule",
    "CUB200DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
]
