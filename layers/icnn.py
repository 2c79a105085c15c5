"""Interpretable CNN part filters: templates, the part mask and the filter loss.

Zhang, Wu, Zhu, "Interpretable Convolutional Neural Networks", CVPR 2018 (arXiv 1710.00935). Each
filter ``f`` of an interpretable conv layer should fire on one object part, at one location per
image. Two pieces make it so:

* **the mask** (paper Sec. 3.1): the filter's map ``x`` ``(n, n)`` is multiplied by the template of
  its strongest location ``mu_hat`` and rectified, ``x_masked = relu(x * M_mu_hat)``, which removes
  activations away from the part. The mask is a constant in backprop.
* **the filter loss** (paper Eq. 2-4): ``Loss_f = -MI(X; T)``, the negative mutual information
  between the images of the batch ``X`` and the ``n^2 + 1`` templates ``T`` (``n^2`` positive
  templates, one per location, and one negative template). It splits exactly as
  ``-MI = -H(T) + H(T'|X) + sum_x p(T+, x) H(T+|X=x)``: the inter-category entropy (each image is
  clearly positive or clearly negative) and the spatial entropy (a positive image peaks at one
  location).

Everything here is pure PyTorch: wrap or append :class:`InterpretableConv2d` (or
:class:`PartFilterMask`) on any stage of any CNN and add ``block.filter_loss(...).loss`` to your
loss. Deviations from the paper and the reference code (zqs1022/interpretableCNN) are
flagged by ``Deviation`` in the docstrings:

* ``template_scale`` / ``normalize``: with the paper's ``tau = 0.5 / n^2`` the traces
  ``tr(x . T)`` of O(1) activations are ~1e-2, ``p(x|T)`` is nearly uniform over the batch and the
  MI (and its gradient) vanishes. ``normalize="max"`` divides every filter's maps by their batch
  maximum (detached) and ``template_scale`` multiplies the templates, so the loss sees a scale-free
  map with a chosen sharpness. Both default to the literal paper (off / 1.0).
* ``positive``: the explicit MI of the paper does not use labels, but the paper's approximate
  gradient and the official code pick the template by label (``T-`` for negatives, ``T_mu_hat`` for
  positives). Passing ``positive`` gives :func:`supervised_filter_terms`: the same posterior
  ``p(T|x)``, with the inter-category entropy replaced by the cross-entropy of ``p(T'|x)`` against
  the label; this is how multi-category filters are tied to their category.
* the official code's gradient injection into ``dL/dx`` (no scalar loss is computed) is available as
  :func:`official_filter_grad` behind ``loss_impl="official_grad"``, without the unexplained
  batch/filter flip of its masks (zqs1022/interpretableCNN issue #8).

Distributed training: the MI couples the images of a batch through ``Z_T`` and ``p(x)``. With
``sync=True`` (default) and an initialised process group, the template scores of every rank are
all-gathered *with gradients*, so the loss and, after DDP's gradient averaging, the gradients equal
those of one process holding the whole global batch; the ``normalize="max"`` statistic is a global
(all-reduced) max. ``sync=False`` computes the MI of each rank's shard (cheaper; the value then
depends on the per-device batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FilterAssignment",
    "FilterLossOutput",
    "InterpretableConv2d",
    "PartFilterLoss",
    "PartFilterMask",
    "filter_loss",
    "filter_mi_terms",
    "supervised_filter_terms",
    "locate_parts",
    "mask_distance",
    "official_filter_grad",
    "part_mask",
    "part_templates",
    "spatial_spread",
    "template_priors",
    "template_scores",
    "template_shapes",
]

LOCATE_MODES = ("argmax", "centroid")
MASK_STYLES = ("paper", "official")
NORMALIZE_MODES = ("none", "max")


# ---------------------------------------------------------------------------------------------------
# distributed helpers
# ---------------------------------------------------------------------------------------------------
def _world_size() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def gather_batch(t: torch.Tensor, with_grad: bool) -> torch.Tensor:
    """Concatenate ``t`` ``(B_r, ...)`` of every rank along dim 0 (rank order); uneven ``B_r`` allowed.

    ``with_grad=True`` uses the autograd-aware all-gather: the gradient reaching each rank's ``t`` is
    the sum over ranks of the gradients of their (identical) losses, i.e. ``world_size`` times the
    gradient of one copy; DDP's gradient averaging divides that back, so parameters receive exactly
    the gradient of the global-batch loss. Without a process group this returns ``t``.
    """
    world = _world_size()
    if world == 1:
        return t
    n = torch.tensor([t.shape[0]], device=t.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes_i = [int(s.item()) for s in sizes]
    top = max(sizes_i)
    if t.shape[0] < top:  # all_gather needs equal shapes: pad, then strip each rank's padding
        t = torch.cat([t, t.new_zeros((top - t.shape[0], *t.shape[1:]))])
    if with_grad:
        from torch.distributed.nn.functional import all_gather as all_gather_autograd

        parts = list(all_gather_autograd(t.contiguous()))
    else:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
    return torch.cat([p[:s] for p, s in zip(parts, sizes_i)])


def all_reduce_(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce (``"sum"`` or ``"max"``) when a process group is up; returns ``t``."""
    if _world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t


# ---------------------------------------------------------------------------------------------------
# templates (paper Sec. 3.1)
# ---------------------------------------------------------------------------------------------------
def _check_map_size(h: int, w: int) -> None:
    if h < 1 or w < 1:
        raise ValueError(f"feature maps must be at least 1x1, got {h}x{w}")


def _grid(h: int, w: int, device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    i = torch.arange(h, device=device, dtype=torch.float32)
    j = torch.arange(w, device=device, dtype=torch.float32)
    return i, j


def mask_distance(mu: torch.Tensor, h: int, w: int, style: str = "paper") -> torch.Tensor:
    """Normalised L1 distance of every cell to the part location ``mu``.

    ``style="paper"``: ``|i - mu_i| / h + |j - mu_j| / w`` (``||(i,j) - mu||_1 / n`` on an ``n x n``
    map, paper Sec. 3.1). ``style="official"``: the same in the reference code's coordinates
    ``linspace(-1, 1, n)``, i.e. ``2|i - mu_i| / (h - 1) + 2|j - mu_j| / (w - 1)``.

    Args:
        mu: ``(..., 2)`` float or long ``(row, col)`` cell indices.

    Returns:
        ``(..., h, w)`` distances.
    """
    if style not in MASK_STYLES:
        raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
    i, j = _grid(h, w, mu.device)
    if style == "paper":
        si, sj = 1.0 / h, 1.0 / w
    else:  # a 1-cell axis has no extent in linspace(-1, 1, 1)
        si = 2.0 / (h - 1) if h > 1 else 0.0
        sj = 2.0 / (w - 1) if w > 1 else 0.0
    mu = mu.float()
    di = (i.view(*([1] * (mu.dim() - 1)), h, 1) - mu[..., 0, None, None]).abs() * si
    dj = (j.view(*([1] * (mu.dim() - 1)), 1, w) - mu[..., 1, None, None]).abs() * sj
    return di + dj


@lru_cache(maxsize=32)
def _shapes_cpu(h: int, w: int, beta: float) -> torch.Tensor:
    mu = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
    return (1.0 - beta * mask_distance(mu, h, w, "paper")).clamp(min=-1.0)


def template_shapes(h: int, w: int | None = None, beta: float = 4.0) -> torch.Tensor:
    """The positive templates without ``tau``: ``M_mu(i, j) = max(1 - beta ||(i,j) - mu||_1 / n, -1)``.

    This is also the mask the forward pass multiplies by (the official code multiplies by the shape,
    not by ``tau * shape``; ``ducminhkhoi``'s port does the latter and shrinks activations ~2n^2-fold).

    Returns:
        ``(h * w, h, w)``; template ``k`` peaks at ``mu = (k // w, k % w)`` (row-major).
    """
    w = h if w is None else w
    _check_map_size(h, w)
    return _shapes_cpu(int(h), int(w), float(beta)).clone()


def default_tau(h: int, w: int) -> float:
    """The paper's template magnitude ``tau = 0.5 / n^2`` (``0.5 / (h w)`` for ``h x w`` maps)."""
    return 0.5 / (h * w)


def part_templates(h: int, w: int | None = None, beta: float = 4.0, tau: float | None = None) -> torch.Tensor:
    """All ``n^2 + 1`` templates of paper Sec. 3.1.

    ``T_mu = tau * max(1 - beta ||(i,j) - mu||_1 / n, -1)`` for each of the ``n^2`` locations, then
    the negative template ``T- = -tau`` everywhere.

    Args:
        h, w: map size (``w`` defaults to ``h``).
        beta: template sharpness (4 in the paper).
        tau: magnitude (default ``0.5 / n^2``).

    Returns:
        ``(h * w + 1, h, w)``: positive templates row-major by ``mu``, the negative one last.
    """
    w = h if w is None else w
    tau = default_tau(h, w) if tau is None else float(tau)
    shapes = template_shapes(h, w, beta)
    return torch.cat([tau * shapes, torch.full((1, h, w), -tau)])


def template_priors(h: int, w: int | None = None, alpha: float | None = None) -> torch.Tensor:
    """Template priors ``p(T_mu) = alpha / n^2``, ``p(T-) = 1 - alpha`` (paper Sec. 3.2).

    The default ``alpha = n^2 / (1 + n^2)`` makes all ``n^2 + 1`` templates equally likely.

    Returns:
        ``(h * w + 1,)`` summing to 1, the negative template's prior last.
    """
    w = h if w is None else w
    _check_map_size(h, w)
    n2 = h * w
    alpha = n2 / (1.0 + n2) if alpha is None else float(alpha)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha (total prior of the positive templates) must be in (0, 1), got {alpha}")
    return torch.cat(
        [torch.full((n2,), alpha / n2, dtype=torch.float64), torch.tensor([1.0 - alpha], dtype=torch.float64)]
    )


# ---------------------------------------------------------------------------------------------------
# the mask (paper Sec. 3.1; official code: getMu / getMask)
# ---------------------------------------------------------------------------------------------------
def _check_maps(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be a feature map batch (B, C, H, W), got shape {tuple(x.shape)}")


def locate_parts(x: torch.Tensor, mode: str = "argmax") -> torch.Tensor:
    """The part location ``mu_hat`` of every map.

    ``mode="argmax"`` (paper): the strongest cell. ``mode="centroid"`` (official ``getMu``): the
    activation-weighted centroid rounded to the grid; an all-zero map falls back to its argmax.

    Args:
        x: ``(B, C, H, W)`` non-negative maps (after ReLU).

    Returns:
        ``(B, C, 2)`` long ``(row, col)``.
    """
    _check_maps(x)
    if mode not in LOCATE_MODES:
        raise ValueError(f"locate must be one of {LOCATE_MODES}, got {mode!r}")
    b, c, h, w = x.shape
    x = x.detach()
    flat = x.reshape(b, c, h * w).argmax(-1)
    arg = torch.stack([flat // w, flat % w], -1)
    if mode == "argmax":
        return arg
    xs = x.clamp(min=0).float()
    total = xs.sum((2, 3))
    i, j = _grid(h, w, x.device)
    ci = (xs.sum(3) * i).sum(-1) / total.clamp(min=1e-12)
    cj = (xs.sum(2) * j).sum(-1) / total.clamp(min=1e-12)
    cen = torch.stack([ci, cj], -1).round().long()
    cen[..., 0].clamp_(0, h - 1)
    cen[..., 1].clamp_(0, w - 1)
    return torch.where((total > 0)[..., None], cen, arg)


_DISTANCE_TABLES: dict[tuple[int, int, str, str], torch.Tensor] = {}
_MAX_TABLE_CELLS = 1024  # maps up to 32 x 32: a table of at most 4 MiB (float32)


def _distance_table(h: int, w: int, style: str, device: torch.device) -> torch.Tensor:
    """``(h * w, h * w)``: row ``k`` is :func:`mask_distance` of the part at cell ``k`` (row-major), cached.

    The mask of a map is then one row gather instead of building ``|i - mu_i| / h + |j - mu_j| / w`` per
    map; the rows are computed by :func:`mask_distance` itself, so the values are identical.
    """
    key = (int(h), int(w), style, str(device))
    table = _DISTANCE_TABLES.get(key)
    if table is None:
        mu = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2)
        table = mask_distance(mu, h, w, style).reshape(h * w, h * w).to(device)
        _DISTANCE_TABLES[key] = table
    return table


def part_mask(
    x: torch.Tensor,
    sharpness: float | torch.Tensor = 4.0,
    locate: str = "argmax",
    style: str = "paper",
) -> torch.Tensor:
    """The (detached) mask ``max(1 - a * d(mu_hat), -1)`` of every map (Zhang, Wu, Zhu 2018, Sec. 3.1).

    Args:
        x: ``(B, C, H, W)`` maps after ReLU.
        sharpness: ``beta`` for ``style="paper"`` (4 in the paper); the official per-filter ``a_f``
            (init 2.0, equivalent to beta 4) for ``style="official"``. A float or a ``(C,)`` tensor.
        locate: ``"argmax"`` or ``"centroid"`` (see :func:`locate_parts`).
        style: distance convention (see :func:`mask_distance`).

    Returns:
        ``(B, C, H, W)`` mask in ``[-1, 1]`` with value 1 at ``mu_hat``; no gradient flows into it.
    """
    _check_maps(x)
    if style not in MASK_STYLES:
        raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
    b, c, h, w = x.shape
    if h * w > _MAX_TABLE_CELLS:  # a (h w)^2 table would be large: build the distances per map
        d = mask_distance(locate_parts(x, locate), h, w, style).view(b, c, h * w)
    elif locate == "argmax":  # the flat argmax is the row of the distance table (no (row, col) round trip)
        flat = x.detach().reshape(b, c, h * w).argmax(-1)
        d = _distance_table(h, w, style, x.device)[flat.reshape(-1)].view(b, c, h * w)
    else:
        mu = locate_parts(x, locate)
        d = _distance_table(h, w, style, x.device)[(mu[..., 0] * w + mu[..., 1]).reshape(-1)].view(
            b, c, h * w
        )
    a = torch.as_tensor(sharpness, dtype=d.dtype, device=d.device)
    if a.dim() == 1:
        if a.numel() != c:
            raise ValueError(f"sharpness has {a.numel()} values but x has {c} channels")
        a = a.view(1, c, 1)
    return (1.0 - a * d).clamp_(min=-1.0).view(b, c, h, w).to(x.dtype).detach()


def spatial_spread(x: torch.Tensor, style: str = "official") -> torch.Tensor:
    """Activation-weighted spatial standard deviation of each map around its centroid (``sqrtvar``).

    In the official code's ``[-1, 1]`` coordinates for ``style="official"`` (used to learn the mask
    sharpness, ``a_f -> 3 / sqrtvar``), in cells otherwise.

    Returns:
        ``(B, C)``; 0 for all-zero maps.
    """
    _check_maps(x)
    b, c, h, w = x.shape
    xs = x.detach().clamp(min=0).float()
    total = xs.sum((2, 3)).clamp(min=1e-12)
    mu = locate_parts(x, "centroid").float()
    i, j = _grid(h, w, x.device)
    si = 2.0 / (h - 1) if (style == "official" and h > 1) else 1.0
    sj = 2.0 / (w - 1) if (style == "official" and w > 1) else 1.0
    di = ((i.view(1, 1, h) - mu[..., 0:1]) * si) ** 2
    dj = ((j.view(1, 1, w) - mu[..., 1:2]) * sj) ** 2
    var = ((xs.sum(3) * di).sum(-1) + (xs.sum(2) * dj).sum(-1)) / total
    return var.sqrt()


class PartFilterMask(nn.Module):
    """``x -> relu(x * mask(x))``: keep each filter's activation around its part location only.

    Wrap the output of any conv + ReLU with it (the official code also masks the input of its
    ``conv_mask`` layer this way). With ``learn_sharpness=True`` (official style only) the per-filter
    sharpness ``a_f`` is pulled towards ``clamp(3 / sqrtvar_f, 1.5, 3)`` by :meth:`update_sharpness`.

    Deviation: the official code learns ``a_f`` by SGD with a hand-set gradient
    ``-10000 (target - a_f)``, learning-rate multiplier 0.05 and base rate 1e-4, which is the update
    ``a_f += 0.05 (target - a_f)``: an exponential moving average with rate ``sharpness_momentum``.
    It is done here as exactly that, on a buffer, with the target computed from global (all-reduced)
    statistics under DDP, so ``a_f`` is identical on every rank.

    Args:
        channels: number of filters ``C``.
        beta: paper sharpness (4). The official style starts from ``beta / 2`` (its 2.0).
        locate: ``"argmax"`` (paper) or ``"centroid"`` (official).
        style: ``"paper"`` or ``"official"`` distance convention (see :func:`mask_distance`).
        learn_sharpness: learn ``a_f`` (needs ``style="official"``).
        sharpness_momentum: EMA rate of the sharpness update.
        sharpness_range: clamp of the sharpness target.
        spread_scale: numerator of the target ``spread_scale / sqrtvar`` (3 in the official code).

    Shape:
        ``(B, C, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(
        self,
        channels: int,
        beta: float = 4.0,
        locate: str = "argmax",
        style: str = "paper",
        learn_sharpness: bool = False,
        sharpness_momentum: float = 0.05,
        sharpness_range: tuple[float, float] = (1.5, 3.0),
        spread_scale: float = 3.0,
    ) -> None:
        super().__init__()
        if locate not in LOCATE_MODES:
            raise ValueError(f"locate must be one of {LOCATE_MODES}, got {locate!r}")
        if style not in MASK_STYLES:
            raise ValueError(f"mask style must be one of {MASK_STYLES}, got {style!r}")
        if learn_sharpness and style != "official":
            raise ValueError(
                "learn_sharpness needs style='official' (the reference code's learned a_f); "
                "set style: official or learn_sharpness: false"
            )
        if beta <= 0:
            raise ValueError(f"beta must be positive, got {beta}")
        self.channels = int(channels)
        self.beta = float(beta)
        self.locate = locate
        self.style = style
        self.learn_sharpness = bool(learn_sharpness)
        self.sharpness_momentum = float(sharpness_momentum)
        self.sharpness_range = (float(sharpness_range[0]), float(sharpness_range[1]))
        self.spread_scale = float(spread_scale)
        init = beta if style == "paper" else beta / 2.0
        # The sharpness defines what each filter's part region is: a buffer, so bundles keep it.
        self.register_buffer("sharpness", torch.full((channels,), float(init)))

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The detached mask ``(B, C, H, W)`` of ``x``."""
        if x.dim() == 4 and x.shape[1] != self.channels:
            raise ValueError(
                f"PartFilterMask was built for {self.channels} channels, got input {tuple(x.shape)}"
            )
        return part_mask(x, self.sharpness, self.locate, self.style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x * self.mask(x))

    @torch.no_grad()
    def update_sharpness(self, x: torch.Tensor, positive: torch.Tensor | None = None) -> None:
        """One EMA step of ``a_f`` towards ``clamp(3 / sqrtvar_f, lo, hi)`` (official rule).

        ``sqrtvar_f`` is the strength-weighted mean of :func:`spatial_spread` over the images that are
        positive for filter ``f`` (all images when ``positive`` is ``None``); strength is the mean
        activation (the reference code weights by the mean *masked* activation, which can be negative
        and then flips the weights). Sums are all-reduced, so every rank applies the same step.

        Args:
            x: ``(B, C, H, W)`` maps before masking.
            positive: ``(B, C)`` or ``(B,)`` bool.
        """
        if not self.learn_sharpness:
            return
        _check_maps(x)
        spread = spatial_spread(x, "official")
        strength = x.detach().float().clamp(min=0).mean((2, 3))
        if positive is not None:
            pos = _expand_positive(positive, x.shape[0], x.shape[1]).to(strength.dtype)
            strength = strength * pos
        stats = torch.stack([(strength * spread).sum(0), strength.sum(0)])
        all_reduce_(stats)
        ok = stats[1] > 0
        target = self.spread_scale / (stats[0] / stats[1].clamp(min=1e-12)).clamp(min=1e-6)
        target = target.clamp(*self.sharpness_range).to(self.sharpness.dtype)
        step = self.sharpness_momentum * (target - self.sharpness)
        self.sharpness.add_(torch.where(ok, step, torch.zeros_like(step)))

    def extra_repr(self) -> str:
        return f"{self.channels}, beta={self.beta}, locate={self.locate}, style={self.style}, learn_sharpness={self.learn_sharpness}"


# ---------------------------------------------------------------------------------------------------
# the filter loss (paper Eq. 2-4)
# ---------------------------------------------------------------------------------------------------
@dataclass
class FilterLossOutput:
    """The filter loss and its exposed terms (scalars reduced over filters; ``per_filter`` ``(C,)``).

    Without labels ``loss = -mi = -H(T) + inter_category_entropy + spatial_entropy``; with labels
    ``loss = inter_category_entropy + spatial_entropy`` of :func:`supervised_filter_terms`.

    Attributes:
        loss: the value to add (times lambda) to the task loss.
        mi: mutual information ``MI(X; T)`` in nats, in ``[0, min(log(n^2+1), log B)]``.
        inter_category_entropy: ``H(T'|X)`` (with labels: the mean cross-entropy of ``p(T'|x)`` vs the label).
        spatial_entropy: ``sum_x p(T+, x) H(T+|X=x)`` (with labels: mean over images of ``1[+] H(T+|x)``).
        prior_entropy: ``H(T)``, a constant under fixed priors.
        per_filter: ``(C,)`` loss of every filter.
    """

    loss: torch.Tensor
    mi: torch.Tensor
    inter_category_entropy: torch.Tensor
    spatial_entropy: torch.Tensor
    prior_entropy: torch.Tensor
    per_filter: torch.Tensor

    def as_dict(self) -> dict[str, torch.Tensor]:
        return {
            "filter_loss": self.loss,
            "filter_mi": self.mi,
            "inter_category_entropy": self.inter_category_entropy,
            "spatial_entropy": self.spatial_entropy,
        }


def _expand_positive(positive: torch.Tensor, b: int, c: int) -> torch.Tensor:
    positive = torch.as_tensor(positive)
    if positive.dim() == 1:
        positive = positive[:, None].expand(-1, c)
    if positive.shape != (b, c):
        raise ValueError(
            f"positive must be (B,) or (B, C) = ({b}, {c}) booleans, got shape {tuple(positive.shape)}"
        )
    return positive.bool()


def normalize_maps(x: torch.Tensor, mode: str = "none", sync: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """``mode="max"``: divide each filter's maps by their (detached, global under ``sync``) batch maximum."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode == "none":
        return x
    m = x.detach().amax(dim=(0, 2, 3)).float()
    if sync:
        all_reduce_(m, "max")
    return x / m.clamp(min=eps).to(x.dtype).view(1, -1, 1, 1)


def template_scores(x: torch.Tensor, templates: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * tr(x . T)`` for every image, filter and template.

    Args:
        x: ``(B, C, H, W)``.
        templates: ``(T, H, W)``.

    Returns:
        ``(B, C, T)``.
    """
    _check_maps(x)
    b, c, h, w = x.shape
    if templates.shape[-2:] != (h, w):
        raise ValueError(f"templates are {tuple(templates.shape[-2:])} but the maps are {(h, w)}")
    t = templates.to(device=x.device, dtype=x.dtype).reshape(templates.shape[0], h * w)
    return scale * (x.reshape(b, c, h * w) @ t.T)


def filter_mi_terms(scores: torch.Tensor, log_prior: torch.Tensor) -> dict[str, torch.Tensor]:
    """The MI and its terms from template scores (paper Eq. 3-4), per filter.

    With ``s[b, c, t] = tr(x_b . T_t)``: ``p(x_b|T_t) = softmax_b(s[:, c, t])`` (``Z_T`` sums over the
    batch), ``p(x) = sum_T p(T) p(x|T)``, ``p(T|x) = p(T) p(x|T) / p(x)``, and
    ``MI = sum_T p(T) sum_x p(x|T) log(p(x|T) / p(x))``. Computed in log space. The decomposition
    ``-MI = -H(T) + H(T'|X) + sum_x p(T+, x) H(T+|X=x)`` (``T' = {T-, T+}``) holds exactly.

    Args:
        scores: ``(B, C, T)``; the last template is the negative one.
        log_prior: ``(T,)`` log priors (or ``(C, T)``, one prior per filter).

    Returns:
        dict of ``(C,)`` tensors ``mi``, ``inter``, ``spatial``, ``loss`` (``= -mi``) and ``prior_entropy``.
    """
    b, c, t = scores.shape
    lp = log_prior.to(device=scores.device, dtype=scores.dtype)
    if lp.shape not in ((t,), (c, t)):
        raise ValueError(
            f"log_prior must be ({t},) or ({c}, {t}) (one entry per template), got {tuple(lp.shape)}"
        )
    lp = lp.expand(c, t)
    log_px_t = torch.log_softmax(scores, dim=0)  # log p(x|T): normalised over the images
    log_joint = log_px_t + lp  # log p(T, x)
    log_px = torch.logsumexp(log_joint, dim=2, keepdim=True)  # log p(x)
    log_post = log_joint - log_px  # log p(T|x)
    px = log_px.squeeze(-1).exp()  # (B, C)
    mi = (log_joint.exp() * (log_px_t - log_px)).sum((0, 2))
    # T' = {T-, T+}: the negative template vs the union of the positive ones.
    log_neg, log_pos = _split_posterior(log_post)
    inter = (px * -(log_neg.exp() * log_neg + log_pos.exp() * log_pos)).sum(0)
    spatial = (px * log_pos.exp() * _location_entropy(log_post, log_pos)).sum(0)
    prior_entropy = -(lp.exp() * lp).sum(-1)
    return {
        "mi": mi,
        "inter": inter,
        "spatial": spatial,
        "loss": -prior_entropy + inter + spatial,
        "prior_entropy": prior_entropy,
    }


def _split_posterior(log_post: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log p(T-|x), log p(T+|x))`` from the full posterior ``(B, C, T)``."""
    return log_post[..., -1], torch.logsumexp(log_post[..., :-1], dim=-1)


def _location_entropy(log_post: torch.Tensor, log_pos: torch.Tensor) -> torch.Tensor:
    """``H(T+|X=x)``: entropy of the part location given that ``x`` fits a positive template, ``(B, C)``."""
    log_q = log_post[..., :-1] - log_pos[..., None]
    return -(log_q.exp() * log_q).sum(-1)


def supervised_filter_terms(
    scores: torch.Tensor,
    positive: torch.Tensor,
    alpha: float | None = None,
    monitor_alpha: float | None = None,
) -> dict[str, torch.Tensor]:
    """Label-aware counterpart of the MI terms (deviation; see :func:`filter_loss`), per filter.

    The posterior ``p(T|x)`` is the paper's (templates, batch-normalised likelihoods, Zhang, Wu, Zhu 2018
    Eq. 3), with the prior of the positive templates set to the fraction ``alpha_c`` of images positive for
    filter ``c`` (the reference code balances positives and negatives the same way). Then, averaged over
    images:

    * ``inter = mean_x -log p(T' = y_x | x)``: negatives must fit ``T-``, positives a positive template;
    * ``spatial = mean_x 1[y_x = +] H(T+|X=x)``: a positive image peaks at one location.

    Both are 0 for an ideal batch. Uniform image weights (instead of the MI's ``p(x)``) matter: with
    ``p(x)`` weights the optimiser lowers the loss by concentrating ``p(x)`` on a few easy images.

    Computed by :class:`_SupervisedTerms` in closed form (one log-softmax over the batch, one softmax over
    the locations, a hand-written backward), which equals the posterior-by-posterior evaluation exactly.

    Args:
        scores: ``(B, C, T)``; positive: ``(B, C)`` bool; alpha: fixed positive prior mass instead.
        monitor_alpha: the ``alpha`` of :func:`template_priors` (``None``: uniform priors) under which
            ``mi``, the paper's ``MI(X; T)`` (Eq. 3) of the same scores, is computed for monitoring.

    Returns:
        dict of ``(C,)`` tensors ``inter``, ``spatial``, ``loss`` and ``mi`` (no gradient).
    """
    b, c, t = scores.shape
    if t < 2:
        raise ValueError(f"scores need at least one positive and the negative template, got {t} templates")
    pos = positive.to(scores.device)
    if pos.shape != (b, c):
        raise ValueError(f"positive must be (B, C) = ({b}, {c}) booleans, got shape {tuple(pos.shape)}")
    pos = pos.bool()
    a = (
        pos.to(scores.dtype).mean(0)
        if alpha is None
        else torch.full((c,), float(alpha), dtype=scores.dtype, device=scores.device)
    )
    a = a.clamp(0.5 / b, 1.0 - 0.5 / b)
    log_prior_pos, log_prior_neg = (a / (t - 1)).log(), (1.0 - a).log()  # (C,) each; no gradient (labels)
    if monitor_alpha is None:
        m_pos = m_neg = -math.log(t)  # uniform priors: every template 1 / T
    else:
        if not 0.0 < monitor_alpha < 1.0:
            raise ValueError(f"monitor_alpha must be in (0, 1), got {monitor_alpha}")
        m_pos, m_neg = math.log(monitor_alpha / (t - 1)), math.log(1.0 - monitor_alpha)
    inter, spatial, mi = _SupervisedTerms.apply(scores, pos, log_prior_pos, log_prior_neg, m_pos, m_neg)
    return {"inter": inter, "spatial": spatial, "loss": inter + spatial, "mi": mi}


class _SupervisedTerms(torch.autograd.Function):
    """``(inter, spatial, mi)`` of :func:`supervised_filter_terms` with a closed-form backward.

    With ``l = log_softmax_b(s)`` (``log p(x|T)``), ``A = logsumexp_{t+} l`` and ``n = l[..., T-]``:
    the positive templates share one prior ``a / (T - 1)``, so ``log p(T+|x) = -softplus(-u)`` and
    ``log p(T-|x) = -softplus(u)`` with the log-odds ``u = A + log(a / (T - 1)) - n - log(1 - a)``, and
    ``p(T_mu|x, T+) = softmax_{t+}(l) = q`` (the priors cancel), ``H(T+|x) = -sum q log q``. Hence

    * ``inter = mean_b softplus(+-u)`` (``-u`` for positives), ``d/du = (sigmoid(u) - y) / B``;
    * ``spatial = mean_b y H``, ``dH/dl_t = -q_t (log q_t + H)``;
    * ``ds = dl - softmax_b(s) sum_b dl`` (the log-softmax backward).

    This takes about half the ``(B, C, T)``-sized passes (and saved tensors) of composing the posterior
    step by step under autograd. ``mi`` (paper Eq. 3, no gradient) reuses ``P = exp(l)``:
    ``MI = sum_t p_t sum_b P l - sum_b e^{log p(x)} log p(x)``, as ``sum_t p_t P = p(x)``.
    """

    @staticmethod
    def forward(ctx, scores, pos, lp_pos, lp_neg, m_pos, m_neg):  # type: ignore[override]
        ls = torch.log_softmax(scores, dim=0)  # log p(x|T), (B, C, T)
        lsp, ln = ls[..., :-1], ls[..., -1]
        # A = logsumexp_{t+} l and q = softmax_{t+} l sharing one exp (torch.logsumexp + exp would take two)
        top = lsp.amax(-1, keepdim=True)
        q = (lsp - top).exp_()
        norm = q.sum(-1, keepdim=True)
        q.div_(norm)
        lse_k = top + norm.log()
        lq = lsp - lse_k  # log p(T_mu | x, T+)
        lse = lse_k.squeeze(-1)  # A, (B, C)
        ent = -(q * lq).sum(-1)  # H(T+|x), (B, C)
        u = lse + lp_pos - ln - lp_neg  # log p(T+|x) - log p(T-|x)
        posf = pos.to(ls.dtype)
        inter = F.softplus(torch.where(pos, -u, u)).mean(0)
        spatial = (posf * ent).mean(0)
        lik = ls.exp()  # p(x|T), reused by the backward
        # monitoring MI under the paper's priors (equal for the positive templates)
        log_px = torch.logaddexp(lse + m_pos, ln + m_neg)  # log p(x), (B, C)
        w = torch.full((ls.shape[-1],), math.exp(m_pos), dtype=ls.dtype, device=ls.device)
        w[-1] = math.exp(m_neg)
        # elementwise (no matmul): under autocast a matmul would run in half precision
        mi = ((lik * ls).sum(0) * w).sum(-1) - (log_px.exp() * log_px).sum(0)
        ctx.save_for_backward(lik, q, lq, ent, torch.sigmoid(u) - posf, posf)
        ctx.mark_non_differentiable(mi)
        return inter, spatial, mi

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_inter, g_spatial, g_mi):  # type: ignore[override]
        lik, q, lq, ent, dsoft, posf = ctx.saved_tensors
        b = lik.shape[0]
        g_u = dsoft * (g_inter / b)  # (B, C)
        g_ent = posf * (g_spatial / b)
        g_l = torch.empty_like(lik)
        # d/dl_mu = q (dA g_u - g_H (log q + H)), as dA/dl_mu = q_mu
        torch.mul(q, g_u.unsqueeze(-1) - g_ent.unsqueeze(-1) * (lq + ent.unsqueeze(-1)), out=g_l[..., :-1])
        g_l[..., -1] = -g_u
        g_s = g_l - lik * g_l.sum(0, keepdim=True)
        return g_s, None, None, None, None, None


def filter_loss(
    x: torch.Tensor,
    positive: torch.Tensor | None = None,
    beta: float = 4.0,
    tau: float | None = None,
    alpha: float | None = None,
    template_scale: float = 1.0,
    normalize: str = "none",
    sync: bool = True,
    reduction: str = "mean",
) -> FilterLossOutput:
    """The filter loss ``-MI(X; T)`` of paper Eq. 2 over the batch, with its two entropy terms.

    Without labels this is the paper's loss: ``loss = -mi = -H(T) + inter + spatial``.

    Deviation, with ``positive`` (the paper's approximate gradient and the reference code choose the
    template by label, which is how multi-category filters get their category):
    ``loss = inter + spatial`` from :func:`supervised_filter_terms` (prior of ``T+`` = fraction of
    positives, cross-entropy of ``p(T'|x)`` against the label, location entropy of positives, image
    weights uniform). ``mi`` is still the paper's MI (uniform template priors) of the same maps, for
    monitoring.

    Args:
        x: ``(B, C, H, W)`` filter maps after ReLU and *before* the mask (the quantity the templates
            describe).
        positive: optional ``(B,)`` or ``(B, C)`` bool labels (image positive for filter).
        beta, tau, alpha: template sharpness, magnitude (default ``0.5 / n^2``) and positive prior
            mass (paper default ``n^2 / (n^2 + 1)``; with labels, the fraction of positives).
        template_scale: multiplies the templates (a sharpness / inverse temperature). Deviation: 1 is
            the paper; larger values keep the MI from vanishing for O(1) activations.
        normalize: ``"none"`` (paper) or ``"max"`` (divide each filter by its detached batch max).
        sync: under an initialised process group, compute over the global batch (scores and labels
            all-gathered, scores with gradients) instead of each rank's shard.
        reduction: ``"mean"`` over filters or ``"sum"`` (the paper's ``sum_f Loss_f``).

    Returns:
        :class:`FilterLossOutput`.
    """
    _check_maps(x)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    b, c, h, w = x.shape
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    # float32 at least: log-softmax over the batch of large scores is unstable in half precision.
    work = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    templates = part_templates(h, w, beta, tau).to(device=x.device, dtype=work.dtype)
    # scale * tr((x / max_c) . T) = (scale / max_c) tr(x . T): one pass over the (B, C, T) scores applies both
    # the template scale and the detached per-filter normalisation (normalize_maps) instead of two passes.
    raw = work.reshape(b, c, h * w) @ templates.reshape(-1, h * w).T  # (B, C, T)
    if normalize == "max":
        m = x.detach().amax(dim=(0, 2, 3)).float()
        if sync:
            all_reduce_(m, "max")
        scores = raw * (template_scale / m.clamp(min=1e-6).to(raw.dtype)).view(1, c, 1)
    else:
        scores = raw * template_scale if template_scale != 1.0 else raw
    pos = None if positive is None else _expand_positive(positive.to(x.device), b, c)
    if sync and _world_size() > 1:
        scores = gather_batch(scores, with_grad=True)
        if pos is not None:
            pos = gather_batch(pos.to(torch.uint8), with_grad=False).bool()
    log_prior = template_priors(h, w, None if pos is not None else alpha).log()
    if pos is None:
        terms = filter_mi_terms(scores, log_prior)
        mi, prior_entropy = terms["mi"], terms["prior_entropy"]
    else:
        # the MI under uniform priors is monitored only: computed inside the fused terms, no gradient
        terms = supervised_filter_terms(scores, pos, alpha)
        mi = terms["mi"]
        prior_entropy = -(log_prior.exp() * log_prior).sum().to(device=scores.device, dtype=scores.dtype)
    red = torch.mean if reduction == "mean" else torch.sum
    return FilterLossOutput(
        loss=red(terms["loss"]),
        mi=red(mi),
        inter_category_entropy=red(terms["inter"]),
        spatial_entropy=red(terms["spatial"]),
        prior_entropy=red(prior_entropy.expand(c)),
        per_filter=terms["loss"],
    )


class PartFilterLoss(nn.Module):
    """:func:`filter_loss` with its settings bound; ``forward(x, positive=None) -> FilterLossOutput``."""

    def __init__(
        self,
        beta: float = 4.0,
        tau: float | None = None,
        alpha: float | None = None,
        template_scale: float = 1.0,
        normalize: str = "none",
        sync: bool = True,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        if normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
        if template_scale <= 0:
            raise ValueError(f"template_scale must be positive, got {template_scale}")
        self.beta, self.tau, self.alpha = float(beta), tau, alpha
        self.template_scale = float(template_scale)
        self.normalize = normalize
        self.sync = bool(sync)
        self.reduction = reduction

    def forward(self, x: torch.Tensor, positive: torch.Tensor | None = None) -> FilterLossOutput:
        return filter_loss(
            x,
            positive,
            self.beta,
            self.tau,
            self.alpha,
            self.template_scale,
            self.normalize,
            self.sync,
            self.reduction,
        )

    def extra_repr(self) -> str:
        return (
            f"beta={self.beta}, tau={self.tau}, template_scale={self.template_scale}, normalize={self.normalize}, "
            f"sync={self.sync}, reduction={self.reduction}"
        )


# ---------------------------------------------------------------------------------------------------
# the official code's gradient injection (zqs1022/interpretableCNN), optional
# ---------------------------------------------------------------------------------------------------
def _official_strength(
    s: torch.Tensor, member: torch.Tensor, alpha: float, log_z: torch.Tensor
) -> torch.Tensor:
    """``e^{s/a} (s - a log Z + a)`` divided by its mean over ``member`` images, per filter (B, C)."""
    # e^{s/a} overflows for large s; the per-filter normalisation below divides any common factor
    # out, so subtract the per-filter max of s/a first.
    e = torch.exp(
        s / alpha - (s / alpha).masked_fill(~member, float("-inf")).amax(0, keepdim=True).clamp(min=-1e30)
    )
    strength = (e * (s - alpha * log_z + alpha)).masked_fill(~member, 0.0)
    count = member.sum(0, keepdim=True).clamp(min=1)
    mean = strength.sum(0, keepdim=True) / count
    out = strength / mean.where(mean.abs() > 1e-12, torch.ones_like(mean))
    return torch.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)


class _OfficialFilterGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask, positive, weight, w_pos, w_neg, alpha):  # type: ignore[override]
        ctx.save_for_backward(x.detach(), mask.detach(), positive)
        ctx.cfg = (float(weight), float(w_pos), float(w_neg), float(alpha))
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        x, mask, positive = ctx.saved_tensors
        weight, w_pos, w_neg, alpha = ctx.cfg
        x, maskf = x.float(), mask.float()
        neg = ~positive
        s = (x * maskf).mean((2, 3))  # (B, C) spatial mean of the masked map
        m = x.mean((2, 3))  # (B, C) spatial mean of the map
        # logZ over the whole batch as in the reference code (its masks flipped along batch and
        # filter axes there, unexplained in issue #8; not reproduced).
        log_z_pos = torch.logsumexp(s / alpha, 0, keepdim=True) - math.log(s.shape[0])
        log_z_neg = torch.logsumexp(-m / alpha, 0, keepdim=True) - math.log(m.shape[0])
        st_pos = _official_strength(s, positive, alpha, log_z_pos)
        st_neg = _official_strength(-m, neg, alpha, log_z_neg)
        extra = -weight * w_pos * maskf * st_pos[..., None, None] + weight * w_neg * st_neg[..., None, None]
        return grad_out + extra.to(grad_out.dtype), None, None, None, None, None, None


def official_filter_grad(
    x: torch.Tensor,
    mask: torch.Tensor,
    positive: torch.Tensor,
    weight: float = 1e-5,
    w_pos: float = 1.0,
    w_neg: float = 1.0,
    alpha: float = 0.5,
) -> torch.Tensor:
    """Identity in the forward pass; adds the reference code's filter-loss gradient in backward.

    For image ``b`` positive for filter ``f``: ``dL/dx -= weight * w_pos * mask * strength+`` with
    ``strength+ = e^{s/a} (s - a log Z+ + a)``, ``s`` the spatial mean of ``x * mask``; for a negative
    image ``dL/dx += weight * w_neg * strength-`` (spatially constant) with ``m`` the spatial mean of
    ``x`` in place of ``s`` and ``-m`` in the exponent. Each strength is divided by its mean over the
    images of its kind; ``a = 0.5``. The reference code sets ``weight = 1e-5 / (10 * epoch)``.
    Statistics are per rank (the reference code's batch). No scalar loss exists: log
    :func:`filter_loss` (under ``no_grad``) to monitor it.

    Args:
        x: ``(B, C, H, W)`` maps before masking; mask: ``(B, C, H, W)``; positive: ``(B,)`` or ``(B, C)``.
    """
    _check_maps(x)
    pos = _expand_positive(positive.to(x.device), x.shape[0], x.shape[1])
    return _OfficialFilterGrad.apply(x, mask, pos, weight, w_pos, w_neg, alpha)


# ---------------------------------------------------------------------------------------------------
# the interpretable conv layer
# ---------------------------------------------------------------------------------------------------
class InterpretableConv2d(nn.Module):
    """A new interpretable conv layer: ``conv -> (BN) -> ReLU -> part mask`` (paper Sec. 3, Fig. 2).

    Append it on top of any stage of a CNN (the paper adds it on top of VGG conv5); the forward pass
    returns the masked maps, and :meth:`filter_loss` gives the loss of the maps of the last forward
    pass (kept in :attr:`last_features`), which any training loop adds to its task loss::

        block = InterpretableConv2d(512)
        net.features = nn.Sequential(net.features, block)
        loss = F.cross_entropy(net(x), y) + 0.1 * block.filter_loss(positive=y == target).loss

    Args:
        in_channels: input channels.
        out_channels: filters ``C`` (default ``in_channels``, as the paper's 512 -> 512).
        kernel_size: conv kernel (3 in the paper), ``padding = kernel_size // 2``.
        batch_norm: add a BatchNorm before the ReLU (not in the paper; helps from-scratch training).
        mask_input: also mask the *input* with its own :class:`PartFilterMask` (the official
            ``conv_mask`` masks its input, i.e. conv5_3 on VGG); then :meth:`filter_loss` covers the
            input maps as well.
        beta, locate, mask_style, learn_sharpness: see :class:`PartFilterMask`.
        loss: keyword arguments of :class:`PartFilterLoss` (``template_scale``, ``normalize``, ...).
        init_std: std of the normal initialisation of the conv weights (official N(0, 0.01));
            ``None`` keeps PyTorch's default (better from scratch).

    Shape:
        ``(B, C_in, H, W)`` to ``(B, C, H, W)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        kernel_size: int = 3,
        batch_norm: bool = False,
        mask_input: bool = False,
        beta: float = 4.0,
        locate: str = "argmax",
        mask_style: str = "paper",
        learn_sharpness: bool = False,
        use_mask: bool = True,
        loss: dict | None = None,
        init_std: float | None = None,
    ) -> None:
        super().__init__()
        out_channels = in_channels if out_channels is None else int(out_channels)
        if kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be odd (same-size output), got {kernel_size}")
        self.in_channels, self.out_channels = int(in_channels), out_channels
        mask_kw = {"beta": beta, "locate": locate, "style": mask_style, "learn_sharpness": learn_sharpness}
        self.input_mask = PartFilterMask(in_channels, **mask_kw) if mask_input else None
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not batch_norm
        )
        self.bn = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.part_mask = PartFilterMask(out_channels, **mask_kw)
        self.use_mask = bool(use_mask)
        self.loss_fn = PartFilterLoss(beta=beta, **(loss or {}))
        if init_std is not None:
            nn.init.normal_(self.conv.weight, std=init_std)
            if self.conv.bias is not None:
                nn.init.zeros_(self.conv.bias)
        self.last_features: dict[str, torch.Tensor] = {}
        self.last_masks: dict[str, torch.Tensor] = {}
        self.last_output: torch.Tensor | None = None

    def forward_parts(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(masked output, {name: maps before masking}, {name: mask})``; names ``"input"``, ``"output"``."""
        feats: dict[str, torch.Tensor] = {}
        masks: dict[str, torch.Tensor] = {}
        if self.input_mask is not None:
            feats["input"] = x
            if self.use_mask:
                masks["input"] = self.input_mask.mask(x)
                x = F.relu(x * masks["input"])
        y = F.relu(self.bn(self.conv(x)))
        feats["output"] = y
        if self.use_mask:
            masks["output"] = self.part_mask.mask(y)
            y = F.relu(y * masks["output"])
        return y, feats, masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, self.last_features, self.last_masks = self.forward_parts(x)
        self.last_output = y
        return y

    def masks(self) -> dict[str, PartFilterMask]:
        """The mask modules by feature name (``"input"`` only with ``mask_input``)."""
        out = {"output": self.part_mask}
        if self.input_mask is not None:
            out = {"input": self.input_mask, **out}
        return out

    def filter_loss(self, positive: torch.Tensor | None = None) -> FilterLossOutput:
        """The filter loss of the last forward pass (summed over ``input``/``output`` maps when both exist)."""
        if not self.last_features:
            raise RuntimeError(
                "InterpretableConv2d.filter_loss() needs a forward pass first: call the network on a batch"
            )
        outs = [self.loss_fn(f, positive) for f in self.last_features.values()]
        if len(outs) == 1:
            return outs[0]
        return FilterLossOutput(
            *(
                sum(getattr(o, k) for o in outs)
                for k in ("loss", "mi", "inter_category_entropy", "spatial_entropy", "prior_entropy")
            ),
            per_filter=torch.cat([o.per_filter for o in outs]),
        )

    def extra_repr(self) -> str:
        return f"use_mask={self.use_mask}"


# ---------------------------------------------------------------------------------------------------
# which category each filter serves (paper Sec. 3.2, multi-category; official ``sliceMag``)
# ---------------------------------------------------------------------------------------------------
ASSIGNMENT_MODES = ("single", "static", "dynamic")


class FilterAssignment(nn.Module):
    """The category of every filter, and from it which images are positive for which filter.

    * ``"single"``: one category vs the rest (paper's single-category setting): every filter serves
      ``target``; an image is positive when its label equals ``target``.
    * ``"static"``: filter ``f`` serves class ``f mod K`` (round-robin), fixed.
    * ``"dynamic"`` (official code): ``response[f, k]`` is an EMA (momentum 0.9) of the mean over
      class-``k`` images of the filter's spatial max, initialised at ``max(mean, floor)``; a filter
      serves ``argmax_k response[f, k]``. Sums are all-reduced, so all ranks hold the same assignment.

    Images of other categories are negatives for a filter (paper Sec. 3.2). The assignment is part of
    what the filters mean, so it is kept in buffers (saved with the weights).

    Args:
        channels: filters ``C``; num_classes: categories ``K``.
        mode: see above; target: the positive class of ``"single"``.
        momentum, floor: of the dynamic EMA.
    """

    def __init__(
        self,
        channels: int,
        num_classes: int,
        mode: str = "dynamic",
        target: int = 1,
        momentum: float = 0.9,
        floor: float = 0.1,
    ) -> None:
        super().__init__()
        if mode not in ASSIGNMENT_MODES:
            raise ValueError(f"assignment must be one of {ASSIGNMENT_MODES}, got {mode!r}")
        if mode == "single" and not 0 <= target < num_classes:
            raise ValueError(f"target class {target} is outside 0..{num_classes - 1}")
        self.mode = mode
        self.num_classes = int(num_classes)
        self.momentum, self.floor = float(momentum), float(floor)
        init = (
            torch.full((channels,), int(target)) if mode == "single" else torch.arange(channels) % num_classes
        )
        self.register_buffer("filter_class", init.long())
        self.register_buffer("response", torch.zeros(channels, num_classes))

    def positive(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B, C)`` bool: image ``b`` belongs to the category of filter ``c``."""
        return labels.view(-1, 1) == self.filter_class.view(1, -1)

    @torch.no_grad()
    def update(self, x: torch.Tensor, labels: torch.Tensor) -> None:
        """One EMA step of the dynamic assignment from maps ``x`` ``(B, C, H, W)`` and labels ``(B,)``."""
        if self.mode != "dynamic":
            return
        _check_maps(x)
        peak = x.detach().float().amax((2, 3))  # (B, C)
        onehot = F.one_hot(labels.long(), self.num_classes).float()  # (B, K)
        stats = torch.cat([peak.T @ onehot, onehot.sum(0, keepdim=True)])  # (C + 1, K)
        all_reduce_(stats)
        sums, counts = stats[:-1], stats[-1]
        mean = sums / counts.clamp(min=1)
        seen = counts > 0
        fresh = seen & (self.response.sum(0) == 0)
        ema = self.momentum * self.response + (1 - self.momentum) * torch.where(mean > 0, mean, self.response)
        new = torch.where(fresh, mean.clamp(min=self.floor), torch.where(seen, ema, self.response))
        self.response.copy_(new)
        started = self.response.sum(1) > 0
        self.filter_class.copy_(torch.where(started, self.response.argmax(1), self.filter_class))

    def extra_repr(self) -> str:
        return f"mode={self.mode}, num_classes={self.num_classes}"
