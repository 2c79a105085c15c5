"""Tiny on-disk datasets in the exact formats the real loaders read, for offline tests.

Each helper writes random images, so tests exercise the real parsing code (CUB text files,
torchvision's MNIST idx reader, CIFAR pickle batches, image folders) without the network.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

CUB_PART_NAMES = [
    "back",
    "beak",
    "belly",
    "breast",
    "crown",
    "forehead",
    "left eye",
    "left leg",
    "left wing",
    "nape",
    "right eye",
    "right leg",
    "right wing",
    "tail",
    "throat",
]


def _random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), dtype=np.uint8), "L"))
        return img
    return img if mode == "RGB" else img.convert(mode)


def make_fake_cub(
    root: str | Path,
    n_classes: int = 3,
    n_per_class: int = 4,
    size: int = 64,
    seed: int = 0,
    n_attributes: int = 12,
) -> Path:
    """Write a small valid CUB-200-2011 tree under ``root/CUB_200_2011`` and return that folder.

    Images have random sizes in ``[size, 1.5 * size)`` per side (never square by construction, so
    x/y mix-ups show), alternate PNG/JPEG, and image 1 is greyscale (CUB has a few). Even-numbered
    images within a class are training images. Each image has a box inside it and 15 parts, of which
    every third is not visible (``0 0 0`` as in the official files); visible parts may lie outside
    the box.

    ``n_attributes`` binary attributes as the official release lays them out: ``root/attributes.txt``
    (``<id> has_x::y`` rows, beside ``CUB_200_2011/``) and ``attributes/image_attribute_labels.txt``
    (``<image> <attribute> <is_present> <certainty> <time>``; image 1's first row carries an extra column, as a
    few official rows do). Attribute ``a`` is shown with probability 0.9 by classes ``c`` with
    ``(a + c) % 3 == 0`` and 0.1 by the others, so class-level majority votes differ between classes.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "CUB_200_2011"
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "parts").mkdir(exist_ok=True)
    images, labels, split, boxes, locs = [], [], [], [], []
    classes = [f"{c + 1:03d}.Fake_Bird_{c + 1}" for c in range(n_classes)]
    img_id = 0
    for c, cname in enumerate(classes):
        (d / "images" / cname).mkdir(exist_ok=True)
        for j in range(n_per_class):
            img_id += 1
            w, h = size + int(rng.integers(1, size // 2 + 2)), size + int(rng.integers(1, size // 2 + 2))
            if w == h:
                w += 1
            ext = "png" if img_id % 2 == 0 else "jpg"
            rel = f"{cname}/Fake_Bird_{c + 1}_{j + 1:04d}.{ext}"
            _random_image(rng, w, h, "L" if img_id == 1 else "RGB").save(d / "images" / rel)
            bx, by = float(rng.integers(0, w // 4)), float(rng.integers(0, h // 4))
            bw, bh = float(rng.integers(w // 2, w - bx)), float(rng.integers(h // 2, h - by))
            images.append(f"{img_id} {rel}")
            labels.append(f"{img_id} {c + 1}")
            split.append(f"{img_id} {int(j % 2 == 0)}")
            boxes.append(f"{img_id} {bx:.1f} {by:.1f} {bw:.1f} {bh:.1f}")
            for p in range(15):
                if p % 3 == 2:
                    locs.append(f"{img_id} {p + 1} 0.0 0.0 0")
                else:
                    locs.append(f"{img_id} {p + 1} {rng.uniform(0, w):.1f} {rng.uniform(0, h):.1f} 1")
    files = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "bounding_boxes.txt": boxes,
        "classes.txt": [f"{c + 1} {n}" for c, n in enumerate(classes)],
        "parts/parts.txt": [f"{p + 1} {n}" for p, n in enumerate(CUB_PART_NAMES)],
        "parts/part_locs.txt": locs,
    }
    if n_attributes > 0:
        # a separate stream, so the images and boxes above do not depend on n_attributes
        arng = np.random.default_rng(seed + 1)
        (d / "attributes").mkdir(exist_ok=True)
        attr_lines = []
        image_classes = [int(line.split()[1]) - 1 for line in labels]
        for i, c in enumerate(image_classes, 1):
            for a in range(n_attributes):
                p = 0.9 if (a + c) % 3 == 0 else 0.1
                extra = " 0" if (i, a) == (1, 0) else ""
                attr_lines.append(f"{i} {a + 1} {int(arng.random() < p)}{extra} 3 {arng.uniform(1, 20):.3f}")
        files["attributes/image_attribute_labels.txt"] = attr_lines
        names = [f"{a + 1} has_part_{a // 4}::value_{a % 4}" for a in range(n_attributes)]
        (Path(root) / "attributes.txt").write_text("\n".join(names) + "\n", encoding="utf-8")
    for name, lines in files.items():
        (d / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d


def make_fake_image_folder(
    root: str | Path,
    classes: Sequence[str] = ("cat", "dog", "fox"),
    n_per_class: int = 3,
    size: int = 32,
    splits: Sequence[str] = ("train", "test"),
    with_concepts: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/<split>/<class>/img_<k>.<ext>`` and return ``root``.

    Images cycle through RGB, RGBA, greyscale (L) and palette (P) modes and PNG/JPEG/BMP files, so
    loaders must convert to RGB. With ``with_concepts``, also writes
    ``root/concepts_train/<concept>/`` and ``root/concepts_test/<concept>/`` (``n_per_class`` each).
    A hidden ``.ipynb_checkpoints`` folder in train must not become a class.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    modes = [("RGB", "png"), ("RGBA", "png"), ("L", "jpg"), ("P", "png"), ("RGB", "bmp"), ("RGB", "jpg")]
    k = 0

    def write(folder: Path) -> None:
        nonlocal k
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(n_per_class):
            mode, ext = modes[k % len(modes)]
            k += 1
            _random_image(rng, size + j, size, mode).save(folder / f"img_{j}.{ext}")

    for split in splits:
        for c in classes:
            write(root / split / c)
    if "train" in splits:
        (root / "train" / ".ipynb_checkpoints").mkdir(exist_ok=True)
    for concept in with_concepts or ():
        write(root / "concepts_train" / concept)
        write(root / "concepts_test" / concept)
    return root


def make_fake_cifar10(root: str | Path, n_per_batch: int = 10, n_test: int = 10, seed: int = 0) -> Path:
    """Write ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``; return that folder.

    Same pickled dicts as the official release (``data`` ``(n, 3072)`` uint8 in CHW order,
    ``labels`` list); labels cycle through the 10 classes. The MD5s differ from the official ones.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    batches = [(f"data_batch_{i}", n_per_batch) for i in range(1, 6)] + [("test_batch", n_test)]
    for b, (name, n) in enumerate(batches):
        entry = {
            "batch_label": f"fake batch {b}",
            "labels": [int(i % 10) for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            "filenames": [f"fake_{b}_{i}.png" for i in range(n)],
        }
        with open(d / name, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(d / "batches.meta", "wb") as f:
        pickle.dump(
            {"label_names": names, "num_cases_per_batch": n_per_batch, "num_vis": 3072}, f, protocol=2
        )
    return d


def _write_idx(path: Path, array: np.ndarray) -> None:
    # idx format: two zero bytes, type code 0x08 (uint8), number of dims, big-endian int32 dims, data.
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def make_fake_mnist(root: str | Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """Write the four uncompressed idx files under ``root/MNIST/raw/`` and return that folder.

    ``torchvision.datasets.MNIST(root, download=False)`` reads them; labels cycle through 0-9.
    """
    rng = np.random.default_rng(seed)
    d = Path(root) / "MNIST" / "raw"
    d.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(d / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(d / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    return d
