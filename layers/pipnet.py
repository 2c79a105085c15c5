"""PIP-Net building blocks (Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive
Prototypes for Interpretable Image Classification", CVPR 2023, Sec. 3 and Fig. 3). Pure PyTorch, no training
logic.

* :class:`PatchPrototypes`: the add-on, a 1x1 convolution from the backbone's ``C`` channels to ``D``
  prototypes followed by a softmax over the ``D`` prototypes at every latent patch (Sec. 3.1: each patch is
  assigned to one prototype, ``sum_d z_{hw,d} = 1``).
* :func:`presence_scores`: global max-pool of those maps, the prototype presence ``p in [0, 1]^D``.
* :class:`NonNegLinear`: the sparse scoring sheet ``o = p W^T`` (``W >= 0``): the forward uses
  ``relu(W)`` and :meth:`NonNegLinear.clamp_` zeroes the small weights after each step, as the reference
  ``pipnet/train.py`` does (``W <- max(W - 1e-3, 0)``).
* the losses: :func:`alignment_loss` (Eq. 1), :func:`tanh_loss` (Eq. 2) and :func:`pipnet_class_loss` (the
  classification loss on the logits ``log(o^2 + 1)``, Sec. 3.2).

Reference code: ``github.com/M-Nauta/PIPNet`` (``pipnet/pipnet.py``, ``pipnet/train.py``); its epsilons are
the defaults here (``1e-12`` in the alignment loss; ``1e-8`` in the tanh loss, the value ``train_pipnet`` passes
to ``calculate_loss``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "NonNegLinear",
    "PatchPrototypes",
    "alignment_loss",
    "pipnet_class_logits",
    "pipnet_class_loss",
    "presence_scores",
    "tanh_loss",
]


class PatchPrototypes(nn.Module):
    """1x1 convolution to ``D`` prototypes, then a softmax over the prototypes at each patch (PIP-Net Sec. 3.1).

    Args:
        in_channels: ``C`` of the backbone feature map.
        num_prototypes: ``D``.

    Shape:
        ``(B, C, H, W)`` to ``(B, D, H, W)``, non-negative, summing to 1 over ``D`` at every ``(h, w)``.
    """

    def __init__(self, in_channels: int, num_prototypes: int) -> None:
        super().__init__()
        if int(in_channels) < 1 or int(num_prototypes) < 1:
            raise ValueError(
                f"in_channels and num_prototypes must be >= 1, got {in_channels} and {num_prototypes}"
            )
        self.conv = nn.Conv2d(int(in_channels), int(num_prototypes), kernel_size=1)

    @property
    def num_prototypes(self) -> int:
        return int(self.conv.out_channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.conv(features).softmax(dim=1)


def presence_scores(maps: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` presence ``p_d = max_{h,w} z_{hw,d}`` of ``(B, D, H, W)`` patch maps (global max-pool)."""
    if maps.dim() != 4:
        raise ValueError(f"prototype maps must be (B, D, H, W), got shape {tuple(maps.shape)}")
    return maps.flatten(2).amax(dim=2)


class NonNegLinear(nn.Module):
    """The scoring sheet ``o = p relu(W)^T (+ b)``: non-negative class weights (PIP-Net Sec. 3.1, reference
    ``NonNegLinear``).

    Args:
        in_features: ``D`` prototypes.
        out_features: ``K`` classes.
        bias: a non-negative bias per class (the reference's default is none).
        multiplier: exponent ``m`` of the logit transform ``log(o^m + 1)`` used by the classification loss
            (the reference's ``normalization_multiplier``, fixed at 2; kept here as a buffer, not trained).
        init_mean, init_std: ``W ~ N(init_mean, init_std)`` (the reference: ``N(1, 0.1)``).

    Shape:
        ``(B, D)`` to ``(B, K)``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        multiplier: float = 2.0,
        init_mean: float = 1.0,
        init_std: float = 0.1,
    ) -> None:
        super().__init__()
        if not (math.isfinite(float(multiplier)) and float(multiplier) >= 1.0):
            raise ValueError(f"multiplier must be a finite number >= 1 (the paper: 2), got {multiplier}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        self.register_buffer("multiplier", torch.tensor(float(multiplier)))
        with torch.no_grad():
            self.weight.normal_(float(init_mean), float(init_std))

    @property
    def effective_weight(self) -> torch.Tensor:
        """``(K, D)`` ``relu(W)``: the weights the forward uses (>= 0 whatever the parameter holds)."""
        return F.relu(self.weight)

    @property
    def effective_bias(self) -> torch.Tensor | None:
        """``(K,)`` ``relu(b)`` or ``None``."""
        return None if self.bias is None else F.relu(self.bias)

    def forward(self, presence: torch.Tensor) -> torch.Tensor:
        return F.linear(presence, self.effective_weight, self.effective_bias)

    @torch.no_grad()
    def clamp_(self, decrement: float = 0.0) -> None:
        """``W <- max(W - decrement, 0)`` and ``b <- max(b, 0)`` in place (reference ``train.py``: after every
        optimiser step of the classification phase, with ``decrement = 1e-3``, which drives small weights to
        exactly zero and so makes the scoring sheet sparse)."""
        self.weight.sub_(float(decrement)).clamp_(min=0.0)
        if self.bias is not None:
            self.bias.clamp_(min=0.0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"multiplier={float(self.multiplier):g}"
        )


def alignment_loss(
    maps1: torch.Tensor, maps2: torch.Tensor, eps: float = 1e-12, offsets: torch.Tensor | None = None
) -> torch.Tensor:
    """PIP-Net alignment loss ``L_A`` (Eq. 1): ``-1/(HW) sum_{h,w} log(z'_{hw} . z''_{hw} + eps)``.

    ``z'``, ``z''`` are the patch softmaxes of two augmented views of the same images; the dot product of the
    two ``D``-vectors of one patch is 1 exactly when both assign it to the same prototype with certainty. As in
    the reference (``train.py``: ``(align(z1, z2.detach()) + align(z2, z1.detach())) / 2``), each view is
    pulled towards the other, stopped-gradient one, and the loss is averaged over the batch too.

    Eq. 1 pairs the patches that show the same image content ("corresponding patches", Sec. 3.1). Without
    ``offsets`` that is the patch at the same ``(h, w)`` in both views (the paper's views differ by colour and a
    sub-cell crop only). With ``offsets``, view 2 was shifted by a whole number of latent cells relative to
    view 1, so the content of view 1's patch ``(h, w)`` is view 2's patch ``(h + dy, w + dx)``: those are paired,
    and the mean runs over the patches whose partner lies inside view 2 (a patch shifted out has no partner).

    Args:
        maps1, maps2: ``(B, D, H, W)`` patch softmaxes of the two views.
        eps: added inside the log (the reference: ``1e-12``).
        offsets: ``(B, 2)`` integer ``(dy, dx)`` per image, or ``None`` (all zero).

    Returns:
        A scalar.
    """
    if maps1.shape != maps2.shape or maps1.dim() != 4:
        raise ValueError(
            f"alignment_loss needs two (B, D, H, W) maps of the same shape, got {tuple(maps1.shape)} and "
            f"{tuple(maps2.shape)}"
        )
    b, d, h, w = maps1.shape
    # (B, D, H, W) -> (B, H*W, D): one D-vector per patch, as the reference flattens them
    e1 = maps1.flatten(2).transpose(1, 2)
    e2 = maps2.flatten(2).transpose(1, 2)
    if offsets is None:
        e1, e2 = e1.reshape(-1, d), e2.reshape(-1, d)
    else:
        off = torch.as_tensor(offsets, device=maps1.device).long()
        if off.shape != (b, 2):
            raise ValueError(
                f"offsets must be (B, 2) = ({b}, 2) integer (dy, dx), got shape {tuple(off.shape)}"
            )
        rows = torch.arange(h, device=maps1.device).view(1, h, 1) + off[:, 0].view(b, 1, 1)  # (B, H, 1)
        cols = torch.arange(w, device=maps1.device).view(1, 1, w) + off[:, 1].view(b, 1, 1)  # (B, 1, W)
        valid = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).flatten(1)  # (B, H*W)
        if not bool(valid.any()):
            raise ValueError(
                f"offsets shift every patch out of the {h}x{w} grid: no corresponding patches to align; "
                f"use shifts smaller than the grid"
            )
        partner = (rows.clamp(0, h - 1) * w + cols.clamp(0, w - 1)).flatten(1)  # (B, H*W) index into view 2
        e2 = e2.gather(1, partner.unsqueeze(2).expand(-1, -1, d))
        e1, e2 = e1[valid], e2[valid]

    def one_way(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -torch.log((a * b.detach()).sum(1) + eps).mean()

    return 0.5 * (one_way(e1, e2) + one_way(e2, e1))


def tanh_loss(presence: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PIP-Net tanh loss ``L_T`` (Eq. 2): ``-1/D sum_d log(tanh(sum_b p_{b,d}) + eps)``.

    It is small when every prototype is present (``p_d`` well above 0) in at least one image of the batch,
    which keeps all ``D`` prototypes in use instead of collapsing onto a few (the uniformity term of Sec. 3.2).

    Args:
        presence: ``(B, D)`` presence scores of one view.
    """
    if presence.dim() != 2:
        raise ValueError(f"presence must be (B, D), got shape {tuple(presence.shape)}")
    return -torch.log(torch.tanh(presence.sum(0)) + eps).mean()


def pipnet_class_logits(outputs: torch.Tensor, multiplier: float | torch.Tensor = 2.0) -> torch.Tensor:
    """``log(o^m + 1)`` of the scoring-sheet outputs ``o >= 0`` (PIP-Net Sec. 3.2, reference
    ``torch.log1p(out ** normalization_multiplier)``): a monotone map, so the predicted class is unchanged, that
    keeps the softmax from saturating on the unbounded sums of presence x weight."""
    return torch.log1p(outputs.clamp(min=0.0) ** multiplier)


def pipnet_class_loss(
    outputs: torch.Tensor, target: torch.Tensor, multiplier: float | torch.Tensor = 2.0
) -> torch.Tensor:
    """Cross-entropy of ``softmax(log(o^m + 1))`` (PIP-Net Sec. 3.2; reference ``NLLLoss(log_softmax(...))``).

    Args:
        outputs: ``(B, K)`` scoring-sheet outputs ``o``.
        target: ``(B,)`` class indices.
    """
    return F.cross_entropy(pipnet_class_logits(outputs, multiplier), target)
