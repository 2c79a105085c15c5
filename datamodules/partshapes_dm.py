"""LightningDataModule for the procedural PartShapes dataset (see :mod:`datamodules.partshapes`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from interpzoo.datamodules.base import BaseDataModule, DataError
from interpzoo.datamodules.partshapes import (
    PartShapesConceptDataset,
    PartShapesDataset,
    PartShapesRenderer,
)

DEFAULT_PROBE_CONCEPTS: tuple[str, ...] = (
    "has_red",
    "has_blue",
    "has_circle",
    "has_triangle",
    "has_striped",
    "has_checker",
)


def _opt_list(x: Sequence[Any] | None) -> list[Any] | None:
    return None if x is None else list(x)


class PartShapesDataModule(BaseDataModule):
    """PartShapes train/val/test splits with ground-truth parts, concepts, landmarks and probe sets.

    Every constructor argument is plain data, so ``hydra.utils.instantiate`` can build it. The dataset
    has its own validation split (``n_val`` samples with their own seeds), so ``val_fraction`` is not
    used. Items follow :mod:`datamodules.base`, plus ``"part_boxes"`` ``(K, 4)``; see
    :class:`datamodules.partshapes.PartShapesDataset`.

    Defaults are an easy, learnable task: a width-16 ResNet-18 (CIFAR stem) reaches 100 % validation
    accuracy after one CPU epoch on the 4,000 default training images (measured).

    Args:
        image_size: side in pixels (32-64).
        num_classes, num_slots, h_min: class design (C classes over K slots, Hamming distance >= h_min).
        n_train, n_val, n_test: split sizes.
        seed: base seed of the samples (and of the classes unless ``class_seed`` is set).
        class_seed: seed of the class definitions.
        minimal_pairs: attributes (``shape``, ``colour``, ``texture``; repeats allowed) with one pair of
            classes each that differs in that attribute only, so the classifier must use it (see
            :class:`PartShapesRenderer`); empty: the plain class table.
        noise_std: per-pixel noise sigma in 0..255 units.
        num_distractors: up to this many distractor objects per image.
        part_dropout: train-only probability of dropping 1..K-1 parts.
        spurious_rho: train-only probability that the background hue encodes the class.
        grayscale: 1-channel images.
        concepts: concept names of the probe sets (default ``DEFAULT_PROBE_CONCEPTS`` that exist in the
            vocabulary).
        n_concept_train, n_concept_test: probe images per concept for "train" / "test".
        shapes, colours, textures, part_names: vocabulary overrides (names).
        scale_range: part size as a fraction of the image side.
        position_jitter: per-part position jitter sigma as a fraction of the image side.
        random_rotation: randomly rotate the layout (slot position uninformative).
        pose: ``"fixed"`` (the default layout: parts move by ~2 px between images) or ``"varied"`` (every
            split drawn like :meth:`ground_truth_dataset`: random rotation, the creature moved by up to 12 %
            of the side), so that a part is no longer where it usually is. Part-location scores are read on
            varied poses; a model trained on fixed poses is out of distribution there.
        concept_probes: what a concept probe image is: ``"part"`` (the default, as in the paper's concept
            datasets: one part that shows the concept on an empty background) or ``"scene"`` (a whole image of
            this data's distribution, pose included, with the concept edited in; its paired negative has it
            edited out: :meth:`PartShapesRenderer.draw_scene_probe`).
        cache: pre-render every split into memory at setup.
        return_concept_masks: add ``"concept_masks"`` ``(N, H, W)`` to every item.
        batch_size, num_workers, pin_memory: loader settings (see :class:`BaseDataModule`).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 10,
        num_slots: int = 4,
        h_min: int = 2,
        n_train: int = 4000,
        n_val: int = 500,
        n_test: int = 1000,
        seed: int = 0,
        class_seed: int | None = None,
        minimal_pairs: Sequence[str] = (),
        noise_std: float = 8.0,
        num_distractors: int = 1,
        part_dropout: float = 0.2,
        spurious_rho: float = 0.0,
        grayscale: bool = False,
        concepts: Sequence[str] | None = None,
        n_concept_train: int = 500,
        n_concept_test: int = 200,
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        textures: Sequence[str] | None = None,
        part_names: Sequence[str] | None = None,
        scale_range: Sequence[float] = (0.19, 0.26),
        position_jitter: float = 0.02,
        random_rotation: bool = False,
        pose: str = "fixed",
        concept_probes: str = "part",
        cache: bool = False,
        return_concept_masks: bool = False,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory, seed=seed)
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(n) < 1:
                raise DataError(
                    f"data.{key}={n}: every split needs at least one sample (validation selects the checkpoint, "
                    f"test gives the final metrics); set data.{key} to 1 or more"
                )
        self.renderer = PartShapesRenderer(
            image_size=image_size,
            num_classes=num_classes,
            num_slots=num_slots,
            h_min=h_min,
            seed=seed,
            class_seed=class_seed,
            minimal_pairs=minimal_pairs if isinstance(minimal_pairs, str) else tuple(minimal_pairs),
            shapes=_opt_list(shapes),
            colours=_opt_list(colours),
            textures=_opt_list(textures),
            part_names=_opt_list(part_names),
            scale_range=tuple(float(v) for v in scale_range),
            position_jitter=position_jitter,
            random_rotation=random_rotation,
            noise_std=noise_std,
            num_distractors=num_distractors,
            part_dropout=part_dropout,
            spurious_rho=spurious_rho,
        )
        if pose not in ("fixed", "varied"):
            raise DataError(
                f"data.pose={pose!r}: use 'fixed' (the default layout) or 'varied' (random rotation and position)"
            )
        self.pose = pose
        if concept_probes not in ("part", "scene"):
            raise DataError(
                f"data.concept_probes={concept_probes!r}: use 'part' (each probe one part on an empty background) "
                "or 'scene' (whole images of the data with the concept edited in or out)"
            )
        self.concept_probes = concept_probes
        if pose == "varied":
            self.renderer = self.renderer.with_pose()
        self.n_train, self.n_val, self.n_test = int(n_train), int(n_val), int(n_test)
        self.grayscale = bool(grayscale)
        self.cache = bool(cache)
        self.return_concept_masks = bool(return_concept_masks)
        if concepts is None:
            names = set(self.renderer.concept_names)
            concepts = [c for c in DEFAULT_PROBE_CONCEPTS if c in names]
        for c in concepts:
            self.renderer.concept_index(c)  # raises a ValueError naming the known concepts
        self.concepts = [str(c) for c in concepts]
        self.n_concept_train = int(n_concept_train)
        self.n_concept_test = int(n_concept_test)
        self._mean_std: tuple[list[float], list[float]] | None = None

    def _build(self) -> None:
        kw = {
            "cache": self.cache,
            "grayscale": self.grayscale,
            "return_concept_masks": self.return_concept_masks,
        }
        self.train_set = PartShapesDataset(self.renderer, "train", self.n_train, **kw)
        self.val_set = PartShapesDataset(self.renderer, "val", self.n_val, **kw)
        self.test_set = PartShapesDataset(self.renderer, "test", self.n_test, **kw)
        self.push_set = self.train_set

    # -- descriptions -------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        return self.renderer.class_names

    @property
    def concept_names(self) -> list[str]:
        return self.renderer.concept_names

    @property
    def part_names(self) -> list[str]:
        return self.renderer.part_names

    def class_definitions(self) -> dict[str, Any]:
        """JSON-serialisable class definitions (see :meth:`PartShapesRenderer.class_definitions`)."""
        return self.renderer.class_definitions()

    @property
    def class_hash(self) -> str:
        return self.renderer.class_hash

    def _channel_stats(self, n: int = 512) -> tuple[list[float], list[float]]:
        """Per-channel mean/std in [0, 1] units over the first ``n`` training images (deterministic)."""
        if self._mean_std is None:
            r = self.renderer
            imgs = np.stack([r.render("train", i).image for i in range(min(n, max(self.n_train, 1)))])
            x = imgs.astype(np.float64) / 255.0
            if self.grayscale:
                x = x @ np.array([0.299, 0.587, 0.114])[:, None]
            flat = x.reshape(-1, x.shape[-1])
            self._mean_std = (
                [round(float(v), 4) for v in flat.mean(0)],
                [round(float(v), 4) for v in flat.std(0)],
            )
        return self._mean_std

    @property
    def data_info(self) -> dict[str, Any]:
        """Plain-data description (keys of :attr:`BaseDataModule.data_info`, plus ``class_hash``)."""
        mean, std = self._channel_stats()
        s = self.renderer.image_size
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": self.renderer.num_classes,
            "in_chans": 1 if self.grayscale else 3,
            "image_size": [s, s],
            "mean": mean,
            "std": std,
            "class_names": list(self.class_names),
            "concept_names": list(self.concept_names),
            "part_names": list(self.part_names),
            "feature_names": None,
            "class_hash": self.class_hash,
        }

    # -- ground truth for the scorecard ----------------------------------------------------------
    def ground_truth_dataset(self, n: int = 500, split: str = "test") -> PartShapesDataset:
        """``n`` held-out images of ``split`` with the pose varied (:meth:`PartShapesRenderer.with_pose`).

        Same classes, vocabulary and noise as the training data, but the layout rotates and moves, so a
        location is no proxy for a part; every item carries ``part_masks``, ``landmarks`` and ``concepts``.
        """
        if split not in ("val", "test"):
            raise DataError(f"the ground-truth split must be 'val' or 'test', got {split!r}")
        return PartShapesDataset(
            self.renderer.with_pose(), split, int(n), cache=True, grayscale=self.grayscale
        )

    # -- concept probe sets -------------------------------------------------------------------
    def concept_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """``{concept: PartShapesConceptDataset}`` for ``self.concepts`` (``data.concept_probes``: one part on
        background, or whole scenes with the concept edited in).

        ``split`` "train" (axis alignment, ``n_concept_train`` images each) or "test"/"val" (held out
        for concept AUC, ``n_concept_test`` each). Item ``"label"`` is the concept's index in
        :attr:`concept_names`.
        """
        return self._probe_sets(split, negative=False)

    def concept_negative_datasets(self, split: str = "train") -> dict[str, Dataset]:
        """``{concept: negatives}`` for contrastive concept whitening, keyed like :meth:`concept_datasets`.

        Item ``i`` is probe ``i`` of :meth:`concept_datasets` re-rendered with the concept removed (same
        layout, noise, part and other attributes; only the attribute carrying the concept is changed, see
        :meth:`PartShapesRenderer.draw_probe_negative` and, for scene probes,
        :meth:`PartShapesRenderer.draw_scene_probe`): paired interventions, so the difference of their
        mean activations is the concept's own effect. Works for presence (``has_red``) and per-slot
        (``head_colour_red``) concepts; each item's ``"concepts"`` vector has the concept off.
        """
        return self._probe_sets(split, negative=True)

    def _probe_sets(self, split: str, negative: bool) -> dict[str, Dataset]:
        if split not in ("train", "val", "test"):
            raise DataError(f"concept split must be 'train', 'val' or 'test', got {split!r}")
        n = self.n_concept_train if split == "train" else self.n_concept_test
        scene = self.concept_probes == "scene"
        return {
            c: PartShapesConceptDataset(
                self.renderer, c, split, n, grayscale=self.grayscale, negative=negative, scene=scene
            )
            for c in self.concepts
        }
