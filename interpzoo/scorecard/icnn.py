"""Ground-truth scorecard of interpretable CNN part filters (Zhang, Wu & Zhu, "Interpretable convolutional
neural networks", CVPR 2018).

:func:`score` reads the part filters of an :class:`~interpzoo.models.icnn.ICNNNet` on the varied-pose
held-out PartShapes split and returns, each with its oracle ceiling and random baseline:

* ``part_iou``: mean over filters of the best-part IoU with an **area-matched** threshold
  (:func:`~interpzoo.metrics.icnn.area_matched_part_iou`; the top-0.5 % threshold of Network Dissection
  caps a perfect detector of a 3.5 %-area part near 0.13);
* ``part_detection_rate``: fraction of filters whose best-part IoU exceeds 0.2 (ICNN Sec. 4.2);
* ``location_instability`` (ICNN Sec. 4.2; lower is better, so ``ceiling < random``);
* ``part_deletion``: causal test with the re-renderer (:func:`~interpzoo.metrics.icnn.part_deletion_score`):
  how often removing a filter's own part lowers its response more than removing another part.

Ceilings: the oracle units (each part mask average-pooled onto the filters' own grid,
:func:`~interpzoo.metrics.icnn.oracle_part_maps`), read by the same metric. Random baselines: 128 random
unit directions of the same layer's channels, in the same trained network
(:func:`~interpzoo.metrics.icnn.random_directions`, seeded). With ``reference_net`` (the matched ordinary
network, e.g. ``use_mask: false``) the same rows are added for its filters as ``method="plain_cnn_filters"``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from interpzoo.datamodules.partshapes import image_to_tensor
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.icnn import (
    LocationInstability,
    oracle_part_maps,
    part_deletion_score,
    part_iou_scores,
    project_maps,
    random_directions,
)
from interpzoo.scorecard.common import ground_truth_batches, ground_truth_dataset, renderer_of

__all__ = ["collect_maps", "layer_maps", "score"]


def _param(net: nn.Module) -> torch.Tensor:
    return next(iter(net.parameters()))


def default_layer(net: nn.Module) -> str:
    """The evaluated part layer: the last interpretable layer of an ICNN (``icnn1``, ...), else the
    Grad-CAM layer (a module path) of another network."""
    assignments = getattr(net, "assignments", None)
    if assignments is not None:
        return [n for n in assignments if not n.endswith("_input")][-1]
    name = getattr(net, "gradcam_layer", None)
    if not name:
        raise ValueError(f"{type(net).__name__} has no part layer: pass layer= (a module name)")
    return str(name)


@torch.no_grad()
def layer_maps(net: nn.Module, x: torch.Tensor, layer: str) -> torch.Tensor:
    """``(B, C, h, w)`` maps of ``layer`` for images ``x`` ``(B, C_in, H, W)``.

    An ICNN's ``part_features[layer]`` (after the ReLU, before the part mask: what the filter loss and
    the paper's metrics read); for another network the output of the module ``layer``.
    """
    if getattr(net, "assignments", None) is not None:
        return net(x).part_features[layer].float()
    seen: list[torch.Tensor] = []
    handle = net.get_submodule(layer).register_forward_hook(
        lambda _m, _i, out: seen.append(out.clone())
    )  # an in-place ReLU may follow
    try:
        net(x)
    finally:
        handle.remove()
    return seen[-1].float()


@torch.no_grad()
def collect_maps(net: nn.Module, dataset: Any, layer: str, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Maps ``(N, C, h, w)``, part masks ``(N, K, H, W)``, landmarks ``(N, K, 2)``, landmark visibility
    ``(N, K)`` and sample ids ``(N,)`` of every image of ``dataset`` (CPU tensors)."""
    p = _param(net)
    out: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("maps", "part_masks", "landmarks", "visible", "index")
    }
    for batch in ground_truth_batches(dataset, batch_size, p.device, p.dtype):
        out["maps"].append(layer_maps(net, batch["image"], layer).cpu())
        out["part_masks"].append(batch["part_masks"].bool().cpu())
        out["landmarks"].append(batch["landmarks"].float().cpu())
        out["visible"].append(batch["landmark_visible"].bool().cpu())
        out["index"].append(batch["index"].cpu())
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def _deletion_responses(
    net: nn.Module, dataset: Any, layer: str, directions: torch.Tensor, grid: tuple[int, int], batch_size: int
) -> dict[str, torch.Tensor]:
    """Responses (spatial max) with every part removed in turn: filters ``(N, K, C)``, random directions
    ``(N, K, R)`` and oracle units ``(N, K, K)`` (pooled masks of the re-rendered image)."""
    p = _param(net)
    k = len(dataset.part_names)
    renderer = dataset.renderer
    filt, rand, orac = [], [], []
    n = len(dataset)
    per = max(1, batch_size // k)
    for start in range(0, n, per):
        images, masks = [], []
        for i in range(start, min(n, start + per)):
            # = dataset.render(i, remove_parts=[part]), drawing the layout once for the K interventions
            spec = renderer.draw(dataset.split, i)
            for part in range(k):
                smp = renderer.sample_from_spec(renderer.intervene(spec, remove_parts=[part]))
                images.append(image_to_tensor(smp.image, dataset.grayscale))
                masks.append(torch.from_numpy(smp.part_masks))
        x = torch.stack(images).to(device=p.device, dtype=p.dtype)
        maps = layer_maps(net, x, layer)
        b = x.shape[0] // k
        filt.append(maps.amax((2, 3)).cpu().view(b, k, -1))
        rand.append(project_maps(maps, directions).amax((2, 3)).cpu().view(b, k, -1))
        orac.append(oracle_part_maps(torch.stack(masks), grid).amax((2, 3)).view(b, k, -1))
    return {"filters": torch.cat(filt), "random": torch.cat(rand), "oracle": torch.cat(orac)}


def _instability(
    maps: torch.Tensor, data: dict[str, torch.Tensor], image_size: tuple[int, int], top_m: int
) -> float:
    metric = LocationInstability(maps.shape[1], data["landmarks"].shape[1], top_m=top_m)
    metric.update(maps, data["landmarks"], data["visible"], image_size, index=data["index"])
    return float(metric.compute())


def _rows(
    method: str,
    net: nn.Module,
    dataset: Any,
    layer: str,
    seed: int,
    batch_size: int,
    top_m: int,
    iou_threshold: float,
    num_random: int,
    details: dict[str, Any] | None = None,
) -> list[Score]:
    data = collect_maps(net, dataset, layer, batch_size)
    maps, masks = data["maps"], data["part_masks"]
    c, grid = maps.shape[1], tuple(maps.shape[-2:])
    image_size = tuple(masks.shape[-2:])
    directions = random_directions(c, num_random, seed)
    rand_maps = project_maps(maps, directions)
    iou = part_iou_scores(maps, masks, rand_maps, iou_threshold)
    baseline = f"{num_random} random unit directions of the {c} {layer} channels (seed {seed})"
    if details is not None:
        # each filter's best-part IoU against the metric's ceiling and random baseline (the report's panels)
        rnd, top = iou["random"]["part_iou"], iou["oracle"]["part_iou"]
        best = iou["model"]["result"]["best_iou"].tolist()
        details["unit_part_scores"] = [
            (b - rnd) / (top - rnd) if top - rnd > 1e-9 else float("nan") for b in best
        ]
    grid_txt = f"{grid[0]}x{grid[1]}"
    rows = [
        Score(
            method,
            "part_iou",
            iou["model"]["part_iou"],
            iou["oracle"]["part_iou"],
            iou["random"]["part_iou"],
            baseline,
            "mean over filters of the best-part IoU, area-matched threshold per (filter, part); ceiling: part "
            f"masks pooled onto the {grid_txt} grid and upsampled like a filter map",
        ),
        Score(
            method,
            "part_detection_rate",
            iou["model"]["part_detection_rate"],
            iou["oracle"]["part_detection_rate"],
            iou["random"]["part_detection_rate"],
            baseline,
            f"fraction of filters with best-part IoU > {iou_threshold} (area-matched threshold)",
        ),
    ]
    # Location instability (Sec. 4.2): every image is a candidate (no category restriction), top_m images.
    present = masks.flatten(2).any(-1).any(0)
    oracle_maps = oracle_part_maps(masks[:, present], grid)
    rows.append(
        Score(
            method,
            "location_instability",
            _instability(maps, data, image_size, top_m),
            _instability(oracle_maps, data, image_size, top_m),
            _instability(rand_maps, data, image_size, top_m),
            baseline,
            f"lower is better; top-{top_m} images of all classes per (filter, landmark); ceiling: pooled part masks",
        )
    )
    # Causal part deletion: each unit's part is its best area-matched IoU part.
    removed = _deletion_responses(net, dataset, layer, directions, grid, batch_size)
    visible = masks.flatten(2).any(-1)  # (N, K): the part shows at least one pixel
    oracle_response = oracle_maps.amax((2, 3))
    own_parts = torch.nonzero(present).flatten()
    rows.append(
        Score(
            method,
            "part_deletion",
            part_deletion_score(
                maps.amax((2, 3)), removed["filters"], iou["model"]["result"]["best_part"], visible
            ),
            part_deletion_score(oracle_response, removed["oracle"][:, :, own_parts], own_parts, visible),
            part_deletion_score(
                rand_maps.amax((2, 3)), removed["random"], iou["random"]["result"]["best_part"], visible
            ),
            baseline,
            "fraction of (filter, image, other part) with a larger max-response drop when the filter's own "
            "(best-IoU) part is removed than when the other part is (re-rendered; ties 1/2; ignoring parts = 0.5)",
        )
    )
    return rows


def score(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    reference_net: nn.Module | None = None,
    layer: str | None = None,
    reference_layer: str | None = None,
    batch_size: int = 100,
    top_m: int = 100,
    iou_threshold: float = 0.2,
    num_random: int = 128,
    details: dict[str, Any] | None = None,
) -> list[Score]:
    """Scorecard rows of an ICNN's part filters on ``datamodule.ground_truth_dataset(num_samples)``.

    Args:
        net: the :class:`~interpzoo.models.icnn.ICNNNet` (eval mode is the caller's job, see
            :func:`interpzoo.scorecard.evaluate`).
        datamodule: a PartShapes datamodule (:class:`~interpzoo.scorecard.common.NoGroundTruth` otherwise).
        num_samples: held-out images; seed: seed of the random directions.
        reference_net: the matched ordinary network; adds rows with ``method="plain_cnn_filters"``.
        layer, reference_layer: evaluated part layer (default: the last interpretable layer; for a
            non-ICNN reference, a module name, default its ``gradcam_layer``).
        batch_size: images per forward pass; top_m: images per (filter, landmark) of location instability;
        iou_threshold: detection threshold of ``part_detection_rate``.
        num_random: random directions of the baseline (128: the spread of their mean over seeds is ~0.02
            normalised; as many as the 32 filters of the shipped net gives ~0.1).
        details: if given, receives ``"unit_part_scores"``: each filter's normalised best-part IoU.

    Returns:
        ``part_iou``, ``part_detection_rate``, ``location_instability``, ``part_deletion`` rows of ``"icnn"``
        (and of ``"plain_cnn_filters"``).
    """
    renderer_of(datamodule)
    dataset = ground_truth_dataset(datamodule, num_samples)
    layer = layer or default_layer(net)
    rows = _rows("icnn", net, dataset, layer, seed, batch_size, top_m, iou_threshold, num_random, details)
    if reference_net is not None:
        was = reference_net.training
        reference_net.eval()
        try:
            ref_layer = reference_layer or default_layer(reference_net)
            rows += _rows(
                "plain_cnn_filters",
                reference_net,
                dataset,
                ref_layer,
                seed,
                batch_size,
                top_m,
                iou_threshold,
                num_random,
            )
        finally:
            reference_net.train(was)
    return rows
