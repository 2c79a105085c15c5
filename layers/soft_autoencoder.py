"""Soft-thresholding units: the activation of the soft autoencoder.

Fan, Li, Teng, Wang, "Soft Autoencoder and Its Wavelet Adaptation Interpretation", IEEE Trans.
Computational Imaging 2020 (arXiv 1812.11675). The abstract (the only part verified for this project) states
that the encoding layers use *adaptable soft-thresholding units*; the exact parameterisation below is
our design:

    S_b(x) = sign(x) · max(|x| − b, 0) = ReLU(x − b) − ReLU(−x − b),     b ≥ 0 per channel,

with ``∂S/∂x = 1[|x| > b]`` and ``∂S/∂b = −sign(x) · 1[|x| > b]``. This is the proximal operator of
``b·‖·‖₁`` (Donoho's soft shrinkage), so a layer "analysis filters → S_b → synthesis filters" is a
learned wavelet shrinkage; :func:`haar_filters` gives the orthonormal Haar filters for which it is
exactly the classical one (``tests/test_soft_autoencoder.py`` checks this against PyWavelets).

Pure PyTorch: no Lightning, no Hydra.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

THRESHOLD_PARAMS = ("softplus", "abs")
# softplus(-1e4) is exactly 0 in float32 and float64 (exp underflows), so b = 0 is representable
# without an infinite parameter, which would turn into NaN under weight decay or Adam's moments.
_SOFTPLUS_ZERO = -1.0e4


def soft_threshold(x: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """``S_b(x) = sign(x) · max(|x| − b, 0)`` (soft shrinkage, Donoho 1995).

    Args:
        x: any tensor.
        threshold: ``b ≥ 0``, broadcastable to ``x`` (e.g. ``(1, C, 1, 1)`` for per-channel).

    Written as ``sign(x) · relu(|x| − b)`` so that autograd gives exactly
    ``∂S/∂x = 1[|x| > b]`` and ``∂S/∂b = −sign(x) · 1[|x| > b]`` (``relu'(0) = 0`` in PyTorch, so the
    indicator is strict), and exact zeros on ``[−b, b]``.
    """
    return torch.sign(x) * F.relu(x.abs() - threshold)


def inverse_softplus(b: torch.Tensor) -> torch.Tensor:
    """``θ`` with ``softplus(θ) = b`` for ``b ≥ 0`` (``b = 0`` maps to a large negative finite θ)."""
    b = b.double()
    theta = b + torch.log(-torch.expm1(-b))  # log(exp(b) - 1) without overflow for large b
    return theta.clamp(min=_SOFTPLUS_ZERO)


class SoftThreshold(nn.Module):
    """Soft-threshold activation with one learnable non-negative threshold per channel.

    A drop-in replacement for ``nn.ReLU`` (see
    :func:`models.soft_autoencoder.replace_relu_with_soft_threshold` for swapping it into any network).
    Put it after a convolution *without* bias: the threshold plays the bias's role.

    Args:
        num_channels: number of channels ``C`` (size of dimension ``channel_dim``).
        init: initial threshold ``b`` (same for every channel), ``≥ 0``. Small values (1e-2) start
            close to the identity; values near the code-space noise level start as a denoiser.
        param: how ``b ≥ 0`` is guaranteed: ``"abs"`` (``b = |θ|``, gradient steps move ``b``
            linearly, so thresholds adapt quickly; exact zero is representable) or ``"softplus"``
            (``b = softplus(θ)``; smooth, but steps change small ``b`` only multiplicatively).
        channel_dim: the channel dimension of the input (1 for ``(B, C, H, W)`` and ``(B, C)``).

    Shape:
        any ``(B, C, ...)`` to the same shape.

    Attributes:
        theta: ``(C,)`` unconstrained parameter; :attr:`threshold` is ``b``.
    """

    def __init__(
        self, num_channels: int, init: float = 1e-2, param: str = "abs", channel_dim: int = 1
    ) -> None:
        super().__init__()
        if int(num_channels) < 1:
            raise ValueError(f"num_channels must be >= 1, got {num_channels}")
        if param not in THRESHOLD_PARAMS:
            raise ValueError(f"param must be one of {THRESHOLD_PARAMS}, got {param!r}")
        if not math.isfinite(init) or init < 0:
            raise ValueError(f"init must be a finite threshold >= 0, got {init}")
        self.num_channels = int(num_channels)
        self.param = param
        self.channel_dim = channel_dim
        self.theta = nn.Parameter(torch.empty(self.num_channels))
        self.set_threshold(init)

    @property
    def threshold(self) -> torch.Tensor:
        """``(C,)`` thresholds ``b ≥ 0`` (differentiable with respect to :attr:`theta`)."""
        return F.softplus(self.theta) if self.param == "softplus" else self.theta.abs()

    @torch.no_grad()
    def set_threshold(self, value: float | torch.Tensor) -> None:
        """Set ``b`` (a scalar or a ``(C,)`` tensor of values ``≥ 0``) through the parameterisation."""
        b = torch.as_tensor(value, dtype=torch.float64).expand(self.num_channels)
        if (b < 0).any() or not torch.isfinite(b).all():
            raise ValueError(f"thresholds must be finite and >= 0, got {b.tolist()}")
        theta = inverse_softplus(b) if self.param == "softplus" else b
        self.theta.copy_(theta.to(self.theta.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % x.dim()
        if x.shape[dim] != self.num_channels:
            raise ValueError(
                f"SoftThreshold({self.num_channels}) got {x.shape[dim]} channels in dimension {dim} of input "
                f"{tuple(x.shape)}; build it with num_channels={x.shape[dim]} (or set channel_dim)"
            )
        shape = [1] * x.dim()
        shape[dim] = self.num_channels
        return soft_threshold(x, self.threshold.to(x.dtype).view(shape))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, param={self.param!r}"


def haar_filters(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The four orthonormal 2-D Haar filters ``(4, 1, 2, 2)``: LL, LH, HL, HH.

    With stride 2 they form an orthogonal analysis operator E (``Eᵀ E = I``); ``conv2d(x, w, stride=2)``
    gives the one-level Haar coefficients and ``conv_transpose2d(c, w, stride=2)`` inverts it.
    """
    lo = torch.tensor([1.0, 1.0], dtype=torch.float64) / math.sqrt(2.0)
    hi = torch.tensor([1.0, -1.0], dtype=torch.float64) / math.sqrt(2.0)
    filters = [torch.outer(a, b) for a, b in ((lo, lo), (lo, hi), (hi, lo), (hi, hi))]
    return torch.stack(filters).unsqueeze(1).to(dtype)
