"""PIP-Net network (Nauta, Schlötterer, van Keulen, Seifert, "PIP-Net: Patch-Based Intuitive Prototypes for
Interpretable Image Classification", CVPR 2023, Sec. 3.1 and Fig. 3).

``features -> 1x1 conv + softmax over D prototypes per patch -> global max-pool -> non-negative linear``:

* a backbone :class:`~interpzoo.models.backbones.Trunk` (any of :func:`models.backbones.list_backbones`), cut at
  ``feature_stage`` (``"auto"``: the stage before a ResNet's last, ``layer3``, so 32 px images give an 8x8
  latent grid on ``resnet18s``; the only stage of VGG/DenseNet);
* :class:`~interpzoo.layers.pipnet.PatchPrototypes`: ``D`` prototypes shared by every class, a softmax over
  them at every patch (``prototype_maps``);
* presence scores ``p_d = max_{hw} z_{hw,d}`` in ``[0, 1]``;
* :class:`~interpzoo.layers.pipnet.NonNegLinear`: the scoring sheet ``o = relu(W) p``. In eval mode presence
  scores below ``presence_threshold`` (the reference's 0.1 at inference) count as absent (0), so an
  explanation lists only prototypes that are really there.

The explanation of class ``c`` is sparse: the prototypes ``d`` with ``W[c, d] > 0`` and ``p_d > 0``, each with
its patch (argmax location) and score ``p_d W[c, d]``; the scores sum (plus the bias, none by default) to the
logit ``o_c``.

Registered names: architecture ``pipnet`` and ``pipnet_<backbone>`` for every backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch

from interpzoo.layers.pipnet import NonNegLinear, PatchPrototypes, presence_scores
from interpzoo.models.backbones import list_backbones
from interpzoo.models.explain import (
    Explanation,
    _barh,
    _check_index,
    _class_label,
    _imshow,
    _part_label,
)
from interpzoo.models.outputs import ClassifierOutput
from interpzoo.models.registry import register_architecture, register_model
from interpzoo.models.trunk import TrunkNet

__all__ = ["PIPNet", "PIPNetBatchExplanation", "PIPNetExplanation", "PIPNetOutput", "resolve_feature_stage"]

_RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")
_PADDING_MODES = ("zeros", "reflect", "replicate")


@dataclass
class PIPNetOutput(ClassifierOutput):
    """Output of :class:`PIPNet`.

    Attributes:
        logits: ``(B, K)`` scoring-sheet outputs ``o = relu(W) p (+ b)`` (``>= 0``; the class loss reads
            ``log(o^2 + 1)`` of them, :func:`~interpzoo.layers.pipnet.pipnet_class_logits`).
        features: ``(B, C, H, W)`` trunk feature map.
        prototype_maps: ``(B, D, H, W)`` patch softmaxes ``z`` (sum to 1 over ``D`` at every patch).
        presence: ``(B, D)`` presence scores the logits use (max-pooled ``z``; in eval mode those below the
            network's ``presence_threshold`` are 0).
        presence_raw: ``(B, D)`` max-pooled ``z`` before that threshold.
    """

    prototype_maps: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    presence_raw: torch.Tensor | None = None


def resolve_feature_stage(backbone: dict[str, Any] | str | None, feature_stage: str | None) -> dict[str, Any]:
    """The backbone config with the stage PIP-Net cuts at.

    ``feature_stage=None`` keeps the config's own stage; ``"auto"`` takes ``layer3`` for ResNets (the paper
    wants a fine latent grid: it removes strides from ConvNeXt to get 26x26 at 224 px) and the backbone's
    only stage otherwise; any other value is used as the stage name (checked by the backbone builder).
    """
    cfg: dict[str, Any] = {"name": backbone} if isinstance(backbone, str) else dict(backbone or {})
    if feature_stage is None:
        return cfg
    if feature_stage == "auto":
        # the builder's own default (the backbone's only stage) for VGG/DenseNet; layer3 for ResNets
        if str(cfg.get("name", "resnet18s")).startswith("resnet"):
            cfg["stage"] = "layer3"
        else:
            cfg.pop("stage", None)
        return cfg
    cfg["stage"] = str(feature_stage)
    return cfg


@register_architecture("pipnet")
class PIPNet(TrunkNet):
    """PIP-Net: backbone + patch prototypes + presence max-pool + non-negative scoring sheet.

    Args:
        num_classes: ``K``.
        in_chans: input channels.
        mean, std: input normalisation (the network takes ``[0, 1]`` images).
        backbone: trunk config (``{"name": "resnet18s", "width": 16}``) or a name.
        feature_stage: where the trunk is cut: ``"auto"`` (``layer3`` for ResNets), ``None`` (the backbone
            config's ``stage``) or a stage name.
        num_prototypes: ``D``; ``None`` takes the trunk's channels (the reference's default).
        bias: a non-negative class bias (the reference: none).
        multiplier: ``m`` of the class-loss logits ``log(o^m + 1)`` (the paper: 2).
        presence_threshold: in eval mode, presence below this counts as 0 (the reference: 0.1 at inference).
        image_size: ``[H, W]`` of the training images (recorded for explanations; filled from the data).
        padding_mode: padding of the trunk's convolutions: ``"zeros"`` (as built), ``"reflect"`` or
            ``"replicate"``. Zero padding tells a cell how far it is from the border, which lets a prototype
            code a grid position rather than image content; the other two do not add that signal. The
            weights are the same, so a warm start from a zero-padded model loads unchanged.

    Shape:
        ``(B, C_in, H, W)`` in ``[0, 1]`` to :class:`PIPNetOutput`.
    """

    def __init__(
        self,
        num_classes: int,
        in_chans: int = 3,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        backbone: dict[str, Any] | str | None = None,
        feature_stage: str | None = "auto",
        num_prototypes: int | None = None,
        bias: bool = False,
        multiplier: float = 2.0,
        presence_threshold: float = 0.1,
        image_size: Sequence[int] | None = None,
        padding_mode: str = "zeros",
    ) -> None:
        if padding_mode not in _PADDING_MODES:
            raise ValueError(
                f"padding_mode={padding_mode!r} is not a padding of the trunk's convolutions; choose one of "
                f"{list(_PADDING_MODES)}"
            )
        if not 0.0 <= float(presence_threshold) < 1.0:
            raise ValueError(
                f"presence_threshold must be in [0, 1) (presence scores lie in [0, 1]; the paper uses 0.1), "
                f"got {presence_threshold}"
            )
        if num_prototypes is not None and int(num_prototypes) < 1:
            raise ValueError(
                f"num_prototypes must be a positive integer or null (the trunk's channels), got {num_prototypes}"
            )
        try:
            cfg = resolve_feature_stage(backbone, feature_stage)
            super().__init__(num_classes, in_chans, mean, std, cfg)
        except ValueError as e:
            if feature_stage is not None and "has no stage" in str(e):
                raise ValueError(
                    f"{e}. PIP-Net cuts the trunk at feature_stage={feature_stage!r}: set model.net.feature_stage "
                    f"to one of those stages, 'auto' or null (the backbone config's stage)"
                ) from None
            raise
        self.image_size = None if image_size is None else [int(v) for v in image_size]
        self.padding_mode = str(padding_mode)
        if self.padding_mode != "zeros":
            for m in self.backbone.modules():
                # Conv2d pads with F.pad(mode=padding_mode) when it is not "zeros" (same weights, same shapes)
                if isinstance(m, torch.nn.Conv2d) and any(int(p) > 0 for p in m.padding):
                    m.padding_mode = self.padding_mode
        d = int(num_prototypes) if num_prototypes is not None else int(self.backbone.out_channels)
        self.prototypes = PatchPrototypes(self.backbone.out_channels, d)
        self.classifier = NonNegLinear(d, self.num_classes, bias=bias, multiplier=multiplier)
        self.presence_threshold = float(presence_threshold)

    @property
    def num_prototypes(self) -> int:
        return self.prototypes.num_prototypes

    @property
    def class_weights(self) -> torch.Tensor:
        """``(K, D)`` the non-negative weights the scoring sheet uses, ``relu(W)``."""
        return self.classifier.effective_weight

    # -- forward --------------------------------------------------------------------------------
    def head(self, features: torch.Tensor) -> PIPNetOutput:
        """Prototype maps, presence scores and logits of a trunk feature map ``(B, C, H, W)``."""
        maps = self.prototypes(features)
        raw = presence_scores(maps)
        presence = raw
        if not self.training and self.presence_threshold > 0:
            # inference as in the reference: weakly present prototypes are absent
            presence = torch.where(raw < self.presence_threshold, torch.zeros_like(raw), raw)
        return PIPNetOutput(
            logits=self.classifier(presence),
            features=features,
            prototype_maps=maps,
            presence=presence,
            presence_raw=raw,
        )

    def forward(self, x: torch.Tensor) -> PIPNetOutput:
        return self.head(self.features(x))

    # -- explanations ---------------------------------------------------------------------------
    def patch_boxes(self, locations: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """``(N, 4)`` ``(x0, y0, x1, y1)`` (end exclusive) image pixels of latent cells ``(N, 2)`` ``(row, col)``:
        the cell's footprint ``stride x stride`` (what the patch summarises; its receptive field is larger)."""
        h, w = int(image_size[0]), int(image_size[1])
        s = int(self.backbone.stride)
        loc = locations.long()
        y0, x0 = (loc[:, 0] * s).clamp(0, h), (loc[:, 1] * s).clamp(0, w)
        y1, x1 = (y0 + s).clamp(0, h), (x0 + s).clamp(0, w)
        return torch.stack([x0, y0, x1, y1], 1)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, target: torch.Tensor | int | None = None) -> PIPNetBatchExplanation:
        """The sparse PIP-Net explanation of each image (Nauta et al. 2023, Fig. 1 and Sec. 3.1).

        For the explained class ``c`` (the prediction unless ``target`` is given): every prototype ``d`` with
        ``W[c, d] > 0`` and presence ``p_d > 0`` (eval mode: below ``presence_threshold`` counts as 0), by
        decreasing score ``p_d W[c, d]``, with its strongest patch. The scores plus the bias sum to the logit.

        Args:
            x: ``(B, C, H, W)`` images in ``[0, 1]``.
            target: class to explain (int or ``(B,)``); default the prediction.
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
        if tgt.numel() != b or bool(((tgt < 0) | (tgt >= self.num_classes)).any()):
            raise ValueError(
                f"target must be one class in [0, {self.num_classes}) or one per image ({b}), got {target!r}"
            )
        weights = self.class_weights[tgt]  # (B, D)
        scores = weights * out.presence
        maps = out.prototype_maps
        wp = maps.shape[3]
        flat = maps.flatten(2).argmax(2)  # (B, D) strongest patch of each prototype
        locations = torch.stack([flat // wp, flat % wp], -1)  # (B, D, 2)
        bias = self.classifier.effective_bias
        result = []
        for i in range(b):
            used = (scores[i] > 0).nonzero().flatten()
            order = used[scores[i, used].argsort(descending=True)]
            loc = locations[i, order]
            result.append(
                PIPNetExplanation(
                    target=int(tgt[i]),
                    logit=float(out.logits[i, tgt[i]]),
                    bias=0.0 if bias is None else float(bias[tgt[i]]),
                    prototypes=order.cpu(),
                    presence=out.presence[i, order].cpu(),
                    weights=weights[i, order].cpu(),
                    scores=scores[i, order].cpu(),
                    locations=loc.cpu(),
                    boxes=self.patch_boxes(loc, x.shape[2:]).cpu(),
                )
            )
        logits = out.logits.detach().float().cpu()
        return PIPNetBatchExplanation(
            explanations=result, images=x.detach().float().cpu(), logits=logits, prediction=logits.argmax(1)
        )


@dataclass
class PIPNetExplanation(Explanation):
    """PIP-Net's sparse explanation of one image for one class.

    Attributes:
        target: the explained class; logit: its logit ``o_c``; bias: its bias (0 without one).
        prototypes: ``(k,)`` prototype indices with a non-zero score, by decreasing score.
        presence: ``(k,)`` their presence ``p_d``; weights: ``(k,)`` ``W[c, d]``.
        scores: ``(k,)`` ``p_d W[c, d]``; ``scores.sum() + bias == logit``.
        locations: ``(k, 2)`` ``(row, col)`` of each prototype's strongest patch.
        boxes: ``(k, 4)`` ``(x0, y0, x1, y1)`` image pixels of that patch's cell.
    """

    target: int
    logit: float
    bias: float
    prototypes: torch.Tensor
    presence: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor
    locations: torch.Tensor
    boxes: torch.Tensor

    @property
    def size(self) -> int:
        """The explanation size: prototypes with a non-zero score."""
        return int(self.prototypes.numel())

    def _draw(
        self,
        ax: Any,
        image: torch.Tensor | None = None,
        class_names: Sequence[str] | None = None,
        part_scores: Sequence[float] | None = None,
        top_k: int = 10,
    ) -> None:
        draw_pipnet_explanation(
            self, ax, image, class_names=class_names, part_scores=part_scores, top_k=top_k
        )


@dataclass
class PIPNetBatchExplanation(Explanation):
    """What :meth:`PIPNet.explain` returns: one :class:`PIPNetExplanation` per image (``ex[i]``) plus the images,
    so ``ex.plot(index=i)`` draws image ``i`` with its prototypes' patches (``image=False``: the scores).

    Attributes:
        explanations: one per image; images: ``(B, C, H, W)``; logits: ``(B, K)``; prediction: ``(B,)``.
    """

    explanations: list[PIPNetExplanation]
    images: torch.Tensor
    logits: torch.Tensor
    prediction: torch.Tensor

    def __len__(self) -> int:
        return len(self.explanations)

    def __iter__(self) -> Iterator[PIPNetExplanation]:
        return iter(self.explanations)

    @overload
    def __getitem__(self, index: int) -> PIPNetExplanation: ...

    @overload
    def __getitem__(self, index: slice) -> PIPNetBatchExplanation: ...

    def __getitem__(self, index: int | slice) -> PIPNetExplanation | PIPNetBatchExplanation:
        if isinstance(index, slice):
            return PIPNetBatchExplanation(
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
        top_k: int = 10,
    ) -> None:
        i = _check_index(index, len(self.explanations))
        draw_pipnet_explanation(
            self.explanations[i],
            ax,
            self.images[i] if image else None,
            class_names=class_names,
            part_scores=part_scores,
            top_k=top_k,
        )


def draw_pipnet_explanation(
    ex: PIPNetExplanation,
    ax: Any,
    image: torch.Tensor | None = None,
    class_names: Sequence[str] | None = None,
    part_scores: Sequence[float] | None = None,
    top_k: int = 10,
) -> None:
    """With ``image`` ``(C, H, W)``: the image and the patch of each of the ``top_k`` highest-scoring prototypes;
    without: the bar chart of their scores ``p_d W[c, d]``. ``part_scores``: one per prototype (indexed by
    prototype number), printed after its label."""
    k = min(int(top_k), ex.size)
    labels = [
        f"p{int(d)} {float(s):.2g}{_part_label(part_scores, int(d))}"
        for d, s in zip(ex.prototypes[:k], ex.scores[:k])
    ]
    title = f"{_class_label(class_names, ex.target)}: logit {ex.logit:.3g} = sum of {ex.size} scores"
    if image is None:
        _barh(ax, labels, ex.scores[:k], title, "presence x weight")
        return
    from matplotlib.patches import Rectangle

    _imshow(ax, image)
    for rank, (box, label) in enumerate(zip(ex.boxes[:k].tolist(), labels)):
        x0, y0, x1, y1 = box
        color = f"C{rank % 10}"
        ax.add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec=color, lw=1.5))
        ax.text(x0, y0, label, color=color, fontsize=6, va="bottom")
    ax.set_title(title, fontsize=8)


for _bb in list_backbones():
    register_model(f"pipnet_{_bb}", "pipnet", backbone={"name": _bb})
