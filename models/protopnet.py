"""ProtoPNet network (Chen et al., "This Looks Like That", NeurIPS 2019, Sec. 2.1 and Fig. 2).

``features -> add-on -> prototype distances -> global min-pool -> similarity -> last layer``:

* a backbone :class:`~models.backbones.Trunk` (any of :func:`models.backbones.list_backbones`);
* add-on 1x1 convolutions ending in a sigmoid, so latent vectors lie in ``[0, 1]^D``;
* a :class:`layers.protopnet.PrototypeLayer` (``m`` prototypes per class);
* a last layer ``W`` (``K x P``, no bias) initialised to ``+1`` for a prototype's own class and
  ``incorrect_strength`` (``-0.5``) otherwise.

The network also keeps the *provenance* of its prototypes as buffers (written by push, see
:mod:`models.protopnet_push`): source image index, latent location, receptive-field box and 95th
percentile high-activation box, so a bundle carries everything an explanation needs.

Registered names: architecture ``protopnet`` and ``protopnet_<backbone>`` for every backbone
(``protopnet_resnet18s`` is the CPU default; at 32 px its ``layer4`` gives a 4x4 latent grid).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from torch import nn

from interpzoo.layers.protopnet import PrototypeLayer, upsample_maps
from interpzoo.models.backbones import list_backbones
from interpzoo.models.explain import Explanation, _check_index, draw_prototype_explanation
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.trunk import TrunkNet

__all__ = [
    "ProtoPNet",
    "ProtoPNetExplanation",
    "ProtoPNetOutput",
    "PrototypeExplanation",
    "high_activation_boxes",
    "receptive_field_params",
    "upsample_maps",
]


@dataclass
class ProtoPNetOutput(ClassifierOutput):
    """Output of :class:`ProtoPNet`.

    Attributes:
        logits: ``(B, K)``.
        features: ``(B, D, H, W)`` latent map after the add-on layers (``z`` in the paper).
        min_distances: ``(B, P)`` smallest squared distance of each prototype to any patch.
        similarities: ``(B, P)`` pooled similarities (the last layer's input, pruned prototypes zeroed).
        similarity_maps: ``(B, P, H', W')`` similarity of each prototype to each patch.
        distances: ``(B, P, H', W')`` squared distances.
    """

    min_distances: torch.Tensor | None = None
    similarities: torch.Tensor | None = None
    similarity_maps: torch.Tensor | None = None
    distances: torch.Tensor | None = None


@dataclass
class PrototypeExplanation(Explanation):
    """ "This looks like that" for one image: the prototypes contributing most to one class logit.

    Attributes:
        target: the explained class (the prediction unless given).
        logit: that class's logit.
        prototypes: ``(k,)`` prototype indices, by decreasing contribution.
        prototype_classes: ``(k,)`` their classes.
        similarities: ``(k,)`` pooled similarity ``s_j``.
        weights: ``(k,)`` last-layer weight ``W[target, j]``.
        contributions: ``(k,)`` ``W[target, j] * s_j`` (they sum, over all prototypes, to the logit).
        boxes: ``(k, 4)`` ``(x0, y0, x1, y1)`` high-activation box of each prototype on this image
            (pixels above the 95th percentile of the bicubically upsampled similarity map).
        locations: ``(k, 2)`` ``(row, col)`` of the most similar latent patch.
        rf_boxes: ``(k, 4)`` receptive-field box of that patch.
        source_index: ``(k,)`` push-set index of each prototype's source image (``-1`` before push).
        source_boxes: ``(k, 4)`` high-activation box of each prototype on its source image.
    """

    target: int
    logit: float
    prototypes: torch.Tensor
    prototype_classes: torch.Tensor
    similarities: torch.Tensor
    weights: torch.Tensor
    contributions: torch.Tensor
    boxes: torch.Tensor
    locations: torch.Tensor
    rf_boxes: torch.Tensor
    source_index: torch.Tensor
    source_boxes: torch.Tensor

    def _draw(
        self,
        ax: Any,
        image: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        part_scores: Sequence[float] | None = None,
    ) -> None:
        # plot(image=x[i]) draws the boxes on the image, plot() the contributions
        draw_prototype_explanation(self, ax, image, class_names=class_names, part_scores=part_scores)


@dataclass
class ProtoPNetExplanation(Explanation):
    """ "This looks like that" for a batch: what :meth:`ProtoPNet.explain` returns.

    A sequence of one :class:`PrototypeExplanation` per image (``len(ex)``, ``ex[i]``, ``for e in ex``;
    a slice gives a batch explanation again) plus the batch's images and logits, so
    ``ex.plot(index=i)`` draws image ``i`` with the high-activation box of each of its top prototypes
    (``image=False``: the bar chart of their contributions instead).

    Attributes:
        explanations: one :class:`PrototypeExplanation` per image.
        images: ``(B, C, H, W)`` the explained images (CPU).
        logits: ``(B, K)``.
        prediction: ``(B,)`` argmax class.
    """

    explanations: list[PrototypeExplanation]
    images: torch.Tensor
    logits: torch.Tensor
    prediction: torch.Tensor

    def __len__(self) -> int:
        return len(self.explanations)

    def __iter__(self) -> Iterator[PrototypeExplanation]:
        return iter(self.explanations)

    @overload
    def __getitem__(self, index: int) -> PrototypeExplanation: ...

    @overload
    def __getitem__(self, index: slice) -> ProtoPNetExplanation: ...

    def __getitem__(self, index: int | slice) -> PrototypeExplanation | ProtoPNetExplanation:
        if isinstance(index, slice):
            return ProtoPNetExplanation(
                explanations=self.explanations[index],
                images=self.images[index],
                logits=self.logits[index],
                prediction=self.prediction[index],
            )
        return self.explanations[_check_index(index, len(self.explanations))]

    def _draw(
        self,
        ax: Any,
        index: int = 0,
        image: bool = True,
        class_names: Sequence[str] | None = None,
        part_scores: Sequence[float] | None = None,
    ) -> None:
        i = _check_index(index, len(self.explanations))
        draw_prototype_explanation(
            self.explanations[i],
            ax,
            self.images[i] if image else None,
            class_names=class_names,
            part_scores=part_scores,
        )


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def receptive_field_params(body: nn.Module) -> tuple[float, float, float]:
    """``(jump, rf_size, start)`` of one output cell of ``body`` (reference ``compute_proto_layer_rf_info``).

    Walks the convolutions and poolings in registration order with the recurrence
    ``jump' = jump * s``, ``rf' = rf + (k - 1) * jump``, ``start' = start + ((k - 1) / 2 - p) * jump``.
    Residual ``downsample`` branches are skipped (the main path has the larger field); for DenseNets
    the chain through every dense layer is the longest path, which this walk follows. The field of
    the identity/short paths is smaller, so the box is an upper bound, as in the reference.
    """
    jump, rf, start = 1.0, 1.0, 0.5
    for name, m in body.named_modules():
        if "downsample" in name.split("."):
            continue
        if isinstance(m, nn.Conv2d | nn.MaxPool2d | nn.AvgPool2d):
            k, s, p = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding)
            d = _pair(getattr(m, "dilation", 1))
            keff = (k[0] - 1) * d[0] + 1
            rf += (keff - 1) * jump
            start += ((keff - 1) / 2 - p[0]) * jump
            jump *= s[0]
    return jump, rf, start


def high_activation_boxes(maps: torch.Tensor, percentile: float = 95.0) -> torch.Tensor:
    """``(N, 4)`` long ``(x0, y0, x1, y1)`` (end exclusive) of the pixels at or above the percentile.

    Reference ``find_high_activation_crop``: the smallest rectangle holding every pixel of the
    upsampled activation map that is ``>=`` its ``percentile``-th percentile.

    Args:
        maps: ``(N, H, W)`` upsampled activation maps.
    """
    if maps.dim() != 3:
        raise ValueError(f"maps must be (N, H, W), got {tuple(maps.shape)}")
    n, h, w = maps.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.long, device=maps.device)
    flat = maps.reshape(n, -1).float()
    thr = torch.quantile(flat, percentile / 100.0, dim=1, keepdim=True)
    mask = (flat >= thr).view(n, h, w)
    rows, cols = mask.any(2), mask.any(1)
    ar_h, ar_w = torch.arange(h, device=maps.device), torch.arange(w, device=maps.device)
    y0 = torch.where(rows, ar_h, h).min(1).values
    y1 = torch.where(rows, ar_h, -1).max(1).values + 1
    x0 = torch.where(cols, ar_w, w).min(1).values
    x1 = torch.where(cols, ar_w, -1).max(1).values + 1
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _add_on_layers(kind: str, in_channels: int, dim: int) -> nn.Sequential:
    """Reference ``add_on_layers``: ``regular`` = conv C->D, ReLU, conv D->D, Sigmoid; ``bottleneck`` halves
    the channels with pairs of 1x1 convs until ``D``; both end in a sigmoid (latents in ``[0, 1]``)."""
    layers: list[nn.Module] = []
    if kind == "regular":
        layers = [nn.Conv2d(in_channels, dim, 1), nn.ReLU(), nn.Conv2d(dim, dim, 1), nn.Sigmoid()]
    elif kind == "bottleneck":
        cur_in = in_channels
        while True:
            cur_out = max(dim, cur_in // 2)
            layers += [nn.Conv2d(cur_in, cur_out, 1), nn.ReLU(), nn.Conv2d(cur_out, cur_out, 1)]
            if cur_out == dim:
                layers.append(nn.Sigmoid())
                break
            layers.append(nn.ReLU())
            cur_in = cur_out
    else:
        raise ValueError(f"add_on must be 'regular' or 'bottleneck', got {kind!r}")
    seq = nn.Sequential(*layers)
    for m in seq.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return seq


@register_architecture("protopnet")
class ProtoPNet(TrunkNet):
    """ProtoPNet: backbone + add-on + prototype layer + last layer (a :class:`~interpzoo.models.trunk.TrunkNet`).

    Args:
        num_classes: ``K``.
        in_chans: input channels.
        mean, std: input normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18s", "stage": "layer4"}``).
        prototypes_per_class: ``m`` (the paper: 10).
        prototype_dim: latent depth ``D`` (the paper: 128).
        prototype_hw: prototype spatial size (the paper: ``[1, 1]``).
        add_on: ``"regular"`` (the reference ``settings.py``) or ``"bottleneck"``.
        activation: ``"log"`` (paper) or ``"linear"`` similarity.
        eps: ``eps`` of the log similarity.
        incorrect_strength: initial last-layer weight to other classes (``-0.5``).
        prototype_init: ``"uniform"`` or ``"normal"``.
        prototype_classes: explicit class per prototype (written by :meth:`prune_prototypes`).
        image_size: ``[H, W]`` of the training images, used for boxes when an input size is unknown.

    Shape:
        ``(B, C_in, H, W)`` in ``[0, 1]`` to :class:`ProtoPNetOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        prototype_hw: Sequence[int] = (1, 1),
        add_on: str = "regular",
        activation: str = "log",
        eps: float = 1e-4,
        incorrect_strength: float = -0.5,
        prototype_init: str = "uniform",
        prototype_classes: Sequence[int] | None = None,
        image_size: Sequence[int] | None = None,
    ) -> None:
        super().__init__(num_classes, in_chans, mean, std, backbone)
        self.image_size = None if image_size is None else [int(v) for v in image_size]
        self.add_on = _add_on_layers(add_on, self.backbone.out_channels, prototype_dim)
        self.prototype_layer = PrototypeLayer(
            num_classes,
            prototypes_per_class,
            prototype_dim,
            prototype_hw,
            activation,
            eps,
            prototype_init,
            classes=prototype_classes,
        )
        p = self.prototype_layer.num_prototypes
        self.last_layer = nn.Linear(p, num_classes, bias=False)
        self.incorrect_strength = float(incorrect_strength)
        self.set_last_layer_incorrect_connection(self.incorrect_strength)
        jump, rf, start = receptive_field_params(self.backbone.body)
        ph, _ = self.prototype_layer.hw
        # the prototype layer is one more stride-1 "convolution" of size h x w
        self.rf_jump, self.rf_size, self.rf_start = jump, rf + (ph - 1) * jump, start + (ph - 1) / 2 * jump
        self._init_push_buffers(p)

    def _init_push_buffers(self, p: int) -> None:
        # Provenance written by push; -1 means "not pushed yet". Buffers, so bundles keep them.
        self.register_buffer("push_source_index", torch.full((p,), -1, dtype=torch.long))
        self.register_buffer("push_source_location", torch.full((p, 2), -1, dtype=torch.long))
        self.register_buffer("push_rf_box", torch.full((p, 4), -1, dtype=torch.long))
        self.register_buffer("push_act_box", torch.full((p, 4), -1, dtype=torch.long))
        self.register_buffer("push_distance", torch.full((p,), float("nan")))

    # -- properties ---------------------------------------------------------------------------
    @property
    def num_prototypes(self) -> int:
        return self.prototype_layer.num_prototypes

    @property
    def prototype_classes(self) -> torch.Tensor:
        return self.prototype_layer.prototype_classes

    @property
    def prototype_class_identity(self) -> torch.Tensor:
        return self.prototype_layer.prototype_class_identity

    @property
    def prototype_mask(self) -> torch.Tensor:
        return self.prototype_layer.prototype_mask

    @property
    def pushed(self) -> bool:
        """Whether every active prototype has a push source."""
        active = self.prototype_mask > 0
        return bool((self.push_source_index[active] >= 0).all())

    @property
    def min_input_size(self) -> tuple[int, int]:
        """``(H, W)`` of the smallest image whose latent grid holds one prototype (``stride * prototype_hw``)."""
        s = int(self.backbone.stride)
        ph, pw = self.prototype_layer.hw
        return s * int(ph), s * int(pw)

    # -- forward ------------------------------------------------------------------------------
    def latent(self, f: torch.Tensor) -> torch.Tensor:
        """``(B, D, H, W)`` add-on output ``z`` in ``[0, 1]``."""
        return self.add_on(f)

    def classify(self, similarities: torch.Tensor) -> torch.Tensor:
        """``(B, K)`` logits ``W (s * mask)``; pruned prototypes contribute nothing and get no gradient."""
        return self.last_layer(similarities * self.prototype_mask.to(similarities.dtype))

    def head(self, z: torch.Tensor) -> ProtoPNetOutput:
        """Prototype layer and last layer on a latent map ``z``."""
        out = self.prototype_layer(z)
        sims = out["similarities"] * self.prototype_mask
        return ProtoPNetOutput(
            logits=self.classify(out["similarities"]),
            features=z,
            min_distances=out["min_distances"],
            similarities=sims,
            similarity_maps=out["similarity_maps"],
            distances=out["distances"],
        )

    def forward(self, x: torch.Tensor) -> ProtoPNetOutput:
        return self.head(self.latent(self.features(x)))

    def push_forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z, distances)``: latent map ``(B, D, H, W)`` and distance maps ``(B, P, H', W')`` (reference)."""
        z = self.latent(self.features(x))
        return z, self.prototype_layer.distances(z)

    # -- last layer ---------------------------------------------------------------------------
    @torch.no_grad()
    def set_last_layer_incorrect_connection(self, incorrect_strength: float = -0.5) -> None:
        """``W[k, j] = 1`` if prototype ``j`` is of class ``k`` else ``incorrect_strength`` (reference init)."""
        pos = self.prototype_class_identity.t()
        self.last_layer.weight.copy_(pos + incorrect_strength * (1.0 - pos))

    # -- boxes --------------------------------------------------------------------------------
    def rf_boxes(self, locations: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """``(N, 4)`` ``(x0, y0, x1, y1)`` receptive-field boxes of latent cells ``(N, 2)`` ``(row, col)``."""
        h, w = int(image_size[0]), int(image_size[1])
        loc = locations.float()
        cy = self.rf_start + loc[:, 0] * self.rf_jump
        cx = self.rf_start + loc[:, 1] * self.rf_jump
        half = self.rf_size / 2
        y0, y1 = (cy - half).floor().clamp(0, h), (cy + half).ceil().clamp(0, h)
        x0, x1 = (cx - half).floor().clamp(0, w), (cx + half).ceil().clamp(0, w)
        return torch.stack([x0, y0, x1, y1], 1).long()

    # -- explanations -------------------------------------------------------------------------
    @torch.no_grad()
    def explain(
        self,
        x: torch.Tensor,
        top_k: int = 5,
        target: torch.Tensor | int | None = None,
        percentile: float = 95.0,
    ) -> ProtoPNetExplanation:
        """ "This looks like that": the ``top_k`` prototypes contributing most to each image's class logit.

        Args:
            x: ``(B, C, H, W)`` images in ``[0, 1]``.
            top_k: prototypes per image.
            target: class to explain (int or ``(B,)``); default the prediction.
            percentile: threshold of the high-activation box.

        Returns:
            A :class:`ProtoPNetExplanation`: one :class:`PrototypeExplanation` per image (``ex[i]``), and
            ``ex.plot(index=i)`` draws image ``i`` with its prototypes' boxes.
        """
        was_training = self.training
        self.eval()
        try:
            out = self(x)
        finally:
            self.train(was_training)
        b = x.shape[0]
        if target is None:
            tgt = out.logits.argmax(1)
        elif isinstance(target, int):
            tgt = torch.full((b,), target, dtype=torch.long, device=x.device)
        else:
            tgt = torch.as_tensor(target, device=x.device).long().view(-1)
        w = self.last_layer.weight[tgt]  # (B, P)
        contrib = w * out.similarities
        contrib = contrib.masked_fill(self.prototype_mask.unsqueeze(0) == 0, float("-inf"))
        k = min(top_k, int((self.prototype_mask > 0).sum()))
        top = contrib.topk(k, dim=1).indices  # (B, k)
        maps = out.similarity_maps.gather(
            1, top[..., None, None].expand(-1, -1, *out.similarity_maps.shape[2:])
        )
        hp, wp = maps.shape[2:]
        flat_loc = maps.flatten(2).argmax(2)
        locations = torch.stack([flat_loc // wp, flat_loc % wp], -1)  # (B, k, 2)
        up = upsample_maps(maps.flatten(0, 1), x.shape[2:])
        boxes = high_activation_boxes(up, percentile).view(b, k, 4)
        result = []
        for i in range(b):
            j = top[i]
            result.append(
                PrototypeExplanation(
                    target=int(tgt[i]),
                    logit=float(out.logits[i, tgt[i]]),
                    prototypes=j.cpu(),
                    prototype_classes=self.prototype_classes[j].cpu(),
                    similarities=out.similarities[i, j].cpu(),
                    weights=w[i, j].cpu(),
                    contributions=contrib[i, j].cpu(),
                    boxes=boxes[i].cpu(),
                    locations=locations[i].cpu(),
                    rf_boxes=self.rf_boxes(locations[i], x.shape[2:]).cpu(),
                    source_index=self.push_source_index[j].cpu(),
                    source_boxes=self.push_act_box[j].cpu(),
                )
            )
        logits = out.logits.detach().float().cpu()
        return ProtoPNetExplanation(
            explanations=result,
            images=x.detach().float().cpu(),
            logits=logits,
            prediction=logits.argmax(1),
        )

    # -- pruning ------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_prototypes(self, keep: torch.Tensor | Sequence[int]) -> None:
        """Physically remove prototypes (reference ``prune_prototypes``): rows of the prototypes, class
        identity and provenance, columns of ``W``. The logits from the kept prototypes are unchanged.

        ``keep`` is a ``(P,)`` bool mask or a list of indices. Updates ``interpzoo_config`` so a bundle
        saved afterwards rebuilds the pruned network.
        """
        keep_t = torch.as_tensor(keep, device=self.last_layer.weight.device)
        idx = keep_t.nonzero().flatten() if keep_t.dtype == torch.bool else keep_t.long()
        if idx.numel() == 0:
            raise ValueError("prune_prototypes would remove every prototype")
        layer = self.prototype_layer
        layer.prototype_vectors = nn.Parameter(layer.prototype_vectors.data[idx].clone())
        layer.prototype_class_identity = layer.prototype_class_identity[idx].clone()
        layer.prototype_mask = layer.prototype_mask[idx].clone()
        new_last = nn.Linear(idx.numel(), self.num_classes, bias=False).to(self.last_layer.weight)
        new_last.weight.copy_(self.last_layer.weight[:, idx])
        self.last_layer = new_last
        for name in (
            "push_source_index",
            "push_source_location",
            "push_rf_box",
            "push_act_box",
            "push_distance",
        ):
            setattr(self, name, getattr(self, name)[idx].clone())
        cfg = getattr(self, "interpzoo_config", None)
        if cfg is not None:
            cfg["model_args"]["prototype_classes"] = [int(c) for c in self.prototype_classes.tolist()]


for _bb in list_backbones():
    register_model(f"protopnet_{_bb}", "protopnet", backbone={"name": _bb})
