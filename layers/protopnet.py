"""Prototype layer and losses of ProtoPNet (Chen et al., "This Looks Like That", NeurIPS 2019).

Pure PyTorch: usable on any ``(B, C, H, W)`` feature map. Notation follows the paper (Sec. 2.1):
latent patches ``z``, prototypes ``p_j`` (``P`` of them, ``m`` per class), squared L2 distance
``d(z, p) = ||z - p||^2``, similarity ``s = log((d + 1) / (d + eps))`` (paper Eq. in Sec. 2.1, the
"log" activation of the reference code), and the training objective (paper Eq. (1))::

    CE + lambda_1 * Clst + lambda_2 * Sep          (joint stage, Sec. 2.2 step 1)
    CE + lambda * sum_{k, j: class(j) != k} |w_kj|  (last-layer stage, Sec. 2.2 step 3)

with ``Clst = mean_i min_{j: class(j) = y_i} min_patch d`` and ``Sep = -mean_i min_{j: class(j) != y_i}
min_patch d``. The reference code writes ``Sep`` as a positive distance with a negative coefficient
(``sep = -0.08``); the functions here return the positive distance, the sign lives in the coefficient.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PrototypeLayer",
    "avg_separation_cost",
    "cluster_cost",
    "cluster_separation_costs",
    "l1_off_class",
    "log_similarity",
    "linear_similarity",
    "prototype_class_identity",
    "separation_cost",
    "squared_l2_distances",
    "upsample_maps",
]

_ACTIVATIONS = ("log", "linear")


def prototype_class_identity(
    num_classes: int, per_class: int, classes: Sequence[int] | None = None
) -> torch.Tensor:
    """``(P, K)`` one-hot float matrix.

    By default prototype ``j`` belongs to class ``j // per_class`` (contiguous blocks, as the reference
    and Huang et al.'s evaluation code assume); ``classes`` gives an explicit class per prototype
    instead (a physically pruned network).
    """
    if num_classes < 1 or per_class < 1:
        raise ValueError(f"num_classes and per_class must be >= 1, got {num_classes} and {per_class}")
    if classes is None:
        cls = torch.arange(num_classes * per_class) // per_class
    else:
        cls = torch.as_tensor(list(classes), dtype=torch.long)
        if cls.numel() == 0 or int(cls.min()) < 0 or int(cls.max()) >= num_classes:
            raise ValueError(
                f"prototype classes must be non-empty and in [0, {num_classes}), got {list(classes)[:10]}..."
            )
    return F.one_hot(cls, num_classes).float()


def squared_l2_distances(z: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every ``h x w`` patch of ``z`` to every prototype, by the expansion trick.

    ``||z - p||^2 = ||z||^2 - 2 z.p + ||p||^2`` where ``||z||^2`` is a convolution of ``z^2`` with ones
    and ``z.p`` a convolution with the prototypes (reference ``_l2_convolution``). Always computed in
    float32 or wider, also under autocast: ``||z||^2`` and ``||p||^2`` are large and nearly cancel, which fp16/bf16
    cannot represent. Round-off can make the difference slightly negative, so it is clamped at 0. On CUDA
    the terms are matrix products (:func:`_patch_terms_exact`, no TF32 convolutions); on CPU, ``1 x 1``
    prototypes (the paper's) take one batched product (:func:`_pointwise_distances`), larger ones the
    convolutions.

    Args:
        z: ``(B, D, H, W)`` latent map.
        prototypes: ``(P, D, h, w)``.

    Returns:
        ``(B, P, H - h + 1, W - w + 1)`` distances ``>= 0``, float32 (float64 for float64 inputs).
    """
    if z.dim() != 4 or prototypes.dim() != 4:
        raise ValueError(
            f"expected z (B, D, H, W) and prototypes (P, D, h, w), got {tuple(z.shape)} and "
            f"{tuple(prototypes.shape)}"
        )
    if z.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"latent depth {z.shape[1]} differs from prototype depth {prototypes.shape[1]}; "
            "the add-on layers must output prototype_dim channels"
        )
    if z.shape[2] < prototypes.shape[2] or z.shape[3] < prototypes.shape[3]:
        raise ValueError(
            f"latent map {tuple(z.shape[2:])} is smaller than the prototype {tuple(prototypes.shape[2:])}; "
            "use larger inputs or an earlier backbone stage"
        )
    # float32 at least (float64 models stay float64: two-process equality tests run in float64)
    dtype = torch.promote_types(torch.promote_types(z.dtype, prototypes.dtype), torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        z32, p32 = z.to(dtype), prototypes.to(dtype)
        if z.device.type == "cuda":
            z2, zp = _patch_terms_exact(z32, p32)
        elif prototypes.shape[2] == prototypes.shape[3] == 1:
            return _pointwise_distances(z32, p32)
        else:
            ones = torch.ones((1, *p32.shape[1:]), dtype=dtype, device=z.device)
            z2 = F.conv2d(z32 * z32, ones)  # (B, 1, H', W')
            zp = F.conv2d(z32, p32)  # (B, P, H', W')
        p2 = (p32 * p32).sum(dim=(1, 2, 3)).view(1, -1, 1, 1)
        return F.relu(z2 - 2.0 * zp + p2)


def _pointwise_distances(z: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``(B, P, H, W)`` ``relu(||z||^2 + ||p||^2 - 2 z.p)`` for ``1 x 1`` prototypes (Chen et al. 2019, Sec. 2.1).

    The same expansion as the convolution route, with ``||z||^2`` a channel sum (not a convolution of
    ``z^2`` with ones) and ``||z||^2 + ||p||^2 - 2 z.p`` one batched ``baddbmm`` accumulating the product
    onto the broadcast norms (two passes over the ``(B, P, H W)`` output before the clamp instead of three,
    and no convolution set-up); equal up to float rounding.

    Args:
        z: ``(B, D, H, W)``; p: ``(P, D, 1, 1)``, same dtype.
    """
    b, _, hh, ww = z.shape
    zf, pf = z.flatten(2), p.flatten(1)  # (B, D, HW), (P, D)
    norms = (zf * zf).sum(1, keepdim=True) + (pf * pf).sum(1).view(1, -1, 1)  # (B, P, HW)
    return F.relu(torch.baddbmm(norms, pf.expand(b, -1, -1), zf, alpha=-2.0)).view(b, -1, hh, ww)


def _patch_terms_exact(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(||z_patch||^2 (B, 1, H', W'), z_patch . p (B, P, H', W'))`` without convolutions, for CUDA.

    cuDNN rounds float32 convolution inputs to TF32 (10-bit mantissa) by default
    (``torch.backends.cudnn.allow_tf32``), which moves a distance that should be 0 (a pushed prototype on
    its own patch) by ~1e-3 ``||z||^2`` and the log similarity from 9.2 to ~3. A matrix product stays in
    IEEE float32 unless the user has opted into TF32 (``torch.set_float32_matmul_precision``), and the
    squared norms are plain sums.
    """
    b, d, hh, ww = z.shape
    n, _, h, w = p.shape
    zz = (z * z).sum(1, keepdim=True)  # (B, 1, H, W)
    if h == w == 1:
        return zz, torch.einsum("bdhw,pd->bphw", z, p.flatten(1))
    z2 = F.avg_pool2d(zz, (h, w), stride=1) * (h * w)
    cols = F.unfold(z, (h, w))  # (B, D*h*w, L), the same (d, i, j) order as p.flatten(1)
    zp = (p.flatten(1) @ cols).view(b, n, hh - h + 1, ww - w + 1)
    return z2, zp


def log_similarity(d: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """``log((d + 1) / (d + eps))``: ``log(1 / eps)`` at ``d = 0``, ``-> 0`` as ``d -> inf`` (reference 'log')."""
    return torch.log((d + 1.0) / (d + eps))


def linear_similarity(d: torch.Tensor) -> torch.Tensor:
    """``-d`` (reference 'linear' activation)."""
    return -d


class PrototypeLayer(nn.Module):
    """Class-specific prototypes and their distance / similarity maps on a latent map.

    Args:
        num_classes: ``K``.
        per_class: prototypes per class ``m`` (``P = K * m``; prototype ``j`` has class ``j // m``).
        dim: latent depth ``D``.
        hw: prototype spatial size ``(h, w)`` (``(1, 1)`` in the paper).
        activation: ``"log"`` (paper) or ``"linear"``.
        eps: ``eps`` of the log similarity.
        init: ``"uniform"`` (``U[0, 1)``, the reference: it matches a sigmoid add-on) or ``"normal"``.
        classes: optional explicit class of every prototype (overrides the contiguous layout).

    State (kept in the state dict, so bundles keep them):
        ``prototype_vectors`` ``(P, D, h, w)`` parameter; ``prototype_class_identity`` ``(P, K)`` buffer;
        ``prototype_mask`` ``(P,)`` buffer, 1 for active and 0 for pruned prototypes.

    Shape:
        ``(B, D, H, W)`` to ``distances`` and ``similarity_maps`` ``(B, P, H', W')`` and their pooled
        ``min_distances`` / ``similarities`` ``(B, P)``.
    """

    def __init__(
        self,
        num_classes: int,
        per_class: int,
        dim: int,
        hw: Sequence[int] = (1, 1),
        activation: str = "log",
        eps: float = 1e-4,
        init: str = "uniform",
        classes: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
        if init not in ("uniform", "normal"):
            raise ValueError(f"init must be 'uniform' or 'normal', got {init!r}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        hw = tuple(int(v) for v in hw)
        if len(hw) != 2 or min(hw) < 1:
            raise ValueError(f"hw must be two positive ints, got {hw}")
        self.num_classes = int(num_classes)
        self.per_class = int(per_class)
        self.dim = int(dim)
        self.hw = hw
        self.activation = activation
        self.eps = float(eps)
        identity = prototype_class_identity(self.num_classes, self.per_class, classes)
        p = identity.shape[0]
        init_fn = torch.rand if init == "uniform" else torch.randn
        self.prototype_vectors = nn.Parameter(init_fn(p, self.dim, *hw))
        self.register_buffer("prototype_class_identity", identity)
        self.register_buffer("prototype_mask", torch.ones(p))

    @property
    def num_prototypes(self) -> int:
        return self.prototype_vectors.shape[0]

    @property
    def prototype_classes(self) -> torch.Tensor:
        """``(P,)`` long: the class of every prototype."""
        return self.prototype_class_identity.argmax(1)

    @property
    def max_distance(self) -> float:
        """``D * h * w``: the bound of ``d`` when latents and prototypes lie in ``[0, 1]`` (sigmoid add-on)."""
        return float(self.dim * self.hw[0] * self.hw[1])

    def distances(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, P, H', W')`` squared L2 distances (:func:`squared_l2_distances`)."""
        return squared_l2_distances(z, self.prototype_vectors)

    def similarity(self, d: torch.Tensor) -> torch.Tensor:
        return log_similarity(d, self.eps) if self.activation == "log" else linear_similarity(d)

    def forward(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Returns ``distances``, ``similarity_maps`` ``(B, P, H', W')``, ``min_distances``, ``similarities`` ``(B, P)``."""
        d = self.distances(z)
        # global min pooling; the similarity is monotone decreasing in d, so max-pooling similarities
        # equals the similarity of the pooled distance.
        min_d = d.flatten(2).min(dim=2).values
        return {
            "distances": d,
            "similarity_maps": self.similarity(d),
            "min_distances": min_d,
            "similarities": self.similarity(min_d),
        }

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, dim={self.dim}, hw={self.hw}, classes={self.num_classes}, "
            f"activation={self.activation!r}"
        )


def _own_class_mask(labels: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """``(B, P)`` bool: prototype ``j`` belongs to the class of sample ``i``."""
    if labels.dim() != 1:
        raise ValueError(f"labels must be (B,), got {tuple(labels.shape)}")
    return class_identity[:, labels].t().bool()


def _masked_min_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over rows of the min of ``values`` where ``mask``; rows with no valid entry are skipped.

    The reference computes this as ``max_dist - max((max_dist - d) * mask)``, which is only right while
    every ``d <= max_dist``; filling invalid entries with ``+inf`` is right for any ``d``. The mean over
    valid rows is ``sum(valid mins) / max(#valid, 1)`` (0, with the graph intact, when no row is valid):
    no boolean indexing and no ``bool()``, so no host synchronisation in the training step.
    """
    mins = values.masked_fill(~mask, float("inf")).min(dim=1).values
    valid = torch.isfinite(mins)
    total = torch.where(valid, mins, torch.zeros_like(mins)).sum()
    return total / valid.sum().clamp(min=1).to(total.dtype)


def cluster_separation_costs(
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Clst, Sep)`` of Chen et al. 2019, Eq. (1), from one own-class mask (what the joint step needs).

    Equal to ``(cluster_cost(...), separation_cost(...))``; the ``(B, P)`` mask and the active-prototype
    mask are built once for both. Arguments as :func:`cluster_cost`.
    """
    own = _own_class_mask(labels, class_identity)
    if active is None:
        return _masked_min_mean(min_distances, own), _masked_min_mean(min_distances, ~own)
    act = active.bool().unsqueeze(0)
    return _masked_min_mean(min_distances, own & act), _masked_min_mean(min_distances, ~own & act)


def cluster_cost(
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Clst: mean over samples of the smallest distance to a prototype of the sample's own class.

    Args:
        min_distances: ``(B, P)`` pooled distances.
        labels: ``(B,)`` class indices.
        class_identity: ``(P, K)`` one-hot prototype classes.
        active: optional ``(P,)`` mask of unpruned prototypes (pruned ones are ignored).
    """
    mask = _own_class_mask(labels, class_identity)
    if active is not None:
        mask = mask & active.bool().unsqueeze(0)
    return _masked_min_mean(min_distances, mask)


def separation_cost(
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sep (positive form): mean over samples of the smallest distance to a prototype of another class.

    Weighted with a negative coefficient (reference ``sep = -0.08``), minimising the loss pushes
    wrong-class prototypes away. Arguments as :func:`cluster_cost`.
    """
    mask = ~_own_class_mask(labels, class_identity)
    if active is not None:
        mask = mask & active.bool().unsqueeze(0)
    return _masked_min_mean(min_distances, mask)


def avg_separation_cost(
    min_distances: torch.Tensor,
    labels: torch.Tensor,
    class_identity: torch.Tensor,
    active: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over samples of the *average* distance to other-class prototypes (logged only, not in the loss)."""
    mask = (~_own_class_mask(labels, class_identity)).float()
    if active is not None:
        mask = mask * active.float().unsqueeze(0)
    return ((min_distances * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


def l1_off_class(weight: torch.Tensor, class_identity: torch.Tensor) -> torch.Tensor:
    """``sum |W[k, j]|`` over ``class(j) != k``: L1 on the last-layer weights linking a prototype to other classes.

    Args:
        weight: ``(K, P)`` last-layer weight.
        class_identity: ``(P, K)`` one-hot prototype classes.
    """
    if weight.shape != class_identity.t().shape:
        raise ValueError(
            f"weight {tuple(weight.shape)} does not match class identity {tuple(class_identity.shape)}^T"
        )
    return (weight * (1.0 - class_identity.t())).abs().sum()


def upsample_maps(maps: torch.Tensor, size: Sequence[int], chunk: int = 256) -> torch.Tensor:
    """Bicubic upsampling of ``(N, h, w)`` maps to ``(N, H, W)`` (the reference uses ``cv2.INTER_CUBIC``)."""
    out = []
    for part in maps.float().split(chunk):
        out.append(
            F.interpolate(
                part.unsqueeze(1), size=tuple(int(s) for s in size), mode="bicubic", align_corners=False
            ).squeeze(1)
        )
    return torch.cat(out) if out else maps.new_zeros((0, *size))
