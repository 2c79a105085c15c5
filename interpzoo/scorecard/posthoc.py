"""What a user would do instead: post-hoc explanations of the matched ordinary network on the same ground truth.

Grad-CAM (Selvaraju et al., ICCV 2017) and Integrated Gradients (Sundararajan et al., ICML 2017, Eq. 1), both
through Captum, explain the black box's logit of the true class. Each class's map is scored like a prototype of
that class (:mod:`interpzoo.scorecard.parts`): ``part_consistency``, ``part_purity`` and ``part_deletion``, where
the unit's response is the class logit.

* Ceiling: the oracle on the explainer's own grid (Grad-CAM: the trunk's last stage, e.g. 4 x 4 at 32 px;
  Integrated Gradients: the pixel grid), reporting the class's most often hit part.
* Random baseline: the same explainer on a **randomly initialised network of the same architecture**
  (the model-randomisation check of Adebayo et al., NeurIPS 2018), seeded.

The linear concept probe (CAV) on the same network is in :func:`interpzoo.scorecard.concept_whitening`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from interpzoo.metrics.calibration import Score
from interpzoo.models.captum_adapter import as_logits_module, gradcam_layer
from interpzoo.scorecard.common import ground_truth_dataset, renderer_of
from interpzoo.scorecard.parts import METRICS, Explainer, oracle_explainer, part_scores

__all__ = ["gradcam_explainer", "integrated_gradients_explainer", "random_twin", "score"]


def _scatter_own(attr: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """``(B, 1, h, w)`` map of the true class into ``(B, C, h, w)`` (other classes' maps are never read)."""
    out = attr.new_zeros((attr.shape[0], num_classes, *attr.shape[2:]))
    out[torch.arange(attr.shape[0]), labels] = attr[:, 0]
    return out


def gradcam_explainer(net: nn.Module, num_classes: int) -> Explainer:
    """Grad-CAM of the true class's logit at the trunk's last stage (ReLU of the weighted channel sum)."""
    from captum.attr import LayerGradCam

    model = as_logits_module(net)
    cam = LayerGradCam(model, gradcam_layer(model))

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch["image"], batch["label"]
        with torch.enable_grad():
            attr = cam.attribute(x, target=y, relu_attributions=True).detach()
        with torch.no_grad():
            logits = model(x)
        return _scatter_own(attr.sum(1, keepdim=True), y, num_classes), logits

    return explain


def integrated_gradients_explainer(net: nn.Module, num_classes: int, n_steps: int = 16) -> Explainer:
    """Integrated Gradients of the true class's logit from a black image, ``|attribution|`` summed over channels."""
    from captum.attr import IntegratedGradients

    model = as_logits_module(net)
    ig = IntegratedGradients(model)

    def explain(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch["image"], batch["label"]
        with torch.enable_grad():
            attr = ig.attribute(x, baselines=torch.zeros_like(x), target=y, n_steps=n_steps).detach()
        with torch.no_grad():
            logits = model(x)
        return _scatter_own(attr.abs().sum(1, keepdim=True), y, num_classes), logits

    return explain


def random_twin(net: nn.Module, seed: int) -> nn.Module:
    """A randomly initialised network of ``net``'s architecture (same constructor arguments), eval mode."""
    from interpzoo.models.registry import build_model

    config = getattr(net, "interpzoo_config", None)
    if not config:
        raise ValueError(
            f"{type(net).__name__} has no interpzoo_config: build it with interpzoo.create_model"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        twin = build_model({**config["model_args"], "name": config["architecture"]})
    p = next(net.parameters())
    return twin.to(p.device, p.dtype).eval()


def _grid(explain: Explainer, dataset, device, dtype) -> tuple[int, int]:
    item = dataset[0]
    batch = {"image": item["image"][None].to(device, dtype), "label": item["label"][None].to(device)}
    return tuple(explain(batch)[0].shape[2:])


def score(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    explainers: tuple[str, ...] = ("gradcam",),
    deletion_images: int = 200,
) -> list[Score]:
    """Scorecard rows of post-hoc explainers of the black box ``net`` (varied-pose held-out split).

    ``explainers``: ``"gradcam"`` (default: one backward pass per image, cheap enough for the end of every
    run) and ``"integrated_gradients"`` (16 steps; ``benchmarks/scorecard.py`` adds it).
    """
    renderer = renderer_of(datamodule)
    ds = ground_truth_dataset(datamodule, num_samples, "test")
    p = next(net.parameters())
    device, dtype = p.device, p.dtype
    c = renderer.num_classes
    classes = torch.arange(c)
    makers = {"gradcam": gradcam_explainer, "integrated_gradients": integrated_gradients_explainer}
    twin = random_twin(net, seed)
    kw = {"deletion_images": deletion_images, "device": device, "dtype": dtype}
    rows = []
    for name in explainers:
        explain = makers[name](net, c)
        grid = _grid(explain, ds, device, dtype)
        raw = part_scores(explain, ds, classes, c, **kw)
        # the oracle of class c reports the part the class map itself hits most often
        parts = torch.tensor(raw.pop("unit_parts"), dtype=torch.long)
        ceiling = part_scores(oracle_explainer(parts, grid), ds, classes, c, unit_parts=parts, **kw)
        rnd = part_scores(makers[name](twin, c), ds, classes, c, **kw)
        for metric in METRICS:
            rows.append(
                Score(
                    name,
                    metric,
                    raw[metric],
                    ceiling[metric],
                    rnd[metric],
                    baseline="the same explainer on a randomly initialised twin network",
                    note=f"{num_samples} varied-pose test images, map grid {grid[0]}x{grid[1]}",
                )
            )
    return rows
