"""PIP-Net training procedure under Lightning (Nauta et al., CVPR 2023, Sec. 3.2; reference ``pipnet/train.py``).

Each training image is seen as two augmented views (augmentations that keep parts whole, a config list, see
:data:`AUGMENT_OPS`); both views go through the network in one batch (as the reference concatenates them).
Two phases, chosen by the Lightning epoch:

* **pretrain** (epochs ``< pretrain_epochs``): the prototypes are learned self-supervised,
  ``L = lambda_A(e) L_A + lambda_T L_T`` (alignment and tanh losses, :mod:`interpzoo.layers.pipnet`); the
  classification layer gets no gradient (it is frozen). As in the reference, ``lambda_A`` ramps up linearly,
  ``(e + 1) / pretrain_epochs`` times ``loss.pretrain_align``, and ``lambda_T = loss.pretrain_tanh`` (5).
* **full**: ``L = lambda_A L_A + lambda_T L_T + lambda_C L_C`` with the reference weights 5, 2, 2, where
  ``L_C`` is the cross-entropy of ``log(o^2 + 1)``. After every optimiser step the class weights become
  ``max(W - weight_decrement, 0)`` (reference: ``1e-3``), which makes the scoring sheet sparse.

``val/acc_full`` (the default ``monitor``) is ``val/acc`` in the full phase and 0 during pretraining (the
classifier is untrained then), so the selected checkpoint is always a trained classifier.
Sparsity is logged per split: ``global_size``, ``nonzero_weights``, ``sparsity_ratio``,
``prototypes_per_class``, ``explanation_size`` (predicted class) and ``explanation_size_any_class``.

Deviations from the reference, each for a reason: one Adam with a parameter group for the classifier
(``optimizer.param_groups``) instead of two optimisers, so the shared schedulers and checkpoints apply; no
separate "finetune" epochs (the reference's few epochs that train only the classifier on a pretrained
ConvNeXt); model selection on the validation split.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from interpzoo.layers.pipnet import alignment_loss, pipnet_class_loss, tanh_loss
from interpzoo.metrics.pipnet import (
    LocalExplanationSize,
    global_size,
    prototypes_per_class,
    sparsity_ratio,
)
from interpzoo.models.lit_base import ClassificationModule
from interpzoo.models.pipnet import PIPNet, PIPNetOutput
from interpzoo.utils import did_you_mean

__all__ = ["AUGMENT_OPS", "DEFAULT_LOSS", "PIPNetModule", "augment_view_pair", "augment_views"]

DEFAULT_LOSS: dict[str, float] = {
    "align": 5.0,
    "tanh": 2.0,
    "class": 2.0,
    "pretrain_align": 1.0,
    "pretrain_tanh": 5.0,
}

#: augmentation op -> (its parameters with defaults, shared by both views?). Shared ops are applied once to the
#: image before the two views are made (the reference's shared ``transform1``: crop/flip), per-view ops to each
#: view independently (its ``transform2``). All of them keep a part whole and keep its colour's hue. ``shift`` moves
#: each view by a whole number of latent cells (``[-max_cells, max_cells]`` per axis, reflect padding); the
#: alignment loss then pairs the patches that show the same content (``offsets`` of
#: :func:`~interpzoo.layers.pipnet.alignment_loss`), so a prototype that codes a grid position instead of image
#: content (zero padding tells a cell where it is) no longer aligns across the views.
AUGMENT_OPS: dict[str, tuple[dict[str, float], bool]] = {
    "hflip": ({"p": 0.5}, True),
    "translate": ({"max_px": 2}, False),
    "shift": ({"max_cells": 1}, False),
    "brightness": ({"max_delta": 0.1}, False),
    "contrast": ({"max_delta": 0.1}, False),
    "noise": ({"std": 0.02}, False),
}


def _check_augment(augment: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    ops = []
    for i, op in enumerate(augment or []):
        if not isinstance(op, dict) or "name" not in op:
            raise ValueError(
                f"model.augment[{i}] must be a dict {{name: <op>, ...}} with name one of {sorted(AUGMENT_OPS)}, "
                f"got {op!r}"
            )
        name = str(op["name"])
        if name not in AUGMENT_OPS:
            raise ValueError(
                f"model.augment[{i}].name={name!r} is not an augmentation{did_you_mean(name, AUGMENT_OPS)}; "
                f"choose from {sorted(AUGMENT_OPS)}"
            )
        defaults, _ = AUGMENT_OPS[name]
        params = dict(defaults)
        for k, v in op.items():
            if k == "name":
                continue
            if k not in defaults:
                raise ValueError(
                    f"model.augment[{i}] ({name}) has no parameter {k!r}{did_you_mean(k, defaults)}; "
                    f"accepted: {sorted(defaults)}"
                )
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"model.augment[{i}].{k} must be a non-negative number, got {v!r}")
            if k in ("max_px", "max_cells") and float(v) != int(v):
                raise ValueError(f"model.augment[{i}].{k} must be a whole number, got {v!r}")
            params[k] = v
        ops.append({"name": name, **params})
    return ops


def _apply_op(x: torch.Tensor, op: dict[str, Any], cell: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One augmentation on a ``(B, C, H, W)`` batch in ``[0, 1]``, random per image (global RNG, so seeded runs
    repeat). Returns the batch and, for ``shift``, the ``(B, 2)`` ``(dy, dx)`` shift in cells of ``cell`` px
    (``None`` for the other ops)."""
    b = x.shape[0]
    name = op["name"]
    if name == "hflip":
        flip = torch.rand(b, device=x.device) < float(op["p"])
        return torch.where(flip[:, None, None, None], x.flip(-1), x), None
    if name in ("translate", "shift"):
        h, w = x.shape[2:]
        unit = 1 if name == "translate" else int(cell)
        m = int(op["max_px"]) if name == "translate" else int(op["max_cells"])
        if m == 0:
            return x, (torch.zeros(b, 2, dtype=torch.long) if name == "shift" else None)
        pad = m * unit
        if name == "shift" and pad >= min(h, w):
            raise ValueError(
                f"augment shift max_cells={m} moves a {h}x{w} image by up to {pad} px ({unit} px per latent cell): "
                f"more than the image; use max_cells < {max(1, min(h, w) // unit)}"
            )
        # translate: replicate padding (the shifted-in border looks like the background, never like a part);
        # shift (whole cells, up to a third of the image): reflect padding keeps the background's noise texture
        padded = F.pad(x, (pad, pad, pad, pad), mode="replicate" if name == "translate" else "reflect")
        shifts = torch.randint(-m, m + 1, (b, 2))
        # content moves by +shift (down/right): the output's pixel (y, x) is the input's (y - dy, x - dx)
        crops = [
            padded[i, :, pad - dy * unit : pad - dy * unit + h, pad - dx * unit : pad - dx * unit + w]
            for i, (dy, dx) in enumerate(shifts.tolist())
        ]
        return torch.stack(crops), (shifts if name == "shift" else None)
    if name == "brightness":
        # a common gain on all channels: scales intensity, keeps the hue of every colour
        gain = 1.0 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * float(op["max_delta"])
        return (x * gain).clamp(0, 1), None
    if name == "contrast":
        gain = 1.0 + (torch.rand(b, 1, 1, 1, device=x.device) * 2 - 1) * float(op["max_delta"])
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return ((x - mean) * gain + mean).clamp(0, 1), None
    if name == "noise":
        return (x + float(op["std"]) * torch.randn_like(x)).clamp(0, 1), None
    raise ValueError(f"unknown augmentation {name!r}")  # unreachable after _check_augment


def augment_view_pair(
    x: torch.Tensor, ops: list[dict[str, Any]], cell: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Two views ``(B, C, H, W)`` of ``x`` and their cell offsets.

    Shared ops are applied once, then the per-view ops to each view independently (PIP-Net Sec. 3.1: one
    geometric transform for both views, then per-view ones). ``cell``: the latent stride in pixels (``shift``
    moves by whole cells). The offsets ``(B, 2)`` give, for each image, where view 1's content lies in view 2 in
    cells (``alignment_loss(..., offsets=...)``): view 2's total shift minus view 1's; ``None`` when no op of
    the list shifts by cells.
    """
    for op in ops:
        if AUGMENT_OPS[op["name"]][1]:
            x, _ = _apply_op(x, op, cell)
    views, totals = [], []
    for _ in range(2):
        v, total = x, None
        for op in ops:
            if not AUGMENT_OPS[op["name"]][1]:
                v, shift = _apply_op(v, op, cell)
                if shift is not None:
                    total = shift if total is None else total + shift
        views.append(v)
        totals.append(total)
    offsets = None if totals[0] is None else (totals[1] - totals[0]).to(x.device)
    return views[0], views[1], offsets


def augment_views(
    x: torch.Tensor, ops: list[dict[str, Any]], cell: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views ``(B, C, H, W)`` of ``x``: shared ops once, then the per-view ops on each view independently."""
    v1, v2, _ = augment_view_pair(x, ops, cell)
    return v1, v2


class PIPNetModule(ClassificationModule):
    """PIP-Net LightningModule (see the module docstring for the procedure).

    Args:
        pretrain_epochs: epochs of self-supervised prototype pretraining (classifier frozen) before the full
            phase.
        loss: weights ``{align, tanh, class}`` of the full phase (reference 5, 2, 2) and ``{pretrain_align,
            pretrain_tanh}`` of pretraining (reference 1 (ramped), 5).
        augment: the augmentation list ``[{name: <op>, <param>: value}, ...]``, ops of :data:`AUGMENT_OPS`.
        weight_decrement: subtracted from the class weights (then clamped at 0) after every full-phase step.
        metrics: compute the sparsity metrics on validation/test.
        **kwargs: the network config ``net`` (must build a :class:`~interpzoo.models.pipnet.PIPNet`),
            ``data_info``, ``optimizer`` (with a ``param_groups`` entry for ``net.classifier.*``), ``scheduler``,
            ``monitor`` (default ``val/acc_full``) and the other arguments of
            :class:`~interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "pipnet"

    def __init__(
        self,
        *,
        pretrain_epochs: int = 1,
        loss: dict[str, float] | None = None,
        augment: list[dict[str, Any]] | None = None,
        weight_decrement: float = 1e-3,
        metrics: bool = True,
        **kwargs: Any,
    ) -> None:
        if isinstance(pretrain_epochs, bool) or not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
            raise ValueError(
                f"model.pretrain_epochs must be an integer >= 0 (epochs of prototype pretraining), got "
                f"{pretrain_epochs!r}"
            )
        if not isinstance(weight_decrement, int | float) or not 0 <= float(weight_decrement) < 1:
            raise ValueError(
                f"model.weight_decrement must be a number in [0, 1) (the reference: 1e-3), got {weight_decrement!r}"
            )
        self.loss_cfg = dict(DEFAULT_LOSS)
        for k, v in (loss or {}).items():
            if k not in DEFAULT_LOSS:
                raise ValueError(
                    f"unknown key model.loss.{k}{did_you_mean(k, DEFAULT_LOSS)}; accepted: {sorted(DEFAULT_LOSS)}"
                )
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise ValueError(f"model.loss.{k} must be a finite number >= 0, got {v!r}")
            self.loss_cfg[k] = float(v)
        self.augment_ops = _check_augment(augment)
        self.pretrain_epochs = int(pretrain_epochs)
        self.weight_decrement = float(weight_decrement)
        kwargs.setdefault("monitor", "val/acc_full")
        super().__init__(**kwargs)
        if not isinstance(self.net, PIPNet):
            raise TypeError(
                f"PIPNetModule needs a PIP-Net network, but net.name={self.net_config()['name']!r} builds "
                f"{type(self.net).__name__}; use net.name=pipnet or a pipnet_<backbone> name"
            )
        self.local_size = torch.nn.ModuleDict(
            {
                s: torch.nn.ModuleDict(
                    {"pred": LocalExplanationSize(), "any": LocalExplanationSize(any_class=True)}
                )
                for s in (("val", "test") if metrics else ())
            }
        )

    # -- phases ------------------------------------------------------------------------------------
    def phase(self, epoch: int | None = None) -> str:
        """``"pretrain"`` for epochs ``< pretrain_epochs``, else ``"full"``."""
        e = self.current_epoch if epoch is None else epoch
        return "pretrain" if e < self.pretrain_epochs else "full"

    def loss_weights(self, epoch: int | None = None) -> dict[str, float]:
        """``{align, tanh, class}`` weights of an epoch (reference ``train_pipnet``)."""
        e = self.current_epoch if epoch is None else epoch
        c = self.loss_cfg
        if self.phase(e) == "pretrain":
            # reference: align weight epoch / nr_epochs with 1-based epochs, reaching its full value at the end
            return {
                "align": c["pretrain_align"] * (e + 1) / self.pretrain_epochs,
                "tanh": c["pretrain_tanh"],
                "class": 0.0,
            }
        return {"align": c["align"], "tanh": c["tanh"], "class": c["class"]}

    # -- losses ------------------------------------------------------------------------------------
    def two_view_losses(
        self, out: PIPNetOutput, y: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Weighted ``{align, tanh[, class]}`` of a forward pass over ``cat([view1, view2])`` (labels ``y``: one
        per image, ``(B,)``; ``offsets``: the views' cell offsets ``(B, 2)`` of :func:`augment_view_pair`)."""
        w = self.loss_weights()
        m1, m2 = out.prototype_maps.chunk(2)
        p1, p2 = out.presence_raw.chunk(2)
        losses = {
            "align": w["align"] * alignment_loss(m1, m2, offsets=offsets),
            "tanh": w["tanh"] * 0.5 * (tanh_loss(p1) + tanh_loss(p2)),
        }
        if w["class"] > 0:
            mult = self.net.classifier.multiplier
            losses["class"] = w["class"] * pipnet_class_loss(out.logits, torch.cat([y, y]), mult)
        return losses

    def compute_losses(self, out: PIPNetOutput, batch: dict[str, Any], stage: str) -> dict[str, torch.Tensor]:
        """Validation/test: the classification loss (weight ``loss.class``) on the un-augmented images."""
        mult = self.net.classifier.multiplier
        return {"class": self.loss_cfg["class"] * pipnet_class_loss(out.logits, batch["label"], mult)}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        x, y = batch["image"], batch["label"]
        v1, v2, offsets = augment_view_pair(x, self.augment_ops, int(self.net.backbone.stride))
        out = self(torch.cat([v1, v2]))
        losses = self.two_view_losses(out, y, offsets)
        loss = torch.stack(list(losses.values())).sum()
        self.check_finite_loss(loss, losses, batch)
        if self.trainer.world_size > 1 and "class" not in losses:
            # DDP expects a gradient for every parameter: the frozen classifier gets an exact zero
            loss = loss + 0.0 * sum(p.sum() for p in self.net.classifier.parameters())
        yy = torch.cat([y, y])
        self.train_acc(out.logits.detach(), yy)
        self.train_loss(loss.detach(), weight=float(yy.shape[0]))
        self.log("train/loss", self.train_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, prog_bar=True)
        for name, value in losses.items():
            self.log(f"train/loss_{name}", value.detach(), on_step=True, on_epoch=True)
        # prototypes clearly present per image (the reference prints this: num_scores > 0.1)
        present = (out.presence_raw.detach() > self.net.presence_threshold).sum(1).float().mean()
        self.log("train/prototypes_present", present, on_step=False, on_epoch=True)
        self.log("train/pretrain", float(self.phase() == "pretrain"), on_step=False, on_epoch=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # reference: after each classification-phase step, W <- max(W - 1e-3, 0); b <- max(b, 0)
        decrement = self.weight_decrement if self.phase() == "full" else 0.0
        self.net.classifier.clamp_(decrement)

    # -- metrics -----------------------------------------------------------------------------------
    def update_eval_metrics(self, out: PIPNetOutput, batch: dict[str, Any], stage: str) -> None:
        if stage not in self.local_size:
            return
        w = self.net.class_weights
        self.local_size[stage]["pred"].update(out.presence, w, out.logits.argmax(1))
        self.local_size[stage]["any"].update(out.presence, w)

    def _log_sparsity(self, stage: str) -> None:
        w = self.net.class_weights.detach()
        values = {
            "global_size": float(global_size(w)),
            "nonzero_weights": float((w > 0).sum()),
            "sparsity_ratio": sparsity_ratio(w),
            "prototypes_per_class": float(prototypes_per_class(w).float().mean()),
        }
        if stage in self.local_size:
            m = self.local_size[stage]
            if float(m["pred"].n) > 0 or self.trainer.world_size > 1:
                values["explanation_size"] = float(m["pred"].compute())
                values["explanation_size_any_class"] = float(m["any"].compute())
            m["pred"].reset()
            m["any"].reset()
        for k, v in values.items():
            self.log(f"{stage}/{k}", v, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        if self.trainer.sanity_checking:
            if "val" in self.local_size:
                for m in self.local_size["val"].values():
                    m.reset()
            return
        full = self.phase() == "full"
        self.log("val/acc_full", float(self.val_acc.compute()) if full else 0.0, sync_dist=True)
        self._log_sparsity("val")

    def on_test_epoch_end(self) -> None:
        self._log_sparsity("test")
