"""SENN on the scorecard: are the learned concepts the data's concepts? (Alvarez-Melis & Jaakkola, NeurIPS 2018).

SENN explains with concepts ``h(x)`` ``(B, k)`` (Sec. 3 of the paper asks them to be "grounded": to mean something a
person recognises), but nothing in the loss ties them to any named concept. PartShapes knows every image's
concepts (``head_colour_red``, ``has_striped``, ...), so we can check. Rows, on the varied-pose held-out split:

* ``concept_auc``: for each learned concept ``h_k``, the ROC AUC of its best-matching ground-truth concept. The
  match (concept and direction, :func:`interpzoo.metrics.senn.match_concepts`) is chosen on one half of the
  images and the AUC is measured on the other half (:func:`~interpzoo.metrics.senn.split_half_concept_auc`), so
  picking the best of ``N`` concepts does not inflate the score (a chance-level concept gets 0.5 in
  expectation, not the max of ``N`` noisy AUCs). Mean over ``k`` (concepts whose match is constant on the
  scoring half are left out).
* ``concept_intervention_accuracy`` and ``concept_intervention_effect`` (causal): for the matched pairs
  ``(h_k, c_j)``, each scoring-half image is re-rendered with ``c_j`` switched (a part's colour/shape/texture
  replaced, same layout and noise) and ``h_k`` must move the way ``c_j`` moved: the share of correct directions
  (a concept that does not move counts half) and the mean signed move in units of ``std(h_k)``
  (:func:`~interpzoo.metrics.senn.intervention_direction_scores`).

Ceiling: the **oracle conceptizer**, ``h`` = ``k`` ground-truth concept columns (the ones whose prevalence is
closest to 1/2), through the same protocol: AUC 1, every intervention moves it by exactly 1 in the right
direction (accuracy 1; effect ``mean_k 1 / std(c_j)``).
Random baseline: a **randomly initialised conceptizer** of the same architecture in a copy of the network
(``draws`` seeds, averaged); for a parameter-free conceptizer (input features as concepts) ``k`` seeded random
projections of the normalised input instead. Both are scored with the same matching protocol, so the baseline
includes whatever a random conv net picks up for free (e.g. colour) and the small bias left by matching.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from interpzoo.datamodules.partshapes import FAMILIES, image_to_tensor
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.senn import intervention_direction_scores, split_half_concept_auc
from interpzoo.scorecard.common import NoGroundTruth, ground_truth_dataset, renderer_of

__all__ = [
    "METRICS",
    "ConceptToggle",
    "concept_interventions",
    "concept_toggle",
    "oracle_columns",
    "random_conceptizer",
    "score",
    "score_concepts",
]

METRICS = ("concept_auc", "concept_intervention_accuracy", "concept_intervention_effect")
TRAIN_HINT = (
    "python train.py model=senn data=partshapes data.n_train=2000 data.n_val=200 data.n_test=200 "
    "data.batch_size=50 trainer.max_epochs=3 seed=0 logger=csv report=false '~callbacks.intrinsic_dim'"
)

# A concept function maps (images (B, C, H, W), ground-truth concepts (B, N)) to concepts (B, k): the network
# reads the images, the oracle reads the ground truth.
ConceptFn = Callable[[Tensor, Tensor], Tensor]


# -- switching one ground-truth concept in a sample ---------------------------------------------------
class ConceptToggle:
    """How to switch each PartShapes concept on or off by re-rendering (per-slot and presence concepts).

    Built from the renderer's vocabulary and concept names (``<part>_<family>_<value>``, ``has_<value>``,
    ``has_striped``), so it needs no private renderer state.
    """

    def __init__(self, renderer: Any) -> None:
        self.renderer = renderer
        self.vocab = {"shape": renderer.shapes, "colour": renderer.colours, "texture": renderer.textures}
        slot: dict[str, tuple[int, int, int]] = {}
        presence: dict[str, tuple[int, tuple[int, ...]]] = {}
        for s, part in enumerate(renderer.part_names):
            for f, fam in enumerate(FAMILIES):
                for v, value in enumerate(self.vocab[fam]):
                    slot[f"{part}_{fam}_{value}"] = (s, f, v)
        for f, fam in enumerate(FAMILIES):
            for v, value in enumerate(self.vocab[fam]):
                presence[f"has_{value}"] = (f, (v,))
        striped = tuple(i for i, t in enumerate(renderer.textures) if t in ("hstripes", "vstripes"))
        presence["has_striped"] = (2, striped)
        self.names = list(renderer.concept_names)
        self.slot = {self.names.index(n): spec for n, spec in slot.items() if n in self.names}
        self.presence = {self.names.index(n): spec for n, spec in presence.items() if n in self.names}

    def edit(self, spec: Any, concept: int, rng: np.random.Generator) -> dict[str, Any] | None:
        """Keyword arguments of ``renderer.render`` that flip ``concept`` in ``spec``, or ``None`` if impossible."""
        attrs, present = spec.attrs, spec.present
        if concept in self.slot:
            s, f, v = self.slot[concept]
            fam = FAMILIES[f]
            if present[s] and attrs[s, f] == v:  # on -> off: another value of the same family
                others = [i for i in range(len(self.vocab[fam])) if i != v]
                if not others:
                    return None
                return {"replace_part": {s: {fam: int(rng.choice(others))}}}
            edit: dict[str, Any] = {"replace_part": {s: {fam: v}}}
            if not present[s]:
                edit["add_parts"] = [s]
            return edit
        if concept in self.presence:
            f, vals = self.presence[concept]
            fam = FAMILIES[f]
            carriers = [s for s in np.flatnonzero(present) if attrs[s, f] in vals]
            if carriers:  # on -> off: every part that shows it gets a value outside the set
                others = [i for i in range(len(self.vocab[fam])) if i not in vals]
                if not others:
                    return None
                return {"replace_part": {int(s): {fam: int(rng.choice(others))} for s in carriers}}
            shown = np.flatnonzero(present)
            s = int(rng.choice(shown)) if len(shown) else 0
            edit = {"replace_part": {s: {fam: int(rng.choice(list(vals)))}}}
            if not len(shown):
                edit["add_parts"] = [s]
            return edit
        return None


def concept_toggle(renderer: Any) -> ConceptToggle:
    """:class:`ConceptToggle` of ``renderer``."""
    return ConceptToggle(renderer)


# -- concept functions ------------------------------------------------------------------------------
def _encoder_concepts(normalize: nn.Module, conceptizer: nn.Module, batch: int = 256) -> ConceptFn:
    """``h(x) = conceptizer.encode(normalize(x))``: the concepts of ``SENN.forward`` without the decoder and
    theta, which the scorecard does not need (they cost most of the forward pass)."""
    param = next(conceptizer.parameters(), None)
    if param is None:
        param = next(normalize.buffers(), torch.zeros(()))
    device, dtype = param.device, param.dtype if param.is_floating_point() else torch.float32

    @torch.no_grad()
    def fn(images: Tensor, _concepts: Tensor) -> Tensor:
        out = [
            conceptizer.encode(normalize(images[i : i + batch].to(device, dtype))).detach().double().cpu()
            for i in range(0, images.shape[0], batch)
        ]
        return torch.cat(out).flatten(1)

    return fn


def oracle_columns(concepts: Tensor, k: int) -> Tensor:
    """Indices ``(min(k, N),)`` of the ground-truth columns with prevalence closest to 1/2 (the oracle's ``h``).

    Balanced columns make the split-half matching well posed (a rare concept can tie with another on half
    the images); ties are broken by column order.
    """
    prevalence = concepts.double().mean(0)
    order = torch.argsort((prevalence - 0.5).abs(), stable=True)
    return order[: min(int(k), concepts.shape[1])]


def _oracle_fn(columns: Tensor) -> ConceptFn:
    return lambda _images, concepts: concepts.double()[:, columns]


def random_conceptizer(net: nn.Module, seed: int) -> ConceptFn:
    """Concepts of a seeded random conceptizer of ``net``'s architecture (the random baseline).

    A conceptizer with parameters is copied and re-initialised (``reset_parameters`` of every module, under
    ``torch.manual_seed(seed)``); a parameter-free one (the input itself) is replaced by ``k`` random
    Gaussian projections of the normalised input, ``(B, d) -> (B, k)``.
    """
    conceptizer = net.conceptizer
    if any(True for _ in conceptizer.parameters()):
        twin = copy.deepcopy(conceptizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for m in twin.modules():
                if hasattr(m, "reset_parameters"):
                    m.reset_parameters()
        return _encoder_concepts(net.normalize, twin.eval())
    g = torch.Generator().manual_seed(int(seed))
    d = math.prod(net.input_shape)
    proj = torch.randn(d, int(net.n_concepts), generator=g, dtype=torch.float64) / math.sqrt(d)
    inputs = _encoder_concepts(net.normalize, conceptizer)

    def fn(images: Tensor, concepts: Tensor) -> Tensor:
        return inputs(images, concepts)[:, :d] @ proj  # the input entries (without the bias concept)

    return fn


# -- the protocol -----------------------------------------------------------------------------------
def concept_interventions(
    fn: ConceptFn,
    dataset: Any,
    h: Tensor,
    concepts: Tensor,
    rows: Tensor,
    index: Tensor,
    sign: Tensor,
    learned: Sequence[int],
    seed: int,
    max_images: int = 100,
) -> tuple[float, float]:
    """Intervention accuracy and effect of the learned concepts ``learned`` (see the module docstring).

    Args:
        fn: concept function; dataset: the scored :class:`~interpzoo.datamodules.partshapes.PartShapesDataset`.
        h: ``(n, k)`` concepts of every image; concepts: ``(n, N)`` ground truth.
        rows: ``(m,)`` images to intervene on (the scoring half); ``max_images`` of them are used per concept.
        index, sign: ``(k,)`` matched ground-truth concept and direction of each learned concept.
        learned: which learned concepts to test.
    """
    toggle = ConceptToggle(dataset.renderer)
    rng = np.random.default_rng([int(seed), 0x5E11])
    scale = h.double().std(0)
    deltas, expected, scales = [], [], []
    specs: dict[int, Any] = {}  # each image's draw, shared by the concepts
    for k in learned:
        j = int(index[k])
        images, new_concepts, src = [], [], []
        for i in rows[:max_images].tolist():
            if i not in specs:
                specs[i] = dataset.renderer.draw(dataset.split, i)
            spec = specs[i]
            edit = toggle.edit(spec, j, rng)
            if edit is None:
                continue
            smp = dataset.renderer.sample_from_spec(dataset.renderer.intervene(spec, **edit))
            change = float(smp.concepts[j]) - float(concepts[i, j])
            if change == 0:  # the edit did not switch it (cannot happen for PartShapes; guard anyway)
                continue
            images.append(image_to_tensor(smp.image, dataset.grayscale))
            new_concepts.append(torch.from_numpy(smp.concepts.astype(np.float32)))
            src.append(i)
            expected.append(float(sign[k]) * math.copysign(1.0, change))
        if not src:
            continue
        h_new = fn(torch.stack(images), torch.stack(new_concepts))[:, k]
        deltas.append(h_new - h[src, k].double())
        scales.append(scale[k].expand(len(src)))
    if not deltas:
        return float("nan"), float("nan")
    return intervention_direction_scores(
        torch.cat(deltas), torch.tensor(expected, dtype=torch.float64), torch.cat(scales)
    )


def score_concepts(
    fn: ConceptFn,
    dataset: Any,
    images: Tensor,
    concepts: Tensor,
    seed: int = 0,
    max_concepts: int = 16,
    max_images: int = 100,
) -> dict[str, float]:
    """``{"concept_auc", "concept_intervention_accuracy", "concept_intervention_effect"}`` of a concept function.

    Split-half matching with ``seed`` (:func:`~interpzoo.metrics.senn.split_half_concept_auc`); the
    interventions test the ``max_concepts`` learned concepts with the strongest held-out AUC (all of them for
    ``k <= max_concepts``) on ``max_images`` scoring-half images each.

    Shape:
        ``images`` ``(n, C, H, W)``, ``concepts`` ``(n, N)``.
    """
    h = fn(images, concepts).double()
    split = split_half_concept_auc(h, concepts, seed=seed)
    auc = split["auc"]
    valid = ~torch.isnan(auc)
    mean_auc = float(auc[valid].mean()) if valid.any() else float("nan")
    ranked = torch.argsort(torch.nan_to_num(auc, nan=-1.0), descending=True, stable=True)
    learned = [int(k) for k in ranked[:max_concepts] if valid[k]]
    acc, effect = concept_interventions(
        fn,
        dataset,
        h,
        concepts,
        split["score_rows"],
        split["index"],
        split["sign"],
        learned,
        seed,
        max_images,
    )
    return {
        "concept_auc": mean_auc,
        "concept_intervention_accuracy": acc,
        "concept_intervention_effect": effect,
    }


def _check_compatible(net: nn.Module, dataset: Any, datamodule: Any) -> None:
    if getattr(net, "tabular", False):
        raise ValueError(
            "this SENN takes tables (num_features); the ground-truth concepts are PartShapes images: score a "
            f"SENN built for images of {type(datamodule).__name__}"
        )
    x = dataset[0]["image"]
    if tuple(x.shape) != tuple(net.input_shape):
        raise ValueError(
            f"the SENN takes inputs {tuple(net.input_shape)} but {type(datamodule).__name__} gives images "
            f"{tuple(x.shape)}; use the datamodule it was trained on (grayscale / image_size)"
        )


@torch.no_grad()
def score(
    net: nn.Module, datamodule: Any, num_samples: int = 500, seed: int = 0, draws: int = 3
) -> list[Score]:
    """Score a SENN's concepts against PartShapes' ground-truth concepts (module docstring).

    Args:
        net: a :class:`~interpzoo.models.senn.SENN` for images of ``datamodule`` (evaluated in eval mode).
        datamodule: a PartShapes datamodule; any other raises :class:`NoGroundTruth`.
        num_samples: images of the varied-pose held-out split (half match, half score).
        seed: seed of the split, the interventions and the random baselines.
        draws: random conceptizers averaged for the baseline.

    Returns:
        three :class:`~interpzoo.metrics.calibration.Score` rows, ``METRICS``.
    """
    try:
        renderer_of(datamodule)
    except NoGroundTruth as e:
        raise NoGroundTruth(
            f"{e}. SENN's concepts are scored against PartShapes' ground-truth concepts; the shipped SENN "
            "bundles (senn_lenet.digits_s0, senn_mlp.breast_cancer_s0) were trained on digits and breast_cancer, "
            f"which have none. Train one on PartShapes: {TRAIN_HINT}"
        ) from e
    dataset = ground_truth_dataset(datamodule, num_samples)
    _check_compatible(net, dataset, datamodule)
    items = [dataset[i] for i in range(len(dataset))]
    images = torch.stack([it["image"] for it in items])
    concepts = torch.stack([it["concepts"] for it in items]).double()
    was = net.training
    net.eval()
    try:
        model = score_concepts(
            _encoder_concepts(net.normalize, net.conceptizer), dataset, images, concepts, seed
        )
        k = int(net.n_concepts)
        oracle = score_concepts(_oracle_fn(oracle_columns(concepts, k)), dataset, images, concepts, seed)
        randoms = [
            score_concepts(random_conceptizer(net, seed * 1000 + d), dataset, images, concepts, seed)
            for d in range(max(1, int(draws)))
        ]
    finally:
        net.train(was)
    parametric = any(True for _ in net.conceptizer.parameters())
    baseline = (
        f"randomly initialised conceptizer (mean of {len(randoms)} seeds)"
        if parametric
        else f"random projections of the input to k concepts (mean of {len(randoms)} seeds)"
    )
    notes = {
        "concept_auc": "best ground-truth match chosen on one half of the images, AUC on the other half",
        "concept_intervention_accuracy": "re-rendered with the matched concept switched; no move counts half",
        "concept_intervention_effect": "signed move of h_k in std(h_k) units per switch of its matched concept",
    }
    rows = []
    for metric in METRICS:
        random = float(np.nanmean([r[metric] for r in randoms]))
        rows.append(
            Score(
                method="senn",
                metric=metric,
                raw=model[metric],
                ceiling=oracle[metric],
                random=random,
                baseline=baseline,
                note=notes[metric],
            )
        )
    return rows
