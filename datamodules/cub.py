"""CUB-200-2011 read from its official text files, with bounding-box crops and 15 part landmarks.

Coordinates use the continuous pixel frame (pixel ``i`` covers ``[i, i + 1)``), which is the one
Pillow's ``resize(box=...)`` and affine ``transform`` sample in; so a landmark mapped by the same
affine map as the image lands on the same content, to sub-pixel accuracy.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from interpzoo.datamodules.base import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BaseDataModule,
    DataError,
    IndexedSubset,
    split_indices,
)
from interpzoo.datamodules.image_folder import load_rgb, pil_to_float, size_pair

CUB_URL = (
    "https://data.caltech.edu/records/65de6-vhk45 (CUB_200_2011.tgz; project page "
    "https://www.vision.caltech.edu/datasets/cub_200_2011/)"
)
CUB_FILES = ("images.txt", "image_class_labels.txt", "classes.txt", "train_test_split.txt")
CUB_BBOX_FILE = "bounding_boxes.txt"
CUB_PART_FILES = ("parts/parts.txt", "parts/part_locs.txt")
CUB_NUM_PARTS = 15
CUB_ATTRIBUTE_LABELS = "attributes/image_attribute_labels.txt"
# attributes.txt (312 "<id> <name>" rows) ships beside CUB_200_2011/ in the official tarball; some copies
# move it inside: the first of these that exists is read (relative to the CUB_200_2011 folder)
CUB_ATTRIBUTE_NAMES = ("attributes.txt", "attributes/attributes.txt", "../attributes.txt")


def _read_table(path: Path, min_cols: int, last_col_free: bool = False) -> list[list[str]]:
    """Whitespace-separated rows; with ``last_col_free`` the last column may contain spaces."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split(maxsplit=min_cols - 1) if last_col_free else line.split()
            if len(parts) < min_cols:
                raise DataError(f"{path}:{lineno}: expected {min_cols} columns, got {line.strip()!r}")
            rows.append([p.strip() for p in parts])
    return rows


def flip_permutation(part_names: Sequence[str]) -> list[int]:
    """Index permutation swapping ``left X`` with ``right X``: a mirrored bird shows its other side."""
    index = {n: i for i, n in enumerate(part_names)}
    perm = list(range(len(part_names)))
    for i, name in enumerate(part_names):
        for a, b in (("left", "right"), ("right", "left")):
            if name.startswith(a + " ") and b + name[len(a) :] in index:
                perm[i] = index[b + name[len(a) :]]
    return perm


class CUBImageDataset(Dataset):
    """CUB images cropped to their box (optionally), resized, and their landmarks mapped alongside.

    Args:
        paths: image files.
        labels: ``(N,)`` class indices.
        boxes: ``(N, 4)`` ``(x, y, width, height)`` crop boxes in source pixels, or ``None`` (whole image).
        landmarks: ``(N, P, 2)`` ``(x, y)`` source pixels, or ``None``.
        visible: ``(N, P)`` bool, or ``None``.
        image_size: ``(H, W)`` output size (aspect ratio not kept, as in ProtoPNet).
        augment: random crop of 64-100% of the box area, horizontal flip (swapping left/right parts),
            rotation of up to +-15 deg; landmarks follow every step.
        flip_perm: part permutation applied on a flip (:func:`flip_permutation`).
        concepts: ``(N, K)`` 0/1 attribute labels, or ``None``.

    Items: ``{"image": (3, H, W) float in [0, 1], "label": long, "index": long}`` plus, with
    landmarks, ``"landmarks"`` ``(P, 2)`` float ``(x, y)`` in output pixels and ``"landmark_visible"``
    ``(P,)`` bool (annotated and inside the output image; coordinates of invisible ones are meaningless),
    and with concepts ``"concepts"`` ``(K,)`` float 0/1.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: np.ndarray,
        boxes: np.ndarray | None,
        landmarks: np.ndarray | None,
        visible: np.ndarray | None,
        image_size: tuple[int, int],
        augment: bool = False,
        flip_perm: Sequence[int] | None = None,
        concepts: np.ndarray | None = None,
    ) -> None:
        self.paths = list(paths)
        self.concepts = None if concepts is None else np.asarray(concepts, dtype=np.float32)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.boxes = boxes
        self.landmarks = landmarks
        self.visible = visible
        self.image_size = image_size
        self.augment = augment
        n_parts = 0 if landmarks is None else landmarks.shape[1]
        self.flip_perm = list(flip_perm) if flip_perm is not None else list(range(n_parts))

    def __len__(self) -> int:
        return len(self.paths)

    def _source_box(self, idx: int, width: int, height: int) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the region that fills the output, clipped to the image."""
        if self.boxes is None:
            return 0.0, 0.0, float(width), float(height)
        x, y, w, h = (float(v) for v in self.boxes[idx])
        x0, y0, x1, y1 = max(0.0, x), max(0.0, y), min(float(width), x + w), min(float(height), y + h)
        if x1 - x0 < 1.0 or y1 - y0 < 1.0:  # degenerate annotation: use the whole image
            return 0.0, 0.0, float(width), float(height)
        return x0, y0, x1, y1

    @staticmethod
    def _random_sub_box(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        x0, y0, x1, y1 = box
        w, h = x1 - x0, y1 - y0
        area = 0.64 + 0.36 * float(torch.rand(()))
        ratio = math.exp(math.log(3 / 4) + math.log(16 / 9) * float(torch.rand(())))
        sw, sh = min(w, w * math.sqrt(area * ratio)), min(h, h * math.sqrt(area / ratio))
        ox, oy = (w - sw) * float(torch.rand(())), (h - sh) * float(torch.rand(()))
        return x0 + ox, y0 + oy, x0 + ox + sw, y0 + oy + sh

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img = load_rgb(self.paths[idx])
        out_h, out_w = self.image_size
        box = self._source_box(idx, *img.size)
        if self.augment:
            box = self._random_sub_box(box)
        x0, y0, x1, y1 = box
        # resize(box=...) crops and scales in one antialiased step with the continuous-frame mapping
        # x' = (x - x0) * W / (x1 - x0), which the landmarks use below.
        img = img.resize((out_w, out_h), Image.BILINEAR, box=box)
        sx, sy = out_w / (x1 - x0), out_h / (y1 - y0)
        affine = np.array([[sx, 0.0, -x0 * sx], [0.0, sy, -y0 * sy], [0.0, 0.0, 1.0]])
        flipped = False
        if self.augment:
            flipped = bool(torch.rand(()) < 0.5)
            angle = math.radians(30.0 * float(torch.rand(())) - 15.0)
            c, s = math.cos(angle), math.sin(angle)
            cx, cy = out_w / 2.0, out_h / 2.0
            f = -1.0 if flipped else 1.0
            # Flip then rotate about the image centre: p' = R F (p - c) + c.
            aug = np.array([[c * f, -s, 0.0], [s * f, c, 0.0], [0.0, 0.0, 1.0]])
            centre = np.array([[1.0, 0.0, cx], [0.0, 1.0, cy], [0.0, 0.0, 1.0]])
            uncentre = np.array([[1.0, 0.0, -cx], [0.0, 1.0, -cy], [0.0, 0.0, 1.0]])
            aug = centre @ aug @ uncentre
            inv = np.linalg.inv(aug)  # Pillow wants output -> input
            img = img.transform(
                (out_w, out_h), Image.AFFINE, tuple(inv[:2].reshape(-1)), resample=Image.BILINEAR
            )
            affine = aug @ affine
        item: dict[str, Any] = {
            "image": pil_to_float(img),
            "label": torch.tensor(int(self.labels[idx]), dtype=torch.long),
            "index": torch.tensor(idx, dtype=torch.long),
        }
        if self.landmarks is not None and self.visible is not None:
            pts = self.landmarks[idx] @ affine[:2, :2].T + affine[:2, 2]
            vis = self.visible[idx].copy()
            if flipped:
                pts, vis = pts[self.flip_perm], vis[self.flip_perm]
            inside = (pts[:, 0] >= 0) & (pts[:, 0] < out_w) & (pts[:, 1] >= 0) & (pts[:, 1] < out_h)
            item["landmarks"] = torch.as_tensor(pts, dtype=torch.float32)
            item["landmark_visible"] = torch.as_tensor(vis & inside, dtype=torch.bool)
        if self.concepts is not None:
            item["concepts"] = torch.from_numpy(self.concepts[idx].copy())
        return item


class CUB200DataModule(BaseDataModule):
    """Caltech-UCSD Birds-200-2011: 200 classes, 5,994 train / 5,794 test images, 15 part landmarks.

    Args:
        root: the ``CUB_200_2011`` folder (holding ``images.txt``), or its parent.
        image_size: output size, ``int`` or ``[H, W]`` (aspect ratio not kept, as in ProtoPNet).
        crop_to_bbox: crop every image to its ``bounding_boxes.txt`` box first (ProtoPNet's setting).
        augment: train-time random crop (64-100% of the box area), flip and +-15 deg rotation, the
            online counterpart of ProtoPNet's offline rotation/flip augmentation.
        landmarks: read ``parts/`` and add ``"landmarks"``/``"landmark_visible"`` to every item.
        mean, std: per-channel statistics the networks normalise with (default ImageNet).
        concepts: read the 312 binary attributes (``attributes/image_attribute_labels.txt`` and
            ``attributes.txt``) and add ``"concepts"`` ``(K,)`` to every item, for concept bottleneck models.
        concept_majority_vote: replace each image's attribute labels by its class's majority vote over the
            official training images (an attribute is on for a class when more than half of its training
            images show it), as Koh et al. (ICML 2020, Sec. 4 / App. A) do to denoise the crowd labels; every
            image of a class then has the same concept vector. ``False`` keeps the per-image labels.
        concept_min_classes: keep only the attributes that the class-level majority vote turns on in at least
            this many classes (Koh et al.: 10, leaving 112 of the 312 attributes); 0 keeps all 312.
        batch_size, num_workers, pin_memory, val_fraction, seed: see :class:`BaseDataModule`; the
            validation split is ``val_fraction`` of the official training images.

    Items: see :class:`CUBImageDataset`.
    """

    def __init__(
        self,
        root: str,
        image_size: int | Sequence[int] = 224,
        crop_to_bbox: bool = True,
        augment: bool = True,
        landmarks: bool = True,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        concepts: bool = False,
        concept_majority_vote: bool = True,
        concept_min_classes: int = 10,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        val_fraction: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, val_fraction, seed)
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size = size_pair(image_size)
        self.crop_to_bbox = crop_to_bbox
        self.augment = augment
        self.landmarks = landmarks
        self.mean = [float(m) for m in (mean if mean is not None else IMAGENET_MEAN)]
        self.std = [float(s) for s in (std if std is not None else IMAGENET_STD)]
        if concept_min_classes < 0:
            raise DataError(
                f"concept_min_classes must be >= 0 (0 keeps every attribute), got {concept_min_classes}"
            )
        self.concepts = bool(concepts)
        self.concept_majority_vote = bool(concept_majority_vote)
        self.concept_min_classes = int(concept_min_classes)
        self._meta: dict[str, Any] | None = None

    # -- files ----------------------------------------------------------------------------------
    def _required(self) -> list[str]:
        files = list(CUB_FILES)
        if self.crop_to_bbox:
            files.append(CUB_BBOX_FILE)
        if self.landmarks:
            files += CUB_PART_FILES
        if self.concepts:
            files.append(CUB_ATTRIBUTE_LABELS)
        return files

    def _attribute_names_file(self) -> Path | None:
        d = self.directory
        for rel in CUB_ATTRIBUTE_NAMES:
            if (d / rel).is_file():
                return (d / rel).resolve()
        return None

    @property
    def directory(self) -> Path:
        """The folder holding the CUB text files: ``root`` or ``root/CUB_200_2011``."""
        if not (self.root / "images.txt").is_file() and (self.root / "CUB_200_2011" / "images.txt").is_file():
            return self.root / "CUB_200_2011"
        return self.root

    def _check_files(self) -> Path:
        d = self.directory
        missing = [f for f in self._required() if not (d / f).is_file()]
        if missing:
            hints = []
            if CUB_BBOX_FILE in missing:
                hints.append("data.crop_to_bbox=false does without bounding_boxes.txt")
            if any(f in missing for f in CUB_PART_FILES):
                hints.append("data.landmarks=false does without parts/")
            if CUB_ATTRIBUTE_LABELS in missing:
                hints.append("data.concepts=false does without attributes/")
            raise DataError(
                f"CUB-200-2011 files missing under '{d}': {missing}. Set data.root to the extracted "
                f"'CUB_200_2011' folder (it holds images.txt and images/). CUB-200-2011 comes from {CUB_URL}."
                + (f" ({'; '.join(hints)})" if hints else "")
            )
        if self.concepts and self._attribute_names_file() is None:
            raise DataError(
                f"CUB-200-2011 attribute names missing: none of {[str(d / r) for r in CUB_ATTRIBUTE_NAMES]} "
                f"exists. data.concepts=true reads 'attributes.txt' (312 rows '<id> <name>'), which the official "
                f"tarball puts beside the CUB_200_2011 folder: copy it into '{d}', or set data.concepts=false."
            )
        return d

    def _names(self) -> tuple[list[str], list[str] | None]:
        d = self._check_files()
        classes = sorted(((int(i), n) for i, n in _read_table(d / "classes.txt", 2, last_col_free=True)))
        parts = None
        if self.landmarks:
            parts = [
                n for _, n in sorted((int(i), n) for i, n in _read_table(d / "parts/parts.txt", 2, True))
            ]
        return [n for _, n in classes], parts

    def _load(self) -> dict[str, Any]:
        """Parse the text files into arrays ordered by image id."""
        if self._meta is not None:
            return self._meta
        d = self._check_files()
        class_rows = sorted((int(i), n) for i, n in _read_table(d / "classes.txt", 2, last_col_free=True))
        class_index = {cid: k for k, (cid, _) in enumerate(class_rows)}
        images = {int(i): p for i, p in _read_table(d / "images.txt", 2, last_col_free=True)}
        ids = sorted(images)

        def by_id(name: str, cols: int) -> dict[int, list[str]]:
            table = {int(r[0]): r[1:] for r in _read_table(d / name, cols)}
            absent = [i for i in ids if i not in table]
            if absent:
                raise DataError(
                    f"'{d / name}' has no row for {len(absent)} image ids of images.txt "
                    f"(first: {absent[:5]}); the files come from different releases?"
                )
            return table

        labels_raw = by_id("image_class_labels.txt", 2)
        split_raw = by_id("train_test_split.txt", 2)
        bad = sorted({int(labels_raw[i][0]) for i in ids} - class_index.keys())
        if bad:
            raise DataError(
                f"image_class_labels.txt uses class ids {bad[:5]} missing from '{d / 'classes.txt'}'."
            )
        meta: dict[str, Any] = {
            "paths": [d / "images" / images[i] for i in ids],
            "labels": np.array([class_index[int(labels_raw[i][0])] for i in ids], dtype=np.int64),
            "is_train": np.array([split_raw[i][0] == "1" for i in ids], dtype=bool),
            "class_names": [n for _, n in class_rows],
            "boxes": None,
            "landmarks": None,
            "visible": None,
            "part_names": None,
        }
        absent_files = [p for p in meta["paths"] if not p.is_file()]
        if absent_files:
            raise DataError(
                f"{len(absent_files)} images listed in '{d / 'images.txt'}' are missing under "
                f"'{d / 'images'}' (first: {[str(p) for p in absent_files[:3]]})."
            )
        if self.crop_to_bbox:
            boxes = by_id(CUB_BBOX_FILE, 5)
            meta["boxes"] = np.array([[float(v) for v in boxes[i][:4]] for i in ids], dtype=np.float64)
        if self.landmarks:
            part_rows = sorted(
                (int(i), n) for i, n in _read_table(d / "parts/parts.txt", 2, last_col_free=True)
            )
            part_index = {pid: k for k, (pid, _) in enumerate(part_rows)}
            row_of = {img_id: r for r, img_id in enumerate(ids)}
            pts = np.zeros((len(ids), len(part_rows), 2), dtype=np.float64)
            vis = np.zeros((len(ids), len(part_rows)), dtype=bool)
            for img_id, pid, x, y, v in _read_table(d / "parts/part_locs.txt", 5):
                r, k = row_of.get(int(img_id)), part_index.get(int(pid))
                if r is None or k is None:
                    raise DataError(
                        f"parts/part_locs.txt refers to image {img_id} / part {pid}, absent from "
                        "images.txt / parts/parts.txt."
                    )
                pts[r, k] = (float(x), float(y))
                vis[r, k] = v.strip() == "1"
            meta.update(landmarks=pts, visible=vis, part_names=[n for _, n in part_rows])
        meta["concepts"], meta["concept_names"] = None, None
        if self.concepts:
            meta["concepts"], meta["concept_names"] = self._load_attributes(d, ids, meta)
        self._meta = meta
        return meta

    def _load_attributes(self, d: Path, ids: list[int], meta: dict[str, Any]) -> tuple[np.ndarray, list[str]]:
        """``(N, K)`` uint8 attribute labels in image-id order and the ``K`` names kept (class docstring)."""
        names_file = self._attribute_names_file()
        assert names_file is not None  # _check_files refused its absence
        attr_rows = sorted((int(i), n) for i, n in _read_table(names_file, 2, last_col_free=True))
        attr_index = {aid: k for k, (aid, _) in enumerate(attr_rows)}
        row_of = {img_id: r for r, img_id in enumerate(ids)}
        labels = np.zeros((len(ids), len(attr_rows)), dtype=np.uint8)
        seen = np.zeros(len(ids), dtype=bool)
        path = d / CUB_ATTRIBUTE_LABELS
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                # "<image> <attribute> <is_present> <certainty> <time>"; a few rows of the official file carry
                # an extra column, so only the first three are read
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 3:
                    raise DataError(
                        f"{path}:{lineno}: expected '<image> <attribute> <is_present> ...', got {line.strip()!r}"
                    )
                r, k = row_of.get(int(parts[0])), attr_index.get(int(parts[1]))
                if r is None or k is None:
                    raise DataError(
                        f"{path}:{lineno} refers to image {parts[0]} / attribute {parts[1]}, absent from images.txt / "
                        f"{names_file.name}; the files come from different releases?"
                    )
                labels[r, k] = parts[2] == "1"
                seen[r] = True
        if not seen.all():
            raise DataError(
                f"'{path}' has no row for {int((~seen).sum())} images of images.txt "
                f"(first ids: {[ids[i] for i in np.flatnonzero(~seen)[:5]]})."
            )
        # class-level majority vote over the official training images (Koh et al. 2020, App. A)
        n_classes = len(meta["class_names"])
        train = meta["is_train"]
        votes = np.zeros((n_classes, labels.shape[1]), dtype=bool)
        for c in range(n_classes):
            rows = train & (meta["labels"] == c)
            if rows.any():
                votes[c] = labels[rows].mean(0) > 0.5
        keep = np.flatnonzero(votes.sum(0) >= self.concept_min_classes)
        if keep.size == 0:
            raise DataError(
                f"no CUB attribute is on (class-level majority vote) in at least data.concept_min_classes="
                f"{self.concept_min_classes} classes of the {n_classes} here; lower data.concept_min_classes "
                "(0 keeps all attributes)"
            )
        values = votes[meta["labels"]] if self.concept_majority_vote else labels.astype(bool)
        return values[:, keep].astype(np.uint8), [attr_rows[k][1] for k in keep]

    def _dataset(self, meta: dict[str, Any], idx: np.ndarray, augment: bool) -> CUBImageDataset:
        def take(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[idx]

        perm = flip_permutation(meta["part_names"]) if meta["part_names"] is not None else None
        return CUBImageDataset(
            [meta["paths"][i] for i in idx],
            meta["labels"][idx],
            take(meta["boxes"]),
            take(meta["landmarks"]),
            take(meta["visible"]),
            self.image_size,
            augment=augment,
            flip_perm=perm,
            concepts=take(meta["concepts"]),
        )

    def _build(self) -> None:
        meta = self._load()
        train_rows = np.flatnonzero(meta["is_train"])
        test_rows = np.flatnonzero(~meta["is_train"])
        if len(train_rows) == 0 or len(test_rows) == 0:
            raise DataError(
                f"'{self.directory / 'train_test_split.txt'}' gives {len(train_rows)} train and "
                f"{len(test_rows)} test images; both splits need images."
            )
        train_idx, val_idx = split_indices(len(train_rows), self.val_fraction, self.seed)
        plain = self._dataset(meta, train_rows, augment=False)
        self.train_set = IndexedSubset(self._dataset(meta, train_rows, augment=self.augment), train_idx)
        self.push_set = IndexedSubset(plain, train_idx)
        self.val_set = IndexedSubset(plain, val_idx)
        self.test_set = self._dataset(meta, test_rows, augment=False)

    @property
    def data_info(self) -> dict[str, Any]:
        classes, parts = self._names()
        return {
            "task": "classification",
            "input_kind": "image",
            "num_classes": len(classes),
            "in_chans": 3,
            "image_size": list(self.image_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": classes,
            "concept_names": list(self._load()["concept_names"]) if self.concepts else None,
            "part_names": parts,
            "feature_names": None,
        }
