"""The interpretable CNN LightningModule (Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks",
CVPR 2018).

:class:`ICNNModule` trains :class:`~interpzoo.models.icnn.ICNNNet` with ``task loss + lambda * filter loss``
(paper Eq. 1) in the two settings of the paper: ``mode: single`` (one category vs the rest, 2-way softmax
standing in for the paper's logistic loss; all filters serve the category) and ``mode: multi`` (filters
assigned to categories, images of other categories are negatives for a filter). Its report figure is
drawn by :mod:`interpzoo.reports.icnn`.

DDP, per statistic:

* filter loss ``-MI``: **global** by default (``filter_loss.sync``): template scores are
  all-gathered with gradients, so value and gradients equal a single process with the global batch;
  ``sync: false`` makes it per rank (then it depends on the per-device batch size);
* ``normalize: max`` scale: global max (all-reduce, detached);
* dynamic filter assignment and learned mask sharpness: EMA updates from all-reduced sums,
  identical on every rank;
* official gradient injection: per rank (the reference code's batch statistics);
* location instability: per-rank top-M buffers merged exactly at compute (tie-break by sample id);
* part IoU and detection rate (area-matched threshold, with ``_ceiling``, ``_random`` and ``_norm``): computed
  on the same fixed, seeded subset by every rank (no collective needed).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.layers.icnn import FilterLossOutput, PartFilterLoss, official_filter_grad
from interpzoo.metrics.calibration import Score, normalised_score
from interpzoo.metrics.icnn import LocationInstability, part_iou_scores, project_maps, random_directions
from interpzoo.models.lit_base import ClassificationModule, batch_input
from interpzoo.utils import did_you_mean

LOCATION_RANDOM_UNITS = 32

__all__ = ["ICNNModule"]


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
    "part_iou_quantile": None,
    "iou_threshold": 0.2,
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
            ``part_iou_samples`` (fixed subset; 0 disables), ``part_iou_quantile`` (``None``: the
            area-matched threshold of :func:`~interpzoo.metrics.icnn.area_matched_part_iou`; a number: the
            fixed top-quantile threshold of Network Dissection, e.g. 0.005), ``iou_threshold`` (detection
            threshold on the best-part IoU, 0.2 as ICNN Sec. 4.2), ``part_iou_seed`` (subset and random
            directions), ``report_samples``, ``report_filters``.
        *args, **kwargs: the network config ``net`` (must build an :class:`ICNNNet`; default ``icnn``),
            ``data_info`` and the other arguments of :class:`~interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "icnn"

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
            # The references of location instability, read on the same images: the oracle (one unit per
            # part reporting the part's mask pooled onto the layer's grid; where the data has part masks)
            # and LOCATION_RANDOM_UNITS random unit directions of the layer's channels (Bau et al. 2017).
            dirs = random_directions(channels, LOCATION_RANDOM_UNITS, int(self.metric_cfg["part_iou_seed"]))
            self.register_buffer("location_random_directions", dirs, persistent=False)
            units = {"": channels, "_random": LOCATION_RANDOM_UNITS, "_ceiling": len(parts or [])}
            for stage in ("val", "test"):
                for ref, n in units.items():
                    if n == 0:
                        continue
                    setattr(
                        self,
                        f"{stage}_location{ref}",
                        LocationInstability(
                            n,
                            len(self.landmark_ids),
                            self.metric_cfg["top_m"],
                            self.metric_cfg["select_ratio"],
                        ),
                    )

    # -- network ---------------------------------------------------------------------------------
    def net_config(self) -> dict[str, Any]:
        config = super().net_config()
        if self.hparams.get("mode") == "single":
            # Binary task: the network gets 2 outputs and every filter serves class 1 ("target").
            config.update(num_classes=2, assignment="single", target_class=1)
        return config

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
                if stage == "train":
                    self.log(f"{stage}/{k}", v.detach(), on_step=False, on_epoch=True, sync_dist=True)
                else:  # sample-weighted over every rank: exact with uneven evaluation shards
                    self.log_epoch_mean(f"{stage}/{k}", v, labels.shape[0])
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
        lm, vis, size = (
            batch["landmarks"][:, ids],
            batch["landmark_visible"][:, ids],
            tuple(batch["image"].shape[-2:]),
        )
        metric.update(feat, lm, vis, size, index=batch.get("index"), candidates=cand)
        self.log(f"{stage}/location_instability", metric, on_step=False, on_epoch=True)
        refs = {"_random": project_maps(feat.detach(), self.location_random_directions)}
        if "part_masks" in batch and hasattr(self, f"{stage}_location_ceiling"):
            # each part's mask average-pooled onto the grid (as interpzoo.scorecard.parts.pooled_part_maps)
            refs["_ceiling"] = F.adaptive_avg_pool2d(batch["part_masks"].to(feat.dtype), feat.shape[-2:])
        for ref, maps in refs.items():
            ref_metric = getattr(self, f"{stage}_location{ref}")
            ref_metric.update(maps, lm, vis, size, index=batch.get("index"))
            self.log(f"{stage}/location_instability{ref}", ref_metric, on_step=False, on_epoch=True)

    def _log_location_norm(self, stage: str) -> None:
        """``<stage>/location_instability_norm`` (lower is better: the oracle's ceiling is below random)."""
        metrics = [getattr(self, f"{stage}_location{r}", None) for r in ("", "_random", "_ceiling")]
        if any(m is None or m.update_count == 0 for m in metrics):
            return
        raw, rnd, ceiling = (float(m.compute()) for m in metrics)
        norm = normalised_score(raw, rnd, ceiling)
        if math.isfinite(norm):
            self.log(f"{stage}/location_instability_norm", norm, sync_dist=False)

    @torch.no_grad()
    def collect_part_maps(self, loader: Iterable[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Images ``(N, C, H, W)``, task labels ``(N,)``, eval-layer maps ``(N, C', h, w)`` and (when present)
        part masks ``(N, P, H, W)`` of every batch of ``loader`` (eval mode, no gradients)."""
        was_training = self.training
        self.eval()
        out: dict[str, list[torch.Tensor]] = {"image": [], "label": [], "maps": [], "part_masks": []}
        try:
            for batch in loader:
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
        idx = fixed_subset_indices(len(dataset), n, int(self.metric_cfg["part_iou_seed"]))
        data = self.collect_part_maps(dm.subset_dataloader(stage, idx, batch_size=64))
        maps, seed = data["maps"], int(self.metric_cfg["part_iou_seed"])
        # Random baseline: 128 random unit directions of the layer's channels (as the scorecard).
        rand = project_maps(maps, random_directions(maps.shape[1], 128, seed))
        quantile = self.metric_cfg["part_iou_quantile"]
        res = part_iou_scores(
            maps,
            data["part_masks"],
            rand,
            float(self.metric_cfg["iou_threshold"]),
            None if quantile is None else float(quantile),
        )
        values: dict[str, float] = {}
        for key in ("part_iou", "part_detection_rate"):
            row = Score("icnn", key, res["model"][key], res["oracle"][key], res["random"][key])
            values.update(row.logged(f"{stage}/"))
        model = res["model"]["result"]
        values[f"{stage}/num_part_detectors"] = float(model["num_part_detectors"])
        values[f"{stage}/num_unique_parts"] = float(model["num_unique_parts"])
        # Same subset and weights on every rank: the values agree; sync_dist only averages equal numbers.
        for key, value in values.items():
            self.log(key, torch.tensor(value, device=self.device), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self._dissect("val")
            self._log_location_norm("val")

    def on_test_epoch_end(self) -> None:
        self._dissect("test")
        self._log_location_norm("test")
