"""Concept whitening networks (Chen, Bei & Rudin, "Concept whitening for interpretable image recognition",
*Nature Machine Intelligence* 2020).

* :func:`replace_batchnorm` turns any CNN with BatchNorms into a concept-whitened one, by dotted
  module names or by the paper's layer indices (``--whitened_layers`` of the reference code),
  starting from the BatchNorm's statistics when it has been trained;
* :class:`ConceptWhiteningNet` (architecture ``cw``, names ``cw_<backbone>``) is a BN backbone with
  one (or more) BatchNorm replaced, global pooling and a linear classifier; its output carries the
  concept axis scores;
* :func:`concept_forward` runs one concept batch (eval mode, no gradients) through a network, stopping
  after the last concept-whitening layer (:func:`forward_until`, the one early-stop helper).

The training procedure (alignment schedule, concept metrics) is
:class:`interpzoo.models.lit_concept_whitening.ConceptWhiteningModule`; the DDP plugin is
:class:`interpzoo.ddp.SyncBatchNormAndConceptWhitening`; the report figures are in
:mod:`interpzoo.reports.concept_whitening`.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from interpzoo.layers.concept_whitening import (
    ConceptWhitening2d,
    concept_whitening_layers,
    pool_axes,
)
from interpzoo.models.backbones import list_backbones
from interpzoo.models.explain import ConceptWhiteningExplanation, explain_concept_whitening
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import get_submodule, set_submodule
from interpzoo.models.trunk import TrunkNet

__all__ = [
    "ConceptWhiteningNet",
    "ConceptWhiteningOutput",
    "concept_forward",
    "forward_until",
    "paper_layer_names",
    "precise_whitening_statistics",
    "replace_batchnorm",
    "resolve_layers",
]

_RESNET_BN1 = re.compile(r"(^|\.)layer[1-4]\.\d+\.bn1$")
_DENSENET_ORDER = ("norm0", "transition1.norm", "transition2.norm", "transition3.norm", "norm5")

# Default whitened layer per backbone: the reference scripts' choice (their --whitened_layers) where one
# exists, otherwise a deep block that still has >= 3x3 maps at the backbone's usual input size.
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
    """Dotted names of the layers the paper's indices ``1, 2, ...`` refer to (``--whitened_layers``).

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
    """Raised by :func:`forward_until`'s hook to end a forward pass early."""


def forward_until(
    net: nn.Module, layer: nn.Module | str, x: torch.Tensor, capture: str | None = "output"
) -> torch.Tensor | None:
    """Run ``net(x)`` only up to ``layer`` (a submodule or its dotted name) and stop there.

    The single early-stop helper: :func:`concept_forward` uses it to stop after the last whitening layer,
    the concept metrics and report figures to read a layer without running the rest of the network.

    Args:
        net: any ``nn.Module``.
        layer: a submodule of ``net``, or its dotted name.
        x: the input of ``net``.
        capture: ``"output"`` (the layer's output), ``"input"`` (its first input, the pass stops before
            the layer runs) or ``None`` (nothing: the pass only runs the layer for its side effects).

    Returns:
        the captured tensor (e.g. ``(B, C, H, W)`` for a convolutional layer), or ``None``.
    """
    if capture not in ("output", "input", None):
        raise ValueError(f"capture must be 'output', 'input' or None, got {capture!r}")
    module = get_submodule(net, layer) if isinstance(layer, str) else layer
    captured: dict[str, torch.Tensor] = {}
    if capture == "input":

        def pre_hook(_module: nn.Module, inputs: Any) -> None:
            captured["t"] = inputs[0]
            raise _StopForward

        handle = module.register_forward_pre_hook(pre_hook)
    else:

        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            if capture == "output":
                captured["t"] = output
            raise _StopForward

        handle = module.register_forward_hook(hook)
    try:
        net(x)
    except _StopForward:
        pass
    finally:
        handle.remove()
    if capture is not None and "t" not in captured:
        raise RuntimeError(
            f"{type(module).__name__} did not run in the forward pass of {type(net).__name__}: "
            f"pass a layer that net(x) calls"
        )
    return captured.get("t")


@torch.no_grad()
@torch.no_grad()
def precise_whitening_statistics(net: nn.Module, batches: Callable[[], Iterable[torch.Tensor]]) -> int:
    """Re-estimate every concept-whitening layer's running mean and ``W`` on the population of ``batches``.

    The whitening analogue of precise BatchNorm (Wu & Johnson 2021; see
    :meth:`~layers.concept_whitening.ConceptWhitening2d.population_statistics`): in eval mode, layer by
    layer in network order (each later layer sees its input through the already re-estimated earlier ones),
    ``batches()`` is iterated once per layer and the pass stops after that layer. The rotation is untouched.
    Under DDP the synced layers sum the moments over ranks (every rank must yield the same number of batches).

    Args:
        net: a network with concept-whitening layers.
        batches: returns a fresh iterable of input batches ``(B, in_chans, H, W)`` on the network's device.

    Returns:
        the number of images seen per layer.
    """
    layers = list(concept_whitening_layers(net).values())
    if not layers:
        raise ValueError(f"{type(net).__name__} has no concept-whitening layer; use replace_batchnorm first")
    was_training = net.training
    net.eval()
    seen = 0
    try:
        for layer in layers:
            seen = 0
            with layer.population_statistics():
                for x in batches():
                    forward_until(net, layer, x, capture=None)
                    seen += int(x.shape[0])
    finally:
        net.train(was_training)
    return seen


def concept_forward(
    net: nn.Module, x: torch.Tensor, axis: int, stop_early: bool = True, negative: bool = False
) -> None:
    """Accumulate the alignment gradient of concept ``axis`` from the images ``x`` (the gradient of paper
    Eq. 3 that the rotation update follows).

    ``negative=True``: ``x`` are images *without* the concept (contrastive alignment; the layers must have
    ``alignment="contrastive"``); their gradient is subtracted at the update.

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
            stack.enter_context(layer.concept_mode(axis, negative=negative))
        if stop_early:
            forward_until(net, layers[-1], x, capture=None)
        else:
            net(x)


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
class ConceptWhiteningNet(TrunkNet):
    """BN backbone with concept whitening in place of BatchNorm(s), global pooling, linear classifier
    (a :class:`~interpzoo.models.trunk.TrunkNet`).

    Args:
        num_classes: classes.
        in_chans, mean, std: input channels and normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18", "pretrained": ...}``); see
            :func:`models.backbones.build_backbone`. With ``pretrained`` weights the whitening starts from
            the trained BatchNorm statistics.
        concepts: concept names of axes ``0..K-1``.
        whitened_layers: names inside the trunk (torchvision paths such as ``layer3.0.bn1``) or the
            paper's indices; ``None``: :data:`DEFAULT_LAYERS` of the backbone.
        T, momentum, activation_mode, grad_mode, rot_dtype, affine, guard, solver: layer options
            (:class:`~layers.concept_whitening.ConceptWhitening2d`).
        alignment: ``paper`` (Eq. 3, the default: bundles saved before the option load unchanged) or
            ``contrastive`` (axes aligned with the difference between images with and without the concept;
            training then needs negative concept batches).
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
        alignment: str = "paper",
        solver: str = "auto",
    ) -> None:
        super().__init__(num_classes, in_chans, mean, std, backbone)
        layers = (
            whitened_layers if whitened_layers is not None else DEFAULT_LAYERS.get(self.backbone.name, [])
        )
        self.concepts = [str(c) for c in concepts]
        self.activation_mode = activation_mode
        self.alignment = alignment
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
            alignment=alignment,
            solver=solver,
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(self.backbone.out_channels, num_classes)

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
        captured: dict[str, torch.Tensor] = {}

        def keep(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
            # A copy: the trunk may apply an in-place ReLU to the layer's output right after it (torchvision's
            # BasicBlock does after bn1), and the axes are the layer's output, not its rectified version.
            captured["z"] = output.clone()

        handle = self.cw_layer.register_forward_hook(keep)
        try:
            feats = self.features(x)  # checks x
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
    def concept_forward(self, x: torch.Tensor, axis: int, negative: bool = False) -> None:
        """One concept batch for axis ``axis`` (see :func:`concept_forward`); put the net in eval mode first.

        ``x`` ``(B, in_chans, H, W)`` in ``[0, 1]`` is checked by :meth:`forward`, which this runs;
        ``negative``: images without the concept (contrastive alignment)."""
        concept_forward(self, x, axis, negative=negative)

    @torch.no_grad()
    def update_rotation(self, **cayley: Any) -> list[float]:
        """:meth:`ConceptWhitening2d.update_rotation_matrix` of every whitening layer; returns the step sizes."""
        return [layer.update_rotation_matrix(**cayley) for layer in self.cw_layers().values()]


for _bb in list_backbones():
    register_model(f"cw_{_bb}", "cw", backbone={"name": _bb}, whitened_layers=DEFAULT_LAYERS[_bb])
