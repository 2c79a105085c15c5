"""Soft autoencoder: soft-threshold encoder, linear decoder (the denoising training is
:class:`interpzoo.models.lit_soft_autoencoder.SoftAutoencoderModule`, its figures
:mod:`interpzoo.reports.soft_autoencoder`).

Fan, Li, Teng, Wang, "Soft Autoencoder and Its Wavelet Adaptation Interpretation", IEEE Trans.
Computational Imaging 2020 (arXiv 1812.11675). Verified from the abstract only: a convolutional
autoencoder whose *encoding* layers use adaptable soft-thresholding units and whose *decoding* layers
are linear, "naturally interpreted as a learned cascaded wavelet shrinkage system". Everything else
here (stage layout, skips, threshold parameterisation, initialisation, losses) is **our design**,
not the paper's verified recipe:

* encoder stage i: ``z_i = S_{b_i}(Conv_i(z_{i-1}))`` (no conv bias: the threshold is the bias),
  ``z_0`` the normalised input;
* decoder stage i: ``y_{i-1} = ConvT_i(y_i)`` (linear, no activation), ``y_N = z_N``, optionally
  ``+ z_{i-1}`` (RED-CNN-style skips, a flag);
* with one stage, orthonormal analysis filters ``E`` and synthesis ``D = Eᵀ`` the network computes
  ``D · S_b(E · x)``, a one-level wavelet shrinkage (the paper's interpretation, from its abstract).

Registered names: ``softae`` (stride 1), ``softae_wavelet`` (stride 2, the wavelet-like variant),
and the matched counterparts ``relu_ae`` (ReLU with conv bias in place of ``S_b``: the same number of
parameters) and ``linear_ae`` (no activation). The torchvision backbones are not offered as encoders:
the method's point is a shallow encoder whose every stage is a shrinkage; use
:func:`replace_relu_with_soft_threshold` to put soft thresholds into any other network.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from interpzoo.layers.normalize import InputNormalize
from interpzoo.layers.soft_autoencoder import THRESHOLD_PARAMS, SoftThreshold
from interpzoo.models.explain import SoftAEExplanation, explain_soft_autoencoder
from interpzoo.models.input_checks import check_image_input
from interpzoo.models.outputs import ReconstructionOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.surgery import replace_modules

ACTIVATIONS = ("soft", "relu", "linear")
# The autoencoder denoises: its inputs are [0, 1] images plus noise, so the value check is lenient
# (0-255 images are still refused; a clean image plus noise of std 0.5 stays far below it).
NOISY_MAX_VALUE = 4.0


class EncoderOutput(NamedTuple):
    """What :class:`SoftEncoder` returns.

    A ``NamedTuple`` (not a dataclass) so that generic forward hooks that read ``out.features`` or
    ``out[0]`` (e.g. :class:`interpzoo.reports.callbacks.IntrinsicDimension` on ``net.backbone``) both work.

    Attributes:
        features: the deepest code ``z_N`` ``(B, C_N, H_N, W_N)``.
        codes: every stage's code ``(z_1, ..., z_N)``.
    """

    features: torch.Tensor
    codes: tuple[torch.Tensor, ...]


class EncoderStage(nn.Module):
    """``act(conv(x))``: one analysis step. ``act`` is :class:`SoftThreshold`, ``nn.ReLU`` or identity.

    The convolution has no bias before a soft threshold (the threshold plays the bias's role)
    and a bias before a ReLU, so the matched ReLU network has the same parameter count.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int,
        stride: int,
        activation: str,
        thr_init: float,
        thr_param: str,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_chans,
            out_chans,
            kernel_size,
            stride=stride,
            padding=(kernel_size - 1) // 2,
            bias=activation == "relu",
        )
        if activation == "soft":
            self.act: nn.Module = SoftThreshold(out_chans, init=thr_init, param=thr_param)
        elif activation == "relu":
            self.act = nn.ReLU()
        else:
            self.act = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class SoftEncoder(nn.Module):
    """The analysis cascade: :class:`EncoderStage` s applied in turn.

    Shape:
        ``(B, C_0, H, W)`` to :class:`EncoderOutput` with codes ``(B, C_i, H_i, W_i)``.
    """

    def __init__(self, stages: Sequence[EncoderStage]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.out_channels = stages[-1].conv.out_channels

    def forward(self, x: torch.Tensor) -> EncoderOutput:
        codes = []
        for stage in self.stages:
            x = stage(x)
            codes.append(x)
        return EncoderOutput(features=x, codes=tuple(codes))


def _per_stage(value: int | Sequence[int], n: int, name: str) -> list[int]:
    values = [int(value)] * n if isinstance(value, int) else [int(v) for v in value]
    if len(values) != n:
        raise ValueError(f"{name} needs one value per stage ({n} stages from widths), got {list(value)}")
    if any(v < 1 for v in values):
        raise ValueError(f"{name} values must be >= 1, got {values}")
    return values


@register_architecture("soft_autoencoder")
class SoftAutoencoder(nn.Module):
    """Convolutional autoencoder with soft-threshold encoder stages and linear decoder stages.

    Our design from the paper's abstract (module docstring). Takes ``[0, 1]`` images, normalises
    them with ``mean``/``std``, and maps the decoder output back to pixel units, so the
    reconstruction is directly comparable with the clean image.

    Args:
        in_chans: image channels ``C_0`` (1 grey, 3 RGB).
        mean, std: input normalisation (the data's statistics; ``0``/``1`` for none).
        widths: code channels per encoder stage; the number of stages is ``len(widths)``.
        kernel_size: conv kernel size, one value or one per stage (padding ``(k - 1) // 2``).
        stride: conv stride, one value or one per stage (2 gives the wavelet-like pyramid).
        skip: add ``z_{i-1}`` to the decoder output ``y_{i-1}`` at every stage (RED-CNN style; with
            it the network predicts a residual on top of its input). Whether the paper uses skips is
            unverified.
        activation: ``"soft"`` (the method), ``"relu"`` (the matched counterpart) or ``"linear"``.
        thr_init: initial soft threshold (in normalised code units).
        thr_param: ``"abs"`` or ``"softplus"`` (see :class:`layers.soft_autoencoder.SoftThreshold`).
        decoder_bias: give the transposed convolutions a bias (off: the decoder is linear, as a
            wavelet synthesis operator).

    Shape:
        ``(B, C_0, H, W)`` in ``[0, 1]`` to :class:`ReconstructionOutput` with ``reconstruction``
        ``(B, C_0, H, W)`` (pixel units, not clamped) and ``codes`` ``{"stage<i>": (B, C_i, H_i, W_i)}``.
        With strides, ``H, W`` are first padded (replicate) to a multiple of the total stride and the
        reconstruction is cropped back.

    Attributes:
        backbone: the encoder (:class:`SoftEncoder`); named ``backbone`` like every zoo trunk so that
            generic callbacks (intrinsic dimension of ``net.backbone``) find it.
        decoder: ``decoder[i]`` maps stage ``i + 1``'s code back to stage ``i``'s resolution.
    """

    def __init__(
        self,
        in_chans: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        widths: Sequence[int] = (16, 32, 64),
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        skip: bool = False,
        activation: str = "soft",
        thr_init: float = 0.05,
        thr_param: str = "abs",
        decoder_bias: bool = False,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if thr_param not in THRESHOLD_PARAMS:
            raise ValueError(f"thr_param must be one of {THRESHOLD_PARAMS}, got {thr_param!r}")
        widths = [int(w) for w in widths]
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty list of positive channel counts, got {widths}")
        n = len(widths)
        kernels = _per_stage(kernel_size, n, "kernel_size")
        strides = _per_stage(stride, n, "stride")
        mean = [0.0] * in_chans if mean is None else [float(m) for m in mean]
        std = [1.0] * in_chans if std is None else [float(s) for s in std]
        if len(mean) != in_chans or len(std) != in_chans:
            raise ValueError(f"mean/std need {in_chans} values (in_chans), got {mean} and {std}")
        self.normalize = InputNormalize(mean, std)
        chans = [int(in_chans), *widths]
        self.backbone = SoftEncoder(
            [
                EncoderStage(chans[i], chans[i + 1], kernels[i], strides[i], activation, thr_init, thr_param)
                for i in range(n)
            ]
        )
        self.decoder = nn.ModuleList(
            nn.ConvTranspose2d(
                chans[i + 1],
                chans[i],
                kernels[i],
                stride=strides[i],
                padding=(kernels[i] - 1) // 2,
                bias=decoder_bias,
            )
            for i in range(n)
        )
        self.in_chans = int(in_chans)
        self.skip = bool(skip)
        self.activation = activation
        self.stage_names = [f"stage{i + 1}" for i in range(n)]
        self.total_stride = math.prod(strides)

    @property
    def code_channels(self) -> dict[str, int]:
        """``{stage name: C_i}``."""
        return {name: st.conv.out_channels for name, st in zip(self.stage_names, self.backbone.stages)}

    def thresholds(self) -> dict[str, torch.Tensor]:
        """``{stage name: (C_i,) thresholds b}`` of the soft-threshold stages (empty for ReLU/linear)."""
        return {
            name: st.act.threshold.detach()
            for name, st in zip(self.stage_names, self.backbone.stages)
            if isinstance(st.act, SoftThreshold)
        }

    def pixel_thresholds(self) -> torch.Tensor | None:
        """Stage-1 thresholds in pixel-noise units, ``(C_1,)``, or ``None`` without soft stage 1.

        The code noise of channel ``j`` for white pixel noise of std σ is ``σ · ‖w_j / s‖₂`` (``w_j`` the
        filter, ``s`` the input std of the normalisation), so ``b_j / ‖w_j / s‖₂`` is the pixel σ at which
        the threshold equals one code-noise std. Unlike ``b`` itself it does not depend on the scale
        the encoder and decoder can trade between them; the shrinkage reading predicts it grows with
        the training σ (e.g. ``≈ σ·√(2 log N)`` for the universal threshold).
        """
        stage = self.backbone.stages[0]
        if not isinstance(stage.act, SoftThreshold):
            return None
        w = stage.conv.weight.detach() / self.normalize.std.view(1, -1, 1, 1).to(stage.conv.weight.dtype)
        return stage.act.threshold.detach() / w.flatten(1).norm(dim=1).clamp(min=1e-12)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ``ValueError`` naming the problem and its fix unless ``x`` is a finite float
        ``(B, in_chans, H, W)`` batch of (possibly noisy) ``[0, 1]`` images, values within
        ``[-3, NOISY_MAX_VALUE]`` (:func:`~interpzoo.models.input_checks.check_image_input`)."""
        check_image_input(x, self.in_chans, max_value=NOISY_MAX_VALUE)

    def forward(self, x: torch.Tensor) -> ReconstructionOutput:
        self.check_input(x)
        h = self.normalize(x)
        height, width = h.shape[-2:]
        # Pad to a multiple of the total stride so no row/column falls off a strided stage (a k=2, s=2
        # stage would drop the last row of an odd image); replicate keeps the borders noise-like.
        ph, pw = (-height) % self.total_stride, (-width) % self.total_stride
        if ph or pw:
            h = F.pad(h, (0, pw, 0, ph), mode="replicate")
        codes = self.backbone(h).codes
        inputs = (h, *codes[:-1])  # z_0 .. z_{N-1}: the targets of each decoder stage
        y = codes[-1]
        for i in reversed(range(len(self.decoder))):
            # output_size undoes the stride exactly for odd sizes too
            y = self.decoder[i](y, output_size=inputs[i].shape[-2:])
            if self.skip:
                y = y + inputs[i]
        mean, std = self.normalize.mean.view(1, -1, 1, 1), self.normalize.std.view(1, -1, 1, 1)
        recon = (y * std.to(y.dtype) + mean.to(y.dtype))[..., :height, :width]
        return ReconstructionOutput(reconstruction=recon, codes=dict(zip(self.stage_names, codes)))

    def explain(self, x: torch.Tensor) -> SoftAEExplanation:
        """Per-stage codes and their sparsity (:mod:`models.explain`)."""
        return explain_soft_autoencoder(self, x)


register_model("softae", "soft_autoencoder", activation="soft", stride=1)
register_model(
    "softae_wavelet", "soft_autoencoder", activation="soft", stride=2, kernel_size=2, widths=[16, 64, 256]
)
register_model("relu_ae", "soft_autoencoder", activation="relu", stride=1)
register_model("linear_ae", "soft_autoencoder", activation="linear", stride=1)


# -- drop-in for any network ------------------------------------------------------------------------
@torch.no_grad()
def replace_relu_with_soft_threshold(
    net: nn.Module,
    example_input: torch.Tensor,
    where: Any = nn.ReLU,
    init: float = 1e-2,
    param: str = "abs",
) -> list[str]:
    """Swap ReLUs (or any activation matched by ``where``) for :class:`SoftThreshold` in place.

    ``nn.ReLU`` does not know its channel count, so one forward pass of ``example_input`` (e.g. one
    ``(1, C, H, W)`` image) records the channels each matched module sees, then
    :func:`models.surgery.replace_modules` does the swap. A module called on different channel counts
    (e.g. one ReLU object reused at two widths) cannot become one per-channel threshold and raises.

    Returns:
        the dotted names of the replaced modules.
    """
    from interpzoo.models.surgery import find_modules, get_submodule

    names = find_modules(net, where)
    if not names:
        raise KeyError(f"no submodule of {type(net).__name__} matches {where!r}")
    seen: dict[str, set[int]] = {n: set() for n in names}
    hooks = [
        get_submodule(net, n).register_forward_hook(lambda _m, _i, out, n=n: seen[n].add(int(out.shape[1])))
        for n in names
    ]
    was_training = net.training
    net.eval()  # no running-statistics updates from the probe pass
    try:
        net(example_input)
    finally:
        for h in hooks:
            h.remove()
        net.train(was_training)
    for n, chans in seen.items():
        if len(chans) != 1:
            what = "never ran on example_input" if not chans else f"ran on {sorted(chans)} channels"
            raise ValueError(
                f"cannot size a SoftThreshold for {n!r}: it {what}. Give each activation its own module "
                f"(one per width) or pass where= the names to replace."
            )
    device = example_input.device  # the network ran on it, so its parameters live there

    def make(name: str, _old: nn.Module) -> nn.Module:
        return SoftThreshold(next(iter(seen[name])), init=init, param=param).to(device)

    return replace_modules(net, names, make)


# -- the classical reference ------------------------------------------------------------------------
def universal_threshold(sigma: float, num_coefficients: int) -> float:
    """Donoho–Johnstone universal (VisuShrink) threshold ``σ · √(2 log N)``."""
    return float(sigma) * math.sqrt(2.0 * math.log(max(int(num_coefficients), 2)))


def wavelet_shrinkage(
    images: torch.Tensor,
    threshold: float,
    wavelet: str = "haar",
    level: int | None = None,
    mode: str = "periodization",
) -> torch.Tensor:
    """Classical wavelet soft-shrinkage denoiser (PyWavelets), the reference line of the benchmark.

    Each channel of each image is decomposed with ``pywt.wavedec2``, every *detail* coefficient is
    soft-thresholded at ``threshold`` (the approximation is kept), and the image is reconstructed.
    With an orthonormal wavelet and ``mode="periodization"`` the transform is orthogonal, so
    coefficient noise has the pixel noise's σ and :func:`universal_threshold` applies directly.

    Args:
        images: ``(B, C, H, W)`` float.
        threshold: soft threshold in pixel units.
        wavelet: PyWavelets name (``haar``, ``db2``, ...).
        level: decomposition levels (``None``: the maximum useful level).

    Returns:
        ``(B, C, H, W)`` denoised images (same dtype/device as ``images``).
    """
    try:
        import pywt
    except ImportError as e:  # optional dependency
        raise ImportError("wavelet_shrinkage needs PyWavelets: pip install 'interpzoo[wavelets]'") from e
    arr = images.detach().cpu().double().numpy()
    out = np.empty_like(arr)
    for b in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            coeffs = pywt.wavedec2(arr[b, c], wavelet, mode=mode, level=level)
            shrunk = [coeffs[0]] + [
                tuple(pywt.threshold(d, threshold, mode="soft") for d in detail) for detail in coeffs[1:]
            ]
            rec = pywt.waverec2(shrunk, wavelet, mode=mode)
            out[b, c] = rec[: arr.shape[2], : arr.shape[3]]
    return torch.from_numpy(out).to(dtype=images.dtype, device=images.device)
