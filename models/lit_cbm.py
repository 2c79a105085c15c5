"""The concept bottleneck LightningModule (Koh et al., "Concept Bottleneck Models", ICML 2020, Sec. 3-5).

:class:`CBMModule` trains a :class:`~interpzoo.models.cbm.CBMNet` ``y = f(g(x))`` from per-image concept
labels (``batch["concepts"]``, e.g. PartShapes' concept vector or CUB's attributes) in one of the paper's
three ways (Sec. 3):

* ``independent``: ``g`` learns ``x -> c`` (concept loss) and ``f`` learns ``c -> y`` from the *true*
  concepts; at test time ``f`` reads ``g``'s predictions. The two losses share no parameter, so both are
  minimised in the same steps (one optimiser, disjoint gradients: the same as training them one after the
  other, with half the passes over the data);
* ``sequential``: ``g`` first (epochs ``0 .. concept_epochs - 1``, concept loss only), then ``g`` is frozen
  (no gradient, BatchNorm statistics fixed) and ``f`` learns from ``g``'s predictions for the remaining
  epochs. The phase follows ``trainer.current_epoch``, so a resumed run continues in the right phase;
* ``joint``: ``L = CE(f(g(x)), y) + concept_weight * sum_j BCE(g_j(x), c_j)``
  (:func:`interpzoo.layers.cbm.joint_loss`).

Validation and test log (:mod:`interpzoo.metrics.cbm`): ``concept_auc_mean`` / ``concept_auc_min`` /
``concept_acc``; the test-time intervention curve (Sec. 5) at a few points, ``intervention/<order>_n<NNN>``,
with ``true_concept_acc`` (``f`` on the true concepts, the curve's right end); and the leakage checks
``leakage_soft_hard`` and (test) ``leakage_probe``. The full curves of the last epoch are kept in
:attr:`CBMModule.intervention_curves`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from interpzoo.layers.cbm import concept_loss, joint_loss
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.cbm import (
    INTERVENTION_ORDERS,
    CBMEvalState,
    concept_aucs,
    intervention_curve,
    probe_accuracy,
    soft_hard_accuracy,
)
from interpzoo.models.cbm import CBMNet, CBMOutput
from interpzoo.models.lit_base import ClassificationModule, batch_input
from interpzoo.utils import did_you_mean

__all__ = ["CBM_MODES", "INTERVENTION_DEFAULTS", "CBMModule"]

CBM_MODES = ("independent", "sequential", "joint")
INTERVENTION_DEFAULTS: dict[str, Any] = {
    "orders": ["random", "uncertainty"],  # random: the paper's; uncertainty: |p - 0.5| smallest first
    "seeds": [0, 1, 2],  # random orders averaged over these seeds
    "points": [
        0.0,
        0.25,
        0.5,
        0.75,
        1.0,
    ],  # fractions of the k concepts logged as intervention/<order>_n<NNN>
    "stages": ["val", "test"],
}


class CBMModule(ClassificationModule):
    """Concept bottleneck classifier, trained independently, sequentially or jointly (Koh et al. 2020).

    Args:
        mode: ``independent`` | ``sequential`` | ``joint`` (module docstring).
        concept_weight: ``lambda`` of the joint loss (``joint`` only; the other modes weigh the concept loss 1).
        concept_epochs: ``sequential``: epochs that train ``g`` before ``f``; ``None`` = half of
            ``trainer.max_epochs`` (rounded down, at least 1).
        concepts: concept names used as the bottleneck, a subset of the data's ``concept_names`` in any order;
            ``None`` = all of them.
        intervention: settings of the intervention curve (:data:`INTERVENTION_DEFAULTS`).
        leakage_probe: at test, fit a linear probe on the predicted concept probabilities and one on the true
            concepts of ``train_samples`` training images and log their test accuracies (``leakage_probe``).
        train_samples: fixed subset of training images for the logit bottleneck's 5th/95th percentiles and
            the leakage probes.
        **kwargs: the network config ``net`` (default ``cbm``), ``data_info`` and the other arguments of
            :class:`interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "cbm"

    def __init__(
        self,
        *,
        mode: str = "joint",
        concept_weight: float = 0.1,
        concept_epochs: int | None = None,
        concepts: Sequence[str] | None = None,
        intervention: dict[str, Any] | None = None,
        leakage_probe: bool = True,
        train_samples: int = 1024,
        **kwargs: Any,
    ) -> None:
        if mode not in CBM_MODES:
            raise ValueError(
                f"mode must be one of {CBM_MODES}, got {mode!r}{did_you_mean(str(mode), CBM_MODES)}"
            )
        if concept_weight < 0:
            raise ValueError(f"concept_weight (lambda of the joint loss) must be >= 0, got {concept_weight}")
        if concept_epochs is not None and concept_epochs < 1:
            raise ValueError(
                f"concept_epochs must be >= 1 (or null for half the epochs), got {concept_epochs}"
            )
        cfg = dict(INTERVENTION_DEFAULTS)
        for key, value in (intervention or {}).items():
            if key not in INTERVENTION_DEFAULTS:
                raise ValueError(
                    f"intervention has no option {key!r}{did_you_mean(key, INTERVENTION_DEFAULTS)}; "
                    f"options: {sorted(INTERVENTION_DEFAULTS)}"
                )
            cfg[key] = value
        for order in cfg["orders"]:
            if order not in INTERVENTION_ORDERS:
                raise ValueError(f"intervention.orders: unknown {order!r}; choose from {INTERVENTION_ORDERS}")
        if any(not 0.0 <= float(p) <= 1.0 for p in cfg["points"]):
            raise ValueError(
                f"intervention.points are fractions of the concepts in [0, 1], got {cfg['points']}"
            )
        super().__init__(**kwargs)
        if mode == "independent" and self.net.bottleneck != "sigmoid":
            raise ValueError(
                "mode=independent trains f on the true 0/1 concepts, which only a sigmoid bottleneck matches at "
                "test time; set model.net.bottleneck=sigmoid or use mode=sequential/joint"
            )
        self.intervention_cfg = cfg
        self.concept_names = list(self.net.concepts)
        self.concept_columns = self._columns()
        self.eval_state = nn.ModuleDict({"val": CBMEvalState(), "test": CBMEvalState()})
        #: ``{stage: {"counts": [...], "random": [...], "uncertainty": [...]}}`` of the last epoch
        self.intervention_curves: dict[str, dict[str, list[float]]] = {}
        self._train_stats: dict[str, torch.Tensor] | None = None

    # -- network and concepts -------------------------------------------------------------------
    def net_config(self) -> dict[str, Any]:
        config = super().net_config()
        concepts = self.hparams.get("concepts")
        if concepts is None:
            concepts = config.get("concepts") or self.data_info.get("concept_names")
        if concepts is None and config.get("n_concepts") is None:
            raise ValueError(
                "a concept bottleneck model needs per-image concept labels: use data with concepts "
                "(data=partshapes, or data=cub200 data.concepts=true) or set model.concepts=[names]"
            )
        if concepts is not None:
            config["concepts"] = [str(c) for c in concepts]
        return config

    def build_net(self) -> nn.Module:
        net = super().build_net()
        if not isinstance(net, CBMNet):
            raise TypeError(f"CBMModule needs net.name=cbm or cbm_<backbone>, got {type(net).__name__}")
        return net

    def _columns(self) -> list[int] | None:
        """Columns of ``batch["concepts"]`` holding :attr:`concept_names` (``None``: the batch's own order)."""
        available = self.data_info.get("concept_names")
        if available is None:
            return None
        available = list(available)
        missing = [c for c in self.concept_names if c not in available]
        if missing:
            raise ValueError(
                f"model.concepts names {missing} that the data does not have"
                f"{did_you_mean(missing[0], available)}; the data's concepts: {available}"
            )
        return [available.index(c) for c in self.concept_names]

    def true_concepts(self, batch: dict[str, Any]) -> torch.Tensor:
        """The batch's 0/1 concept labels ``(B, k)`` of the bottleneck's concepts, in its order."""
        if "concepts" not in batch:
            raise ValueError(
                "the batch has no 'concepts': a concept bottleneck model trains on per-image concept labels; use "
                "data=partshapes, or data=cub200 with data.concepts=true (CUB attributes)"
            )
        c = batch["concepts"].float()
        if self.concept_columns is not None:
            c = c[:, self.concept_columns]
        if c.shape[1] != self.net.n_concepts:
            raise ValueError(
                f"the batch has {c.shape[1]} concepts but the bottleneck has {self.net.n_concepts}; give "
                "model.concepts=[...] matching the data's concept_names"
            )
        return c

    # -- schedule -------------------------------------------------------------------------------
    def concept_epochs(self) -> int:
        """Epochs of the sequential mode's first phase (``g`` only)."""
        if self.hparams.concept_epochs is not None:
            return int(self.hparams.concept_epochs)
        max_epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 2
        return max(1, int(max_epochs) // 2)

    def phase(self) -> str:
        """``joint`` / ``independent``, or for ``sequential`` ``concepts`` (train g) then ``labels`` (train f)."""
        if self.hparams.mode != "sequential":
            return str(self.hparams.mode)
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return "concepts" if epoch < self.concept_epochs() else "labels"

    def setup(self, stage: str) -> None:
        if stage != "fit" or self.hparams.mode != "sequential" or self.trainer is None:
            return
        max_epochs = self.trainer.max_epochs
        if max_epochs is not None and max_epochs > 0 and self.concept_epochs() >= max_epochs:
            raise ValueError(
                f"mode=sequential trains g for concept_epochs={self.concept_epochs()} epochs and f after them, but "
                f"trainer.max_epochs={max_epochs} leaves no epoch for f: lower model.concept_epochs or raise "
                "trainer.max_epochs"
            )
        if self.trainer.world_size > 1:
            kwargs = getattr(self.trainer.strategy, "_ddp_kwargs", {}) or {}
            if not kwargs.get("find_unused_parameters", False):
                raise ValueError(
                    "mode=sequential leaves f unused while g trains and g unused while f trains, which DDP refuses "
                    "by default: add trainer.strategy=ddp_find_unused_parameters_true"
                )

    def _freeze_concept_predictor(self) -> None:
        # the sequential mode's second phase: g's BatchNorms keep their statistics (Lightning puts the whole
        # module back in training mode after every validation, hence on every batch)
        if self.phase() == "labels":
            for m in self.net.concept_predictor_modules():
                m.eval()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._freeze_concept_predictor()

    # -- losses ---------------------------------------------------------------------------------
    def compute_losses(self, out: CBMOutput, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """The loss terms of the mode (and phase); their sum is the training loss (Koh et al. 2020, Sec. 3)."""
        c, y = self.true_concepts(batch), batch["label"]
        phase = self.phase()
        if phase == "joint":
            return joint_loss(out.logits, y, out.concept_logits, c, self.hparams.concept_weight)
        if phase == "independent":
            # f sees the true concepts only; g is trained on the concept loss alone
            return {
                "concept": concept_loss(out.concept_logits, c),
                "ce": F.cross_entropy(self.net.predict_from_concepts(c), y),
            }
        if stage != "train":
            # sequential, evaluated: both halves, so val/loss means the same thing in either phase (and in a
            # test run, where the epoch counter says nothing about the phase)
            return {"concept": concept_loss(out.concept_logits, c), "ce": F.cross_entropy(out.logits, y)}
        if phase == "concepts":
            return {"concept": concept_loss(out.concept_logits, c)}
        # labels phase: f on g's predictions, with no gradient into the frozen g
        return {"ce": F.cross_entropy(self.net.predict_from_concepts(out.concepts.detach()), y)}

    # -- evaluation -----------------------------------------------------------------------------
    def update_eval_metrics(self, out: CBMOutput, batch: dict[str, Any], stage: str) -> None:
        self.eval_state[stage].update(out.concept_logits, self.true_concepts(batch), batch["label"])

    @torch.no_grad()
    def _collect_train_stats(self) -> dict[str, torch.Tensor] | None:
        """Concept logits, true concepts and labels of a fixed subset of training images (eval mode)."""
        from interpzoo.datamodules.base import fixed_subset_indices

        dm = self.trainer.datamodule if self.trainer is not None else None
        split, ds = "push", getattr(dm, "push_set", None) if dm is not None else None
        if ds is None and dm is not None:
            split, ds = "train", getattr(dm, "train_set", None)
        if ds is None or len(ds) == 0:
            return None
        idx = fixed_subset_indices(len(ds), int(self.hparams.train_samples), seed=0)
        was_training = self.net.training
        self.net.eval()
        logits, concepts, labels = [], [], []
        for batch in dm.subset_dataloader(split, idx, batch_size=256):
            x = batch_input(batch).to(self.device)
            logits.append(self.net.predict_concepts(x)[0].float())
            concepts.append(self.true_concepts(batch).to(self.device))
            labels.append(batch["label"].to(self.device))
        self.net.train(was_training)
        return {
            "concept_logits": torch.cat(logits),
            "concepts": torch.cat(concepts),
            "labels": torch.cat(labels),
        }

    def _refresh(self, stage: str) -> None:
        need_percentiles = self.net.bottleneck == "logit"
        need_probe = stage == "test" and bool(self.hparams.leakage_probe)
        self._train_stats = None
        if not (need_percentiles or need_probe):
            return
        stats = self._collect_train_stats()
        if stats is None:
            return
        if need_percentiles:
            self.net.set_intervention_values(stats["concept_logits"])  # paper Sec. 5
        self._train_stats = stats

    def on_validation_epoch_start(self) -> None:
        self._refresh("val")

    def on_test_epoch_start(self) -> None:
        self._refresh("test")

    def _log(self, name: str, value: float) -> None:
        # every rank holds the same gathered values, so the numbers agree without another reduction
        self.log(name, float(value), sync_dist=False, rank_zero_only=False)

    @torch.no_grad()
    def _epoch_metrics(self, stage: str) -> None:
        state = self.eval_state[stage]
        res = state.compute()
        state.reset()
        logits, c, y = res["concept_logits"], res["concepts"], res["labels"]
        if y.numel() == 0:
            return
        probs = torch.sigmoid(logits)
        aucs = concept_aucs(probs.cpu(), c.cpu())
        defined = ~torch.isnan(aucs)
        if defined.any():
            # the references on the same images: the oracle predicts the true concepts, the random baseline
            # seeded uniform scores
            g = torch.Generator().manual_seed(0)
            refs = {
                "": aucs,
                "_ceiling": concept_aucs(c.cpu().float(), c.cpu()),
                "_random": concept_aucs(torch.rand(c.shape, generator=g), c.cpu()),
            }
            for stat, reduce in (("mean", torch.mean), ("min", torch.min)):
                vals = {r: float(reduce(a[defined])) for r, a in refs.items()}
                name = f"{stage}/concept_auc_{stat}"
                for key, value in (
                    Score("cbm", name, vals[""], vals["_ceiling"], vals["_random"]).logged().items()
                ):
                    if math.isfinite(value):
                        self._log(key, value)
        self._log(f"{stage}/concept_acc", float(((probs > 0.5).float() == c).float().mean()))
        if stage == "test":
            for j, name in enumerate(self.concept_names):
                if not torch.isnan(aucs[j]):
                    self._log(f"test/concept_auc/{name}", float(aucs[j]))
        net = self.net
        if net.bottleneck == "logit" and not bool(torch.isfinite(net.concept_low).all()):
            return  # no training percentiles (no training split here): no logit interventions to measure
        predicted = net.to_bottleneck(logits)
        targets = net.intervention_values(c)
        predict = net.predict_from_concepts
        # leakage, soft vs hard: f on the rounded predictions (module docstring of metrics.cbm)
        soft_acc, hard_acc = soft_hard_accuracy(
            predict, predicted, net.intervention_values((probs > 0.5).float()), y
        )
        self._log(f"{stage}/leakage_soft_acc", soft_acc)
        self._log(f"{stage}/leakage_hard_acc", hard_acc)
        self._log(f"{stage}/leakage_soft_hard", soft_acc - hard_acc)
        cfg = self.intervention_cfg
        if stage in cfg["stages"]:
            k = net.n_concepts
            counts = list(range(k + 1))
            curves: dict[str, list[float]] = {"counts": [float(n) for n in counts]}
            for order in cfg["orders"]:
                curve = intervention_curve(
                    predict, predicted, targets, y, counts, order, probs=probs, seeds=cfg["seeds"]
                )
                curves[order] = curve.tolist()
                for p in cfg["points"]:
                    n = round(float(p) * k)
                    self._log(f"{stage}/intervention/{order}_n{n:03d}", float(curve[n]))
            self.intervention_curves[stage] = curves
        self._log(f"{stage}/true_concept_acc", float((predict(targets).argmax(1) == y).float().mean()))
        if stage == "test" and self.hparams.leakage_probe and self._train_stats is not None:
            tr = self._train_stats
            k_classes = int(self.net.num_classes)
            soft_probe = probe_accuracy(
                torch.sigmoid(tr["concept_logits"]), tr["labels"], probs, y, k_classes
            )
            true_probe = probe_accuracy(tr["concepts"], tr["labels"], c, y, k_classes)
            self._log("test/leakage_probe_soft_acc", soft_probe)
            self._log("test/leakage_probe_true_acc", true_probe)
            self._log("test/leakage_probe", soft_probe - true_probe)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._epoch_metrics("val")

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._epoch_metrics("test")
