"""The SENN LightningModule (Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with
Self-Explaining Neural Networks", NeurIPS 2018, Sec. 3).

:class:`SENNModule` trains a :class:`~interpzoo.models.senn.SENN` with cross-entropy, the robustness loss
``lambda * || grad_x f - theta^T J_x h ||`` (:func:`interpzoo.layers.senn.robustness_loss`) and, for
learned concepts, a reconstruction loss and an L1 sparsity penalty; it logs faithfulness, local
Lipschitz estimates and concept statistics (:mod:`interpzoo.metrics.senn`). Its report figures are drawn
by :mod:`interpzoo.reports.senn`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data._utils.collate import default_collate
from torchmetrics import MeanMetric, MeanSquaredError

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.layers.senn import (
    PENALTY_OPTIONS,
    PENALTY_REDUCTIONS,
    PENALTY_TARGETS,
    assert_per_sample,
    concept_sparsity_loss,
    reconstruction_loss,
    robustness_loss,
    subbatch_robustness_loss,
)
from interpzoo.metrics.calibration import normalised_score
from interpzoo.metrics.senn import (
    LIPSCHITZ_METHODS,
    LIPSCHITZ_MODES,
    ConceptSparsity,
    DeadConcepts,
    LocalLipschitz,
    MeanScore,
    concept_faithfulness_references,
    input_faithfulness_scores,
    local_lipschitz,
)
from interpzoo.models.lit_base import ClassificationModule, batch_input
from interpzoo.models.senn import SENN, SENNOutput
from interpzoo.utils import did_you_mean

FAITHFULNESS_NAMES = ("faithfulness", "faithfulness_median", "faithfulness_input")

__all__ = ["LIPSCHITZ_DEFAULTS", "SENNModule"]

LIPSCHITZ_DEFAULTS: dict[str, Any] = {
    "points": 128,  # size of the fixed, seeded subset of the val/test split
    "methods": ["sample"],  # "sample" and/or "gradient"
    "mode": "concepts",  # "concepts": ||dtheta|| / ||dh|| (paper's mode 2); "input": / ||dx||
    "eps": 0.01,  # box half-width in units of the input std (the reference's lip_eps, box_std)
    "samples": 16,  # draws per point (sample method)
    "steps": 10,  # ascent steps (gradient method)
    "step_size": 0.25,  # ascent step as a fraction of the box half-width
    "seed": 0,
    "every_n_epochs": 1,
    "batch_size": 64,
    "stages": ["val", "test"],
}


class SENNModule(ClassificationModule):
    """SENN classifier: cross-entropy + robustness + (learned concepts) reconstruction and sparsity.

    Args:
        robustness_lambda: weight of the robustness loss (0 disables it in training).
        penalty_target: ``logits`` (0 for a model linear in its concepts) or ``log_probs`` (the
            reference code's choice).
        penalty_reduction: ``mean`` | ``rms`` | ``batch_fro``, see
            :func:`layers.senn.robustness_loss` (``batch_fro`` is the reference's, it scales with
            sqrt(batch)).
        penalty_method: ``stopgrad`` (C vector-Jacobian products, exact) or ``jacobian`` (the full C + k,
            exact), or ``subbatch``: the exact ``stopgrad`` penalty of a random ``penalty_subbatch`` share of
            the batch, an unbiased estimate of the ``mean`` penalty and of its gradient that is several times
            cheaper but noisier (:func:`layers.senn.subbatch_robustness_loss`).
        penalty_subbatch: share of the batch that ``penalty_method=subbatch`` penalises.
        penalty_space: ``normalized`` (gradients w.r.t. the normalised input the conceptizer sees,
            so lambda does not depend on the units of a CSV column) or ``raw``.
        recon_weight: weight of the reconstruction loss (autoencoder conceptizers).
        sparsity_weight: weight of the batch-mean L1 norm of the concepts (learned conceptizers).
        val_penalty_batches: validation batches on which the robustness loss is also computed (with
            gradients enabled) and logged as ``val/robustness``; 0 = never.
        faithfulness: log concept-level faithfulness (``faithfulness`` with the zero baseline,
            ``faithfulness_median`` with training medians) and, for the input conceptizer,
            ``faithfulness_input``.
        faithfulness_relevance: what is correlated with the probability drops: ``theta``
            (``theta_{i,y}``, the paper's) or ``contribution`` (``theta_{i,y} h_i``; removing concept
            ``i`` moves the logit by exactly this, so it is faithful by construction, while ``theta``
            alone ignores the sign and size of ``h_i``).
        input_faithfulness_max_features: skip the input-level variant above this many inputs (it
            costs one forward per input entry).
        lipschitz: local Lipschitz settings (:data:`LIPSCHITZ_DEFAULTS`); ``points: 0`` disables it.
        median_samples: training samples (fixed subset) for the concept/input medians.
        report: ``{"samples": 6, "top_k": 8}``: test samples in the relevance figure and top
            activating training samples per concept.
        **kwargs: the network config ``net`` (must build a :class:`~interpzoo.models.senn.SENN`; default
            ``senn``), ``data_info`` and the other arguments of
            :class:`interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "senn"

    def __init__(
        self,
        *,
        robustness_lambda: float = 1e-4,
        penalty_target: str = "logits",
        penalty_reduction: str = "mean",
        penalty_method: str = "stopgrad",
        penalty_subbatch: float = 0.0625,
        penalty_space: str = "normalized",
        recon_weight: float = 1.0,
        sparsity_weight: float = 2e-5,
        val_penalty_batches: int = 1,
        faithfulness: bool = True,
        faithfulness_relevance: str = "theta",
        input_faithfulness_max_features: int = 256,
        lipschitz: dict[str, Any] | None = None,
        median_samples: int = 512,
        report: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if penalty_target not in PENALTY_TARGETS:
            raise ValueError(f"penalty_target must be one of {PENALTY_TARGETS}, got {penalty_target!r}")
        if penalty_reduction not in PENALTY_REDUCTIONS or penalty_reduction == "none":
            raise ValueError(
                f"penalty_reduction must be one of mean|rms|batch_fro, got {penalty_reduction!r}"
            )
        if penalty_method not in PENALTY_OPTIONS:
            raise ValueError(f"penalty_method must be one of {PENALTY_OPTIONS}, got {penalty_method!r}")
        if not 0.0 < penalty_subbatch <= 1.0:
            raise ValueError(f"penalty_subbatch must be in (0, 1], got {penalty_subbatch}")
        if penalty_space not in ("normalized", "raw"):
            raise ValueError(f"penalty_space must be 'normalized' or 'raw', got {penalty_space!r}")
        if faithfulness_relevance not in ("theta", "contribution"):
            raise ValueError(
                f"faithfulness_relevance must be 'theta' or 'contribution', got {faithfulness_relevance!r}"
            )
        if robustness_lambda < 0:
            raise ValueError(f"robustness_lambda must be >= 0, got {robustness_lambda}")
        if kwargs.get("compile") and robustness_lambda > 0:
            raise ValueError(
                "compile=true cannot be combined with robustness_lambda > 0 (double backward); set compile=false"
            )
        lip = dict(LIPSCHITZ_DEFAULTS)
        for key, value in (lipschitz or {}).items():
            if key not in LIPSCHITZ_DEFAULTS:
                raise ValueError(f"lipschitz has no option {key!r}{did_you_mean(key, LIPSCHITZ_DEFAULTS)}")
            lip[key] = value
        lip["methods"] = [lip["methods"]] if isinstance(lip["methods"], str) else list(lip["methods"])
        for m in lip["methods"]:
            if m not in LIPSCHITZ_METHODS:
                raise ValueError(f"lipschitz.methods: unknown {m!r}; choose from {LIPSCHITZ_METHODS}")
        if lip["mode"] not in LIPSCHITZ_MODES:
            raise ValueError(f"lipschitz.mode must be one of {LIPSCHITZ_MODES}, got {lip['mode']!r}")
        super().__init__(**kwargs)
        if not isinstance(self.net, SENN):
            raise TypeError(
                f"SENNModule needs a SENN architecture ('senn', 'senn_mlp', ...), got {type(self.net).__name__}"
            )
        self.lipschitz_cfg = lip
        self.report_cfg = {"samples": 6, "top_k": 8, **(report or {})}
        k = self.net.n_concepts

        def stage_metrics() -> nn.ModuleDict:
            return nn.ModuleDict(
                {
                    **{
                        f"{name}{ref}": MeanScore()
                        for name in FAITHFULNESS_NAMES
                        for ref in ("", "_ceiling", "_random")
                    },
                    "concept_sparsity": ConceptSparsity(),
                    "dead_concepts": DeadConcepts(k),
                    "concept_l1": MeanMetric(),
                    "relevance_abs": MeanMetric(),
                    "reconstruction_mse": MeanSquaredError(),
                    "robustness": MeanMetric(),
                }
            )

        self.senn_metrics = nn.ModuleDict({"val": stage_metrics(), "test": stage_metrics()})
        names = ["combined", *lip["methods"]]
        self.lipschitz_metrics = nn.ModuleDict(
            {s: nn.ModuleDict({n: LocalLipschitz() for n in names}) for s in ("val", "test")}
        )
        self._concept_medians: torch.Tensor | None = None
        self._input_medians: torch.Tensor | None = None
        self._eval_batch_idx = 0
        self._faithfulness_logged: set[str] = set()

    # -- losses ----------------------------------------------------------------------------------
    def robustness_penalty(self, x: torch.Tensor, out: SENNOutput, create_graph: bool = True) -> torch.Tensor:
        """The configured robustness loss of ``out = net(x)`` (``x`` required grad before the forward).

        ``penalty_method=subbatch`` estimates it from a sub-batch when the loss is trained
        (``create_graph``); evaluation (``val/robustness``) always logs the exact ``stopgrad`` value.
        """
        assert_per_sample(self.net.conceptizer, self.net.parametrizer)
        scale = self.net.input_scale() if self.hparams.penalty_space == "normalized" else None
        kwargs = {
            "target": self.hparams.penalty_target,
            "reduction": self.hparams.penalty_reduction,
            "input_scale": scale,
            "create_graph": create_graph,
        }
        if self.hparams.penalty_method == "subbatch":
            if create_graph:

                def forward(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
                    o = self.net(z, concept_input_grad=self.hparams.penalty_target != "logits")
                    return o.concepts, o.relevances, o.logits

                return subbatch_robustness_loss(forward, x, self.hparams.penalty_subbatch, **kwargs)
            return robustness_loss(x, out.concepts, out.relevances, out.logits, method="stopgrad", **kwargs)
        return robustness_loss(
            x, out.concepts, out.relevances, out.logits, method=self.hparams.penalty_method, **kwargs
        )

    def compute_losses(self, out: SENNOutput, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        losses = {"ce": F.cross_entropy(out.logits, batch["label"])}
        if out.reconstruction is not None:
            # Kept even at weight 0 so every decoder parameter stays in the graph (DDP).
            losses["recon"] = self.hparams.recon_weight * reconstruction_loss(
                out.reconstruction, out.reconstruction_target
            )
        if self.net.conceptizer.learnable and self.hparams.sparsity_weight > 0:
            losses["sparsity"] = self.hparams.sparsity_weight * concept_sparsity_loss(out.concepts)
        if stage == "train" and self.hparams.robustness_lambda > 0:
            penalty = self.robustness_penalty(batch_input(batch), out)
            self.log("train/robustness", penalty.detach(), on_step=False, on_epoch=True, sync_dist=True)
            losses["robustness"] = self.hparams.robustness_lambda * penalty
        return losses

    def forward(self, x: torch.Tensor) -> SENNOutput:
        if x.requires_grad and self._concepts_constant_in_penalty():
            # The exact stopgrad penalty on the logits never differentiates h w.r.t. x: by the product
            # rule grad_x f_c - theta_c^T J_x h = sum_i h_i grad_x theta_ic (Alvarez-Melis & Jaakkola 2018,
            # Sec. 3; layers.senn.robustness_residual), so J_x h drops out. The conceptizer runs on a
            # detached input: same values and parameter gradients, no conceptizer input gradient.
            if self.hparams.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            return self.net(x, concept_input_grad=False)
        return super().forward(x)

    def _concepts_constant_in_penalty(self) -> bool:
        """Whether the trained penalty is the exact ``stopgrad`` one on the logits (no ``J_x h`` needed)."""
        hp = self.hparams
        return (
            self.training
            and hp.robustness_lambda > 0
            and hp.penalty_method == "stopgrad"
            and hp.penalty_target == "logits"
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        # A fresh leaf: the penalty differentiates w.r.t. the input. The sub-batch estimate makes its own
        # leaf of the drawn samples, so there the full batch is left out of the input-gradient graph.
        if self.hparams.robustness_lambda > 0 and self.hparams.penalty_method != "subbatch":
            key = "image" if "image" in batch else "features"
            batch = {**batch, key: batch[key].detach().clone().requires_grad_(True)}
        return self._step(batch, "train")

    # -- evaluation metrics ----------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch_idx = batch_idx
        super().validation_step(batch, batch_idx)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch_idx = batch_idx
        super().test_step(batch, batch_idx)

    def update_eval_metrics(self, out: SENNOutput, batch: dict[str, Any], stage: str) -> None:
        m = self.senn_metrics[stage]
        h, theta = out.concepts, out.relevances
        logged: list[str] = ["concept_sparsity", "dead_concepts", "concept_l1", "relevance_abs"]
        m["concept_sparsity"].update(h)
        m["dead_concepts"].update(h)
        m["concept_l1"].update(h.abs().sum(1))
        m["relevance_abs"].update(theta.abs().mean(dim=(1, 2)))
        if out.reconstruction is not None:
            m["reconstruction_mse"].update(out.reconstruction.flatten(), out.reconstruction_target.flatten())
            logged.append("reconstruction_mse")
        if self.hparams.faithfulness:
            rel = self.hparams.faithfulness_relevance
            # the random baseline's orderings follow each sample's dataset index: the same on any sharding
            seed, index = self._eval_batch_idx, batch.get("index")
            scores = {
                "faithfulness": concept_faithfulness_references(
                    h, theta, relevance=rel, seed=seed, index=index
                )
            }
            if self._concept_medians is not None:
                medians = self._concept_medians.to(h)
                scores["faithfulness_median"] = concept_faithfulness_references(
                    h, theta, medians, relevance=rel, seed=seed, index=index
                )
            x = batch_input(batch)
            if (
                self.net.uses_input_concepts
                and self._input_medians is not None
                and x[0].numel() <= self.hparams.input_faithfulness_max_features
            ):
                scores["faithfulness_input"] = input_faithfulness_scores(
                    self.net, x, self._input_medians, out, references=True, seed=seed, index=index
                )
            # the oracle ceiling and the random baseline of each, read on the same interventions
            self._faithfulness_logged.update(scores)
            for name, refs in scores.items():
                for ref, value in refs.items():
                    m[f"{name}{ref}"].update(value)
                    logged.append(f"{name}{ref}")
        if stage == "val" and self._eval_batch_idx < self.hparams.val_penalty_batches:
            # Validation runs under inference mode: leave it, and enable gradients, on this batch only.
            with torch.inference_mode(False), torch.enable_grad():
                x = batch_input(batch).clone().requires_grad_(True)
                penalty = self.robustness_penalty(x, self.net(x), create_graph=False)
            m["robustness"].update(penalty.detach())
            logged.append("robustness")
        for name in logged:
            self.log(f"{stage}/{name}", m[name], on_step=False, on_epoch=True)

    def _refresh_medians(self) -> None:
        """Training medians of the concepts (and raw inputs) on a fixed subset, for median interventions."""
        dm = self.trainer.datamodule if self.trainer is not None else None
        split = "push"
        ds = getattr(dm, "push_set", None) if dm is not None else None
        if ds is None and dm is not None:
            split, ds = "train", getattr(dm, "train_set", None)
        if ds is None or len(ds) == 0 or not self.hparams.faithfulness:
            return
        idx = fixed_subset_indices(len(ds), self.hparams.median_samples, seed=0)
        loader = dm.subset_dataloader(split, idx, batch_size=256)
        was_training = self.net.training
        self.net.eval()
        hs, xs = [], []
        with torch.no_grad():
            for batch in loader:
                x = batch_input(batch).to(self.device)
                hs.append(self.net(x).concepts)
                if self.net.uses_input_concepts and self._input_medians is None:
                    xs.append(x)
        self.net.train(was_training)
        self._concept_medians = torch.cat(hs).median(dim=0).values
        if xs:
            self._input_medians = torch.cat(xs).median(dim=0).values

    def on_validation_epoch_start(self) -> None:
        self._refresh_medians()

    def on_test_epoch_start(self) -> None:
        self._refresh_medians()

    # -- stability at epoch end ------------------------------------------------------------------
    def lipschitz_estimates(
        self, dataset: torch.utils.data.Dataset, indices: Sequence[int]
    ) -> dict[str, torch.Tensor]:
        """Per-point local Lipschitz estimates ``{method: (n,), "combined": (n,)}`` of ``dataset[indices]``."""
        cfg = self.lipschitz_cfg
        scale = self.net.input_scale()
        clip = None if self.net.tabular else (0.0, 1.0)
        results: dict[str, list[torch.Tensor]] = {m: [] for m in cfg["methods"]}
        bs = int(cfg["batch_size"])
        for start in range(0, len(indices), bs):
            chunk = list(indices[start : start + bs])
            batch = default_collate([dataset[i] for i in chunk])
            x = batch_input(batch).to(self.device).clone()
            for method in cfg["methods"]:
                results[method].append(
                    local_lipschitz(
                        self.net,
                        x,
                        chunk,
                        method=method,
                        mode=cfg["mode"],
                        eps=float(cfg["eps"]),
                        scale=scale,
                        samples=int(cfg["samples"]),
                        steps=int(cfg["steps"]),
                        step_size=float(cfg["step_size"]),
                        clip=clip,
                        seed=int(cfg["seed"]),
                    )
                )
        out = {m: torch.cat(v) if v else torch.empty(0, device=self.device) for m, v in results.items()}
        stacked = torch.stack([torch.nan_to_num(v, nan=float("-inf")) for v in out.values()], 1)
        combined = stacked.amax(1)
        out["combined"] = torch.where(
            torch.isinf(combined), torch.full_like(combined, float("nan")), combined
        )
        return out

    def _log_lipschitz(self, stage: str) -> None:
        cfg = self.lipschitz_cfg
        if not cfg["points"] or stage not in cfg["stages"] or self.trainer.sanity_checking:
            return
        if stage == "val" and (self.current_epoch + 1) % max(1, int(cfg["every_n_epochs"])) != 0:
            return
        dm = self.trainer.datamodule
        dataset = getattr(dm, f"{stage}_set", None) if dm is not None else None
        if dataset is None:
            return
        idx = fixed_subset_indices(len(dataset), cfg["points"], cfg["seed"])
        mine = idx[self.trainer.global_rank :: max(1, self.trainer.world_size)]  # each point on one rank
        metrics = self.lipschitz_metrics[stage]
        with torch.inference_mode(False), torch.enable_grad():
            if mine:
                for name, values in self.lipschitz_estimates(dataset, mine).items():
                    metrics[name].update(values)
        for name, metric in metrics.items():
            res = metric.compute()  # collective: every rank gets here
            metric.reset()
            key = f"{stage}/lipschitz" if name == "combined" else f"{stage}/lipschitz_{name}"
            if name != "combined" and len(cfg["methods"]) == 1:
                continue
            self.log(key, res["mean"], sync_dist=False)
            if name == "combined":
                self.log(f"{stage}/lipschitz_max", res["max"], sync_dist=False)
                self.log(f"{stage}/lipschitz_undefined", res["undefined"], sync_dist=False)

    def _log_faithfulness_norm(self, stage: str) -> None:
        """``<stage>/faithfulness*_norm`` from the epoch's (DDP-reduced) model, ceiling and random means."""
        m = self.senn_metrics[stage]
        # which variants run depends on the config and the data only, so every rank walks the same list
        for name in (n for n in FAITHFULNESS_NAMES if n in self._faithfulness_logged):
            raw, ceiling, rnd = (float(m[f"{name}{r}"].compute()) for r in ("", "_ceiling", "_random"))
            norm = normalised_score(raw, rnd, ceiling)
            if math.isfinite(norm):
                self.log(f"{stage}/{name}_norm", norm, sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if not self.trainer.sanity_checking:
            self._log_faithfulness_norm("val")
        self._log_lipschitz("val")

    def on_test_epoch_end(self) -> None:
        self._log_faithfulness_norm("test")
        self._log_lipschitz("test")
