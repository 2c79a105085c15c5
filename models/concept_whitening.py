"""Concept whitening networks (Chen, Bei & Rudin, *Nature Machine Intelligence* 2020).

* :func:`replace_batchnorm` turns any CNN with BatchNorms into a concept-whitened one, by dotted
  module names or by the paper's layer indices (``--whitened_layers`` of the reference code,
  spec §1.5), starting from the BatchNorm's statistics when it has been trained;
* :class:`ConceptWhiteningNet` (architecture ``cw``, names ``cw_<backbone>``) is a BN backbone with
  one (or more) BatchNorm replaced, global pooling and a linear classifier; its output carries the
  concept axis scores;
* :func:`concept_forward` runs one concept batch (eval mode, no gradients) through a network, stopping
  after the last concept-whitening layer;
* :class:`ConceptWhiteningModule` is the LightningModule: every ``align_every`` batches one batch per
  concept, reduction across ranks, Cayley rotation update (spec §1.4 "Schedule"); concept purity
  metrics against the matched BN model (``shared/specs/metrics.md`` A.1); report figures;
* :class:`SyncBatchNormAndConceptWhitening` is a Lightning ``LayerSync`` plugin that converts
  BatchNorms to ``SyncBatchNorm`` *and* concept-whitening layers to their synced variant.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from interpzoo.layers.concept_whitening import (
    ConceptWhitening2d,
    SyncConceptWhitening2d,
    concept_whitening_layers,
    pool_axes,
)
from interpzoo.layers.normalize import InputNormalize
from interpzoo.models.backbones import backbone_from_config, list_backbones
from interpzoo.models.baseline import check_image_input
from interpzoo.models.explain import ConceptWhiteningExplanation, explain_concept_whitening
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.outputs import ClassifierOutput, NetworkOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import get_submodule, set_submodule

log = logging.getLogger(__name__)

__all__ = [
    "ConceptWhiteningModule",
    "ConceptWhiteningNet",
    "ConceptWhiteningOutput",
    "SyncBatchNormAndConceptWhitening",
    "concept_forward",
    "paper_layer_names",
    "replace_batchnorm",
    "resolve_layers",
]

_RESNET_BN1 = re.compile(r"(^|\.)layer[1-4]\.\d+\.bn1$")
_DENSENET_ORDER = ("norm0", "transition1.norm", "transition2.norm", "transition3.norm", "norm5")

# Default whitened layer per backbone: the reference scripts' choice (spec §1.5) where one exists,
# otherwise a deep block that still has >= 3x3 maps at the backbone's usual input size.
DEFAULT_LAYERS: dict[str, list[int | str]] = {
    "resnet18": [8],  # layer4.1.bn1 (Places365 / ISIC scripts)
    "resnet34": ["layer4.2.bn1"],
    "resnet50": [16],  # layer4.2.bn1
    "resnet18s": ["layer3.0.bn1"],  # paper index 5; 8x8 maps at 32 px (pool_max needs >= 3x3)
    "vgg11_bn": [8],
    "vgg16_bn": [13],
    "densenet121": [2],  # transition1.norm (the DenseNet-161 script's index)
}


# ---------------------------------------------------------------------------------------------
# Surgery
# ---------------------------------------------------------------------------------------------
def paper_layer_names(net: nn.Module) -> list[str]:
    """Dotted names of the layers the paper's indices ``1, 2, ...`` refer to (spec §1.5).

    * ResNets: ``bn1`` of every residual block in order (ResNet-18: ``layer1.0.bn1`` ...
      ``layer4.1.bn1`` = 1..8; ResNet-50: 1..16);
    * DenseNets: ``norm0``, ``transition1.norm``, ``transition2.norm``, ``transition3.norm``, ``norm5``;
    * anything else (VGG-BN): every ``BatchNorm2d`` in module order (VGG16-BN: 1..13 =
      ``features.1, 4, 8, ..., 41``).
    """
    names = [n for n, _ in net.named_modules() if n]
    resnet = [n for n in names if _RESNET_BN1.search(n)]
    if resnet:
        return resnet
    if any(n.endswith("denseblock1") for n in names):
        out = []
        for suffix in _DENSENET_ORDER:
            out += [n for n in names if n == suffix or n.endswith("." + suffix)]
        return out
    return [n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)]


def resolve_layers(net: nn.Module, layers: Sequence[int | str] | int | str) -> list[str]:
    """Dotted names for ``layers``: names as given, ints as the paper's 1-based indices."""
    if isinstance(layers, int | str):
        layers = [layers]
    if not layers:
        raise ValueError(
            "no layer to whiten: pass dotted names (e.g. 'layer3.0.bn1') or paper indices (e.g. 8)"
        )
    paper: list[str] | None = None
    out: list[str] = []
    for item in layers:
        if isinstance(item, bool):
            raise TypeError(f"layer {item!r} is neither a module name nor a paper index")
        if isinstance(item, int):
            paper = paper if paper is not None else paper_layer_names(net)
            if not 1 <= item <= len(paper):
                raise ValueError(
                    f"paper layer index {item} is out of range: {type(net).__name__} has {len(paper)} "
                    f"whitening positions (1..{len(paper)}): {paper}"
                )
            out.append(paper[item - 1])
        else:
            get_submodule(net, str(item))  # did-you-mean error for typos
            out.append(str(item))
    if len(set(out)) != len(out):
        raise ValueError(f"layer listed twice: {out}")
    return out


def replace_batchnorm(
    net: nn.Module,
    layers: Sequence[int | str] | int | str,
    concepts: Sequence[str] | None = None,
    init_stats: bool | None = None,
    **cw_kwargs: Any,
) -> nn.Module:
    """Replace BatchNorms of ``net`` by :class:`~layers.concept_whitening.ConceptWhitening2d` (in place).

    >>> net = torchvision.models.resnet18()
    >>> replace_batchnorm(net, ["layer3.0.bn1"], concepts=["airplane", "bed", "person"])
    >>> replace_batchnorm(torchvision.models.vgg16_bn(), [13])  # the paper's VGG16-BN layer 13

    Args:
        net: any ``nn.Module``.
        layers: dotted names, or the paper's 1-based layer indices (:func:`paper_layer_names`).
        concepts: concept names of axes ``0..K-1`` (stored on the layers).
        init_stats: copy the BatchNorm's running statistics (``None``: when it has been trained; see
            :meth:`ConceptWhitening2d.from_batchnorm`).
        **cw_kwargs: layer options (``T``, ``momentum``, ``activation_mode``, ``grad_mode``,
            ``rot_dtype``, ``affine``, ``guard``, ...).

    Returns:
        ``net`` itself. The paper and the reference README advise a single whitened layer: several
        layers are supported but have been reported to diverge (reference issues #11, #12).
    """
    names = resolve_layers(net, layers)
    for name in names:
        old = get_submodule(net, name)
        if isinstance(old, ConceptWhitening2d):
            raise ValueError(f"{name} is already a concept-whitening layer")
        if not isinstance(old, nn.modules.batchnorm._BatchNorm) or isinstance(
            old, nn.BatchNorm1d | nn.BatchNorm3d
        ):
            raise TypeError(
                f"{name} is a {type(old).__name__}, not a BatchNorm2d; concept whitening replaces BatchNorm2d layers"
            )
        set_submodule(
            net,
            name,
            ConceptWhitening2d.from_batchnorm(
                old, init_stats=init_stats, concept_names=concepts, **cw_kwargs
            ),
        )
    return net


class _StopForward(Exception):
    pass


def _raise_stop(module: nn.Module, inputs: Any, output: Any) -> None:
    raise _StopForward


@torch.no_grad()
def concept_forward(net: nn.Module, x: torch.Tensor, axis: int, stop_early: bool = True) -> None:
    """Accumulate the alignment gradient of concept ``axis`` from the images ``x`` (spec §1.4).

    Sets ``mode = axis`` on every concept-whitening layer of ``net``, runs ``net(x)`` without
    gradients and resets the mode. With ``stop_early`` the pass stops right after the last whitening
    layer (the rest of the network does not influence the gradient). Put ``net`` in eval mode first so
    the whitening uses the running statistics, as the reference procedure does.
    """
    layers = list(concept_whitening_layers(net).values())
    if not layers:
        raise ValueError(f"{type(net).__name__} has no concept-whitening layer; use replace_batchnorm first")
    with contextlib.ExitStack() as stack:
        for layer in layers:
            stack.enter_context(layer.concept_mode(axis))
        handle = layers[-1].register_forward_hook(_raise_stop) if stop_early else None
        try:
            net(x)
        except _StopForward:
            pass
        finally:
            if handle is not None:
                handle.remove()


# ---------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------
@dataclass
class ConceptWhiteningOutput(ClassifierOutput):
    """Output of :class:`ConceptWhiteningNet`.

    Attributes:
        logits: ``(B, num_classes)``.
        features: ``(B, C', H', W')`` trunk output.
        concept_activations: ``(B, K)`` score ``phi(z_j)`` of the ``K`` concept axes of the first
            whitening layer (``activation_mode`` pooling).
        whitened: ``(B, C, H, W)`` output ``z`` of the first whitening layer (all axes).
    """

    concept_activations: torch.Tensor | None = None
    whitened: torch.Tensor | None = None


@register_architecture("cw")
class ConceptWhiteningNet(nn.Module):
    """BN backbone with concept whitening in place of BatchNorm(s), global pooling, linear classifier.

    Args:
        num_classes: classes.
        in_chans, mean, std: input channels and normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18", "pretrained": ...}``); see
            :func:`models.backbones.build_backbone`. With ``pretrained`` weights the whitening starts from
            the trained BatchNorm statistics.
        concepts: concept names of axes ``0..K-1``.
        whitened_layers: names inside the trunk (torchvision paths such as ``layer3.0.bn1``) or the
            paper's indices; ``None``: :data:`DEFAULT_LAYERS` of the backbone.
        T, momentum, activation_mode, grad_mode, rot_dtype, affine, guard: layer options
            (:class:`~layers.concept_whitening.ConceptWhitening2d`).
        dropout: before the classifier.

    Shape:
        ``(B, in_chans, H, W)`` to :class:`ConceptWhiteningOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        concepts: Sequence[str] = (),
        whitened_layers: Sequence[int | str] | None = None,
        T: int = 10,
        momentum: float = 0.05,
        activation_mode: str = "pool_max",
        grad_mode: str = "exact",
        rot_dtype: str = "float32",
        affine: bool = False,
        guard: str = "fallback",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.normalize = InputNormalize(mean, std)
        self.backbone = backbone_from_config(backbone, in_chans=in_chans)
        layers = (
            whitened_layers if whitened_layers is not None else DEFAULT_LAYERS.get(self.backbone.name, [])
        )
        self.concepts = [str(c) for c in concepts]
        self.activation_mode = activation_mode
        self.whitened_names = resolve_layers(self.backbone.body, list(layers))
        replace_batchnorm(
            self.backbone.body,
            self.whitened_names,
            concepts=self.concepts,
            T=T,
            momentum=momentum,
            activation_mode=activation_mode,
            grad_mode=grad_mode,
            rot_dtype=rot_dtype,
            affine=affine,
            guard=guard,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)
        self.num_classes = num_classes
        self.in_chans = in_chans

    # -- access -------------------------------------------------------------------------------------
    def cw_layers(self) -> dict[str, ConceptWhitening2d]:
        """``{name in the trunk: layer}`` (looked up each time: DDP conversion swaps the objects)."""
        return {n: get_submodule(self.backbone.body, n) for n in self.whitened_names}

    @property
    def cw_layer(self) -> ConceptWhitening2d:
        """The first whitening layer (the one whose axes the outputs and metrics describe)."""
        return get_submodule(self.backbone.body, self.whitened_names[0])

    # -- forward ------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> ConceptWhiteningOutput:
        check_image_input(x, self.in_chans)
        captured: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            captured["z"] = output

        handle = self.cw_layer.register_forward_hook(keep)
        try:
            feats = self.backbone(self.normalize(x))
        finally:
            handle.remove()
        z = captured["z"]
        logits = self.classifier(self.dropout(self.pool(feats).flatten(1)))
        acts = pool_axes(z[:, : len(self.concepts)], self.activation_mode)
        return ConceptWhiteningOutput(logits=logits, features=feats, concept_activations=acts, whitened=z)

    def explain(self, x: torch.Tensor) -> ConceptWhiteningExplanation:
        """Concept-axis activations of the first whitened layer, by concept name (:mod:`models.explain`)."""
        return explain_concept_whitening(self, x)

    @torch.no_grad()
    def concept_forward(self, x: torch.Tensor, axis: int) -> None:
        """One concept batch for axis ``axis`` (see :func:`concept_forward`); put the net in eval mode first."""
        check_image_input(x, self.in_chans)
        concept_forward(self, x, axis)

    @torch.no_grad()
    def update_rotation(self, **cayley: Any) -> list[float]:
        """:meth:`ConceptWhitening2d.update_rotation_matrix` of every whitening layer; returns the step sizes."""
        return [layer.update_rotation_matrix(**cayley) for layer in self.cw_layers().values()]


for _bb in list_backbones():
    register_model(f"cw_{_bb}", "cw", backbone={"name": _bb}, whitened_layers=DEFAULT_LAYERS[_bb])


# ---------------------------------------------------------------------------------------------
# DDP: one LayerSync for BatchNorm and concept whitening
# ---------------------------------------------------------------------------------------------
class SyncBatchNormAndConceptWhitening(TorchSyncBatchNorm):
    """Lightning ``LayerSync``: ``SyncBatchNorm`` for BatchNorms and global statistics for concept whitening.

    Lightning allows one ``LayerSync``; this one subclasses its ``TorchSyncBatchNorm`` so it may be
    given together with ``Trainer(sync_batchnorm=True)`` and replaces it (ecosystem §4.8). ``apply``
    converts every :class:`~layers.concept_whitening.ConceptWhitening2d` to
    :class:`~layers.concept_whitening.SyncConceptWhitening2d` and, unless disabled, every BatchNorm to
    ``nn.SyncBatchNorm``; ``revert`` undoes both.

    Args:
        enabled: ``False`` makes the plugin a no-op (the config switch ``trainer.sync_batchnorm`` feeds it).
        batchnorm: convert ordinary BatchNorms too. ``None``: yes, except with the CPU ``gloo`` backend,
            where ``nn.SyncBatchNorm`` cannot run (they stay per-rank, with a warning); concept whitening
            is synced on every backend.
    """

    def __init__(self, enabled: bool = True, batchnorm: bool | None = None) -> None:
        self.enabled = bool(enabled)
        self.batchnorm = batchnorm

    def _convert_batchnorm(self) -> bool:
        if self.batchnorm is not None:
            return bool(self.batchnorm)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            warnings.warn(
                "SyncBatchNorm needs GPUs; on the CPU gloo backend ordinary BatchNorms stay per-rank "
                "(concept-whitening layers are synced)",
                stacklevel=2,
            )
            return False
        return True

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        if self._convert_batchnorm():
            model = super().apply(model)
        return SyncConceptWhitening2d.convert_sync(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        model = SyncConceptWhitening2d.revert(model)
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            model = super().revert(model)
        return model


# ---------------------------------------------------------------------------------------------
# The LightningModule
# ---------------------------------------------------------------------------------------------
_CAYLEY_KEYS = ("tau0", "c1", "c2", "max_tries", "outer_steps")


class ConceptWhiteningModule(ClassificationModule):
    """Fine-tunes a concept-whitened classifier; aligns the axes with concept batches (spec §1.4, §1.6).

    Every ``align_every`` training batches (before that batch's step, as the reference code): the
    network goes to eval mode, one batch of each concept's probe set runs without gradients (stopping
    after the whitening layer), the accumulated gradients are made equal on every rank, the rotation is
    updated and broadcast, and the network returns to train mode. Concept batches never touch the
    running statistics.

    Metrics (``shared/specs/metrics.md`` A.1), logged as ``val/...`` and ``test/...``:
    ``concept_auc/<concept>`` and ``concept_auc_mean`` (one-vs-all AUC of ``phi(z_j)`` on the held-out
    concept images), ``concept_auc_fold_std`` (mean over concepts of the std over 5 folds, the
    reference protocol), ``concept_auc_best_filter/<c>`` / ``concept_auc_cav/<c>`` and their means (the
    baselines on the matched BN model at the same layer), ``concept_similarity_offdiag``,
    ``whitening_offdiag_corr``, ``whitening_cov_error``, ``rotation_orthogonality_error``; at test also
    ``concept_importance/<c>`` (increase of the loss when axis ``j`` is permuted across the batch).

    Args:
        concepts: concept names, in axis order; ``None``: ``data_info["concept_names"]`` (the concept
            folders of an image-folder dataset).
        align_every: alignment period in training batches (reference: 30 on Places365, 20 on ISIC).
        concept_batch_size: images per concept batch and rank (``None``: the training batch size).
        cayley: ``tau0``, ``c1``, ``c2``, ``max_tries``, ``outer_steps`` of the rotation update.
        init_from: bundle folder or ``.ckpt`` of a trained BN model of the same backbone (``baseline``) to
            warm-start from (the paper's recipe); it is also the matched BN model of the baselines.
        concept_eval_samples: held-out concept images per concept for the metrics (fixed, seeded subset).
        eval_every_n_epochs: concept metrics every N validation epochs (always at test).
        baselines: compute the best-filter and CAV baselines (needs ``init_from`` or a pretrained backbone).
        permutation_importance: compute ``concept_importance/<c>`` at test.
        report_top_k, report_samples: report figure of the top-``k`` test images per axis out of the
            first ``report_samples`` test images.
        Other arguments: see :class:`~models.lit_base.InterpModule`.
    """

    def __init__(
        self,
        *args: Any,
        concepts: list[str] | None = None,
        align_every: int = 30,
        concept_batch_size: int | None = None,
        cayley: dict[str, Any] | None = None,
        init_from: str | None = None,
        concept_eval_samples: int = 200,
        eval_every_n_epochs: int = 1,
        baselines: bool = True,
        permutation_importance: bool = True,
        report_top_k: int = 8,
        report_samples: int = 512,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("arch", "cw")
        super().__init__(*args, **kwargs)
        from interpzoo.metrics.concept_whitening import (
            ConceptAUC,
            ConceptSimilarity,
            PermutationImportance,
            WhiteningCorrelation,
        )

        bad = sorted(set(cayley or {}) - set(_CAYLEY_KEYS))
        if bad:
            raise ValueError(f"unknown cayley option(s) {bad}; known: {list(_CAYLEY_KEYS)}")
        if align_every < 0:
            raise ValueError(f"align_every must be >= 0 (0 disables alignment), got {align_every}")
        self.concept_names = self.net.concepts
        k, c = len(self.concept_names), self.net.cw_layer.num_features
        for stage in ("val", "test"):
            setattr(self, f"{stage}_concept_auc", ConceptAUC(k))
            setattr(self, f"{stage}_concept_similarity", ConceptSimilarity(k, c))
            setattr(self, f"{stage}_whitening_corr", WhiteningCorrelation(c))
        self.test_permutation = PermutationImportance(k)
        self._concept_iters: list[Iterator[dict[str, Any]]] | None = None
        self._concept_samplers: list[Any] = []
        self._reference: list[nn.Module] = []  # matched BN model, kept out of the module tree
        self._baseline_cache: dict[str, float] | None = None

    # -- network ----------------------------------------------------------------------------------
    def net_arguments(self) -> tuple[str, dict[str, Any]]:
        arch, args = super().net_arguments()
        concepts = self.hparams.get("concepts")
        if concepts is None:
            concepts = self.data_info.get("concept_names")
        if concepts is None:
            raise ValueError(
                "concept whitening needs concept names: set model.concepts=[...] (PartShapes probe concepts such "
                "as has_red) or use a dataset with concept folders (data.concepts_train_dir)"
            )
        args["concepts"] = [str(c) for c in concepts]
        return arch, args

    def build_net(self) -> nn.Module:
        net = super().build_net()
        if not isinstance(net, ConceptWhiteningNet):
            raise TypeError(
                f"ConceptWhiteningModule needs arch=cw or cw_<backbone>, got {type(net).__name__}"
            )
        if len(net.concepts) > net.cw_layer.num_features:
            raise ValueError(
                f"{len(net.concepts)} concepts but the whitened layer has {net.cw_layer.num_features} axes"
            )
        return net

    # -- setup --------------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        dm = self.trainer.datamodule if self.trainer is not None else None
        if stage == "fit":
            if dm is not None:
                self._check_concept_sets(dm)
            if self.hparams.init_from and self.trainer.ckpt_path is None:
                self.warm_start(self.hparams.init_from)
        if self.hparams.baselines and not self._reference:
            ref = self._build_reference()
            if ref is not None:
                self._reference.append(ref)

    def _check_concept_sets(self, dm: Any) -> None:
        for split in ("train", "test"):
            available = list(dm.concept_datasets(split))
            missing = [c for c in self.concept_names if c not in available]
            if missing:
                raise ValueError(
                    f"concept(s) {missing} have no {split} probe set in {type(dm).__name__} (available: "
                    f"{available}). Choose model.concepts among them, or add the concepts to the data "
                    f"config (data.concepts=[...] for PartShapes, one folder per concept for image folders)."
                )

    def _source_net(self, source: str) -> nn.Module:
        from interpzoo.models.bundle import load_pretrained
        from interpzoo.models.checkpoint import load_checkpoint

        path = Path(source)
        net = load_checkpoint(path) if path.suffix == ".ckpt" else load_pretrained(source)
        return net.eval()

    @torch.no_grad()
    def warm_start(self, source: str) -> None:
        """Copy a trained BN model's weights; each whitening layer starts from its BatchNorm's statistics."""
        src = self._source_net(source)
        src_state = src.state_dict()
        own = self.net.state_dict()
        cw_prefixes = {f"backbone.body.{n}." for n in self.net.whitened_names}
        missing = [
            k
            for k in own
            if not any(k.startswith(p) for p in cw_prefixes)
            and (k not in src_state or src_state[k].shape != own[k].shape)
        ]
        if missing:
            raise ValueError(
                f"init_from={source} does not match this network ({len(missing)} tensors missing or of another "
                f"shape, e.g. {missing[:3]}): warm-start from a BN model of the same backbone and classes"
            )
        self.net.load_state_dict(
            {k: src_state[k] for k in own if k in src_state and src_state[k].shape == own[k].shape},
            strict=False,
        )
        for name, layer in self.net.cw_layers().items():
            bn = src.get_submodule(f"backbone.body.{name}")
            if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
                raise ValueError(
                    f"init_from={source}: backbone.body.{name} is a {type(bn).__name__}, not a BatchNorm"
                )
            layer.load_batchnorm_statistics(bn.running_mean, bn.running_var, bn.eps)
        self._reference = [src]
        log.info("warm-started concept whitening from %s", source)

    def _build_reference(self) -> nn.Module | None:
        """The matched BN model: ``init_from`` or, with a pretrained backbone, the same BN trunk."""
        if self.hparams.init_from:
            try:
                return self._source_net(self.hparams.init_from)
            except Exception as e:  # noqa: BLE001 - baselines are optional; say why they are missing
                warnings.warn(
                    f"no concept baselines: cannot load init_from={self.hparams.init_from} ({e})",
                    stacklevel=2,
                )
                return None
        _, args = self.net_arguments()
        if (args.get("backbone") or {}).get("pretrained"):
            from interpzoo.models.registry import build_architecture

            keep = ("num_classes", "in_chans", "mean", "std", "backbone")
            return build_architecture("baseline", {k: args[k] for k in keep if k in args}).eval()
        return None

    # -- concept batches ----------------------------------------------------------------------------
    def _concept_loaders(self) -> list[Iterator[dict[str, Any]]]:
        from torch.utils.data import DataLoader, DistributedSampler

        dm = self.trainer.datamodule
        sets = dm.concept_datasets("train")
        world, rank = self.trainer.world_size, self.trainer.global_rank
        bs = self.hparams.concept_batch_size or getattr(dm, "per_device_batch_size", None) or 32
        iters = []
        self._concept_samplers = []
        for j, name in enumerate(self.concept_names):
            # A DistributedSampler shards and shuffles on one rank as well; distinct seeds per concept.
            sampler = DistributedSampler(
                sets[name], num_replicas=world, rank=rank, shuffle=True, seed=1234 + j
            )
            loader = DataLoader(
                sets[name],
                batch_size=bs,
                sampler=sampler,
                num_workers=0,
                drop_last=len(sets[name]) >= bs * world,
            )
            self._concept_samplers.append(sampler)
            iters.append(_cycle(loader, sampler))
        return iters

    def _next_concept_batch(self, j: int) -> torch.Tensor:
        if self._concept_iters is None:
            self._concept_iters = self._concept_loaders()
        batch = next(self._concept_iters[j])
        return batch["image"].to(self.device)

    @torch.no_grad()
    def align_concepts(self) -> list[float]:
        """One alignment round: a batch per concept, reduce across ranks, rotate (spec §1.4)."""
        layers = self.net.cw_layers()
        was_training = self.net.training
        self.net.eval()
        try:
            for j in range(len(self.concept_names)):
                self.net.concept_forward(self._next_concept_batch(j), j)
            self._reduce_concept_gradients(layers)
            taus = self.net.update_rotation(**dict(self.hparams.cayley or {}))
            self._broadcast_rotations(layers)
        finally:
            for layer in layers.values():
                layer.mode = -1
            self.net.train(was_training)
        return taus

    def _distributed(self) -> bool:
        import torch.distributed as dist

        return (
            self.trainer is not None
            and self.trainer.world_size > 1
            and dist.is_available()
            and dist.is_initialized()
        )

    def _reduce_concept_gradients(self, layers: dict[str, ConceptWhitening2d]) -> None:
        # Synced layers already reduced their gradients; plain layers (DDP without the sync plugin) hold
        # per-rank averages of equal-sized batches, whose mean is the global one (sum_G is linear in them).
        if not self._distributed():
            return
        import torch.distributed as dist

        world = self.trainer.world_size
        for layer in layers.values():
            if isinstance(layer, SyncConceptWhitening2d):
                continue
            for t in (layer.sum_G, layer.counter):
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                t.div_(world)

    def _broadcast_rotations(self, layers: dict[str, ConceptWhitening2d]) -> None:
        if not self._distributed():
            return
        import torch.distributed as dist

        for layer in layers.values():
            if not isinstance(layer, SyncConceptWhitening2d):  # the synced layer broadcasts itself
                dist.broadcast(layer.running_rot, src=0)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        every = int(self.hparams.align_every)
        if every <= 0 or not self.concept_names or (batch_idx + 1) % every != 0:
            return
        taus = self.align_concepts()
        self.log("train/cw_tau", float(taus[0]), on_step=True, on_epoch=False, prog_bar=False)
        self.log(
            "train/rotation_orthogonality_error",
            self.net.cw_layer.rotation_orthogonality_error(),
            on_step=True,
            on_epoch=False,
        )

    # -- metrics ------------------------------------------------------------------------------------
    def update_eval_metrics(self, out: NetworkOutput, batch: dict[str, Any], stage: str) -> None:
        getattr(self, f"{stage}_whitening_corr").update(out.whitened.detach())
        if stage == "test" and self.hparams.permutation_importance and self.concept_names:
            self._update_permutation(out, batch)

    @torch.no_grad()
    def _update_permutation(self, out: ConceptWhiteningOutput, batch: dict[str, Any]) -> None:
        x, y = batch["image"], batch["label"]
        base = F.cross_entropy(out.logits, y, reduction="none")
        # Seed the permutation by the batch's sample indices: identical on reruns and independent of rank.
        seed = int(batch["index"].sum()) if "index" in batch else 0
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(x.shape[0], generator=g).to(x.device)
        losses, errors = [], []
        for j in range(len(self.concept_names)):
            handle = self.net.cw_layer.register_forward_hook(_permute_axis_hook(j, perm))
            try:
                logits = self.net(x).logits
            finally:
                handle.remove()
            losses.append(F.cross_entropy(logits, y, reduction="none"))
            errors.append((logits.argmax(1) != y).float())
        self.test_permutation.update(
            base, (out.logits.argmax(1) != y).float(), torch.stack(losses, 1), torch.stack(errors, 1)
        )

    def _concept_eval_sets(self) -> list[Any]:
        from torch.utils.data import Subset

        sets = self.trainer.datamodule.concept_datasets("test")
        out = []
        for j, name in enumerate(self.concept_names):
            ds = sets[name]
            n = min(len(ds), int(self.hparams.concept_eval_samples))
            idx = (
                torch.randperm(len(ds), generator=torch.Generator().manual_seed(10_000 + j))[:n]
                .sort()
                .values.tolist()
            )
            out.append(Subset(ds, idx))
        return out

    def _concept_eval_loader(self, rank_shard: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images, concept labels)`` batches of the fixed held-out concept subset (a shard per rank)."""
        from torch.utils.data import DataLoader, Subset

        world, rank = (self.trainer.world_size, self.trainer.global_rank) if rank_shard else (1, 0)
        limit = 1 if self.trainer.fast_dev_run else None
        bs = getattr(self.trainer.datamodule, "per_device_batch_size", 64)
        for j, ds in enumerate(self._concept_eval_sets()):
            shard = Subset(ds, list(range(rank, len(ds), world)))
            for i, batch in enumerate(DataLoader(shard, batch_size=bs, shuffle=False, num_workers=0)):
                if limit is not None and i >= limit:
                    break
                x = batch["image"].to(self.device)
                yield x, torch.full((x.shape[0],), j, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def _concept_metrics(self, stage: str) -> None:
        auc, sim = getattr(self, f"{stage}_concept_auc"), getattr(self, f"{stage}_concept_similarity")
        was_training = self.net.training
        self.net.eval()
        try:
            for x, labels in self._concept_eval_loader(rank_shard=True):
                out = self.net(x)
                auc.update(out.concept_activations, labels)
                sim.update(out.whitened.mean((2, 3)), labels)
        finally:
            self.net.train(was_training)
        result = auc.compute()  # all ranks: the states are all-gathered
        auc.reset()
        offdiag = sim.compute()["offdiag_mean"]
        sim.reset()
        values = {
            f"{stage}/concept_auc/{c}": float(result["auc"][j]) for j, c in enumerate(self.concept_names)
        }
        values[f"{stage}/concept_auc_mean"] = float(result["auc"].nanmean())
        values[f"{stage}/concept_auc_fold_std"] = float(result["fold_std"].nanmean())
        values[f"{stage}/concept_similarity_offdiag"] = float(offdiag)
        values.update({f"{stage}/{k}": v for k, v in self._baselines().items()})
        for k, v in values.items():
            self.log(k, v, sync_dist=True, rank_zero_only=False)

    @torch.no_grad()
    def _baselines(self) -> dict[str, float]:
        """Best single filter and linear probe (CAV) AUCs on the matched BN model (computed once)."""
        if self._baseline_cache is not None:
            return self._baseline_cache
        if not self._reference or not self.hparams.baselines:
            return {}
        from interpzoo.metrics.concept_whitening import best_filter_auc, linear_probe_auc

        ref = self._reference[0].to(self.device).eval()
        layer_name = f"backbone.body.{self.net.whitened_names[0]}"
        train_sets = self.trainer.datamodule.concept_datasets("train")

        def feats(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
            maps, labels = [], []
            for x, y in batches:
                maps.append(_layer_output(ref, layer_name, x).cpu())
                labels.append(y.cpu())
            return torch.cat(maps), torch.cat(labels)

        def train_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            from torch.utils.data import DataLoader, Subset

            for j, name in enumerate(self.concept_names):
                ds = train_sets[name]
                n = min(len(ds), int(self.hparams.concept_eval_samples))
                for i, batch in enumerate(DataLoader(Subset(ds, list(range(n))), batch_size=64)):
                    if self.trainer.fast_dev_run and i >= 1:
                        break
                    x = batch["image"].to(self.device)
                    yield x, torch.full((x.shape[0],), j, dtype=torch.long)

        # Every rank computes the same numbers from the full (small) sets: no collectives needed.
        test_maps, test_y = feats(self._concept_eval_loader(rank_shard=False))
        train_maps, train_y = feats(train_batches())
        mode = self.net.activation_mode
        k = len(self.concept_names)
        filt, _ = best_filter_auc(pool_axes(test_maps, mode), test_y, k)
        cav = linear_probe_auc(train_maps.mean((2, 3)), train_y, test_maps.mean((2, 3)), test_y, k)
        out: dict[str, float] = {}
        for j, c in enumerate(self.concept_names):
            out[f"concept_auc_best_filter/{c}"] = float(filt[j])
            out[f"concept_auc_cav/{c}"] = float(cav[j])
        out["concept_auc_mean_best_filter"] = float(filt.nanmean())
        out["concept_auc_mean_cav"] = float(cav.nanmean())
        self._baseline_cache = out
        return out

    def _log_layer_metrics(self, stage: str) -> None:
        corr = getattr(self, f"{stage}_whitening_corr")
        res = corr.compute()  # all ranks: sum-reduced states
        corr.reset()
        if torch.isfinite(res["offdiag_mean"]):
            self.log(f"{stage}/whitening_offdiag_corr", float(res["offdiag_mean"]), sync_dist=True)
            self.log(f"{stage}/whitening_cov_error", float(res["cov_error"]), sync_dist=True)
        self.log(
            f"{stage}/rotation_orthogonality_error",
            self.net.cw_layer.rotation_orthogonality_error(),
            sync_dist=True,
        )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            self.val_whitening_corr.reset()
            return
        self._log_layer_metrics("val")
        every = max(1, int(self.hparams.eval_every_n_epochs))
        if self.concept_names and (self.current_epoch + 1) % every == 0:
            self._concept_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_layer_metrics("test")
        if self.concept_names:
            self._concept_metrics("test")
            if self.hparams.permutation_importance:
                res = self.test_permutation.compute()
                for j, c in enumerate(self.concept_names):
                    self.log(f"test/concept_importance/{c}", float(res["loss_increase"][j]), sync_dist=True)
                    self.log(
                        f"test/concept_importance_acc/{c}", float(res["error_increase"][j]), sync_dist=True
                    )
                self.test_permutation.reset()

    # -- reports ------------------------------------------------------------------------------------
    def write_report(self, out_dir: Path, datamodule: pl.LightningDataModule) -> list[Path]:
        from interpzoo.metrics.concept_whitening import correlation_heatmap_figure, top_activating_figure

        figures = super().write_report(out_dir, datamodule)
        if not self.concept_names:
            return figures
        images, scores = [], []
        n = 0
        was_training = self.net.training
        self.net.eval()
        with torch.no_grad():
            for batch in datamodule.test_dataloader():
                x = batch["image"].to(self.device)
                scores.append(self.net(x).concept_activations.cpu())
                images.append(batch["image"])
                n += x.shape[0]
                if n >= self.hparams.report_samples:
                    break
            figures.append(
                top_activating_figure(
                    torch.cat(images),
                    torch.cat(scores),
                    self.concept_names,
                    out_dir / "cw_top_images.png",
                    k=self.hparams.report_top_k,
                )
            )
            x = torch.cat(images)[: min(n, 256)].to(self.device)
            cw_pix = _pixels(self.net(x).whitened)
            if self._reference:
                ref = self._reference[0].to(self.device).eval()
                bn_pix = _pixels(_layer_output(ref, f"backbone.body.{self.net.whitened_names[0]}", x))
                bn_title = "matched BN model"
            else:  # correlation is invariant to BatchNorm's per-channel affine map: its input shows the same
                bn_pix = _pixels(_layer_input(self.net, self.net.cw_layer, x))
                bn_title = "before whitening (this model)"
        self.net.train(was_training)
        figures.append(
            correlation_heatmap_figure(bn_pix, cw_pix, out_dir / "cw_correlation.png", left_title=bn_title)
        )
        return figures


def _cycle(loader: Any, sampler: Any) -> Iterator[dict[str, Any]]:
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def _permute_axis_hook(axis: int, perm: torch.Tensor) -> Any:
    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        out = output.clone()
        out[:, axis] = output[perm, axis]
        return out

    return hook


def _layer_output(net: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """Output of ``net``'s submodule ``name`` on ``x``, stopping the forward there."""
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        captured["out"] = output
        raise _StopForward

    handle = get_submodule(net, name).register_forward_hook(hook)
    try:
        net(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["out"]


def _layer_input(net: nn.Module, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: dict[str, torch.Tensor] = {}

    def hook(module: nn.Module, inputs: Any) -> None:
        captured["in"] = inputs[0]
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        net(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return captured["in"]


def _pixels(z: torch.Tensor) -> torch.Tensor:
    """``(B, C, H, W)`` to ``(B * H * W, C)`` per-pixel channel vectors (CPU, float64)."""
    return z.detach().permute(0, 2, 3, 1).reshape(-1, z.shape[1]).double().cpu()
