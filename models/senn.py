"""Self-explaining neural networks (SENN) for images and tables.

Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with Self-Explaining Neural Networks",
NeurIPS 2018, Sec. 3. The network predicts ``logits_c = sum_i theta_ic(x) h_i(x)``
(sum aggregator) and returns the concepts ``h(x)`` ``(B, k)`` and relevances ``theta(x)``
``(B, k, C)`` with the logits: the pair is the explanation. Training adds the robustness loss
``lambda * || grad_x f - theta^T J_x h ||`` (computed with ``C`` vector-Jacobian products, see
:func:`layers.senn.robustness_residual`), and for learned concepts a reconstruction loss and an L1
sparsity penalty; that is :class:`interpzoo.models.lit_senn.SENNModule`, whose report figures are drawn by
:mod:`interpzoo.reports.senn`.

Registered names: ``senn`` (the architecture; conceptizer and parametrizer chosen by config, "auto"
picks the paper's choice for the input kind), ``senn_lenet`` (conv autoencoder concepts, LeNet
theta: the paper's MNIST model), ``senn_mlp`` (input features as concepts, MLP theta: the paper's
UCI/COMPAS model) and ``senn_<backbone>`` (conv autoencoder concepts, theta on a backbone trunk).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interpzoo.layers.normalize import InputNormalize
from interpzoo.layers.senn import (
    BackboneConceptizer,
    BackboneParametrizer,
    ConvAutoencoderConceptizer,
    ConvParametrizer,
    InputConceptizer,
    MLPAutoencoderConceptizer,
    MLPParametrizer,
    SumAggregator,
)
from interpzoo.models.backbones import backbone_from_config, list_backbones
from interpzoo.models.explain import SENNExplanation
from interpzoo.models.input_checks import check_image_input, check_tabular_input
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import find_modules, replace_modules
from interpzoo.utils import did_you_mean


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
    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem and its fix unless ``x`` is a finite float
        ``(B, F)`` table, or a ``(B, *input_shape)`` image batch in about ``[0, 1]``
        (:mod:`interpzoo.models.input_checks`)."""
        if self.tabular:
            check_tabular_input(x, self.input_shape[0])
            return
        if tuple(x.shape[1:]) != self.input_shape:
            if x.dim() == 4 and x.shape[1] != self.in_chans:  # channel messages (channels-last hint)
                check_image_input(x, self.in_chans, max_value=None)
            hint = " (add a batch dimension: x.unsqueeze(0))" if tuple(x.shape) == self.input_shape else ""
            raise ValueError(
                f"expected images (B, {', '.join(map(str, self.input_shape))}), got {tuple(x.shape)}{hint}; "
                f"this SENN was built for image_size={list(self.input_shape[1:])}: resize the images or "
                f"build it for their size"
            )
        check_image_input(x, self.in_chans)

    def forward(self, x: torch.Tensor, concept_input_grad: bool = True) -> SENNOutput:
        """Logits, concepts and relevances of ``x`` ``(B, C_in, H, W)`` or ``(B, F)``.

        ``concept_input_grad=False`` runs the conceptizer on the input detached from the autograd
        graph: same values and the same gradients w.r.t. every parameter, but no path from the
        concepts back to ``x``. That is all the ``stopgrad`` form of the robustness loss on the
        logits, ``|| grad_x f(x) - theta(x)^T J_x h(x) ||`` (Alvarez-Melis & Jaakkola 2018, Sec. 3),
        needs: it uses ``h(x)`` only as the vector of its vector-Jacobian products (see
        :func:`layers.senn.robustness_residual`), and this spares the backward pass the
        conceptizer's gradient w.r.t. ``x``. Leave it ``True`` for ``log_probs``, the ``jacobian`` method or any
        other use of ``J_x h``.
        """
        self.check_input(x)
        z = self.normalize(x)
        concepts, recon = self.conceptizer(z if concept_input_grad else z.detach())
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
