"""PartShapes: a procedural 2-D "FunnyBirds" with ground-truth parts, concepts and interventions.

A *creature* is ``K`` parts (slots, default 4: "head", "body", "wing", "tail") laid out on a jittered
ring around a jittered centre. Each part is one (shape, colour, texture) from a small vocabulary; a
class fixes the triple of every slot. Classes are sampled without replacement from the product space
with a minimum Hamming distance ``h_min`` (number of slots that differ), deterministically from a class
seed, so minimal sufficient part sets follow combinatorially (:meth:`PartShapesRenderer.minimal_sufficient_part_sets`).

Every sample is a pure function of ``(seed, split, index)``: all random draws come from
``numpy.random.Generator(PCG64(SeedSequence([seed, split_id, index])))`` and all of them happen in
:meth:`PartShapesRenderer.draw`, before rasterisation. :meth:`PartShapesRenderer.render` therefore
re-renders the *same* sample (same layout, same background, same noise) under an intervention:
parts removed, a part's shape/colour/texture replaced, distractors removed.

Rendering pastes precomputed stamps (one per shape x texture x size, 4x-supersampled coverage
masks) by slicing, and adds pixel noise from a pre-drawn bank of noise tiles at a random offset.
Measured on the shared 2-core CPU (numpy 2.4, default settings incl. noise and distractors):
10,000 images at 32 px in about 1.1 s (~105 us per image, concepts and landmarks included; 0.9 s for
draw + rasterise alone); at 64 px about 1.4 s.

Outputs per sample (:class:`PartShapesSample`): image ``(H, W, 3)`` uint8, part map ``(H, W)`` uint8
(0 background, ``1..K`` creature slots, ``K+1..`` distractors), concept vector, landmarks (part
centres), part boxes and presence flags. :class:`PartShapesDataset` turns them into the interpzoo
item dict (see :mod:`datamodules.base`).

Pixel coordinates: ``(x, y)`` = (column, row) with the centre of pixel ``(r, c)`` at ``(c, r)``.
"""

from __future__ import annotations

import colorsys
import copy
import hashlib
import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

# ----------------------------------------------------------------------------------------------
# Vocabulary
# ----------------------------------------------------------------------------------------------

ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond", "cross", "star")
ALL_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (45, 90, 235),
    "yellow": (240, 205, 30),
    "magenta": (205, 50, 215),
    "cyan": (40, 205, 225),
}
ALL_TEXTURES: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checker", "dots")

DEFAULT_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
DEFAULT_COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta")
DEFAULT_TEXTURES: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checker")
# the three attributes of a part, in the order of the class table's last axis
ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "texture")
FOUR_PART_NAMES: tuple[str, ...] = ("head", "body", "wing", "tail")

SPLIT_IDS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
PROBE_SPLIT_OFFSET = 100
# scene probes (whole images with a concept edited in or out) draw from streams of their own
SCENE_PROBE_OFFSET = 200
FAMILIES: tuple[str, ...] = ("shape", "colour", "texture")
_N_CANDIDATES = 8  # distractor position candidates per distractor
# texture as an adjective in class display names; solid is the unmarked case and is left out
_TEXTURE_WORDS: dict[str, str] = {
    "hstripes": "h-striped",
    "vstripes": "v-striped",
    "checker": "checked",
    "dots": "dotted",
}


def _split_id(split: str) -> int:
    if split not in SPLIT_IDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
    return SPLIT_IDS[split]


def _polygon_contains(x: np.ndarray, y: np.ndarray, verts: Sequence[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over points ``x``, ``y`` (same shape)."""
    inside = np.zeros(x.shape, dtype=bool)
    n = len(verts)
    for i in range(n):
        x1, y1 = verts[i]
        x2, y2 = verts[(i + 1) % n]
        crosses = (y1 > y) != (y2 > y)
        with np.errstate(divide="ignore", invalid="ignore"):
            xi = x1 + (y - y1) * (x2 - x1) / (y2 - y1 if y2 != y1 else 1e-12)
        inside ^= crosses & (x < xi)
    return inside


def shape_mask(shape: str, size: int, supersample: int = 4) -> np.ndarray:
    """Binary mask ``(size, size)`` of ``shape``: pixels whose supersampled coverage is >= 50 %."""
    n = size * supersample
    t = (np.arange(n) + 0.5) / n * 2.0 - 1.0  # pixel centres in (-1, 1)
    x, y = np.meshgrid(t, t)  # y points down (row index)
    if shape == "circle":
        m = x**2 + y**2 <= 1.0
    elif shape == "square":
        m = (np.abs(x) <= 0.92) & (np.abs(y) <= 0.92)
    elif shape == "triangle":
        m = _polygon_contains(x, y, [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)])
    elif shape == "diamond":
        m = np.abs(x) + np.abs(y) <= 1.0
    elif shape == "cross":
        m = ((np.abs(x) <= 0.36) | (np.abs(y) <= 0.36)) & (np.abs(x) <= 1) & (np.abs(y) <= 1)
    elif shape == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.48)
        m = _polygon_contains(x, y, list(zip(radii * np.cos(angles), radii * np.sin(angles) + 0.08)))
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {ALL_SHAPES}")
    cov = m.reshape(size, supersample, size, supersample).mean(axis=(1, 3))
    out = cov >= 0.5
    out[(size - 1) // 2 : size // 2 + 1, (size - 1) // 2 : size // 2 + 1] = True  # centre always inside
    return out


def texture_dark(texture: str, size: int, period: int) -> np.ndarray:
    """Bool ``(size, size)``: pixels drawn in the dark shade of the part colour (stamp coordinates)."""
    r = np.arange(size)[:, None]
    c = np.arange(size)[None, :]
    w = max(1, period)
    if texture == "solid":
        d = np.zeros((size, size), dtype=bool)
    elif texture == "hstripes":
        d = np.broadcast_to((r // w) % 2 == 1, (size, size))
    elif texture == "vstripes":
        d = np.broadcast_to((c // w) % 2 == 1, (size, size))
    elif texture == "checker":
        d = ((r // w) + (c // w)) % 2 == 1
    elif texture == "dots":
        p = 2 * w + 1
        d = ((r % p) >= w) & ((r % p) < 2 * w) & ((c % p) >= w) & ((c % p) < 2 * w)
    else:
        raise ValueError(f"unknown texture {texture!r}; known: {ALL_TEXTURES}")
    return np.array(d, dtype=bool)


# ----------------------------------------------------------------------------------------------
# Sample description and output
# ----------------------------------------------------------------------------------------------


@dataclass
class SampleSpec:
    """Every random decision of one sample (no pixels). Interventions edit a copy of this.

    Shapes: ``K`` creature slots, ``D`` placed distractors.

    Attributes:
        split, index, label: identity of the sample (``label`` = class index, or concept index for
            a concept probe).
        attrs: ``(K, 3)`` int (shape, colour, texture) indices per slot.
        present: ``(K,)`` bool, part drawn or dropped.
        size: stamp side of every creature part in pixels.
        xy0: ``(K, 2)`` int top-left ``(x0, y0)`` of each part's stamp.
        bg: ``(3,)`` int16 background colour.
        noise: ``(tile, oy, ox)`` into the noise bank, or ``None``.
        d_attrs, d_size, d_xy0: ``(D, 3)``, ``(D,)``, ``(D, 2)`` distractor attributes/sizes/positions.
        hue, spurious: background hue in [0, 1) and whether it was tied to the class.
    """

    split: str
    index: int
    label: int
    attrs: np.ndarray
    present: np.ndarray
    size: int
    xy0: np.ndarray
    bg: np.ndarray
    noise: tuple[int, int, int] | None
    d_attrs: np.ndarray
    d_size: np.ndarray
    d_xy0: np.ndarray
    hue: float = 0.0
    spurious: bool = False


@dataclass
class PartShapesSample:
    """One rendered sample (numpy). ``K`` slots, ``N`` concepts, image ``H = W = image_size``.

    Attributes:
        image: ``(H, W, 3)`` uint8 RGB.
        part_map: ``(H, W)`` uint8; 0 background, ``1..K`` creature slot ``k-1``, ``K+1..`` distractors.
        label: class index.
        concepts: ``(N,)`` float32 multi-hot (see :attr:`PartShapesRenderer.concept_names`).
        landmarks: ``(K, 2)`` float32 part centres ``(x, y)`` (layout position, also for dropped parts).
        landmark_visible: ``(K,)`` bool = part present.
        part_boxes: ``(K, 4)`` float32 stamp boxes ``(x0, y0, x1, y1)``, ``x1``/``y1`` exclusive.
        spec: the :class:`SampleSpec` that produced it.
    """

    image: np.ndarray
    part_map: np.ndarray
    label: int
    concepts: np.ndarray
    landmarks: np.ndarray
    landmark_visible: np.ndarray
    part_boxes: np.ndarray
    spec: SampleSpec = field(repr=False)

    @property
    def part_present(self) -> np.ndarray:
        """``(K,)`` bool presence flags (same as ``landmark_visible``)."""
        return self.landmark_visible

    @property
    def part_masks(self) -> np.ndarray:
        """``(K, H, W)`` bool visible (modal) mask of each creature slot."""
        k = self.landmarks.shape[0]
        return self.part_map[None] == np.arange(1, k + 1, dtype=np.uint8)[:, None, None]

    @property
    def distractor_mask(self) -> np.ndarray:
        """``(H, W)`` bool pixels showing a distractor (background objects for BI/D metrics)."""
        return self.part_map > self.landmarks.shape[0]


# ----------------------------------------------------------------------------------------------
# Renderer
# ----------------------------------------------------------------------------------------------


class PartShapesRenderer:
    """Pure-numpy generator of PartShapes samples; holds the vocabulary, classes, stamps and noise bank.

    Args:
        image_size: side ``H = W`` in pixels (32-64 recommended).
        num_classes: number of classes ``C``.
        num_slots: number of part slots ``K``.
        h_min: minimum number of slots in which any two classes differ (1..K).
        seed: base seed of every sample and of the noise bank.
        class_seed: seed of the class definitions (default ``seed``).
        minimal_pairs: attribute names (``"shape"``, ``"colour"``, ``"texture"``; repeats allowed), one pair
            of classes per entry that differ in that attribute *only* (in ``h_min`` slots), so a classifier
            must read the attribute to tell them apart. Without it an attribute is often redundant (on the
            default table, classes stay ``h_min`` slots apart with shape ignored) and a network need not
            represent it. Empty (default): the plain table, unchanged.
        shapes, colours, textures: vocabulary (names from ``ALL_SHAPES``, ``ALL_COLOURS``, ``ALL_TEXTURES``).
        part_names: names of the slots (default head/body/wing/tail for K=4, ``slot_i`` otherwise).
        scale_range: part stamp side as a fraction of ``image_size`` (one scale per sample).
        ring_radius: slot ring radius as a fraction of ``image_size``.
        radius_jitter: relative jitter of the ring radius (uniform +-).
        angle_jitter: ring rotation jitter in degrees (uniform +-); ignored if ``random_rotation``.
        random_rotation: rotate the layout uniformly (slot position then carries no information).
        centre_jitter: creature centre jitter as a fraction of ``image_size`` (uniform +-, per axis).
        position_jitter: per-part Gaussian jitter sigma as a fraction of ``image_size`` (clipped at 2 sigma).
        noise_std: per-pixel Gaussian noise sigma in 0..255 units (0 disables).
        num_distractors: up to this many distractors per image (uniform count in ``0..num_distractors``),
            from the same vocabulary, placed so their boxes do not touch the creature's.
        distractor_scale_range: distractor stamp side as a fraction of ``image_size``.
        part_dropout: probability (train split only) that a sample loses 1..K-1 random parts.
        spurious_rho: probability (train split only) that the background hue equals the class hue.
        background_saturation: strength of the background hue tint (0 = pure grey).
        grey_range: background grey level range (0..255).
        texture_contrast: dark shade = colour * (1 - texture_contrast).
        noise_tiles: number of pre-drawn noise tiles (each ``2H x 2W x 3``).
    """

    def __init__(
        self,
        image_size: int = 32,
        num_classes: int = 10,
        num_slots: int = 4,
        h_min: int = 2,
        seed: int = 0,
        class_seed: int | None = None,
        minimal_pairs: Sequence[str] = (),
        shapes: Sequence[str] | None = None,
        colours: Sequence[str] | None = None,
        textures: Sequence[str] | None = None,
        part_names: Sequence[str] | None = None,
        scale_range: Sequence[float] = (0.19, 0.26),
        ring_radius: float = 0.25,
        radius_jitter: float = 0.08,
        angle_jitter: float = 15.0,
        random_rotation: bool = False,
        centre_jitter: float = 0.06,
        position_jitter: float = 0.02,
        noise_std: float = 8.0,
        num_distractors: int = 1,
        distractor_scale_range: Sequence[float] = (0.13, 0.17),
        part_dropout: float = 0.2,
        spurious_rho: float = 0.0,
        background_saturation: float = 0.2,
        grey_range: Sequence[float] = (85.0, 165.0),
        texture_contrast: float = 0.55,
        noise_tiles: int = 8,
    ) -> None:
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        if not 1 <= h_min <= num_slots:
            raise ValueError(f"h_min must be in [1, num_slots={num_slots}], got {h_min}")
        if not 0.0 <= part_dropout <= 1.0 or not 0.0 <= spurious_rho <= 1.0:
            raise ValueError("part_dropout and spurious_rho must lie in [0, 1]")
        self.image_size = int(image_size)
        self.num_classes = int(num_classes)
        self.num_slots = int(num_slots)
        self.h_min = int(h_min)
        self.seed = int(seed)
        self.class_seed = int(seed if class_seed is None else class_seed)
        if isinstance(
            minimal_pairs, str
        ):  # data.minimal_pairs=shape on the command line: one pair, not 5 letters
            minimal_pairs = (minimal_pairs,)
        bad_attr = [a for a in minimal_pairs if a not in ATTRIBUTES]
        if bad_attr:
            raise ValueError(
                f"minimal_pairs={list(minimal_pairs)}: {bad_attr} not among the attributes {list(ATTRIBUTES)}"
            )
        if 2 * len(minimal_pairs) > num_classes:
            raise ValueError(
                f"minimal_pairs has {len(minimal_pairs)} pairs, which need {2 * len(minimal_pairs)} classes; "
                f"num_classes={num_classes}: raise num_classes or list fewer pairs"
            )
        self.minimal_pairs = tuple(str(a) for a in minimal_pairs)
        self.shapes = tuple(shapes) if shapes is not None else DEFAULT_SHAPES
        self.colours = tuple(colours) if colours is not None else DEFAULT_COLOURS
        self.textures = tuple(textures) if textures is not None else DEFAULT_TEXTURES
        for name, vocab, known in (
            ("shapes", self.shapes, ALL_SHAPES),
            ("colours", self.colours, tuple(ALL_COLOURS)),
            ("textures", self.textures, ALL_TEXTURES),
        ):
            bad = [v for v in vocab if v not in known]
            if bad or len(set(vocab)) != len(vocab) or not vocab:
                raise ValueError(f"{name}={list(vocab)} must be distinct names from {list(known)}")
        if part_names is not None:
            if len(part_names) != num_slots:
                raise ValueError(f"part_names has {len(part_names)} names for num_slots={num_slots}")
            self.part_names = [str(p) for p in part_names]
        elif num_slots == 4:
            self.part_names = list(FOUR_PART_NAMES)
        else:
            self.part_names = [f"slot_{i}" for i in range(num_slots)]

        s = self.image_size
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.ring_radius = float(ring_radius)
        self.radius_jitter = float(radius_jitter)
        self.angle_jitter = float(angle_jitter)
        self.random_rotation = bool(random_rotation)
        self.centre_jitter = float(centre_jitter)
        self.position_jitter = float(position_jitter)
        self.noise_std = float(noise_std)
        self.num_distractors = int(num_distractors)
        self.distractor_scale_range = (float(distractor_scale_range[0]), float(distractor_scale_range[1]))
        self.part_dropout = float(part_dropout)
        self.spurious_rho = float(spurious_rho)
        self.background_saturation = float(background_saturation)
        self.grey_range = (float(grey_range[0]), float(grey_range[1]))
        self.texture_contrast = float(texture_contrast)

        self.part_sizes = self._size_range(self.scale_range)
        self.distractor_sizes = self._size_range(self.distractor_scale_range)
        if self.part_sizes[-1] > s or self.distractor_sizes[-1] > s:
            raise ValueError("scale_range / distractor_scale_range give stamps larger than the image")

        # stamps[shape][texture][size] = (mask (size, size) bool, shade index per mask pixel (n,))
        period = max(1, round(s / 32))
        all_sizes = sorted(set(self.part_sizes) | set(self.distractor_sizes))
        self._stamps: list[list[dict[int, tuple[np.ndarray, np.ndarray]]]] = []
        for sh in self.shapes:
            row = []
            for tx in self.textures:
                d: dict[int, tuple[np.ndarray, np.ndarray]] = {}
                for sz in all_sizes:
                    m = shape_mask(sh, sz)
                    dark = texture_dark(tx, sz, period)
                    d[sz] = (m, np.where(dark[m], 2, 1).astype(np.intp))
                row.append(d)
            self._stamps.append(row)
        # palettes[colour] = (3, 3) int16 rows: unused, light, dark
        self._palettes = []
        for c in self.colours:
            light = np.array(ALL_COLOURS[c], dtype=np.float64)
            dark = np.round(light * (1.0 - self.texture_contrast))
            self._palettes.append(np.stack([np.zeros(3), light, dark]).astype(np.int16))

        self._noise_bank: np.ndarray | None = None
        if self.noise_std > 0:
            g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0x0B5E])))
            bank = g.standard_normal((int(noise_tiles), 2 * s, 2 * s, 3)) * self.noise_std
            self._noise_bank = np.clip(np.round(bank), -255, 255).astype(np.int16)

        self._classes = self._sample_classes()
        self._build_concepts()
        self._carriers: dict[int, np.ndarray] = {}  # concept column -> concept_carriers, for scene probes
        # number of uniforms per draw (fixed so every sample consumes the same stream layout)
        k, nd = self.num_slots, self.num_distractors
        self._n_u = 7 + k + 6 + 1 + nd * (4 + 2 * _N_CANDIDATES) + 4

    def with_pose(self, random_rotation: bool = True, centre_jitter: float = 0.12) -> PartShapesRenderer:
        """A copy that draws the same classes, colours and noise with a varied pose: the layout rotates
        uniformly and the creature moves by ``+-centre_jitter`` of the image side.

        Part-location metrics are read on such data: on the default layout a part sits within ~2 px of the
        same place in every image, so a detector that always fires at one location looks like a part
        detector. With the pose varied, such a detector scores at chance.
        """
        out = copy.copy(self)
        out.random_rotation = bool(random_rotation)
        out.centre_jitter = float(centre_jitter)
        return out

    # -- vocabulary, classes, concepts ------------------------------------------------------------
    def _size_range(self, rng: tuple[float, float]) -> list[int]:
        lo = max(3, round(rng[0] * self.image_size))
        hi = max(lo, round(rng[1] * self.image_size))
        return list(range(lo, hi + 1))

    def _sample_classes(self) -> np.ndarray:
        """``(C, K, 3)`` int class table, sampled without replacement with Hamming distance >= h_min; the
        :attr:`minimal_pairs` (if any) come first."""
        k = self.num_slots
        ns, nc, nt = len(self.shapes), len(self.colours), len(self.textures)
        per_slot = ns * nc * nt
        if self.num_classes < 1 or self.num_classes > per_slot**k:
            raise ValueError(f"num_classes must be in [1, {per_slot**k}], got {self.num_classes}")
        g = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.class_seed, 0xC1A55])))
        codes: list[np.ndarray] = self._minimal_pair_codes(g) if self.minimal_pairs else []
        tries = 0
        while len(codes) < self.num_classes:
            tries += 1
            if tries > 200_000:
                raise ValueError(
                    f"could not sample {self.num_classes} classes with h_min={self.h_min} from "
                    f"{per_slot}^{k} combinations; lower num_classes or h_min, or enlarge the vocabulary"
                )
            cand = g.integers(0, per_slot, size=k)
            if codes and (np.stack(codes) != cand).sum(axis=1).min() < self.h_min:
                continue
            codes.append(cand)
        code = np.stack(codes)  # (C, K) flat per-slot code
        return np.stack([code // (nc * nt), (code // nt) % nc, code % nt], axis=-1).astype(np.int64)

    def _minimal_pair_codes(self, g: np.random.Generator) -> list[np.ndarray]:
        """Flat per-slot codes ``(K,)`` of the :attr:`minimal_pairs`: per entry a random class and its twin,
        which differs from it in the entry's attribute alone, in ``h_min`` random slots (each changed to
        another value), every class at least ``h_min`` slots from all earlier ones."""
        k = self.num_slots
        sizes = (len(self.shapes), len(self.colours), len(self.textures))
        for attr in self.minimal_pairs:
            if sizes[ATTRIBUTES.index(attr)] < 2:
                raise ValueError(f"minimal_pairs: the {attr} vocabulary has one value; a pair needs two")
        codes: list[np.ndarray] = []
        for attr in self.minimal_pairs:
            a = ATTRIBUTES.index(attr)
            for _ in range(200_000):
                base = np.stack([g.integers(0, n, size=k) for n in sizes], axis=-1)  # (K, 3)
                twin = base.copy()
                for slot in g.choice(k, size=self.h_min, replace=False):
                    twin[slot, a] = (base[slot, a] + g.integers(1, sizes[a])) % sizes[a]
                pair = [self._flat_code(base), self._flat_code(twin)]
                if codes and min((np.stack(codes) != c).sum(axis=1).min() for c in pair) < self.h_min:
                    continue
                codes += pair
                break
            else:
                raise ValueError(
                    f"could not place the minimal pairs {list(self.minimal_pairs)} with h_min={self.h_min}; "
                    f"list fewer pairs or lower h_min"
                )
        return codes

    def _flat_code(self, table: np.ndarray) -> np.ndarray:
        """``(K, 3)`` (shape, colour, texture) indices -> ``(K,)`` flat per-slot codes of :meth:`_sample_classes`."""
        nc, nt = len(self.colours), len(self.textures)
        return table[:, 0] * nc * nt + table[:, 1] * nt + table[:, 2]

    @property
    def class_table(self) -> np.ndarray:
        """``(C, K, 3)`` int (shape, colour, texture) index per class and slot (a copy)."""
        return self._classes.copy()

    @property
    def class_names(self) -> list[str]:
        return [f"class_{c:02d}" for c in range(self.num_classes)]

    @property
    def class_display_names(self) -> list[str]:
        """Short readable class labels for figures, e.g. ``"c3: red h-striped circle head"``.

        Each class is named after its most distinctive part: the slot whose (shape, colour, texture)
        triple the fewest other classes share in that slot (ties: the lowest slot index, so the name is a
        deterministic function of the class table). The ``c<index>:`` prefix keeps the names unique even
        when two classes' distinctive parts coincide. Figures only: :attr:`class_names` (``class_07``) is
        what :attr:`class_hash` and shipped bundles use, and it does not change.
        """
        table = self._classes  # (C, K, 3)
        # shared[c, k]: other classes with the same triple in slot k (the class itself subtracted)
        shared = (table[:, None] == table[None]).all(-1).sum(1) - 1  # (C, K)
        names = []
        for c in range(self.num_classes):
            k = int(np.argmin(shared[c]))  # argmin takes the first minimum: the lowest slot on ties
            shape, colour, texture = (int(v) for v in table[c, k])
            words = [self.colours[colour], _TEXTURE_WORDS.get(self.textures[texture], ""), self.shapes[shape]]
            names.append(f"c{c}: {' '.join(w for w in words if w)} {self.part_names[k]}")
        return names

    def class_definitions(self) -> dict[str, Any]:
        """JSON-serialisable class definitions (vocabulary, slots and each class's parts)."""
        classes = []
        for c, name in enumerate(self.class_names):
            parts = {
                self.part_names[k]: {
                    "shape": self.shapes[int(a[0])],
                    "colour": self.colours[int(a[1])],
                    "texture": self.textures[int(a[2])],
                }
                for k, a in enumerate(self._classes[c])
            }
            classes.append({"name": name, "parts": parts})
        return {
            "vocabulary": {
                "shapes": list(self.shapes),
                "colours": list(self.colours),
                "textures": list(self.textures),
            },
            "part_names": list(self.part_names),
            "h_min": self.h_min,
            "class_seed": self.class_seed,
            "classes": classes,
            # only when set, so the plain tables keep their hashes
            **({"minimal_pairs": list(self.minimal_pairs)} if self.minimal_pairs else {}),
        }

    def class_definitions_json(self) -> str:
        """Canonical JSON of :meth:`class_definitions` (sorted keys, no whitespace)."""
        return json.dumps(self.class_definitions(), sort_keys=True, separators=(",", ":"))

    @property
    def class_hash(self) -> str:
        """First 16 hex digits of the SHA-256 of :meth:`class_definitions_json`."""
        return hashlib.sha256(self.class_definitions_json().encode()).hexdigest()[:16]

    def minimal_sufficient_part_sets(self) -> dict[str, list[list[int]]]:
        """For each class, the inclusion-minimal slot sets that no other class matches entirely.

        A slot set ``S`` is sufficient for class ``c`` if every other class differs from ``c`` in at
        least one slot of ``S``. Returns ``{class_name: [sorted slot-index lists]}`` ordered by size.
        """
        k = self.num_slots
        out: dict[str, list[list[int]]] = {}
        same = (self._classes[:, None] == self._classes[None]).all(-1)  # (C, C, K) slot equal
        for c, name in enumerate(self.class_names):
            others = np.delete(same[c], c, axis=0)  # (C-1, K)
            found: list[tuple[int, ...]] = []
            for r in range(1, k + 1):
                for sub in itertools.combinations(range(k), r):
                    if any(set(f) <= set(sub) for f in found):
                        continue
                    if others.shape[0] == 0 or not others[:, list(sub)].all(axis=1).any():
                        found.append(sub)
            out[name] = [list(f) for f in found]
        return out

    def _build_concepts(self) -> None:
        vocab = (self.shapes, self.colours, self.textures)
        names: list[str] = []
        for p in self.part_names:
            for fam, vals in zip(FAMILIES, vocab):
                names += [f"{p}_{fam}_{v}" for v in vals]
        self.n_slot_concepts = len(names)
        # presence concepts: (family, set of value indices)
        self._presence: list[tuple[int, tuple[int, ...]]] = []
        for f, vals in enumerate(vocab):
            for i, v in enumerate(vals):
                names.append(f"has_{v}")
                self._presence.append((f, (i,)))
        striped = tuple(i for i, t in enumerate(self.textures) if t in ("hstripes", "vstripes"))
        if len(striped) == 2:
            names.append("has_striped")
            self._presence.append((2, striped))
        self.concept_names: list[str] = names
        self._concept_index = {n: i for i, n in enumerate(names)}
        self._block = len(self.shapes) + len(self.colours) + len(self.textures)
        self._fam_offset = (0, len(self.shapes), len(self.shapes) + len(self.colours))
        # (block, n_presence): which per-slot value switches each presence concept on
        self._presence_matrix = np.zeros((self._block, len(self._presence)), dtype=np.float32)
        for j, (f, vals) in enumerate(self._presence):
            self._presence_matrix[[self._fam_offset[f] + v for v in vals], j] = 1.0

    @property
    def presence_concept_names(self) -> list[str]:
        """Slot-agnostic concepts (``has_red``, ``has_triangle``, ``has_striped``, ...)."""
        return self.concept_names[self.n_slot_concepts :]

    def concept_index(self, name: str) -> int:
        if name not in self._concept_index:
            raise ValueError(f"unknown concept {name!r}; known: {self.concept_names}")
        return self._concept_index[name]

    def concepts_of(self, attrs: np.ndarray, present: np.ndarray) -> np.ndarray:
        """``(N,)`` float32 concept vector for creature ``attrs`` ``(K, 3)`` with ``present`` ``(K,)``."""
        k = self.num_slots
        slot = np.zeros((k, self._block), dtype=np.float32)
        ks = np.flatnonzero(present)
        for f in range(3):
            slot[ks, self._fam_offset[f] + attrs[ks, f]] = 1.0
        presence = (slot.max(axis=0) @ self._presence_matrix) > 0
        return np.concatenate([slot.reshape(-1), presence.astype(np.float32)])

    # -- drawing (all randomness) -----------------------------------------------------------------
    def _rng(self, key: Sequence[int]) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, *key])))

    def label_of(self, index: int) -> int:
        """Class of sample ``index`` (balanced: ``index % C``)."""
        return int(index) % self.num_classes

    def draw(self, split: str, index: int) -> SampleSpec:
        """All random decisions of sample ``(split, index)``; no pixels are touched."""
        sid = _split_id(split)
        u, z = self._draw_streams([sid, int(index)])
        return self._spec_from_streams(u, z, split, int(index), self.label_of(index), train=sid == 0)

    def _draw_streams(self, key: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        g = self._rng(key)
        return g.random(self._n_u), g.standard_normal(2 * self.num_slots)

    def _spec_from_streams(
        self, u: np.ndarray, z: np.ndarray, split: str, index: int, label: int, train: bool
    ) -> SampleSpec:
        s, k = self.image_size, self.num_slots
        # layout
        cx = s / 2 + (2 * u[0] - 1) * self.centre_jitter * s
        cy = s / 2 + (2 * u[1] - 1) * self.centre_jitter * s
        if self.random_rotation:
            theta0 = 2 * np.pi * u[2]
        else:
            theta0 = -np.pi / 2 + np.deg2rad((2 * u[2] - 1) * self.angle_jitter)
        radius = self.ring_radius * s * (1 + (2 * u[3] - 1) * self.radius_jitter)
        size = self.part_sizes[min(int(u[4] * len(self.part_sizes)), len(self.part_sizes) - 1)]
        ang = theta0 + 2 * np.pi * np.arange(k) / k
        jit = np.clip(z.reshape(k, 2), -2, 2) * self.position_jitter * s
        centres = np.stack([cx + radius * np.cos(ang), cy + radius * np.sin(ang)], axis=1) + jit
        xy0 = np.clip(np.round(centres - (size - 1) / 2), 0, s - size).astype(np.int64)
        # part dropout (train only)
        present = np.ones(k, dtype=bool)
        if train and k > 1 and u[5] < self.part_dropout:
            n_drop = 1 + min(int(u[6] * (k - 1)), k - 2)
            present[np.argsort(u[7 : 7 + k], kind="stable")[:n_drop]] = False
        o = 7 + k
        # background
        grey = self.grey_range[0] + u[o] * (self.grey_range[1] - self.grey_range[0])
        spurious = bool(train and u[o + 2] < self.spurious_rho)
        hue = label / self.num_classes if spurious else float(u[o + 1])
        rgb = np.array(colorsys.hsv_to_rgb(hue, 1.0, 1.0)) * 255.0
        bg = np.clip(np.round(grey + self.background_saturation * (rgb - 127.5)), 0, 255).astype(np.int16)
        noise = None
        if self._noise_bank is not None:
            nt = self._noise_bank.shape[0]
            noise = (min(int(u[o + 3] * nt), nt - 1), int(u[o + 4] * s), int(u[o + 5] * s))
        o += 6
        # distractors
        n_d = min(int(u[o] * (self.num_distractors + 1)), self.num_distractors)
        o += 1
        boxes = [np.concatenate([xy0, xy0 + size], axis=1)]  # (K, 4) creature stamp boxes, all slots
        d_attrs, d_size, d_xy0 = [], [], []
        vocab_n = (len(self.shapes), len(self.colours), len(self.textures))
        for j in range(self.num_distractors):
            du = u[o : o + 4 + 2 * _N_CANDIDATES]
            o += 4 + 2 * _N_CANDIDATES
            if j >= n_d:
                continue
            a = [min(int(du[f] * vocab_n[f]), vocab_n[f] - 1) for f in range(3)]
            dsz = self.distractor_sizes[
                min(int(du[3] * len(self.distractor_sizes)), len(self.distractor_sizes) - 1)
            ]
            cand = np.floor(du[4:].reshape(_N_CANDIDATES, 2) * (s - dsz + 1)).astype(np.int64)
            allb = np.concatenate(boxes, axis=0)
            m = 1  # margin in pixels
            ok = ~(
                (cand[:, None, 0] < allb[None, :, 2] + m)
                & (allb[None, :, 0] < cand[:, None, 0] + dsz + m)
                & (cand[:, None, 1] < allb[None, :, 3] + m)
                & (allb[None, :, 1] < cand[:, None, 1] + dsz + m)
            ).any(axis=1)
            if not ok.any():
                continue
            pos = cand[int(np.argmax(ok))]
            d_attrs.append(a)
            d_size.append(dsz)
            d_xy0.append(pos)
            boxes.append(np.array([[pos[0], pos[1], pos[0] + dsz, pos[1] + dsz]]))
        return SampleSpec(
            split=split,
            index=index,
            label=int(label),
            attrs=self._classes[label % self.num_classes].copy(),
            present=present,
            size=int(size),
            xy0=xy0,
            bg=bg,
            noise=noise,
            d_attrs=np.array(d_attrs, dtype=np.int64).reshape(-1, 3),
            d_size=np.array(d_size, dtype=np.int64),
            d_xy0=np.array(d_xy0, dtype=np.int64).reshape(-1, 2),
            hue=float(hue),
            spurious=spurious,
        )

    # -- interventions ----------------------------------------------------------------------------
    def _slot(self, slot: int | str) -> int:
        if isinstance(slot, str):
            if slot not in self.part_names:
                raise ValueError(f"unknown part {slot!r}; parts: {self.part_names}")
            return self.part_names.index(slot)
        if not 0 <= int(slot) < self.num_slots:
            raise ValueError(f"slot {slot} out of range [0, {self.num_slots})")
        return int(slot)

    def intervene(
        self,
        spec: SampleSpec,
        remove_parts: Sequence[int | str] | None = None,
        replace_part: Mapping[int | str, Mapping[str, int | str]] | None = None,
        remove_distractors: bool = False,
        add_parts: Sequence[int | str] | None = None,
    ) -> SampleSpec:
        """A copy of ``spec`` with parts removed/added, part attributes replaced, distractors removed.

        ``replace_part`` maps a slot (index or part name) to ``{"shape"|"colour"|"texture": value}``
        with values as names or vocabulary indices; it does not change presence (use ``add_parts``
        to draw a dropped slot).
        """
        new = copy.deepcopy(spec)
        for slot in add_parts or ():
            new.present[self._slot(slot)] = True
        for slot in remove_parts or ():
            new.present[self._slot(slot)] = False
        vocab = {"shape": self.shapes, "colour": self.colours, "texture": self.textures}
        for slot, change in (replace_part or {}).items():
            k = self._slot(slot)
            for fam, val in change.items():
                if fam not in vocab:
                    raise ValueError(f"replace_part keys must be in {list(vocab)}, got {fam!r}")
                if isinstance(val, str):
                    if val not in vocab[fam]:
                        raise ValueError(f"{val!r} is not a {fam} of this dataset: {vocab[fam]}")
                    val = vocab[fam].index(val)
                new.attrs[k, FAMILIES.index(fam)] = int(val)
        if remove_distractors:
            new.d_attrs = new.d_attrs[:0]
            new.d_size = new.d_size[:0]
            new.d_xy0 = new.d_xy0[:0]
        return new

    # -- rasterisation ----------------------------------------------------------------------------
    def _paste(
        self, img: np.ndarray, pmap: np.ndarray, a: np.ndarray, size: int, x0: int, y0: int, label: int
    ) -> None:
        m, sidx = self._stamps[a[0]][a[2]][size]
        img[y0 : y0 + size, x0 : x0 + size][m] = self._palettes[a[1]][sidx]
        pmap[y0 : y0 + size, x0 : x0 + size][m] = label

    def rasterise(self, spec: SampleSpec) -> tuple[np.ndarray, np.ndarray]:
        """Pixels of ``spec``: image ``(H, W, 3)`` uint8 and part map ``(H, W)`` uint8. No randomness."""
        s, k = self.image_size, self.num_slots
        img = np.empty((s, s, 3), dtype=np.int16)
        img[...] = spec.bg
        pmap = np.zeros((s, s), dtype=np.uint8)
        for j in range(spec.d_attrs.shape[0]):  # distractors first: the creature is on top
            self._paste(img, pmap, spec.d_attrs[j], int(spec.d_size[j]), *spec.d_xy0[j].tolist(), k + 1 + j)
        for i in np.flatnonzero(spec.present):
            self._paste(img, pmap, spec.attrs[i], spec.size, *spec.xy0[i].tolist(), i + 1)
        if spec.noise is not None and self._noise_bank is not None:
            t, oy, ox = spec.noise
            img += self._noise_bank[t, oy : oy + s, ox : ox + s]
            np.clip(img, 0, 255, out=img)
        return img.astype(np.uint8), pmap

    def sample_from_spec(self, spec: SampleSpec) -> PartShapesSample:
        """Rasterise ``spec`` and attach concepts, landmarks, boxes and presence flags."""
        img, pmap = self.rasterise(spec)
        lm = (spec.xy0 + (spec.size - 1) / 2.0).astype(np.float32)
        boxes = np.concatenate([spec.xy0, spec.xy0 + spec.size], axis=1).astype(np.float32)
        return PartShapesSample(
            image=img,
            part_map=pmap,
            label=spec.label,
            concepts=self.concepts_of(spec.attrs, spec.present),
            landmarks=lm,
            landmark_visible=spec.present.copy(),
            part_boxes=boxes,
            spec=spec,
        )

    def render(
        self,
        split: str,
        index: int,
        remove_parts: Sequence[int | str] | None = None,
        replace_part: Mapping[int | str, Mapping[str, int | str]] | None = None,
        remove_distractors: bool = False,
        add_parts: Sequence[int | str] | None = None,
    ) -> PartShapesSample:
        """Render sample ``(split, index)``, optionally under an intervention (see :meth:`intervene`)."""
        spec = self.draw(split, index)
        if remove_parts or replace_part or remove_distractors or add_parts:
            spec = self.intervene(spec, remove_parts, replace_part, remove_distractors, add_parts)
        return self.sample_from_spec(spec)

    def concept_masks(self, sample: PartShapesSample) -> np.ndarray:
        """``(N, H, W)`` bool pixel mask of each concept: the union of the visible parts that carry it."""
        spec = sample.spec
        pm = sample.part_masks
        s = self.image_size
        out = np.zeros((len(self.concept_names), s, s), dtype=bool)
        for i in np.flatnonzero(spec.present):
            for f in range(3):
                out[i * self._block + self._fam_offset[f] + spec.attrs[i, f]] |= pm[i]
        base = self.n_slot_concepts
        for j, (f, vals) in enumerate(self._presence):
            for i in np.flatnonzero(spec.present):
                if spec.attrs[i, f] in vals:
                    out[base + j] |= pm[i]
        return out

    # -- concept probes ---------------------------------------------------------------------------
    def draw_probe(self, concept: str, split: str, index: int) -> SampleSpec:
        """Spec of probe image ``index`` for ``concept``: one part that shows it, other attributes random.

        Per-slot concepts (``head_colour_red``) use that slot's position; presence concepts use a
        random slot. No distractors, no dropout, no spurious background. Seeds are separate from the
        main splits and between ``split``s.
        """
        ci = self.concept_index(concept)
        u, z = self._draw_streams([PROBE_SPLIT_OFFSET + _split_id(split), ci, int(index)])
        spec = self._spec_from_streams(u, z, split, int(index), 0, train=False)
        pu = u[-4:]
        vocab_n = (len(self.shapes), len(self.colours), len(self.textures))
        attrs = np.array([min(int(pu[1 + f] * vocab_n[f]), vocab_n[f] - 1) for f in range(3)])
        if ci < self.n_slot_concepts:
            slot, rest = divmod(ci, self._block)
            f = int(np.searchsorted(self._fam_offset, rest, side="right") - 1)
            attrs[f] = rest - self._fam_offset[f]
        else:
            slot = min(int(pu[0] * self.num_slots), self.num_slots - 1)
            f, vals = self._presence[ci - self.n_slot_concepts]
            if attrs[f] not in vals:
                attrs[f] = vals[min(int(pu[1 + f] * len(vals)), len(vals) - 1)]
        spec.attrs[slot] = attrs
        spec.present[:] = False
        spec.present[slot] = True
        spec.label = ci
        spec.d_attrs, spec.d_size, spec.d_xy0 = spec.d_attrs[:0], spec.d_size[:0], spec.d_xy0[:0]
        return spec

    def render_probe(self, concept: str, split: str, index: int) -> PartShapesSample:
        """Rendered :meth:`draw_probe`; ``sample.label`` is the concept's index in :attr:`concept_names`."""
        return self.sample_from_spec(self.draw_probe(concept, split, index))

    def draw_probe_negative(self, concept: str, split: str, index: int) -> SampleSpec:
        """Probe ``index`` of ``concept`` with the concept removed: the paired negative of :meth:`draw_probe`.

        The same layout, noise, part and other attributes; only the attribute that carries the concept is
        redrawn among the values that do not (``has_striped``: a texture other than both stripes;
        ``head_colour_red``: another colour). So positive and negative differ by the concept alone, which
        is what contrastive concept whitening contrasts. ``spec.label`` stays the concept's index.
        """
        ci = self.concept_index(concept)
        spec = self.draw_probe(concept, split, index)
        if ci < self.n_slot_concepts:
            slot, rest = divmod(ci, self._block)
            f = int(np.searchsorted(self._fam_offset, rest, side="right") - 1)
            carrying: tuple[int, ...] = (rest - self._fam_offset[f],)
        else:
            slot = int(np.flatnonzero(spec.present)[0])
            f, carrying = self._presence[ci - self.n_slot_concepts]
        n_values = (len(self.shapes), len(self.colours), len(self.textures))[f]
        others = [v for v in range(n_values) if v not in carrying]
        if not others:
            raise ValueError(f"concept {concept!r} is carried by every {FAMILIES[f]}: it has no negative")
        # a stream of its own: the positive's draws are untouched, so the pair shares everything else
        u = self._rng([PROBE_SPLIT_OFFSET + _split_id(split), ci, int(index), 1]).random()
        spec.attrs[slot, f] = others[min(int(u * len(others)), len(others) - 1)]
        return spec

    def render_probe_negative(self, concept: str, split: str, index: int) -> PartShapesSample:
        """Rendered :meth:`draw_probe_negative` (its concept vector has ``concept`` off)."""
        return self.sample_from_spec(self.draw_probe_negative(concept, split, index))

    def draw_scene_probe(self, concept: str, split: str, index: int, negative: bool = False) -> SampleSpec:
        """Scene probe ``index`` of ``concept``: a whole image of the data's distribution with the concept on
        (``negative=False``) or off (``negative=True``), the two differing by one edit.

        The scene is drawn like a held-out sample (a class creature with all its parts, distractors, noise,
        this renderer's pose) from streams of its own (never a training, val or test image). Where the
        concept is absent one part's shape / colour / texture is changed to a value that carries it; where
        present every part carrying it is changed to a value that does not (:func:`concept_edit`, the edits
        the scorecard's intervention metric applies). The positive and the negative are the same scene, so
        their difference is the concept's own effect, in context: the part's neighbours, distractors and pose
        are those a test image has. Compare :meth:`draw_probe` (one part on an empty background).
        ``spec.label`` is the concept's index in :attr:`concept_names`.
        """
        ci = self.concept_index(concept)
        sid = _split_id(split)
        carriers = self._carriers.get(ci)
        if carriers is None:
            carriers = self._carriers[ci] = concept_carriers(self, ci)
        for attempt in range(64):  # a scene whose parts cannot carry the concept is redrawn
            key = [SCENE_PROBE_OFFSET + sid, ci, int(index), attempt]
            u, z = self._draw_streams(key)
            label = int(self._rng([*key, 1]).integers(self.num_classes))
            spec = self._spec_from_streams(u, z, split, int(index), label, train=False)
            edit = concept_edit(carriers, spec.attrs, spec.present, self._rng([*key, 2]))
            if edit is not None:
                break
        else:
            raise ValueError(f"concept {concept!r}: no scene of this renderer can be edited to show it")
        replace, sign = edit
        edited = self.intervene(spec, replace_part=replace)
        # sign +1: the scene lacked the concept and the edit adds it; -1: it had it and the edit removes it
        out = spec if (sign > 0) == negative else edited
        out.label = ci
        return out


def concept_carriers(renderer: Any, column: int) -> np.ndarray:
    """``(K, S, C, T)`` bool: does slot ``k`` drawn as (shape ``s``, colour ``c``, texture ``t``) carry the
    concept in column ``column`` of the renderer's concept vector (``renderer.concepts_of`` of that part alone).

    Works for per-slot concepts (``head_colour_red``) and presence concepts (``has_red``, ``has_striped``)
    alike, with no knowledge of how the renderer names them.
    """
    k = renderer.num_slots
    sizes = (len(renderer.shapes), len(renderer.colours), len(renderer.textures))
    out = np.zeros((k, *sizes), dtype=bool)
    for slot in range(k):
        present = np.zeros(k, dtype=bool)
        present[slot] = True
        for s in range(sizes[0]):
            for c in range(sizes[1]):
                for t in range(sizes[2]):
                    attrs = np.zeros((k, 3), dtype=np.int64)
                    attrs[slot] = (s, c, t)
                    out[slot, s, c, t] = renderer.concepts_of(attrs, present)[column] > 0.5
    return out


def concept_edit(
    carriers: np.ndarray, attrs: np.ndarray, present: np.ndarray, rng: np.random.Generator
) -> tuple[dict[int, dict[str, int]], int] | None:
    """One-attribute edits that add the concept (if absent) or remove it (if present).

    Args:
        carriers: ``(K, S, C, T)`` from :func:`concept_carriers`.
        attrs: ``(K, 3)`` (shape, colour, texture) indices of the sample; present: ``(K,)`` bool.
        rng: picks among the valid edits.

    Returns:
        ``(replace_part, sign)`` for ``renderer.render(..., replace_part=...)``: ``{slot: {family: value}}``
        and ``+1`` (added) or ``-1`` (removed); ``None`` when no single-attribute edit exists.
    """
    carrying = [int(i) for i in np.flatnonzero(present) if carriers[(i, *attrs[i])]]

    def changes(slot: int, want: bool) -> list[tuple[int, int]]:
        out = []
        for f, n in enumerate(carriers.shape[1:]):
            for v in range(n):
                if v == attrs[slot, f]:
                    continue
                a = attrs[slot].copy()
                a[f] = v
                if bool(carriers[(slot, *a)]) == want:
                    out.append((f, v))
        return out

    if carrying:  # remove: every carrying part loses the concept
        edit: dict[int, dict[str, int]] = {}
        for slot in carrying:
            options = changes(slot, False)
            if not options:
                return None
            f, v = options[int(rng.integers(len(options)))]
            edit[slot] = {FAMILIES[f]: int(v)}
        return edit, -1
    options3 = [(int(i), f, v) for i in np.flatnonzero(present) for f, v in changes(int(i), True)]
    if not options3:
        return None
    slot, f, v = options3[int(rng.integers(len(options3)))]
    return {slot: {FAMILIES[f]: int(v)}}, 1


# ----------------------------------------------------------------------------------------------
# torch Datasets
# ----------------------------------------------------------------------------------------------

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def image_to_tensor(img: np.ndarray, grayscale: bool = False) -> torch.Tensor:
    """uint8 ``(H, W, 3)`` -> float ``(C, H, W)`` in [0, 1]; ``C = 1`` (luma) if ``grayscale``."""
    x = img.astype(np.float32) * (1.0 / 255.0)
    if grayscale:
        return torch.from_numpy(x @ _LUMA)[None]
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class PartShapesDataset(Dataset):
    """``n`` samples of one split, rendered lazily (or all at once with ``cache=True``).

    Items (``K`` slots, ``N`` concepts, ``C`` channels):
    ``"image"`` ``(C, H, W)`` float in [0, 1], ``"label"`` long, ``"index"`` long,
    ``"concepts"`` ``(N,)`` float, ``"part_masks"`` ``(K, H, W)`` bool, ``"landmarks"`` ``(K, 2)``
    float ``(x, y)``, ``"landmark_visible"`` ``(K,)`` bool, ``"part_boxes"`` ``(K, 4)`` float
    ``(x0, y0, x1, y1)``, and ``"concept_masks"`` ``(N, H, W)`` bool if ``return_concept_masks``.

    Args:
        renderer: the :class:`PartShapesRenderer` (shared between splits).
        split: "train", "val" or "test".
        n: number of samples.
        cache: pre-render the whole split into uint8 arrays (rich progress bar above 50k images).
        grayscale: return 1-channel luma images.
        return_concept_masks: add ``"concept_masks"`` to every item (memory: ``N*H*W`` bytes each).
    """

    def __init__(
        self,
        renderer: PartShapesRenderer,
        split: str,
        n: int,
        cache: bool = False,
        grayscale: bool = False,
        return_concept_masks: bool = False,
    ) -> None:
        _split_id(split)
        self.renderer = renderer
        self.split = split
        self.n = int(n)
        self.grayscale = grayscale
        self.return_concept_masks = return_concept_masks
        self._cache: dict[str, np.ndarray] | None = None
        if cache:
            self.build_cache()

    def __len__(self) -> int:
        return self.n

    # names
    @property
    def class_names(self) -> list[str]:
        return self.renderer.class_names

    @property
    def concept_names(self) -> list[str]:
        return self.renderer.concept_names

    @property
    def part_names(self) -> list[str]:
        return self.renderer.part_names

    def build_cache(self) -> None:
        """Render the split once into uint8 arrays: images ``(n, H, W, 3)``, part maps ``(n, H, W)``, ..."""
        r = self.renderer
        s, k = r.image_size, r.num_slots
        c = {
            "image": np.empty((self.n, s, s, 3), np.uint8),
            "part_map": np.empty((self.n, s, s), np.uint8),
            "label": np.empty(self.n, np.int64),
            "concepts": np.empty((self.n, len(r.concept_names)), np.float32),
            "landmarks": np.empty((self.n, k, 2), np.float32),
            "landmark_visible": np.empty((self.n, k), bool),
            "part_boxes": np.empty((self.n, k, 4), np.float32),
        }
        indices: Any = range(self.n)
        if self.n >= 50_000:
            from rich.progress import track

            indices = track(indices, description=f"rendering PartShapes {self.split}", total=self.n)
        for i in indices:
            smp = r.render(self.split, i)
            for key in (
                "image",
                "part_map",
                "label",
                "concepts",
                "landmarks",
                "landmark_visible",
                "part_boxes",
            ):
                c[key][i] = getattr(smp, key)
        self._cache = c

    def render(
        self,
        index: int,
        remove_parts: Sequence[int | str] | None = None,
        replace_part: Mapping[int | str, Mapping[str, int | str]] | None = None,
        remove_distractors: bool = False,
        add_parts: Sequence[int | str] | None = None,
    ) -> PartShapesSample:
        """Numpy sample ``index`` of this split, optionally under an intervention (same layout and noise)."""
        self._check(index)
        return self.renderer.render(
            self.split, index, remove_parts, replace_part, remove_distractors, add_parts
        )

    def concept_masks(self, index: int) -> torch.Tensor:
        """``(N, H, W)`` bool per-concept pixel masks of sample ``index``."""
        return torch.from_numpy(self.renderer.concept_masks(self.render(index)))

    def concept_probe_dataset(self, concept_name: str, split: str, n: int) -> PartShapesConceptDataset:
        """Probe images for one concept (see :class:`PartShapesConceptDataset`), same renderer/channels."""
        return PartShapesConceptDataset(self.renderer, concept_name, split, n, grayscale=self.grayscale)

    def _check(self, index: int) -> None:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.split} split of size {self.n}")

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        self._check(index)
        k = self.renderer.num_slots
        if self._cache is not None:
            c = self._cache
            img, pmap = c["image"][index], c["part_map"][index]
            label, concepts = int(c["label"][index]), c["concepts"][index]
            lm, vis, boxes = c["landmarks"][index], c["landmark_visible"][index], c["part_boxes"][index]
            smp = None
        else:
            smp = self.renderer.render(self.split, index)
            img, pmap, label, concepts = smp.image, smp.part_map, smp.label, smp.concepts
            lm, vis, boxes = smp.landmarks, smp.landmark_visible, smp.part_boxes
        pm = torch.from_numpy(np.ascontiguousarray(pmap))
        item = {
            "image": image_to_tensor(img, self.grayscale),
            "label": torch.tensor(label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "concepts": torch.from_numpy(np.array(concepts, dtype=np.float32)),
            "part_masks": pm[None] == torch.arange(1, k + 1, dtype=torch.uint8)[:, None, None],
            "landmarks": torch.from_numpy(np.array(lm, dtype=np.float32)),
            "landmark_visible": torch.from_numpy(np.array(vis, dtype=bool)),
            "part_boxes": torch.from_numpy(np.array(boxes, dtype=np.float32)),
        }
        if self.return_concept_masks:
            if smp is None:
                smp = self.renderer.render(self.split, index)
            item["concept_masks"] = torch.from_numpy(self.renderer.concept_masks(smp))
        return item


class PartShapesConceptDataset(Dataset):
    """Concept-whitening probe set: ``n`` images that each show ``concept`` (one part on background).

    Items: ``"image"`` ``(C, H, W)`` float in [0, 1], ``"label"`` long = index of the concept in
    ``renderer.concept_names``, ``"index"`` long, ``"concepts"`` ``(N,)`` float (the probe image's own
    concept vector), ``"concept_mask"`` ``(H, W)`` bool (pixels of the concept's part).
    Deterministic per (seed, split, concept, index); "train" and "test" probes never share seeds
    with each other or with the main splits.

    ``negative=True``: item ``i`` is probe ``i`` with the concept removed
    (:meth:`PartShapesRenderer.draw_probe_negative`), the paired negative of contrastive alignment.

    ``scene=True``: whole images of the data's distribution with the concept edited in (or, with
    ``negative=True``, out) instead of one part on background (:meth:`PartShapesRenderer.draw_scene_probe`);
    ``"concept_mask"`` is then the pixels of the parts that carry the concept (empty for a negative).
    """

    def __init__(
        self,
        renderer: PartShapesRenderer,
        concept: str,
        split: str,
        n: int,
        grayscale: bool = False,
        negative: bool = False,
        scene: bool = False,
    ) -> None:
        renderer.concept_index(concept)
        _split_id(split)
        self.renderer = renderer
        self.concept = concept
        self.split = split
        self.n = int(n)
        self.grayscale = grayscale
        self.negative = bool(negative)
        self.scene = bool(scene)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        index = int(index)
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for probe set of size {self.n}")
        if self.scene:
            r = self.renderer
            smp = r.sample_from_spec(r.draw_scene_probe(self.concept, self.split, index, self.negative))
            mask = r.concept_masks(smp)[smp.label]
        else:
            render = self.renderer.render_probe_negative if self.negative else self.renderer.render_probe
            smp = render(self.concept, self.split, index)
            mask = smp.part_map > 0
        return {
            "image": image_to_tensor(smp.image, self.grayscale),
            "label": torch.tensor(smp.label, dtype=torch.long),
            "index": torch.tensor(index, dtype=torch.long),
            "concepts": torch.from_numpy(smp.concepts),
            "concept_mask": torch.from_numpy(mask),
        }


def concept_probe_dataset(
    renderer: PartShapesRenderer, concept_name: str, split: str, n: int, grayscale: bool = False
) -> PartShapesConceptDataset:
    """Functional alias of :class:`PartShapesConceptDataset`."""
    return PartShapesConceptDataset(renderer, concept_name, split, n, grayscale=grayscale)
