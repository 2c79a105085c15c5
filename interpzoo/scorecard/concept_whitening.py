"""Ground-truth scorecard of concept whitening (Chen, Bei & Rudin, "Concept whitening for interpretable image
recognition", *Nature Machine Intelligence* 2(12):772-782, 2020), and of the post-hoc linear probe (CAV, Kim
et al., "Interpretability beyond feature attribution", ICML 2018) a user would fit instead.

Rows (:class:`~interpzoo.metrics.calibration.Score`, one per aligned concept ``/<concept>`` and their mean):

* ``concept_auc``: the paper's concept purity (Sec. 4, Fig. 4), the AUC of the axis score ``phi(z_j)`` on the
  held-out probe images (``dm.concept_datasets("test")``), with positives and negatives read from each probe
  image's concept vector. Ceiling: the ground-truth indicator as the score (1). Random: the mean AUC of
  random unit directions of the same whitened layer, pooled with the same ``phi``.
* ``concept_intervention_accuracy``: a causal test on the varied-pose held-out split. Every image gets one
  edit per concept, re-rendered with the same layout and noise: where the concept is absent, one part's
  colour / shape / texture is changed to a value that carries it; where present, every part carrying it is
  changed to a value that does not. The share of edits after which the axis score moved the right way
  (ties count one half). Ceiling: the ground-truth indicator (1, known by hand: every edit flips it).
  Random: random directions (0.5 in expectation).
* ``concept_intervention_effect``: the mean signed change of the axis score, divided by the score's std
  over the un-edited images. Ceiling: the indicator's ``1 / sqrt(p (1 - p))`` for the concept's prevalence
  ``p``; random: random directions (0 in expectation).

:func:`score_linear_probe` scores the CAV baseline on an ordinary network with the same probe sets and labels.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from interpzoo.metrics.calibration import Score
from interpzoo.metrics.concept_whitening import (
    binary_auc,
    concept_auc_ceiling,
    intervention_accuracy,
    intervention_effect,
    linear_probe_auc,
    project_and_pool,
    random_direction_aucs,
    random_directions,
)
from interpzoo.scorecard.common import NoGroundTruth, ground_truth_dataset, renderer_of
from interpzoo.scorecard.concept_edits import (
    concept_carriers,
    concept_columns,
    concept_edit,
    concept_rows,
    edited_images,
    population_sd,
)

__all__ = ["concept_carriers", "concept_edit", "score", "score_linear_probe"]

METHOD = "concept_whitening"
NUM_DIRECTIONS = 16


# ---------------------------------------------------------------------------------------------
# Helpers (the edits, columns and rows are shared with the CBM scorecard: scorecard.concept_edits)
# ---------------------------------------------------------------------------------------------
def _device_dtype(net: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(net.parameters())
    return p.device, p.dtype


_columns = concept_columns
_sd = population_sd


def _probe_sets(datamodule: Any, concepts: Sequence[str], split: str, limit: int) -> list[Dataset]:
    """The datamodule's probe set of every concept (``split``), at most ``limit`` images each."""
    from interpzoo.datamodules.partshapes import PartShapesConceptDataset

    have = datamodule.concept_datasets(split)
    n = datamodule.n_concept_train if split == "train" else datamodule.n_concept_test
    grey = bool(getattr(datamodule, "grayscale", False))
    out: list[Dataset] = []
    for c in concepts:
        ds = have.get(c) or PartShapesConceptDataset(datamodule.renderer, c, split, n, grayscale=grey)
        out.append(Subset(ds, range(min(len(ds), int(limit)))))
    return out


def _batches(datasets: Iterable[Dataset], batch_size: int) -> Iterable[dict[str, torch.Tensor]]:
    for ds in datasets:
        yield from DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


def _rows(
    metric: str,
    concepts: Sequence[str],
    raw: Sequence[float],
    ceiling: Sequence[float],
    random: Sequence[float],
    method: str = METHOD,
    baseline: str = "",
    note: str = "",
) -> list[Score]:
    """One row per concept (``metric/<concept>``) and their mean (``metric``)."""
    return concept_rows(metric, concepts, raw, ceiling, random, method, baseline, note)


@torch.no_grad()
def _cw_scores(
    net: nn.Module, x: torch.Tensor, directions: torch.Tensor, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Axis scores ``(B, K)`` and random-direction scores ``(B, D)`` of a :class:`ConceptWhiteningNet`."""
    out = net(x.to(device, dtype))
    rand = project_and_pool(out.whitened.double(), directions, net.activation_mode)
    return out.concept_activations.double().cpu(), rand.cpu()


# ---------------------------------------------------------------------------------------------
# Scorers
# ---------------------------------------------------------------------------------------------
def score(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    num_directions: int = NUM_DIRECTIONS,
    batch_size: int = 100,
) -> list[Score]:
    """Concept AUC and causal concept interventions of a concept-whitening network (see the module docstring).

    Args:
        net: a :class:`~interpzoo.models.concept_whitening.ConceptWhiteningNet`; scored in eval mode (the
            running whitening statistics), its mode restored after.
        datamodule: PartShapes (its renderer gives the concept vectors and the re-rendered edits).
        num_samples: images of the varied-pose held-out split for the interventions, and at most as many
            probe images per concept for the AUC.
        seed: seed of the random directions and of the choice among valid edits.
        num_directions: random unit directions of the baseline (antithetic pairs).

    Returns:
        ``concept_auc``, ``concept_intervention_accuracy`` and ``concept_intervention_effect`` rows, each per
        aligned concept and their mean.
    """
    was = net.training
    net.eval()
    try:
        return _score(net, datamodule, num_samples, seed, num_directions, batch_size)
    finally:
        net.train(was)


@torch.no_grad()
def _score(
    net: nn.Module, datamodule: Any, num_samples: int, seed: int, num_directions: int, batch_size: int
) -> list[Score]:
    renderer = renderer_of(datamodule)
    concepts = list(net.concepts)
    if not concepts:
        raise NoGroundTruth("this concept-whitening network has no aligned concepts")
    cols = _columns(renderer, concepts)
    k = len(concepts)
    device, dtype = _device_dtype(net)
    directions = random_directions(net.cw_layer.num_features, num_directions, seed)
    baseline = (
        f"{num_directions} random unit directions of the whitened layer ({net.activation_mode} pooling)"
    )
    rows: list[Score] = []

    # 1. concept AUC on the probe test sets, labels from the concept vectors
    axis, rand, truth = [], [], []
    for batch in _batches(_probe_sets(datamodule, concepts, "test", num_samples), batch_size):
        a, r = _cw_scores(net, batch["image"], directions, device, dtype)
        axis.append(a)
        rand.append(r)
        truth.append(batch["concepts"][:, cols] > 0.5)
    axis_t, rand_t, truth_t = torch.cat(axis), torch.cat(rand), torch.cat(truth)
    raw = [binary_auc(axis_t[:, j], truth_t[:, j]) for j in range(k)]
    rows += _rows(
        "concept_auc",
        concepts,
        raw,
        concept_auc_ceiling(truth_t).tolist(),
        random_direction_aucs(rand_t, truth_t, k).tolist(),
        baseline=baseline,
        note="probe test sets; positives = probe images whose concept vector has the concept",
    )

    # 2. causal interventions on the varied-pose held-out split
    ds = ground_truth_dataset(datamodule, num_samples)
    before_axis, before_rand, before_truth = [], [], []
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        a, r = _cw_scores(net, batch["image"], directions, device, dtype)
        before_axis.append(a)
        before_rand.append(r)
        before_truth.append(batch["concepts"][:, cols].double())
    b_axis, b_rand, b_truth = torch.cat(before_axis), torch.cat(before_rand), torch.cat(before_truth)
    acc = {"raw": [], "ceiling": [], "random": []}
    eff = {"raw": [], "ceiling": [], "random": []}
    for j, col in enumerate(cols):
        edits = edited_images(ds, col, seed)
        if not len(edits):
            for d in (acc, eff):
                for key in d:
                    d[key].append(float("nan"))
            continue
        sel, sign = edits.index, edits.sign
        after_axis, after_rand = [], []
        for s in range(0, len(edits), batch_size):
            a, r = _cw_scores(net, edits.images[s : s + batch_size], directions, device, dtype)
            after_axis.append(a[:, j])
            after_rand.append(r)
        a_axis, a_rand = torch.cat(after_axis), torch.cat(after_rand)
        t_after = edits.truth_after

        dirs = range(a_rand.shape[1])
        acc["raw"].append(intervention_accuracy(b_axis[sel, j], a_axis, sign))
        acc["ceiling"].append(intervention_accuracy(b_truth[sel, j], t_after, sign))
        acc["random"].append(
            float(np.mean([intervention_accuracy(b_rand[sel, d], a_rand[:, d], sign) for d in dirs]))
        )
        eff["raw"].append(intervention_effect(b_axis[sel, j], a_axis, sign, _sd(b_axis[:, j])))
        eff["ceiling"].append(intervention_effect(b_truth[sel, j], t_after, sign, _sd(b_truth[:, j])))
        eff["random"].append(
            float(
                np.mean(
                    [intervention_effect(b_rand[sel, d], a_rand[:, d], sign, _sd(b_rand[:, d])) for d in dirs]
                )
            )
        )
    note = (
        "varied-pose held-out split; one single-attribute edit per part, image and concept, re-rendered with "
        "the same layout and noise (images without a single-attribute edit are skipped)"
    )
    rows += _rows(
        "concept_intervention_accuracy",
        concepts,
        acc["raw"],
        acc["ceiling"],
        acc["random"],
        baseline=baseline,
        note=note,
    )
    rows += _rows(
        "concept_intervention_effect",
        concepts,
        eff["raw"],
        eff["ceiling"],
        eff["random"],
        baseline=baseline,
        note=note,
    )
    return rows


def _default_layer(net: nn.Module) -> str:
    """The layer concept whitening would replace in ``net``'s backbone (its ``DEFAULT_LAYERS`` entry)."""
    from interpzoo.models.concept_whitening import DEFAULT_LAYERS, resolve_layers

    backbone = getattr(net, "backbone", None)
    name = getattr(backbone, "name", None)
    if backbone is None or name not in DEFAULT_LAYERS:
        raise ValueError(f"no default probe layer for {type(net).__name__}; pass layer='<dotted name>'")
    return "backbone.body." + resolve_layers(backbone.body, list(DEFAULT_LAYERS[name]))[0]


@torch.no_grad()
def score_linear_probe(
    net: nn.Module,
    datamodule: Any,
    concepts: Sequence[str],
    num_samples: int = 500,
    seed: int = 0,
    layer: str | None = None,
    num_directions: int = NUM_DIRECTIONS,
    batch_size: int = 100,
) -> list[Score]:
    """The post-hoc alternative: a CAV-style linear probe on an ordinary network's layer (Kim et al. 2018).

    A logistic regression per concept (:func:`~interpzoo.metrics.concept_whitening.linear_probe_auc`) on the
    spatially averaged ``(B, C)`` features of ``layer``, trained on the probe *train* sets (at most
    ``num_samples`` images per concept), AUC of its decision value on the probe *test* sets; labels from the
    concept vectors, as :func:`score`. Ceiling: the ground-truth indicator; random: random unit directions of
    the same pooled features (an untrained linear read-out).

    Args:
        net: any interpzoo classifier (e.g. ``build_model({"name": "baseline", ...})``).
        concepts: renderer concept names (``has_red``, ...).
        layer: dotted name of a module of ``net`` with ``(B, C, H, W)`` output; default: the layer concept
            whitening replaces in the same backbone.

    Returns:
        ``concept_auc`` rows (per concept and mean) of method ``linear_probe_cav``.
    """
    from interpzoo.models.concept_whitening import forward_until

    renderer = renderer_of(datamodule)
    concepts = list(concepts)
    cols = _columns(renderer, concepts)
    k = len(concepts)
    layer = layer or _default_layer(net)
    device, dtype = _device_dtype(net)
    was = net.training
    net.eval()
    try:
        feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in ("train", "test"):
            xs, ts = [], []
            for batch in _batches(_probe_sets(datamodule, concepts, split, num_samples), batch_size):
                maps = forward_until(net, layer, batch["image"].to(device, dtype))
                xs.append(maps.double().cpu())
                ts.append(batch["concepts"][:, cols] > 0.5)
            feats[split] = (torch.cat(xs), torch.cat(ts))
    finally:
        net.train(was)
    (tr_maps, tr_t), (te_maps, te_t) = feats["train"], feats["test"]
    raw = linear_probe_auc(tr_maps.mean((2, 3)), tr_t, te_maps.mean((2, 3)), te_t, k, seed=seed)
    directions = random_directions(te_maps.shape[1], num_directions, seed)
    rand = random_direction_aucs(project_and_pool(te_maps, directions, "mean"), te_t, k)
    return _rows(
        "concept_auc",
        concepts,
        raw.tolist(),
        concept_auc_ceiling(te_t).tolist(),
        rand.tolist(),
        method="linear_probe_cav",
        baseline=f"{num_directions} random unit directions of the spatially averaged {layer}",
        note=f"logistic regression on the spatial mean of {layer}; probe train -> probe test sets",
    )
