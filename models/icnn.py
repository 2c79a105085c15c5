"""Interpretable CNNs (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018).

The network (:class:`ICNNNet`, architecture ``icnn``, model names ``icnn_<backbone>``) is a backbone
trunk with one or more :class:`~layers.icnn.InterpretableConv2d` layers inserted after a
named module, then global average pooling and a linear classifier. Placement follows the paper and
its reference code (``shared/specs/interpretable_cnn.md`` Sec. 2.3):

* VGG: after the ReLU of conv5_3 (``features.42`` for ``vgg16_bn``), before the last max-pool: a new
  3x3 conv 512 -> 512 whose filters are the part filters;
* ResNet: after ``layer3`` (the ada-shen port), followed by the pretrained ``layer4``;
* DenseNet: on top of the final feature map;
* or after any named submodule of the trunk (``placement: layer2``, ``placement: "layer3.1"``).

Deviation: the head is GAP + linear, not VGG's fc6/fc7 (a 7x7 conv to 4096 and a 1x1 conv).

:class:`ICNNModule` trains it with ``task loss + lambda * filter loss`` (paper Eq. 1) in the two
settings of the paper: ``mode: single`` (one category vs the rest, 2-way softmax standing in for the
paper's logistic loss; all filters serve the category) and ``mode: multi`` (filters assigned to
categories, images of other categories are negatives for a filter).

DDP (``shared/specs/ecosystem.md`` Sec. 4.8), per statistic:

* filter loss ``-MI``: **global** by default (``filter_loss.sync``): template scores are
  all-gathered with gradients, so value and gradients equal a single process with the global batch;
  ``sync: false`` makes it per rank (then it depends on the per-device batch size);
* ``normalize: max`` scale: global max (all-reduce, detached);
* dynamic filter assignment and learned mask sharpness: EMA updates from all-reduced sums,
  identical on every rank;
* official gradient injection: per rank (the reference code's batch statistics);
* location instability: per-rank top-M buffers merged exactly at compute (tie-break by sample id);
* part IoU: computed on the same fixed, seeded subset by every rank (no collective needed).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from interpzoo.layers.normalize import InputNormalize
from interpzoo.layers.icnn import (
    FilterAssignment,
    FilterLossOutput,
    InterpretableConv2d,
    PartFilterLoss,
    official_filter_grad,
)
from interpzoo.metrics.icnn import LocationInstability, part_dissection, part_filter_figure
from interpzoo.models.backbones import _SPECS, backbone_from_config, list_backbones
from interpzoo.models.baseline import check_image_input
from interpzoo.models.errors import did_you_mean
from interpzoo.models.explain import ICNNExplanation, explain_icnn
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import get_submodule, set_submodule


@dataclass
class ICNNOutput(ClassifierOutput):
    """Output of :class:`ICNNNet`.

    Attributes:
        logits: ``(B, K)``.
        features: ``(B, C', H', W')`` trunk output (after the whole trunk).
        masked_features: ``(B, C, h, w)`` masked output of the last interpretable layer.
        part_features: ``{name: (B, C, h, w)}`` maps of every interpretable layer after ReLU and
            before the mask (what the filter loss and the metrics read); names ``icnn1``, ``icnn2``,
            ... and ``icnn1_input`` when the layer also masks its input.
        part_masks: ``{name: (B, C, h, w)}`` the masks applied to them (empty without masks).
    """

    masked_features: torch.Tensor | None = None
    part_features: dict[str, torch.Tensor] | None = None
    part_masks: dict[str, torch.Tensor] | None = None

    def as_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, dict):
                out.update({f"{f.name}/{k}": t for k, t in v.items()})
            elif v is not None:
                out[f.name] = v
        return out


def _infer_channels(root: nn.Module, name: str, example: torch.Tensor) -> int:
    """Channels of the output of ``root.<name>`` from one forward pass of ``example`` (no grad, eval)."""
    seen: list[int] = []
    handle = get_submodule(root, name).register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    was_training = root.training
    root.eval()
    try:
        with torch.no_grad():
            root(example)
    finally:
        handle.remove()
        root.train(was_training)
    if not seen:
        raise ValueError(f"module {name!r} was not called in a forward pass; choose another placement")
    return int(seen[-1])


def attach_part_filters(
    net: nn.Module,
    name: str,
    in_channels: int | None = None,
    num_layers: int = 1,
    example_input: torch.Tensor | None = None,
    **block_kwargs: Any,
) -> list[InterpretableConv2d]:
    """Append interpretable conv layers after the submodule ``name`` of any network, in place.

    ``net.<name>`` becomes ``Sequential(base=<old module>, icnn1=..., icnnN=...)``; each layer keeps
    the channel count, so the rest of the network is unchanged. Train with
    ``sum(b.filter_loss(positive).loss for b in blocks)`` added to the task loss.

    Args:
        net: any ``nn.Module`` (e.g. a torchvision ResNet: ``name="layer3"``).
        name: dotted submodule name.
        in_channels: channels of its output; inferred from ``example_input`` (one forward pass) or
            from the last conv/norm layer inside the submodule.
        num_layers: interpretable layers appended.
        **block_kwargs: arguments of :class:`InterpretableConv2d` (``mask_input`` applies to the first).

    Returns:
        the new layers, in order.
    """
    if in_channels is None:
        if example_input is not None:
            in_channels = _infer_channels(net, name, example_input)
        else:
            found = [
                m for m in get_submodule(net, name).modules() if isinstance(m, nn.Conv2d | nn.BatchNorm2d)
            ]
            if not found:
                raise ValueError(f"cannot tell the channels of {name!r}: pass in_channels= or example_input=")
            last = found[-1]
            in_channels = last.out_channels if isinstance(last, nn.Conv2d) else last.num_features
    # Only the first layer can mask its input: the others receive an already masked map.
    first_kw = dict(block_kwargs)
    rest_kw = {**block_kwargs, "mask_input": False}
    blocks = [
        InterpretableConv2d(in_channels, in_channels, **(first_kw if k == 0 else rest_kw))
        for k in range(num_layers)
    ]
    old = get_submodule(net, name)
    seq = nn.Sequential(OrderedDict([("base", old), *((f"icnn{k + 1}", b) for k, b in enumerate(blocks))]))
    set_submodule(net, name, seq)
    return blocks


def default_placement(trunk: nn.Module, backbone_name: str) -> str:
    """The paper's placement on a trunk: ResNet ``layer3``, VGG the last ReLU (conv5_3), else the end."""
    family = _SPECS[backbone_name].family if backbone_name in _SPECS else ""
    children = [n for n, _ in trunk.body.named_children()]
    if family == "resnet" and "layer3" in children:
        return "layer3"
    if family == "vgg":
        relus = [n for n, m in trunk.body.named_children() if isinstance(m, nn.ReLU)]
        return relus[-1]
    return children[-1]


@register_architecture("icnn")
class ICNNNet(nn.Module):
    """Backbone with interpretable part-filter layers, GAP and a linear classifier (paper Fig. 2).

    Args:
        num_classes: classes ``K`` (2 in the single-category setting).
        in_chans, mean, std: input channels and normalisation (inputs are ``[0, 1]`` images).
        backbone: trunk config (``{"name": "vgg16_bn", "pretrained": true}``).
        placement: ``"auto"`` (see the module docstring) or a dotted submodule name of the trunk body.
        num_layers: interpretable layers stacked there (1 in the paper; the ResNet port uses 2).
        kernel_size, batch_norm, mask_input, beta, locate, mask_style, learn_sharpness, init_std:
            see :class:`~layers.icnn.InterpretableConv2d`.
        use_mask: apply the part masks (``False`` gives the matched ordinary CNN with the same layers).
        dropout: before the classifier.
        assignment: ``"single"``, ``"static"`` or ``"dynamic"`` filter categories
            (:class:`~layers.icnn.FilterAssignment`); target_class: the single category.

    Shape:
        ``(B, C_in, H, W)`` to :class:`ICNNOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        placement: str = "auto",
        num_layers: int = 1,
        kernel_size: int = 3,
        batch_norm: bool = False,
        mask_input: bool = False,
        beta: float = 4.0,
        locate: str = "argmax",
        mask_style: str = "paper",
        learn_sharpness: bool = False,
        use_mask: bool = True,
        init_std: float | None = None,
        dropout: float = 0.0,
        assignment: str = "dynamic",
        target_class: int = 1,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.normalize = InputNormalize(mean, std)
        self.backbone = backbone_from_config(backbone, in_chans=in_chans)
        body = self.backbone.body
        if placement == "auto":
            placement = default_placement(self.backbone, self.backbone.name)
        names = [n for n, _ in body.named_modules() if n]
        if placement not in names:
            raise ValueError(
                f"placement {placement!r} is not a submodule of the {self.backbone.name} trunk"
                f"{did_you_mean(placement, names)}; top-level names: {[n for n, _ in body.named_children()]}"
            )
        channels = _infer_channels(body, placement, torch.zeros(1, in_chans, 64, 64))
        block_kw = dict(
            kernel_size=kernel_size,
            batch_norm=batch_norm,
            mask_input=mask_input,
            beta=beta,
            locate=locate,
            mask_style=mask_style,
            learn_sharpness=learn_sharpness,
            use_mask=use_mask,
            init_std=init_std,
        )
        attach_part_filters(body, placement, channels, num_layers, **block_kw)
        self.placement = placement
        self._block_paths = [f"backbone.body.{placement}.icnn{k + 1}" for k in range(num_layers)]
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)
        self.num_classes, self.in_chans = num_classes, in_chans
        # Which category each filter serves: buffers, so a bundle keeps what its filters mean.
        self.assignments = nn.ModuleDict()
        for k in range(num_layers):
            if mask_input and k == 0:
                self.assignments[f"icnn{k + 1}_input"] = FilterAssignment(
                    channels, num_classes, assignment, target_class
                )
            self.assignments[f"icnn{k + 1}"] = FilterAssignment(
                channels, num_classes, assignment, target_class
            )

    def blocks(self) -> dict[str, InterpretableConv2d]:
        """The interpretable layers by name (``icnn1``, ...)."""
        return {f"icnn{k + 1}": self.get_submodule(p) for k, p in enumerate(self._block_paths)}

    def masks(self) -> dict[str, nn.Module]:
        """The :class:`~layers.icnn.PartFilterMask` of every part-feature name."""
        out: dict[str, nn.Module] = {}
        for name, block in self.blocks().items():
            for key, m in block.masks().items():
                out[name if key == "output" else f"{name}_input"] = m
        return out

    def forward(self, x: torch.Tensor) -> ICNNOutput:
        check_image_input(x, self.in_chans)
        feats = self.backbone(self.normalize(x))
        part_features: dict[str, torch.Tensor] = {}
        part_masks: dict[str, torch.Tensor] = {}
        masked = None
        for name, block in self.blocks().items():
            # The layers ran inside the trunk; read the maps they kept from this forward pass.
            for key, t in block.last_features.items():
                part_features[name if key == "output" else f"{name}_input"] = t
            for key, t in block.last_masks.items():
                part_masks[name if key == "output" else f"{name}_input"] = t
            masked = block.last_output
        logits = self.classifier(self.dropout(self.pool(feats).flatten(1)))
        return ICNNOutput(
            logits=logits,
            features=feats,
            masked_features=masked,
            part_features=part_features,
            part_masks=part_masks,
        )

    def explain(self, x: torch.Tensor, layer: str | None = None) -> ICNNExplanation:
        """Each part filter's map and its strongest unit's image position (:mod:`models.explain`)."""
        return explain_icnn(self, x, layer)


for _bb in list_backbones():
    register_model(f"icnn_{_bb}", "icnn", backbone={"name": _bb})


# ---------------------------------------------------------------------------------------------------
# LightningModule
# ---------------------------------------------------------------------------------------------------
_LOSS_DEFAULTS: dict[str, Any] = {
    "template_scale": 1.0,
    "normalize": "none",
    "label_aware": True,
    "sync": True,
    "reduction": "mean",
    "tau": None,
    "alpha": None,
}
_OFFICIAL_DEFAULTS: dict[str, Any] = {"weight": 1e-5, "anneal": True, "alpha": 0.5}
_METRIC_DEFAULTS: dict[str, Any] = {
    "eval_layer": None,
    "top_m": 100,
    "select_ratio": 1.0,
    "landmark_ids": None,
    "candidates": "category",
    "part_iou_samples": 256,
    "part_iou_quantile": 0.005,
    "iou_threshold": 0.04,
    "part_iou_seed": 0,
    "report_samples": 256,
    "report_filters": 8,
}


def _merged(defaults: dict[str, Any], given: dict[str, Any] | None, what: str) -> dict[str, Any]:
    given = dict(given or {})
    bad = [k for k in given if k not in defaults]
    if bad:
        hints = "".join(f"\n  {k!r}{did_you_mean(k, defaults)}" for k in bad)
        raise ValueError(f"unknown {what} keys:{hints}\n  accepted: {sorted(defaults)}")
    return {**defaults, **given}


class ICNNModule(ClassificationModule):
    """Trains :class:`ICNNNet` with ``task loss + lambda * filter loss`` (paper Eq. 1).

    Args:
        mode: ``"single"`` (class ``target_class`` vs the rest; labels become 0/1 and the network has
            2 outputs) or ``"multi"`` (all classes; filters assigned to categories).
        target_class: the positive category of the single-category setting.
        lambda_filter: weight of the filter loss (``0`` trains the ordinary CNN, still logging MI).
        loss_impl: ``"mi"`` (explicit ``-MI``, default) or ``"official_grad"`` (the reference code's
            gradient injection; the MI is still logged).
        filter_loss: ``template_scale``, ``normalize`` (``none``/``max``), ``label_aware`` (use the
            category labels in the inter-category term), ``sync`` (global statistics under DDP),
            ``reduction``, ``tau``, ``alpha``; see :func:`layers.icnn.filter_loss`.
        official_grad: ``weight`` (1e-5), ``anneal`` (divide by 10 * epoch as the reference code),
            ``alpha`` (0.5).
        metrics: ``eval_layer`` (default: the last layer), ``top_m``, ``select_ratio``,
            ``landmark_ids`` (subset of landmarks, e.g. CUB back/forehead/tail ``[0, 5, 13]``),
            ``candidates`` (``category``: a filter's top images come from its category; ``all``),
            ``part_iou_samples`` (fixed subset; 0 disables), ``part_iou_quantile``,
            ``iou_threshold``, ``part_iou_seed``, ``report_samples``, ``report_filters``.
        *args, **kwargs: :class:`~models.lit_base.ClassificationModule` arguments.
    """

    def __init__(
        self,
        *args: Any,
        mode: str = "multi",
        target_class: int = 0,
        lambda_filter: float = 1.0,
        loss_impl: str = "mi",
        filter_loss: dict[str, Any] | None = None,
        official_grad: dict[str, Any] | None = None,
        metrics: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if mode not in ("single", "multi"):
            raise ValueError(f"mode must be 'single' (one category vs the rest) or 'multi', got {mode!r}")
        if loss_impl not in ("mi", "official_grad"):
            raise ValueError(f"loss_impl must be 'mi' or 'official_grad', got {loss_impl!r}")
        if lambda_filter < 0:
            raise ValueError(f"lambda_filter must be >= 0, got {lambda_filter}")
        self.filter_cfg = _merged(_LOSS_DEFAULTS, filter_loss, "filter_loss")
        self.official_cfg = _merged(_OFFICIAL_DEFAULTS, official_grad, "official_grad")
        self.metric_cfg = _merged(_METRIC_DEFAULTS, metrics, "metrics")
        if mode == "single":
            num_classes = (kwargs.get("data_info") or {}).get("num_classes")
            if num_classes is not None and not 0 <= target_class < int(num_classes):
                raise ValueError(
                    f"target_class {target_class} is not a class of the data (0..{int(num_classes) - 1})"
                )
            # Binary task: the network gets 2 outputs and every filter serves class 1 ("target").
            kwargs["model_args"] = {
                **dict(kwargs.get("model_args") or {}),
                "num_classes": 2,
                "assignment": "single",
                "target_class": 1,
            }
        super().__init__(*args, **kwargs)
        self.mode, self.target_class = mode, int(target_class)
        self.lambda_filter, self.loss_impl = float(lambda_filter), loss_impl
        if mode == "single":
            for stage in ("train", "val", "test"):
                setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes=2, average="micro"))
        beta = float(self.net_arguments()[1].get("beta", 4.0))
        cfg = self.filter_cfg
        self.loss_fn = PartFilterLoss(
            beta,
            cfg["tau"],
            cfg["alpha"],
            cfg["template_scale"],
            cfg["normalize"],
            cfg["sync"],
            cfg["reduction"],
        )
        names = list(self.net.assignments.keys())
        self.eval_layer = self.metric_cfg["eval_layer"] or [n for n in names if not n.endswith("_input")][-1]
        if self.eval_layer not in names:
            raise ValueError(
                f"metrics.eval_layer {self.eval_layer!r} is not a part layer{did_you_mean(self.eval_layer, names)}"
            )
        parts = self.data_info.get("part_names")
        ids = self.metric_cfg["landmark_ids"]
        self.landmark_ids = list(range(len(parts))) if (parts and ids is None) else list(ids or [])
        if parts and any(not 0 <= i < len(parts) for i in self.landmark_ids):
            raise ValueError(
                f"metrics.landmark_ids {self.landmark_ids} outside 0..{len(parts) - 1} ({parts})"
            )
        channels = self.net.assignments[self.eval_layer].filter_class.numel()
        if self.landmark_ids:
            for stage in ("val", "test"):
                setattr(
                    self,
                    f"{stage}_location",
                    LocationInstability(
                        channels,
                        len(self.landmark_ids),
                        self.metric_cfg["top_m"],
                        self.metric_cfg["select_ratio"],
                    ),
                )

    # -- task ------------------------------------------------------------------------------------
    def task_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Dataset labels -> task labels (``1`` for the target class in single-category mode)."""
        return (labels == self.target_class).long() if self.mode == "single" else labels

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        return super()._step({**batch, "label": self.task_labels(batch["label"])}, stage)

    # -- losses ----------------------------------------------------------------------------------
    def filter_terms(self, out: Any, labels: torch.Tensor, grad: bool = True) -> dict[str, FilterLossOutput]:
        """The filter loss of every part layer (positives from the filter assignments)."""
        res: dict[str, FilterLossOutput] = {}
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            for name, feat in (out.part_features or {}).items():
                pos = self.net.assignments[name].positive(labels) if self.filter_cfg["label_aware"] else None
                res[name] = self.loss_fn(feat, pos)
        return res

    def compute_losses(self, out: Any, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        losses = super().compute_losses(out, batch, stage)
        labels = batch["label"]
        use_mi = self.loss_impl == "mi" and self.lambda_filter > 0
        terms = self.filter_terms(out, labels, grad=use_mi and stage == "train")
        if terms:
            total = {
                k: sum(v.as_dict()[k] for v in terms.values()) for k in next(iter(terms.values())).as_dict()
            }
            for k, v in total.items():
                self.log(f"{stage}/{k}", v.detach(), on_step=False, on_epoch=True, sync_dist=True)
            if use_mi:
                losses["filter"] = self.lambda_filter * total["filter_loss"]
        if stage == "train" and self.loss_impl == "official_grad" and self.lambda_filter > 0:
            inj = []
            epoch = self.current_epoch + 1
            weight = (
                self.lambda_filter
                * self.official_cfg["weight"]
                / (10.0 * epoch if self.official_cfg["anneal"] else 1.0)
            )
            for name, feat in (out.part_features or {}).items():
                mask = (out.part_masks or {}).get(name, torch.ones_like(feat))
                pos = self.net.assignments[name].positive(labels)
                # Zero-valued term whose backward adds the reference code's gradient to dL/dx.
                inj.append(
                    (
                        official_filter_grad(feat, mask, pos, weight, alpha=self.official_cfg["alpha"]) * 0
                    ).sum()
                )
            losses["filter"] = torch.stack(inj).sum()
        if stage == "train":
            self._update_procedures(out, labels)
        return losses

    @torch.no_grad()
    def _update_procedures(self, out: Any, labels: torch.Tensor) -> None:
        """Dynamic filter assignment and learned mask sharpness (all-reduced: identical on all ranks)."""
        masks = self.net.masks()
        for name, feat in (out.part_features or {}).items():
            assign = self.net.assignments[name]
            pos = assign.positive(labels)
            masks[name].update_sharpness(feat, pos)
            assign.update(feat, labels)
        learned = [m.sharpness.mean() for m in masks.values() if m.learn_sharpness]
        if learned:
            self.log(
                "train/mask_sharpness",
                torch.stack(learned).mean(),
                on_step=False,
                on_epoch=True,
                sync_dist=True,
            )

    # -- metrics ---------------------------------------------------------------------------------
    def update_eval_metrics(self, out: Any, batch: dict[str, Any], stage: str) -> None:
        metric = getattr(self, f"{stage}_location", None)
        if metric is None or "landmarks" not in batch:
            return
        feat = out.part_features[self.eval_layer]
        ids = self.landmark_ids
        cand = None
        if self.metric_cfg["candidates"] == "category":
            cand = self.net.assignments[self.eval_layer].positive(batch["label"])
        metric.update(
            feat,
            batch["landmarks"][:, ids],
            batch["landmark_visible"][:, ids],
            tuple(batch["image"].shape[-2:]),
            index=batch.get("index"),
            candidates=cand,
        )
        self.log(f"{stage}/location_instability", metric, on_step=False, on_epoch=True)

    @torch.no_grad()
    def collect_part_maps(
        self, dataset: Any, num_samples: int, seed: int, batch_size: int = 64
    ) -> dict[str, torch.Tensor]:
        """Images, labels, eval-layer maps and (when present) part masks of a fixed, seeded subset."""
        from torch.utils.data import DataLoader

        from interpzoo.metrics.callbacks import fixed_subset
        from interpzoo.models.lit_base import batch_input

        was_training = self.training
        self.eval()
        out: dict[str, list[torch.Tensor]] = {"image": [], "label": [], "maps": [], "part_masks": []}
        try:
            for batch in DataLoader(fixed_subset(dataset, num_samples, seed), batch_size=batch_size):
                x = batch_input(batch).to(self.device)
                res = self(x)
                out["image"].append(x.cpu())
                out["label"].append(self.task_labels(batch["label"]))
                out["maps"].append(res.part_features[self.eval_layer].float().cpu())
                if "part_masks" in batch:
                    out["part_masks"].append(batch["part_masks"].bool())
        finally:
            self.train(was_training)
        return {k: torch.cat(v) for k, v in out.items() if v}

    def _dissect(self, stage: str) -> None:
        n = int(self.metric_cfg["part_iou_samples"])
        dm = self.trainer.datamodule if self.trainer is not None else None
        dataset = getattr(dm, f"{stage}_set", None) if dm is not None else None
        if n <= 0 or dataset is None or len(dataset) == 0 or "part_masks" not in dataset[0]:
            return
        data = self.collect_part_maps(dataset, n, int(self.metric_cfg["part_iou_seed"]))
        res = part_dissection(
            data["maps"],
            data["part_masks"],
            self.metric_cfg["part_iou_quantile"],
            self.metric_cfg["iou_threshold"],
        )
        # Same subset and weights on every rank: the values agree; sync_dist only averages equal numbers.
        for key in ("part_iou", "num_part_detectors", "num_unique_parts"):
            self.log(f"{stage}/{key}", res[key].float().to(self.device), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self._dissect("val")

    def on_test_epoch_end(self) -> None:
        self._dissect("test")

    # -- report ----------------------------------------------------------------------------------
    def write_report(self, out_dir: Path, datamodule: pl.LightningDataModule) -> list[Path]:
        """``part_filters.png`` (top images, heatmaps and inferred parts of a sample of filters), and the
        confusion matrix in multi-category mode."""
        figures: list[Path] = []
        if self.mode == "multi":
            figures += super().write_report(out_dir, datamodule)
        dataset = getattr(datamodule, "test_set", None)
        if dataset is None or len(dataset) == 0:
            return figures
        data = self.collect_part_maps(dataset, int(self.metric_cfg["report_samples"]), 0)
        names = self.data_info.get("class_names") or []
        fc = self.net.assignments[self.eval_layer].filter_class.tolist()
        if self.mode == "single":
            target = names[self.target_class] if self.target_class < len(names) else str(self.target_class)
            labels = [f"{target} vs rest"] * len(fc)
        else:
            labels = [str(names[c]) if c < len(names) else f"class {c}" for c in fc]
        images = data["image"]
        figures.append(
            part_filter_figure(
                images,
                data["maps"],
                out_dir / "part_filters.png",
                num_filters=int(self.metric_cfg["report_filters"]),
                filter_names=labels,
            )
        )
        return figures


def icnn_net_summary(net: ICNNNet) -> dict[str, Any]:
    """Plain-data description of where the part filters sit (for logs and bundles)."""
    return {
        "placement": net.placement,
        "layers": list(net.blocks()),
        "filters": {n: int(a.filter_class.numel()) for n, a in net.assignments.items()},
    }


__all__ = [
    "ICNNModule",
    "ICNNNet",
    "ICNNOutput",
    "attach_part_filters",
    "default_placement",
    "icnn_net_summary",
]
