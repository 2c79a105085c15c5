"""Self-explaining neural networks (SENN): conceptizers, parametrizers, aggregator and losses.

Alvarez-Melis & Jaakkola, "Towards Robust Interpretability with Self-Explaining Neural Networks",
NeurIPS 2018; reference code dmelis/SENN. A SENN predicts with a linear model whose coefficients
depend on the input,

    f(x) = g(theta(x)_1 h(x)_1, ..., theta(x)_k h(x)_k),

where ``h`` (the *conceptizer*) maps the input to ``k`` scalar concepts, ``theta`` (the
*parametrizer*) gives their relevances, one per concept and class, and ``g`` (the *aggregator*) is
the sum in every experiment of the paper: ``logits_c = sum_i theta_ic(x) h_i(x)``. Training adds the
robustness loss of Section 3 of the paper,

    L_theta(f(x)) = || grad_x f(x) - theta(x)^T J_x h(x) ||,

which asks ``f`` to be locally linear in the concepts with coefficients ``theta``, plus, for learned
concepts, an autoencoder reconstruction loss and an L1 sparsity penalty on ``h``.

Shapes: concepts ``(B, k)``; relevances ``(B, k, C)``; logits ``(B, C)``. Every module here is pure
PyTorch (no Lightning, no Hydra) and works on already normalised inputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

PENALTY_TARGETS = ("logits", "log_probs")
PENALTY_REDUCTIONS = ("mean", "rms", "batch_fro", "none")
PENALTY_METHODS = ("stopgrad", "jacobian")
# Values of SENNModule's ``penalty_method``: the exact methods, plus the cheaper unbiased estimate
# :func:`subbatch_robustness_loss` (exact ``stopgrad`` penalty of a random part of the batch).
PENALTY_OPTIONS = (*PENALTY_METHODS, "subbatch")

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
    "none": nn.Identity,
}


def activation(name: str) -> nn.Module:
    """``tanh`` | ``sigmoid`` | ``relu`` | ``none`` as a module."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


def _as_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    size = tuple(int(s) for s in size)
    if len(size) != 2:
        raise ValueError(f"image_size must be an int or [H, W], got {list(size)}")
    return size  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------
# Input convolution with a cheap input gradient (the robustness loss's hot spot on CPU)
# ------------------------------------------------------------------------------------------------
class _ConvTransposeInput(torch.autograd.Function):
    """``dL/dx`` of ``y = conv2d(x, W, padding=p)`` (stride 1, no dilation) from ``g = dL/dy``.

    Forward: the transposed convolution written as a *depthwise* convolution of ``g`` with the
    flipped kernels, padding ``k - 1 - p``, summed over the ``C_out`` groups:
    ``dL/dx[b, c] = sum_o corr(pad(g[b, o]), flip(W[o, c]))``.
    Backward (the robustness loss's double backward), both as ordinary convolutions:
    ``d/dg = conv2d(u, W, padding=p)`` (the adjoint of a transposed convolution is the convolution) and
    ``d/dW[o, c] = sum_b corr(pad(u[b, c]), g[b, o])`` = ``conv2d(u^T, g^T, padding=p)^T`` (``u`` the
    upstream gradient ``(B, C_in, H, W)``, ``^T`` swapping batch and channels). Both are
    differentiable, so every higher derivative stays exact too.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        grad_y: torch.Tensor,
        weight: torch.Tensor,
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(grad_y, weight)
        ctx.padding = padding
        out_c, in_c, kh, kw = weight.shape
        flipped = weight.flip(-1, -2).reshape(out_c * in_c, 1, kh, kw)  # row o * C_in + c: W[o, c]
        pad = (kh - 1 - padding[0], kw - 1 - padding[1])
        maps = F.conv2d(grad_y, flipped, padding=pad, groups=out_c)  # (B, C_out * C_in, H, W)
        return maps.view(grad_y.shape[0], out_c, in_c, *maps.shape[-2:]).sum(1)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, upstream: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        grad_y, weight = ctx.saved_tensors
        d_grad_y = d_weight = None
        if ctx.needs_input_grad[0]:
            d_grad_y = F.conv2d(upstream, weight, padding=ctx.padding)
        if ctx.needs_input_grad[1]:
            d_weight = F.conv2d(upstream.transpose(0, 1), grad_y.transpose(0, 1), padding=ctx.padding)
            d_weight = d_weight.transpose(0, 1)
        return d_grad_y, d_weight, None


class _ConvInputGradient(torch.autograd.Function):
    """Identity on ``y = conv2d(x.detach(), W)`` whose backward adds ``dL/dx`` (:class:`_ConvTransposeInput`).

    ``W`` gets no gradient from this node: its first-order gradient comes from the native
    convolution that produced ``y``; its second-order one from the graph of ``dL/dx``.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        padding: tuple[int, int],
    ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.padding = padding
        return y.view_as(y)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, None, None]:
        grad_x = None
        if ctx.needs_input_grad[1]:
            (weight,) = ctx.saved_tensors
            grad_x = _ConvTransposeInput.apply(grad, weight, ctx.padding)
        return grad, grad_x, None, None


class InputConv2d(nn.Conv2d):
    """``nn.Conv2d`` for the *first* layer of a SENN network, with a faster gradient w.r.t. its input.

    Same parameters, state-dict keys and output as ``nn.Conv2d``; it differs only in how the gradient
    w.r.t. the input is computed, and only for a single-channel input that requires grad on the CPU.
    That is when the robustness loss (Alvarez-Melis & Jaakkola 2018, Sec. 3: ``L_theta = || grad_x
    f(x) - theta(x)^T J_x h(x) ||``) differentiates the network w.r.t. ``x``: each of its ``C``
    vector-Jacobian products ends in this layer's input gradient, and their double backward in its
    derivatives. oneDNN's backward kernels are slow here: for ``(64, 1, 32, 32)``, 10 maps, 5x5 on
    one core, backward-data takes ~4x the forward and the weight gradient of its double backward ~6x.
    So the weight and bias gradients of the prediction still come from the native convolution (of
    ``x.detach()``), which leaves the unpenalised step untouched, and the input gradient from
    :class:`_ConvTransposeInput` (a depthwise and two ordinary forward convolutions, the fast
    kernels). Value, first and second derivatives are those of the convolution, to float rounding.

    Elsewhere it is plain ``nn.Conv2d``: on CUDA (cuDNN has no such gap), for strides, dilation,
    groups or non-zero padding modes, and for ``C_in > 1`` (measured: oneDNN's grouped kernel with
    several outputs per group, which :class:`_ConvTransposeInput` would use, is slower than native).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (
            x.requires_grad
            and torch.is_grad_enabled()
            and x.device.type == "cpu"
            and x.dim() == 4
            and self.in_channels == 1
            and self.groups == 1
            and self.stride == (1, 1)
            and self.dilation == (1, 1)
            and self.padding_mode == "zeros"
            and isinstance(self.padding, tuple)
            and all(p < k for p, k in zip(self.padding, self.kernel_size))
        ):
            return super().forward(x)
        y = super().forward(x.detach())
        return _ConvInputGradient.apply(y, x, self.weight, self.padding)


# ------------------------------------------------------------------------------------------------
# Conceptizers h: (B, *input) -> concepts (B, k) [+ reconstruction (B, *input)]
# ------------------------------------------------------------------------------------------------
class Conceptizer(nn.Module):
    """Base of every conceptizer ``h``.

    ``forward(z)`` returns ``(concepts, reconstruction)``: concepts ``(B, k)`` and the decoder's
    reconstruction of ``z`` (same shape as ``z``) or ``None`` when there is no decoder.

    Attributes:
        n_concepts: ``k``.
        learnable: whether ``h`` has parameters (only then are reconstruction and sparsity losses
            meaningful).
    """

    n_concepts: int
    learnable: bool = True

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, concepts: torch.Tensor) -> torch.Tensor | None:
        return None

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.encode(z)
        return h, self.decode(h)


class InputConceptizer(Conceptizer):
    """The raw (normalised) input as concepts: ``h(x) = [vec(x), 1]`` (``input_conceptizer``).

    Used by the paper for the tabular (UCI, COMPAS) experiments. With ``add_bias`` a constant
    concept 1 is appended, so its relevance plays the role of the intercept: ``k = d + 1``.

    Args:
        num_inputs: ``d``, the number of input entries (features, or ``C * H * W`` pixels).
        add_bias: append the constant concept.

    Shape:
        ``(B, *input)`` with ``prod(input) == d`` to concepts ``(B, d [+ 1])``; no reconstruction.
    """

    learnable = False

    def __init__(self, num_inputs: int, add_bias: bool = True) -> None:
        super().__init__()
        self.num_inputs = int(num_inputs)
        self.add_bias = bool(add_bias)
        self.n_concepts = self.num_inputs + int(self.add_bias)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        h = z.flatten(1)
        if h.shape[1] != self.num_inputs:
            raise ValueError(f"InputConceptizer expects {self.num_inputs} input entries, got {h.shape[1]}")
        if self.add_bias:
            h = torch.cat([h, h.new_ones(h.shape[0], 1)], dim=1)
        return h

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, add_bias={self.add_bias}"


class ConvAutoencoderConceptizer(Conceptizer):
    """Convolutional autoencoder conceptizer (the reference ``image_cnn_conceptizer``).

    Encoder: conv(C_in -> 10, 5x5) -> max-pool 2 -> ReLU -> conv(10 -> k, 5x5) -> max-pool 2 -> ReLU,
    then a Linear(h' * w' -> 1) shared by the ``k`` channel maps gives one scalar per concept.
    Decoder: Linear(1 -> h' * w') per concept -> ConvT(k -> 16, 5, stride 2) -> ReLU -> ConvT(16 -> 8, 5)
    -> ReLU -> ConvT(8 -> C_in, 2, stride 2, padding 1), resized to the input size when the
    arithmetic does not land on it exactly (it does for 28 and 32 px).

    The decoder output is linear (the reference ends in tanh) because it reconstructs the
    *normalised* input, which is not confined to ``[-1, 1]``.

    Args:
        in_chans: input channels.
        image_size: ``int`` or ``[H, W]`` (at least 16 px per side).
        n_concepts: ``k``.
        decoder: build the decoder (reconstruction loss); without it the concepts are only
            constrained by the classification loss and sparsity.

    Shape:
        ``(B, C_in, H, W)`` to concepts ``(B, k)`` and reconstruction ``(B, C_in, H, W)``.
    """

    def __init__(
        self, in_chans: int, image_size: int | Sequence[int], n_concepts: int = 5, decoder: bool = True
    ) -> None:
        super().__init__()
        self.image_size = _as_pair(image_size)
        if min(self.image_size) < 16:
            raise ValueError(
                f"ConvAutoencoderConceptizer needs images of at least 16 px per side, got {list(self.image_size)}; "
                "upsample the data (e.g. data.image_size=32) or use conceptizer type 'mlp_ae'"
            )
        self.in_chans = in_chans
        self.n_concepts = int(n_concepts)
        self.encoder = nn.Sequential(
            InputConv2d(in_chans, 10, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, self.n_concepts, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
        )
        with torch.no_grad():
            self.code_hw = tuple(self.encoder(torch.zeros(1, in_chans, *self.image_size)).shape[-2:])
        area = self.code_hw[0] * self.code_hw[1]
        self.to_concept = nn.Linear(area, 1)  # shared by every concept channel, as in the reference
        self.has_decoder = bool(decoder)
        if self.has_decoder:
            self.from_concept = nn.Linear(1, area)
            self.decoder = nn.Sequential(
                nn.ConvTranspose2d(self.n_concepts, 16, 5, stride=2),
                nn.ReLU(),
                nn.ConvTranspose2d(16, 8, 5),
                nn.ReLU(),
                nn.ConvTranspose2d(8, in_chans, 2, stride=2, padding=1),
            )

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        maps = self.encoder(z)  # (B, k, h', w')
        return self.to_concept(maps.flatten(2)).squeeze(-1)

    def decode(self, concepts: torch.Tensor) -> torch.Tensor | None:
        if not self.has_decoder:
            return None
        maps = self.from_concept(concepts.unsqueeze(-1)).view(
            concepts.shape[0], self.n_concepts, *self.code_hw
        )
        out = self.decoder(maps)
        if tuple(out.shape[-2:]) != self.image_size:
            out = F.interpolate(out, size=self.image_size, mode="bilinear", align_corners=False)
        return out


def _mlp(sizes: Sequence[int], act: str, last_act: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2 or last_act:
            layers.append(activation(act))
    return nn.Sequential(*layers)


class MLPAutoencoderConceptizer(Conceptizer):
    """Fully connected autoencoder conceptizer (the reference ``image_fcc_conceptizer``, any input size).

    Args:
        input_shape: shape of one input, e.g. ``[F]`` or ``[C, H, W]``.
        n_concepts: ``k``.
        hidden: encoder hidden widths (the decoder mirrors them).
        decoder: build the decoder.

    Shape:
        ``(B, *input_shape)`` to concepts ``(B, k)`` and reconstruction ``(B, *input_shape)``.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        n_concepts: int = 5,
        hidden: Sequence[int] = (64, 32),
        decoder: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(int(s) for s in input_shape)
        d = math.prod(self.input_shape)
        self.n_concepts = int(n_concepts)
        self.encoder = _mlp([d, *hidden, self.n_concepts], "relu", last_act=False)
        self.has_decoder = bool(decoder)
        if self.has_decoder:
            self.decoder = _mlp([self.n_concepts, *reversed(list(hidden)), d], "relu", last_act=False)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return self.encoder(z.flatten(1))

    def decode(self, concepts: torch.Tensor) -> torch.Tensor | None:
        if not self.has_decoder:
            return None
        return self.decoder(concepts).view(concepts.shape[0], *self.input_shape)


class BackboneConceptizer(Conceptizer):
    """Concepts from any CNN trunk: trunk -> global average pool -> Linear(C -> k). No decoder.

    Args:
        trunk: a module mapping ``(B, C_in, H, W)`` to ``(B, C, H', W')`` (or ``(B, C)``).
        out_channels: ``C``.
        n_concepts: ``k``.

    Shape:
        ``(B, C_in, H, W)`` to concepts ``(B, k)``; no reconstruction.
    """

    def __init__(self, trunk: nn.Module, out_channels: int, n_concepts: int = 5) -> None:
        super().__init__()
        self.trunk = trunk
        self.n_concepts = int(n_concepts)
        self.to_concepts = nn.Linear(out_channels, self.n_concepts)

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        f = self.trunk(z)
        if f.dim() == 4:
            f = f.mean(dim=(2, 3))
        return self.to_concepts(f)


# ------------------------------------------------------------------------------------------------
# Parametrizers theta: (B, *input) -> relevances (B, k, C)
# ------------------------------------------------------------------------------------------------
class Parametrizer(nn.Module):
    """Base of every parametrizer ``theta``: ``backbone`` features -> dropout -> Linear -> ``out_act``.

    Attributes:
        backbone: the feature extractor (what the paper swaps between LeNet, VGG, ...).
        head: ``Linear(D, k * C)``.
        n_concepts, num_classes: ``k`` and ``C``.

    Shape:
        ``(B, *input)`` to relevances ``(B, k, C)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feat_dim: int,
        n_concepts: int,
        num_classes: int,
        dropout: float,
        out_act: str,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.n_concepts = int(n_concepts)
        self.num_classes = int(num_classes)
        # Dropout before the head, not on theta itself as the reference does: dropping relevances
        # would make the robustness penalty see a different linear model than the prediction.
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(feat_dim, self.n_concepts * self.num_classes)
        self.out_act = activation(out_act)

    def features(self, z: torch.Tensor) -> torch.Tensor:
        f = self.backbone(z)
        if f.dim() == 4:
            f = f.mean(dim=(2, 3))
        return f.flatten(1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        theta = self.out_act(self.head(self.dropout(self.features(z))))
        return theta.view(z.shape[0], self.n_concepts, self.num_classes)


class MLPParametrizer(Parametrizer):
    """Tabular parametrizer (the reference ``dfc_parametrizer``): tanh MLP -> Linear(k * C).

    Args:
        num_inputs: input entries ``d`` (inputs are flattened).
        n_concepts, num_classes: ``k`` and ``C``.
        hidden: hidden widths (COMPAS in the reference: ``(10, 10, 5)``).
        act: hidden activation.
        dropout: dropout before the head.
        out_act: ``tanh`` (theta in [-1, 1]), ``sigmoid`` (positive theta) or ``none``.
    """

    def __init__(
        self,
        num_inputs: int,
        n_concepts: int,
        num_classes: int,
        hidden: Sequence[int] = (64, 64),
        act: str = "tanh",
        dropout: float = 0.0,
        out_act: str = "tanh",
    ) -> None:
        hidden = list(hidden)
        body = (
            nn.Sequential(nn.Flatten(1), _mlp([num_inputs, *hidden], act, last_act=True))
            if hidden
            else nn.Flatten(1)
        )
        super().__init__(
            body, hidden[-1] if hidden else num_inputs, n_concepts, num_classes, dropout, out_act
        )


class ConvParametrizer(Parametrizer):
    """Small LeNet-style parametrizer (the reference ``image_parametrizer``).

    conv(C_in -> 10, 5) -> max-pool 2 -> ReLU -> conv(10 -> 20, 5) -> Dropout2d -> max-pool 2 -> ReLU ->
    flatten -> dropout -> Linear(k * C) -> ``out_act``.

    Args:
        in_chans: input channels.
        image_size: ``int`` or ``[H, W]`` (at least 16 px per side).
        n_concepts, num_classes: ``k`` and ``C``.
        dropout: channel dropout after the second conv and dropout before the head.
        out_act: ``tanh`` | ``sigmoid`` | ``none``.
    """

    def __init__(
        self,
        in_chans: int,
        image_size: int | Sequence[int],
        n_concepts: int,
        num_classes: int,
        dropout: float = 0.5,
        out_act: str = "tanh",
    ) -> None:
        size = _as_pair(image_size)
        if min(size) < 16:
            raise ValueError(
                f"ConvParametrizer needs images of at least 16 px per side, got {list(size)}; "
                "upsample the data (e.g. data.image_size=32) or use parametrizer type 'mlp'"
            )
        body = nn.Sequential(
            InputConv2d(in_chans, 10, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, 5),
            nn.Dropout2d(dropout),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(1),
        )
        with torch.no_grad():
            feat_dim = int(body(torch.zeros(1, in_chans, *size)).shape[1])
        super().__init__(body, feat_dim, n_concepts, num_classes, dropout, out_act)


class BackboneParametrizer(Parametrizer):
    """Parametrizer on any CNN trunk: trunk -> global average pool -> dropout -> Linear(k * C).

    Args:
        trunk: ``(B, C_in, H, W)`` to ``(B, C, H', W')``.
        out_channels: ``C`` of the trunk.
        n_concepts, num_classes, dropout, out_act: as :class:`Parametrizer`.
    """

    def __init__(
        self,
        trunk: nn.Module,
        out_channels: int,
        n_concepts: int,
        num_classes: int,
        dropout: float = 0.0,
        out_act: str = "tanh",
    ) -> None:
        super().__init__(trunk, out_channels, n_concepts, num_classes, dropout, out_act)


# ------------------------------------------------------------------------------------------------
# Aggregator g
# ------------------------------------------------------------------------------------------------
class SumAggregator(nn.Module):
    """``g`` = sum: ``logits_c = sum_i theta_ic h_i`` (the reference ``additive_scalar_aggregator``).

    Returns logits; the log-softmax of the reference is left to the loss.

    Shape:
        concepts ``(B, k)`` and relevances ``(B, k, C)`` to logits ``(B, C)``.
    """

    def forward(self, concepts: torch.Tensor, relevances: torch.Tensor) -> torch.Tensor:
        if relevances.dim() != 3 or concepts.shape != relevances.shape[:2]:
            raise ValueError(
                f"expected concepts (B, k) and relevances (B, k, C), got {tuple(concepts.shape)} and "
                f"{tuple(relevances.shape)}"
            )
        return torch.einsum("bk,bkc->bc", concepts, relevances)


# ------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------
class BatchCouplingError(ValueError):
    """A layer mixes samples, so per-sample Jacobians from batch-summed gradients would be wrong."""


def assert_per_sample(*modules: nn.Module) -> None:
    """Raise :class:`BatchCouplingError` if a BatchNorm in training mode sits in ``modules``.

    The robustness loss gets per-sample Jacobians by differentiating a *batch sum*; that is exact
    only if sample ``b``'s output does not depend on sample ``b'``. BatchNorm in training mode
    normalises with batch statistics, which breaks this silently.
    """
    bad = [
        f"{type(m).__name__} {name or '(root)'}"
        for mod in modules
        for name, m in mod.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
    ]
    if bad:
        raise BatchCouplingError(
            f"the SENN robustness loss needs per-sample Jacobians, but {len(bad)} BatchNorm layer(s) in training "
            f"mode mix samples (e.g. {bad[:3]}). Fix: build the network with batchnorm='groupnorm' (replace them "
            "with GroupNorm) or batchnorm='frozen' (always use running statistics), or set robustness_lambda=0."
        )


def _vjp_or_zeros(
    output: torch.Tensor, x: torch.Tensor, vector: torch.Tensor | None, create_graph: bool
) -> torch.Tensor:
    """``sum_j vector_j * d output_j / dx`` (``vector=None``: all ones); zeros if ``output`` ignores ``x``.

    With ``create_graph`` the result stays differentiable w.r.t. ``vector`` too, which is what
    lets the cheap penalty keep its gradient w.r.t. the conceptizer (see :func:`robustness_residual`).
    """
    if not output.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(
        output,
        x,
        grad_outputs=torch.ones_like(output) if vector is None else vector,
        create_graph=create_graph,
        retain_graph=True,
        allow_unused=True,
    )
    return torch.zeros_like(x) if g is None else g


def _check_penalty_args(x: torch.Tensor, target: str, method: str) -> None:
    if target not in PENALTY_TARGETS:
        raise ValueError(f"penalty_target must be one of {PENALTY_TARGETS}, got {target!r}")
    if method not in PENALTY_METHODS:
        raise ValueError(f"penalty method must be one of {PENALTY_METHODS}, got {method!r}")
    if not x.requires_grad:
        raise ValueError(
            "the robustness loss differentiates with respect to the input, but x does not require grad: "
            "call x.requires_grad_(True) before the forward pass (out = net(x))"
        )


def robustness_residual(
    x: torch.Tensor,
    concepts: torch.Tensor,
    relevances: torch.Tensor,
    logits: torch.Tensor | None = None,
    target: str = "logits",
    method: str = "stopgrad",
    create_graph: bool = True,
) -> torch.Tensor:
    """Residual ``grad_x f_c(x) - sum_i theta_ic(x) grad_x h_i(x)`` of the SENN robustness loss.

    ``f`` is the logits (``target="logits"``, the principled choice: a model that is exactly linear
    in its concepts gets 0) or the log-probabilities (``"log_probs"``, what the reference code
    differentiates).

    Methods:
        ``stopgrad`` (default): for the logits ``f_c = sum_i theta_ic h_i``, the product rule gives
        the residual as ``sum_i h_i grad_x theta_ic = grad_x [theta_c(x) . stopgrad_x(h(x))]``: ``C``
        vector-Jacobian products (``J_x theta_c^T h``) instead of the ``C + k`` of the full formula.
        ``h`` enters as the VJP vector, not as ``h.detach()``: the value is the same, but a
        detached ``h`` would drop the penalty's gradient w.r.t. the conceptizer parameters. For
        log-probabilities, ``grad log p_c = grad f_c - sum_j p_j grad f_j`` and the last term is one
        more product (``J_x f^T p``): ``C + 1`` products.
        ``jacobian``: the reference's full formula, ``J_x f - theta^T J_x h`` with ``C + k`` products.

    Both are exact when no layer mixes samples (see :func:`assert_per_sample`).

    Args:
        x: ``(B, *input)`` input that required grad *before* the forward pass.
        concepts: ``(B, k)``; relevances: ``(B, k, C)``; logits: ``(B, C)`` (needed for
            ``log_probs`` and ``jacobian``; defaults to ``sum_i theta_ic h_i``).
        create_graph: keep the graph so the loss can be back-propagated (training).

    Returns:
        ``(B, C, *input)``.
    """
    _check_penalty_args(x, target, method)
    if logits is None:
        logits = torch.einsum("bk,bkc->bc", concepts, relevances)
    n_classes = relevances.shape[2]
    if method == "stopgrad":
        # grad_x [theta_c . stopgrad_x(h)] as the vector-Jacobian product of theta_c with the vector h:
        # h is held constant in x but, unlike h.detach(), keeps its dependence on the parameters, so
        # the penalty still trains the conceptizer exactly as the full formula does.
        rows = [_vjp_or_zeros(relevances[:, :, c], x, concepts, create_graph) for c in range(n_classes)]
        residual = torch.stack(rows, dim=1)
        if target == "log_probs":
            p = torch.softmax(
                logits, dim=1
            )  # as the VJP vector: constant in x, differentiable in the parameters
            residual = residual - _vjp_or_zeros(logits, x, p, create_graph).unsqueeze(1)
        return residual
    f = logits if target == "logits" else torch.log_softmax(logits, dim=1)
    jac_f = torch.stack([_vjp_or_zeros(f[:, c], x, None, create_graph) for c in range(n_classes)], dim=1)
    jac_h = torch.stack(
        [_vjp_or_zeros(concepts[:, i], x, None, create_graph) for i in range(concepts.shape[1])], dim=1
    )
    return jac_f - torch.einsum("bkc,bk...->bc...", relevances, jac_h)


def robustness_loss(
    x: torch.Tensor,
    concepts: torch.Tensor,
    relevances: torch.Tensor,
    logits: torch.Tensor | None = None,
    *,
    target: str = "logits",
    reduction: str = "mean",
    input_scale: torch.Tensor | None = None,
    method: str = "stopgrad",
    create_graph: bool = True,
) -> torch.Tensor:
    """SENN robustness loss ``L_theta = || grad_x f(x) - theta(x)^T J_x h(x) ||`` (paper Section 3).

    Args:
        x, concepts, relevances, logits, target, method, create_graph: see :func:`robustness_residual`.
        reduction: how the per-sample residuals ``R_b`` (``C x d``) become one number:

            * ``mean`` (default): ``mean_b ||R_b||_F``, the paper's per-sample norm averaged over
              the batch: independent of the batch size.
            * ``rms``: ``sqrt(mean_b ||R_b||_F^2)`` = ``batch_fro / sqrt(B)``, also batch-size free.
            * ``batch_fro``: ``||R||_F`` over the whole batch, the reference code's value; it grows
              like ``sqrt(B)``, so a lambda tuned at one batch size does not transfer.
            * ``none``: the per-sample norms ``(B,)``.
        input_scale: multiplies the residual per input entry (broadcast over ``x.shape[1:]``). The
            chain rule factor ``dx / dz`` turns gradients w.r.t. a raw input ``x`` into gradients
            w.r.t. a normalised ``z = (x - mean) / std``: pass ``std``.

    Returns:
        a scalar (or ``(B,)`` for ``reduction="none"``).
    """
    if reduction not in PENALTY_REDUCTIONS:
        raise ValueError(f"penalty reduction must be one of {PENALTY_REDUCTIONS}, got {reduction!r}")
    residual = robustness_residual(x, concepts, relevances, logits, target, method, create_graph)
    # One scale for every entry (a single input channel): every norm below is |s| times the unscaled
    # one, so scale the (B,) norms instead of the (B, C, *input) residual and its gradient.
    factor = None
    if input_scale is not None and input_scale.numel() == 1:
        factor = input_scale.reshape(()).abs()
    elif input_scale is not None:
        residual = residual * input_scale
    batch = residual.shape[0]
    if reduction in ("batch_fro", "rms"):
        total = torch.linalg.vector_norm(residual)
        total = total if factor is None else total * factor
        return total if reduction == "batch_fro" else total / math.sqrt(batch)
    per_sample = torch.linalg.vector_norm(residual.flatten(1), dim=1)  # zero-safe gradient, unlike sqrt
    if factor is not None:
        per_sample = per_sample * factor
    return per_sample if reduction == "none" else per_sample.mean()


def subbatch_robustness_loss(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
    x: torch.Tensor,
    fraction: float = 0.0625,
    *,
    generator: torch.Generator | None = None,
    target: str = "logits",
    reduction: str = "mean",
    input_scale: torch.Tensor | None = None,
    method: str = "stopgrad",
    create_graph: bool = True,
) -> torch.Tensor:
    """Unbiased sub-batch estimate of :func:`robustness_loss` over the batch ``x`` (a cheaper option).

    The exact penalty of the paper (Section 3, ``L_theta``) costs ``C`` (``stopgrad``) vector-Jacobian
    products through the network *and* their double backward for every sample of the batch. This
    estimate draws ``s = max(1, round(fraction * B))`` samples without replacement, runs ``forward`` on
    them alone (a fresh input leaf, so every product and the double backward involve ``s`` samples, not
    ``B``) and returns their exact penalty:

    * ``reduction="mean"`` (the default): ``mean_{b in S} ||R_b||_F`` has expectation
      ``mean_b ||R_b||_F``, the exact penalty, and so does its gradient: training follows the exact
      objective in expectation (an SGD-style estimate with variance ``(1 - s/B) var_b ||R_b||_F / s``);
    * ``rms`` and ``batch_fro``: the estimate's *square* is unbiased (``batch_fro`` is rescaled by
      ``sqrt(B / s)``); the estimate itself is biased low by Jensen's inequality, by at most the relative
      spread of the per-sample norms.

    What changes: the penalty is a noisy estimate (its logged value varies from batch to batch more than
    the exact one), it is computed on a second forward pass of the ``s`` samples (dropout draws its own
    masks there), and the step costs roughly ``fraction`` of the exact penalty's extra work, plus the
    per-operation overhead of small batches.

    Args:
        forward: maps an input ``(s, *input)`` to ``(concepts, relevances, logits)``, e.g.
            ``lambda z: (o := net(z)).concepts, o.relevances, o.logits``; it must treat samples
            independently (:func:`assert_per_sample`).
        x: the batch ``(B, *input)`` (need not require grad).
        fraction: share of the batch whose penalty is computed, in ``(0, 1]``.
        generator: random source of the sub-batch (default: the global one).
        target, reduction, input_scale, method, create_graph: as :func:`robustness_loss`
            (``reduction="none"`` is not an estimate of anything and is refused).
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"the sub-batch fraction must be in (0, 1], got {fraction}")
    if reduction not in PENALTY_REDUCTIONS or reduction == "none":
        raise ValueError(f"sub-batch penalty reduction must be mean, rms or batch_fro, got {reduction!r}")
    batch = x.shape[0]
    size = max(1, round(fraction * batch))
    idx = torch.randperm(batch, generator=generator)[:size].to(x.device)
    xs = x.detach()[idx].clone().requires_grad_(True)
    concepts, relevances, logits = forward(xs)
    loss = robustness_loss(
        xs,
        concepts,
        relevances,
        logits,
        target=target,
        reduction="rms" if reduction == "batch_fro" else reduction,
        input_scale=input_scale,
        method=method,
        create_graph=create_graph,
    )
    return loss * math.sqrt(batch) if reduction == "batch_fro" else loss


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Autoencoder loss of a learned conceptizer: MSE averaged over every entry (batch-size free)."""
    if reconstruction.shape != target.shape:
        raise ValueError(
            f"reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ"
        )
    return F.mse_loss(reconstruction, target)


def concept_sparsity_loss(concepts: torch.Tensor) -> torch.Tensor:
    """``mean_b ||h(x_b)||_1``.

    The reference sums ``||h||_1`` over the batch, so its weight depends on the batch size; the
    batch mean does not (reference weight ``w`` at batch ``B`` equals ``w * B`` here).
    """
    return concepts.abs().sum(dim=1).mean()
