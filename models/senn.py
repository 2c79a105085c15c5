"""Self-explaining neural networks (SENN) for images and tables, and their LightningModule.

Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with Self-Explaining Neural Networks",
NeurIPS 2018 (``shared/specs/senn.md``). The network predicts ``logits_c = sum_i theta_ic(x) h_i(x)``
(sum aggregator) and returns the concepts ``h(x)`` ``(B, k)`` and relevances ``theta(x)``
``(B, k, C)`` with the logits: the pair is the explanation. Training adds the robustness loss
``lambda * || grad_x f - theta^T J_x h ||`` (computed with ``C`` vector-Jacobian products, see
:func:`layers.senn.robustness_residual`), and for learned concepts a reconstruction loss and an L1
sparsity penalty.

Registered names: ``senn`` (the architecture; conceptizer and parametrizer chosen by config, "auto"
picks the paper's choice for the input kind), ``senn_lenet`` (conv autoencoder concepts, LeNet
theta: the paper's MNIST model), ``senn_mlp`` (input features as concepts, MLP theta: the paper's
UCI/COMPAS model) and ``senn_<backbone>`` (conv autoencoder concepts, theta on a backbone trunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset
from torch.utils.data._utils.collate import default_collate
from torchmetrics import MeanMetric, MeanSquaredError

from interpzoo.layers.normalize import InputNormalize
from interpzoo.layers.senn import (
    PENALTY_METHODS,
    PENALTY_REDUCTIONS,
    PENALTY_TARGETS,
    BackboneConceptizer,
    BackboneParametrizer,
    ConvAutoencoderConceptizer,
    ConvParametrizer,
    InputConceptizer,
    MLPAutoencoderConceptizer,
    MLPParametrizer,
    SumAggregator,
    assert_per_sample,
    concept_sparsity_loss,
    reconstruction_loss,
    robustness_loss,
)
from interpzoo.metrics.senn import (
    LIPSCHITZ_METHODS,
    LIPSCHITZ_MODES,
    ConceptSparsity,
    DeadConcepts,
    LocalLipschitz,
    MeanScore,
    concept_faithfulness_scores,
    fixed_subset_indices,
    input_faithfulness_scores,
    local_lipschitz,
)
from interpzoo.models.backbones import backbone_from_config, list_backbones
from interpzoo.models.errors import did_you_mean
from interpzoo.models.explain import SENNExplanation
from interpzoo.models.lit_base import ClassificationModule, batch_input
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import find_modules, replace_modules


@dataclass
class SENNOutput(ClassifierOutput):
    """Output of :class:`SENN`.

    Attributes:
        logits: ``(B, C)`` = ``sum_i relevances[:, i, c] * concepts[:, i]``.
        concepts: ``(B, k)`` concept activations ``h(x)``.
        relevances: ``(B, k, C)`` relevances ``theta(x)`` (for ``single_logit_binary`` models the
            two columns are ``-theta/2`` and ``+theta/2``, which keeps the identity above exact).
        reconstruction: ``(B, *input)`` the conceptizer's reconstruction of the *normalised* input,
            or ``None`` without a decoder.
        reconstruction_target: the normalised input it reconstructs, or ``None``.
    """

    concepts: torch.Tensor | None = None
    relevances: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    reconstruction_target: torch.Tensor | None = None


_CONCEPTIZER_KEYS = {"type", "n_concepts", "concept_dim", "add_bias", "hidden", "decoder"}
_PARAMETRIZER_KEYS = {"type", "hidden", "act", "dropout", "out_act"}
CONCEPTIZER_TYPES = ("auto", "input", "cnn_ae", "mlp_ae", "backbone")
PARAMETRIZER_TYPES = ("auto", "mlp", "lenet", "backbone")
BATCHNORM_POLICIES = ("groupnorm", "frozen", "keep")


def _component_cfg(cfg: dict[str, Any] | str | None, allowed: set[str], what: str) -> dict[str, Any]:
    cfg = {"type": cfg} if isinstance(cfg, str) else dict(cfg or {})
    for key in cfg:
        if key not in allowed:
            raise ValueError(
                f"SENN {what} has no option {key!r}{did_you_mean(key, allowed)}; options: {sorted(allowed)}"
            )
    return cfg


def _group_norm_for(bn: nn.Module) -> nn.GroupNorm:
    """A GroupNorm with the BatchNorm's channels and affine parameters (up to 32 groups)."""
    c = bn.num_features
    groups = next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)
    gn = nn.GroupNorm(groups, c, eps=bn.eps, affine=bn.affine)
    if bn.affine:
        with torch.no_grad():
            gn.weight.copy_(bn.weight)
            gn.bias.copy_(bn.bias)
    return gn


@register_architecture("senn")
class SENN(nn.Module):
    """Self-explaining neural network: ``logits_c = sum_i theta_ic(x) h_i(x)``.

    Args:
        num_classes: ``C``.
        in_chans, image_size: image inputs ``(B, in_chans, H, W)`` in ``[0, 1]``.
        num_features: set for tabular inputs ``(B, F)`` (then ``in_chans``/``image_size`` are unused).
        mean, std: input normalisation (per channel, or per feature for tables), applied inside.
        conceptizer: ``{"type": "auto"|"input"|"cnn_ae"|"mlp_ae"|"backbone", "n_concepts": 5,
            "add_bias": True, "hidden": [64, 32], "decoder": True, "concept_dim": 1}``. ``auto`` is
            ``input`` for tables (the paper's UCI/COMPAS choice) and ``cnn_ae`` for images.
        parametrizer: ``{"type": "auto"|"mlp"|"lenet"|"backbone", "hidden": [64, 64],
            "act": "tanh", "dropout": 0.0, "out_act": "tanh"|"sigmoid"|"none"}``. ``auto`` is ``mlp``
            for tables and ``lenet`` for images; ``backbone`` uses the ``backbone`` trunk.
        aggregator: ``"sum"`` (the only aggregator the paper uses).
        backbone: trunk config for ``backbone`` conceptizers/parametrizers (ignored otherwise).
        single_logit_binary: for ``C = 2``, learn one relevance per concept (the paper's binary
            setup, sigmoid output) and return it as the columns ``(-theta/2, +theta/2)``, whose
            softmax equals ``sigmoid(theta . h)``.
        batchnorm: what to do with BatchNorm layers of backbone trunks, which break per-sample
            Jacobians in training mode: ``groupnorm`` (replace, affine weights kept), ``frozen``
            (always evaluate with running statistics) or ``keep`` (the robustness loss then refuses
            to run with a clear error).

    Shape:
        ``(B, C_in, H, W)`` or ``(B, F)`` to :class:`SENNOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        image_size: int | Sequence[int] = 32,
        num_features: int | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        conceptizer: dict[str, Any] | str | None = None,
        parametrizer: dict[str, Any] | str | None = None,
        aggregator: str = "sum",
        backbone: dict[str, Any] | str | None = None,
        single_logit_binary: bool = False,
        batchnorm: str = "groupnorm",
    ) -> None:
        super().__init__()
        if aggregator != "sum":
            raise ValueError(f"SENN aggregator {aggregator!r} is not available; use 'sum' (the paper's g)")
        if batchnorm not in BATCHNORM_POLICIES:
            raise ValueError(f"batchnorm must be one of {BATCHNORM_POLICIES}, got {batchnorm!r}")
        if single_logit_binary and num_classes != 2:
            raise ValueError(f"single_logit_binary needs num_classes=2, got {num_classes}")
        self.num_classes = int(num_classes)
        self.tabular = num_features is not None
        if self.tabular:
            self.input_shape: tuple[int, ...] = (int(num_features),)
        else:
            size = (
                (image_size, image_size) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
            )
            self.input_shape = (int(in_chans), *size)
        self.in_chans = self.input_shape[0]
        self.single_logit_binary = bool(single_logit_binary)
        self.batchnorm = batchnorm
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.normalize = InputNormalize(mean, std) if mean is not None else nn.Identity()

        c_cfg = _component_cfg(conceptizer, _CONCEPTIZER_KEYS, "conceptizer")
        p_cfg = _component_cfg(parametrizer, _PARAMETRIZER_KEYS, "parametrizer")
        if int(c_cfg.get("concept_dim", 1)) != 1:
            raise ValueError("SENN supports concept_dim=1 only (scalar concepts, as the reference code)")
        self.conceptizer = self._build_conceptizer(c_cfg, backbone)
        self.n_concepts = self.conceptizer.n_concepts
        self.parametrizer = self._build_parametrizer(p_cfg, backbone)
        self.aggregator = SumAggregator()
        self.conceptizer_type = type(self.conceptizer).__name__
        if batchnorm == "groupnorm":
            for part in (self.conceptizer, self.parametrizer):
                if find_modules(part, nn.modules.batchnorm._BatchNorm):
                    replace_modules(part, nn.modules.batchnorm._BatchNorm, lambda _n, m: _group_norm_for(m))

    # -- construction ----------------------------------------------------------------------------
    def _trunk(self, backbone: dict[str, Any] | str | None) -> nn.Module:
        if self.tabular:
            raise ValueError("a 'backbone' conceptizer/parametrizer needs image inputs; use 'mlp' for tables")
        return backbone_from_config(backbone, in_chans=self.in_chans)

    def _build_conceptizer(self, cfg: dict[str, Any], backbone: dict[str, Any] | str | None) -> nn.Module:
        kind = cfg.get("type", "auto")
        if kind == "auto":
            kind = "input" if self.tabular else "cnn_ae"
        k = int(cfg.get("n_concepts", 5))
        if kind == "input":
            return InputConceptizer(math.prod(self.input_shape), add_bias=bool(cfg.get("add_bias", True)))
        if kind == "cnn_ae":
            if self.tabular:
                raise ValueError(
                    "conceptizer 'cnn_ae' needs image inputs; use 'mlp_ae' or 'input' for tables"
                )
            return ConvAutoencoderConceptizer(
                self.in_chans, self.input_shape[1:], k, decoder=cfg.get("decoder", True)
            )
        if kind == "mlp_ae":
            return MLPAutoencoderConceptizer(
                self.input_shape, k, hidden=cfg.get("hidden", (64, 32)), decoder=cfg.get("decoder", True)
            )
        if kind == "backbone":
            trunk = self._trunk(backbone)
            return BackboneConceptizer(trunk, trunk.out_channels, k)
        raise ValueError(
            f"unknown conceptizer type {kind!r}{did_you_mean(kind, CONCEPTIZER_TYPES)}; choose from {CONCEPTIZER_TYPES}"
        )

    def _build_parametrizer(self, cfg: dict[str, Any], backbone: dict[str, Any] | str | None) -> nn.Module:
        kind = cfg.get("type", "auto")
        if kind == "auto":
            kind = "mlp" if self.tabular else "lenet"
        k, c = self.n_concepts, 1 if self.single_logit_binary else self.num_classes
        out_act = cfg.get("out_act", "tanh")
        if kind == "mlp":
            return MLPParametrizer(
                math.prod(self.input_shape),
                k,
                c,
                hidden=cfg.get("hidden", (64, 64)),
                act=cfg.get("act", "tanh"),
                dropout=float(cfg.get("dropout", 0.0)),
                out_act=out_act,
            )
        if kind == "lenet":
            if self.tabular:
                raise ValueError("parametrizer 'lenet' needs image inputs; use 'mlp' for tables")
            return ConvParametrizer(
                self.in_chans, self.input_shape[1:], k, c, float(cfg.get("dropout", 0.5)), out_act
            )
        if kind == "backbone":
            trunk = self._trunk(backbone)
            return BackboneParametrizer(
                trunk, trunk.out_channels, k, c, float(cfg.get("dropout", 0.0)), out_act
            )
        raise ValueError(
            f"unknown parametrizer type {kind!r}{did_you_mean(kind, PARAMETRIZER_TYPES)}; choose from {PARAMETRIZER_TYPES}"
        )

    # -- properties ------------------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        """theta's feature extractor (what the paper swaps between LeNet, VGG, ...); not a copy."""
        return self.parametrizer.backbone

    @property
    def uses_input_concepts(self) -> bool:
        return isinstance(self.conceptizer, InputConceptizer)

    def input_scale(self) -> torch.Tensor | None:
        """``dx / dz`` of the normalisation ``z = (x - mean) / std`` (``std`` shaped like one input)."""
        if not isinstance(self.normalize, InputNormalize):
            return None
        std = self.normalize.std
        if self.tabular:
            return std
        return std.view(-1, *([1] * (len(self.input_shape) - 1)))

    def train(self, mode: bool = True) -> SENN:
        super().train(mode)
        if self.batchnorm == "frozen":
            # Running statistics in training too: every sample is normalised on its own.
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward ---------------------------------------------------------------------------------
    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[1:]) == self.input_shape:
            return
        if self.tabular:
            raise ValueError(f"expected tabular input (B, {self.input_shape[0]}), got shape {tuple(x.shape)}")
        hint = " (add a batch dimension: x.unsqueeze(0))" if tuple(x.shape) == self.input_shape else ""
        raise ValueError(
            f"expected images (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}{hint}"
        )

    def forward(self, x: torch.Tensor) -> SENNOutput:
        self._check_input(x)
        z = self.normalize(x)
        concepts, recon = self.conceptizer(z)
        theta = self.parametrizer(z)
        if self.single_logit_binary:
            theta = torch.cat([-0.5 * theta, 0.5 * theta], dim=2)
        logits = self.aggregator(concepts, theta)
        return SENNOutput(
            logits=logits,
            concepts=concepts,
            relevances=theta,
            reconstruction=recon,
            reconstruction_target=z if recon is not None else None,
        )

    @torch.no_grad()
    def explain(self, x: torch.Tensor) -> SENNExplanation:
        """Prediction and explanation of ``x`` (eval mode is the caller's choice).

        Returns ``prediction`` ``(B,)``, ``probabilities`` ``(B, C)``, ``concepts`` ``(B, k)``,
        ``relevances`` ``(B, k, C)``, ``relevance`` ``(B, k)`` = theta for the predicted class and
        ``contributions`` ``(B, k)`` = ``relevance * concepts`` (they sum to the predicted logit), as a
        :class:`models.explain.SENNExplanation` (also indexable by these names, like a dict).
        """
        out = self(x)
        pred = out.logits.argmax(1)
        rel = out.relevances.gather(2, pred[:, None, None].expand(-1, out.relevances.shape[1], 1)).squeeze(2)
        return SENNExplanation(
            prediction=pred,
            probabilities=out.logits.softmax(1),
            concepts=out.concepts,
            relevances=out.relevances,
            relevance=rel,
            contributions=rel * out.concepts,
            concept_names=self.concept_names(),
        )

    def concept_names(self, feature_names: Sequence[str] | None = None) -> list[str]:
        """Readable concept names: feature names (+ ``bias``) for input concepts, else ``concept i``."""
        if self.uses_input_concepts:
            d = self.conceptizer.num_inputs
            names = (
                list(feature_names)
                if feature_names is not None and len(feature_names) == d
                else [f"x{i}" for i in range(d)]
            )
            return names + (["bias"] if self.conceptizer.add_bias else [])
        return [f"concept {i}" for i in range(self.n_concepts)]


register_model("senn_lenet", "senn", conceptizer={"type": "cnn_ae"}, parametrizer={"type": "lenet"})
register_model("senn_mlp", "senn", conceptizer={"type": "input"}, parametrizer={"type": "mlp"})
for _bb in list_backbones():
    register_model(f"senn_{_bb}", "senn", backbone={"name": _bb}, parametrizer={"type": "backbone"})


# ================================================================================================
# LightningModule
# ================================================================================================
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
        arch, model_args, backbone, data_info, optimizer, scheduler, monitor, monitor_mode,
            channels_last, compile: see :class:`models.lit_base.InterpModule`; ``arch`` must build a
            :class:`SENN`.
        robustness_lambda: weight of the robustness loss (0 disables it in training).
        penalty_target: ``logits`` (0 for a model linear in its concepts) or ``log_probs`` (the
            reference code's choice).
        penalty_reduction: ``mean`` | ``rms`` | ``batch_fro``, see
            :func:`layers.senn.robustness_loss` (``batch_fro`` is the reference's, it scales with
            sqrt(batch)).
        penalty_method: ``stopgrad`` (C vector-Jacobian products) or ``jacobian`` (the full C + k).
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
    """

    def __init__(
        self,
        arch: str = "senn",
        model_args: dict[str, Any] | None = None,
        backbone: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        monitor: str = "val/acc",
        monitor_mode: str = "max",
        channels_last: bool = False,
        compile: bool = False,
        robustness_lambda: float = 1e-4,
        penalty_target: str = "logits",
        penalty_reduction: str = "mean",
        penalty_method: str = "stopgrad",
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
    ) -> None:
        if penalty_target not in PENALTY_TARGETS:
            raise ValueError(f"penalty_target must be one of {PENALTY_TARGETS}, got {penalty_target!r}")
        if penalty_reduction not in PENALTY_REDUCTIONS or penalty_reduction == "none":
            raise ValueError(
                f"penalty_reduction must be one of mean|rms|batch_fro, got {penalty_reduction!r}"
            )
        if penalty_method not in PENALTY_METHODS:
            raise ValueError(f"penalty_method must be one of {PENALTY_METHODS}, got {penalty_method!r}")
        if penalty_space not in ("normalized", "raw"):
            raise ValueError(f"penalty_space must be 'normalized' or 'raw', got {penalty_space!r}")
        if faithfulness_relevance not in ("theta", "contribution"):
            raise ValueError(
                f"faithfulness_relevance must be 'theta' or 'contribution', got {faithfulness_relevance!r}"
            )
        if robustness_lambda < 0:
            raise ValueError(f"robustness_lambda must be >= 0, got {robustness_lambda}")
        if compile and robustness_lambda > 0:
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
        super().__init__(
            arch=arch,
            model_args=model_args,
            backbone=backbone,
            data_info=data_info,
            optimizer=optimizer,
            scheduler=scheduler,
            monitor=monitor,
            monitor_mode=monitor_mode,
            channels_last=channels_last,
            compile=compile,
        )
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
                    "faithfulness": MeanScore(),
                    "faithfulness_median": MeanScore(),
                    "faithfulness_input": MeanScore(),
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

    # -- losses ----------------------------------------------------------------------------------
    def robustness_penalty(self, x: torch.Tensor, out: SENNOutput, create_graph: bool = True) -> torch.Tensor:
        """The configured robustness loss of ``out = net(x)`` (``x`` required grad before the forward)."""
        assert_per_sample(self.net.conceptizer, self.net.parametrizer)
        scale = self.net.input_scale() if self.hparams.penalty_space == "normalized" else None
        return robustness_loss(
            x,
            out.concepts,
            out.relevances,
            out.logits,
            target=self.hparams.penalty_target,
            reduction=self.hparams.penalty_reduction,
            input_scale=scale,
            method=self.hparams.penalty_method,
            create_graph=create_graph,
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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if self.hparams.robustness_lambda > 0:
            key = "image" if "image" in batch else "features"
            # A fresh leaf: the penalty differentiates w.r.t. the input.
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
            m["faithfulness"].update(concept_faithfulness_scores(h, theta, relevance=rel))
            logged.append("faithfulness")
            if self._concept_medians is not None:
                medians = self._concept_medians.to(h)
                m["faithfulness_median"].update(concept_faithfulness_scores(h, theta, medians, relevance=rel))
                logged.append("faithfulness_median")
            x = batch_input(batch)
            if (
                self.net.uses_input_concepts
                and self._input_medians is not None
                and x[0].numel() <= self.hparams.input_faithfulness_max_features
            ):
                m["faithfulness_input"].update(
                    input_faithfulness_scores(self.net, x, self._input_medians, out)
                )
                logged.append("faithfulness_input")
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
        ds = getattr(dm, "push_set", None) if dm is not None else None
        if ds is None and dm is not None:
            ds = getattr(dm, "train_set", None)
        if ds is None or len(ds) == 0 or not self.hparams.faithfulness:
            return
        idx = fixed_subset_indices(len(ds), self.hparams.median_samples, seed=0)
        loader = DataLoader(Subset(ds, idx), batch_size=256, shuffle=False, collate_fn=default_collate)
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

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._log_lipschitz("val")

    def on_test_epoch_end(self) -> None:
        self._log_lipschitz("test")

    # -- report ----------------------------------------------------------------------------------
    def write_report(self, out_dir: Path, datamodule: pl.LightningDataModule) -> list[Path]:
        from interpzoo.metrics.senn_reports import (
            concept_prototypes_figure,
            reconstruction_figure,
            relevance_figure,
        )

        paths = super().write_report(out_dir, datamodule)
        paths.append(
            relevance_figure(self, datamodule, out_dir / "senn_relevances.png", self.report_cfg["samples"])
        )
        if not self.net.uses_input_concepts:
            paths.append(
                concept_prototypes_figure(
                    self, datamodule, out_dir / "senn_concept_prototypes.png", self.report_cfg["top_k"]
                )
            )
        if getattr(self.net.conceptizer, "has_decoder", False):
            paths.append(reconstruction_figure(self, datamodule, out_dir / "senn_reconstructions.png"))
        return paths
