"""Ground-truth scorecard: every interpretability metric next to its oracle ceiling and random baseline.

``evaluate(net, datamodule)`` scores a trained network on a held-out PartShapes split whose pose varies
(:meth:`~interpzoo.datamodules.partshapes_dm.PartShapesDataModule.ground_truth_dataset`) and returns
:class:`~interpzoo.metrics.calibration.Score` rows (raw, ceiling, random, normalised). One module per method
holds its scorer (``interpzoo.scorecard.<method>.score``); :mod:`interpzoo.scorecard.posthoc` scores what a user
would do instead (Grad-CAM, Integrated Gradients, a linear concept probe on an ordinary network).
:class:`GroundTruthScorecard` logs the rows at the end of a test run; ``benchmarks/scorecard.py`` prints them
for every shipped bundle.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch
from torch import nn

from interpzoo.metrics.calibration import Score, normalised_score
from interpzoo.scorecard.common import NoGroundTruth

__all__ = [
    "GroundTruthScorecard",
    "NoGroundTruth",
    "Score",
    "accuracy_row",
    "check_same_data",
    "evaluate",
    "normalised_score",
    "scorer_module",
]

# network class name -> scorer module (imported lazily: each pulls in its method's metrics only)
_SCORERS = {
    "ProtoPNet": "protopnet",
    "PIPNet": "pipnet",
    "ConceptWhiteningNet": "concept_whitening",
    "ICNNNet": "icnn",
    "SENN": "senn",
    "SoftAutoencoder": "soft_autoencoder",
    "BaselineNet": "posthoc",
    "CBMNet": "cbm",
}


def scorer_module(net: nn.Module) -> Any:
    """The scorecard module of ``net``'s method; :class:`NoGroundTruth` if it has none."""
    for cls in type(net).__mro__:
        if cls.__name__ in _SCORERS:
            return importlib.import_module(f"interpzoo.scorecard.{_SCORERS[cls.__name__]}")
    raise NoGroundTruth(f"no scorecard for {type(net).__name__}")


def evaluate(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    details: dict[str, Any] | None = None,
) -> list[Score]:
    """Score ``net`` on ``num_samples`` varied-pose held-out images of ``datamodule`` (PartShapes).

    Raises :class:`NoGroundTruth` when the data (or the method) has no ground truth to score against.
    The network is put in eval mode for the call and restored after. ``details`` (a dict) receives what a
    scorer gives beyond the rows, e.g. ``"unit_part_scores"`` (one normalised part score per prototype).
    """
    module = scorer_module(net)
    check_same_data(net, datamodule)
    was = net.training
    net.eval()
    kwargs: dict[str, Any] = {"num_samples": num_samples, "seed": seed}
    if details is not None and "details" in inspect.signature(module.score).parameters:
        kwargs["details"] = details
    try:
        rows = list(module.score(net, datamodule, **kwargs))
        accuracy = accuracy_row(net, datamodule, num_samples, rows[0].method if rows else "model")
        return ([accuracy] if accuracy is not None else []) + rows
    finally:
        net.train(was)


def check_same_data(net: nn.Module, datamodule: Any) -> None:
    """Refuse to score ``net`` on data it was not trained on (another image size or class table).

    A loaded bundle knows its data (``net.data_config``); scoring it on other images would report the
    distribution shift, not the explanation. Networks without a recorded data config are not checked.
    """
    trained = getattr(net, "data_config", None) or {}
    renderer = getattr(datamodule, "renderer", None)
    if not isinstance(trained, dict) or not trained or renderer is None:
        return
    size = trained.get("image_size")
    have = [renderer.image_size, renderer.image_size] if hasattr(renderer, "image_size") else None
    if size and have and list(size) != list(have):
        raise ValueError(
            f"the network was trained on {size[0]}x{size[1]} images but the datamodule renders "
            f"{have[0]}x{have[1]}: build it with the network's size, e.g. "
            f"PartShapesDataModule(image_size={size[0]}) (net.data_config['image_size'])"
        )
    h_net, h_dm = trained.get("class_hash"), getattr(datamodule, "class_hash", None)
    if h_net and h_dm and h_net != h_dm:
        raise ValueError(
            f"the network was trained on another PartShapes class table (class_hash {h_net}, the datamodule's "
            f"is {h_dm}): build the datamodule with the data settings the network was trained with (its "
            "bundle's config.json, lightning.hparams / recipe)"
        )


@torch.no_grad()
def accuracy_row(net: nn.Module, datamodule: Any, num_samples: int, method: str) -> Score | None:
    """Accuracy on the scorecard's own held-out images (ceiling 1, chance ``1/C``): is the model in distribution?"""
    from interpzoo.models.outputs import ClassifierOutput
    from interpzoo.scorecard.common import ground_truth_batches, ground_truth_dataset

    ds = ground_truth_dataset(datamodule, num_samples, "test")
    p = next(net.parameters())
    correct = total = 0
    for batch in ground_truth_batches(ds, 100, p.device, p.dtype):
        out = net(batch["image"])
        if not isinstance(out, ClassifierOutput):
            return None
        correct += int((out.logits.argmax(1) == batch["label"]).sum())
        total += batch["label"].numel()
    num_classes = datamodule.renderer.num_classes
    return Score(
        method,
        "gt_accuracy",
        correct / max(total, 1),
        1.0,
        1.0 / num_classes,
        baseline="chance (1 / classes)",
        note="accuracy on the scorecard's varied-pose images: low means the model is out of distribution there",
    )


def __getattr__(name: str) -> Any:  # the callback needs Lightning: import it only when asked
    if name == "GroundTruthScorecard":
        from interpzoo.scorecard.callback import GroundTruthScorecard

        return GroundTruthScorecard
    raise AttributeError(name)
