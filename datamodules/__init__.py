"""LightningDataModules. Every module yields dict batches (see :mod:`datamodules.base`)."""

from datamodules.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    DataError,
    IndexedSubset,
    split_indices,
)
from datamodules.cub import CUB200DataModule
from datamodules.digits import DigitsDataModule
from datamodules.image_folder import ImageFolderDataModule
from datamodules.partshapes import PartShapesConceptDataset, PartShapesDataset, PartShapesRenderer
from datamodules.partshapes_dm import PartShapesDataModule
from datamodules.torchvision_sets import CIFAR10DataModule, MNISTDataModule

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "BaseDataModule", "DataError", "IndexedSubset", "split_indices"]
__all__ += ["PartShapesConceptDataset", "PartShapesDataModule", "PartShapesDataset", "PartShapesRenderer"]
__all__ += [
    "CIFAR10DataModule",
    "CUB200DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
]
