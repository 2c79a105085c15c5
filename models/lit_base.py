"""LightningModules shared by every method: classification and reconstruction tasks.

Hyper-parameters are plain data only (strings, numbers, lists, dicts), so every checkpoint loads with
``torch.load(..., weights_only=True)`` and resumes. The network is rebuilt by the registry's one builder
(:func:`interpzoo.models.registry.build_model`) from the network config ``net`` and ``data_info``. Report figures are not drawn here: see
:func:`interpzoo.reports.write_report`.
"""

from __future__ import annotations

import copy
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from interpzoo.models.optim import build_optimizer, build_scheduler
from interpzoo.models.outputs import NetworkOutput
from interpzoo.models.registry import build_model, resolve_net
from interpzoo.utils import UsageError


class NonFiniteLossError(UsageError, FloatingPointError):
    """Training produced a NaN or infinite loss; the message has the step, the loss terms and a hint.

    Exit code 1 in the console scripts (the run failed; the command itself was valid).
    """

    exit_code = 1


def batch_input(batch: dict[str, Any]) -> torch.Tensor:
    """The network input of a dict batch: ``"image"`` ``(B, C, H, W)`` or ``"features"`` ``(B, F)``."""
    if "image" in batch:
        return batch["image"]
    if "features" in batch:
        return batch["features"]
    raise KeyError(f"batch has neither 'image' nor 'features' (keys: {sorted(batch)})")


class InterpModule(pl.LightningModule):
    """Common base: builds the network, optimisers, schedulers; subclasses define the task.

    Args:
        net: the network config ``{"name": <model or architecture name>, **constructor arguments}``, the
            same shape as ``interpzoo.create_model(name, **kwargs)`` (``model.net`` in a training config;
            its ``backbone`` entry is the ``backbone=`` config group, ignored by architectures without a
            trunk). ``name`` defaults to the module's :attr:`default_net`. Built by
            :func:`~interpzoo.models.registry.build_model`: registry defaults < ``data_info`` < ``net``.
        data_info: the datamodule's :attr:`~datamodules.base.BaseDataModule.data_info`.
        optimizer: optimiser config (:func:`models.optim.build_optimizer`).
        scheduler: scheduler config or ``None`` (:func:`models.optim.build_scheduler`).
        monitor: metric used for checkpoint selection; ``monitor_mode``: ``max`` or ``min``.
        channels_last: use channels-last memory format (faster convolutions on GPU).
        compile: wrap the network with ``torch.compile``.
    """

    #: network name used when ``net`` has no ``name``
    default_net = "baseline"

    def __init__(
        self,
        net: dict[str, Any] | None = None,
        data_info: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        monitor: str = "val/acc",
        monitor_mode: str = "max",
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        if monitor_mode not in ("min", "max"):
            raise ValueError(f"monitor_mode must be 'min' or 'max', got {monitor_mode!r}")
        self.save_hyperparameters()
        self.data_info = dict(data_info or {})
        self.net = self.build_net()
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        self._forward_net = torch.compile(self.net) if compile else self.net

    # -- network ---------------------------------------------------------------------------------
    def net_config(self) -> dict[str, Any]:
        """The network config this module builds: ``net`` (``name`` defaulting to :attr:`default_net`).

        Subclasses add what their training fixes (concept names, a binary head, ...).
        """
        return {"name": self.default_net, **copy.deepcopy(dict(self.hparams.get("net") or {}))}

    def net_arguments(self) -> tuple[str, dict[str, Any]]:
        """``(architecture, constructor kwargs)``: registry defaults < data_info < :meth:`net_config`."""
        return resolve_net(self.net_config(), self.data_info, drop_unused_backbone=True)

    def build_net(self) -> nn.Module:
        return build_model(self.net_config(), self.data_info, drop_unused_backbone=True)

    def forward(self, x: torch.Tensor) -> NetworkOutput:
        if self.hparams.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._forward_net(x)

    # -- optimisation ----------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer or {"name": "adam", "lr": 1e-3})
        optimizer = build_optimizer(self.named_parameters(), opt_cfg)
        max_epochs = self.trainer.max_epochs if self.trainer is not None and self.trainer.max_epochs else 1
        steps = 1
        if self.trainer is not None:
            try:
                steps = max(1, int(self.trainer.estimated_stepping_batches // max(1, max_epochs)))
            except Exception:  # estimated_stepping_batches needs a dataloader; epoch interval does not
                steps = 1
        sched = build_scheduler(optimizer, self.hparams.scheduler, max_epochs, steps)
        if sched is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": sched}

    # -- a non-finite loss stops training at once ------------------------------------------------
    def check_finite_loss(self, loss: torch.Tensor, losses: dict[str, torch.Tensor], batch: Any) -> None:
        """Raise :class:`NonFiniteLossError` if ``loss`` is NaN or infinite (on any rank), before the backward.

        Training on would turn every weight into NaN and report chance accuracy; the error names the step,
        each loss term and the likely fix. Called by the training steps of this module; modules with their
        own ``training_step`` get the same check after the step (:meth:`on_train_batch_end`).
        """
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer is not None and self.trainer.world_size > 1:
            # every rank must stop together, or the others wait for this one in the next collective
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        self._loss_checked = True
        if bad:
            terms = {k: float(v.detach().float().mean()) for k, v in losses.items()}
            raise NonFiniteLossError(
                self._non_finite_message(float(loss.detach().float().mean()), terms, batch)
            )

    def _non_finite_message(self, value: float, terms: dict[str, float], batch: Any) -> str:
        trainer = self.trainer
        where = (
            f"step {trainer.global_step} (epoch {trainer.current_epoch})" if trainer is not None else "a step"
        )
        shown = ", ".join(f"{k}={v:.4g}" for k, v in terms.items()) or "no terms logged"
        lrs = []
        if trainer is not None:
            lrs = sorted(
                {float(g["lr"]) for opt in trainer.optimizers for g in opt.param_groups if "lr" in g}
            )
        lr = f" (learning rate now {', '.join(f'{v:.3g}' for v in lrs)})" if lrs else ""
        x = (
            batch_input(batch)
            if isinstance(batch, dict) and ("image" in batch or "features" in batch)
            else None
        )
        if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
            hint = "The batch itself holds NaN or inf values: clean the data (or drop those rows/images)."
        else:
            hint = (
                "Most often the learning rate is too high: lower model.optimizer.lr (e.g. 10x), or clip gradients "
                "with trainer.gradient_clip_val=1.0; also check the data for extreme values."
            )
        return (
            f"the training loss became {value} at {where}{lr}; loss terms: {shown}. Training stopped: the weights "
            f"would all turn into NaN. {hint} The checkpoints written so far hold the weights before this step."
        )

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_loss_checked", False):
            self._loss_checked = False
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, torch.Tensor):
            return
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self.trainer.world_size > 1:
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            metrics = self.trainer.callback_metrics
            terms = {
                k.removeprefix("train/loss_").removesuffix("_step"): float(v)
                for k, v in metrics.items()
                if k.startswith("train/loss_") and k.endswith("_step")
            }
            raise NonFiniteLossError(
                self._non_finite_message(float(loss.detach().float().mean()), terms, batch)
            )

    # -- epoch means that stay exact under DDP -------------------------------------------------
    def log_epoch_mean(self, name: str, value: torch.Tensor, weight: int | torch.Tensor) -> None:
        """Log ``name`` as the sample-weighted mean of per-batch means over the epoch, over every rank.

        ``self.log(..., sync_dist=True)`` of a per-batch mean averages the ranks' means with equal weight,
        which differs from one process when the ranks hold different numbers of samples (an odd validation
        or test split under DDP); a ``MeanMetric`` per name sums value and weight across ranks instead, so the
        logged value equals single-process up to float reduction order. ``weight``: the batch's sample count.
        """
        from torchmetrics import MeanMetric

        key = name.replace("/", "__").replace(".", "_")
        means = self.__dict__.setdefault("_epoch_means", {})
        metric = means.get(key)
        if metric is None:
            metric = means[key] = MeanMetric().to(self.device)
            # created lazily (the names are the method's loss terms): a child so that Lightning resets it
            self.add_module(f"_epoch_mean__{key}", metric)
        metric.update(value.detach().float().mean(), weight=float(weight))
        self.log(name, metric, on_step=False, on_epoch=True, metric_attribute=f"_epoch_mean__{key}")

    # -- checkpoints -----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        from interpzoo.models.checkpoint import CHECKPOINT_KEY
        from interpzoo.models.registry import task_name

        arch, args = self.net_arguments()
        checkpoint[CHECKPOINT_KEY] = {
            "task": task_name(self),
            "architecture": arch,
            "model_args": args,
        }


class ClassificationModule(InterpModule):
    """Classification task: cross-entropy + method-specific terms, accuracy per split.

    Subclasses add loss terms by overriding :meth:`compute_losses` (each term is logged as
    ``train/loss_<name>``) and interpretability metrics by overriding :meth:`update_eval_metrics`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        k = int(self.data_info.get("num_classes") or self.net_arguments()[1].get("num_classes", 2))
        self.train_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=k, average="micro")
        self.train_loss = MeanMetric()
        self.val_loss = MeanMetric()
        self.test_loss = MeanMetric()
        self.val_acc_best = MaxMetric()

    def compute_losses(
        self, out: NetworkOutput, batch: dict[str, Any], stage: str
    ) -> dict[str, torch.Tensor]:
        """Named, already weighted loss terms; their sum is the training loss."""
        return {"ce": F.cross_entropy(out.logits, batch["label"])}

    def update_eval_metrics(self, out: NetworkOutput, batch: dict[str, Any], stage: str) -> None:
        """Hook for interpretability metrics on validation/test batches."""

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        x, y = batch_input(batch), batch["label"]
        out = self(x)
        losses = self.compute_losses(out, batch, stage)
        loss = torch.stack(list(losses.values())).sum()
        if stage == "train":
            self.check_finite_loss(loss, losses, batch)
        acc, mean_loss = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_loss")
        acc(out.logits.detach(), y)
        # weighted by the batch's samples: the mean over samples, the same however the split is batched or
        # sharded across ranks (an unweighted mean of batch means is not)
        mean_loss(loss.detach(), weight=float(y.shape[0]))
        on_step = stage == "train"
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=stage != "test")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=True)
        if len(losses) > 1:
            for name, value in losses.items():
                if on_step:
                    self.log(f"{stage}/loss_{name}", value.detach(), on_step=True, on_epoch=True)
                else:  # sample-weighted over every rank: exact with uneven evaluation shards
                    self.log_epoch_mean(f"{stage}/loss_{name}", value, y.shape[0])
        if stage != "train":
            self.update_eval_metrics(out, batch, stage)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")

    def on_train_start(self) -> None:
        # The sanity check ran validation on an untrained model: do not let it set the best value. A resumed
        # run keeps the best of the epochs before the kill (restored by on_load_checkpoint).
        best = self._resumed_val_acc_best
        self.val_acc_best.reset()
        if best is not None:
            self.val_acc_best.update(best.to(self.device))
            self._resumed_val_acc_best = None

    # torchmetrics states are not in the state_dict: the best validation accuracy so far travels in the
    # checkpoint itself, so that a killed and resumed run logs the same val/acc_best as an uninterrupted one
    _resumed_val_acc_best: torch.Tensor | None = None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.val_acc_best.update_count > 0:  # its state, not compute(): no collective while saving
            # (each rank updated it with the same all-reduced val/acc)
            checkpoint["val_acc_best"] = self.val_acc_best.max_value.detach().cpu().clone()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        best = checkpoint.get("val_acc_best")
        self._resumed_val_acc_best = best if isinstance(best, torch.Tensor) else None

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best(self.val_acc.compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)


class ReconstructionModule(InterpModule):
    """Denoising reconstruction task: ``x_noisy = x + sigma * n``, MSE to the clean ``x``, PSNR per split.

    Validation and test noise is seeded per sample index, so every evaluation of a model sees the
    same noisy images.

    Args:
        noise_std: sigma of additive Gaussian noise in ``[0, 1]`` pixel units (e.g. ``25 / 255``).
        noise_seed: seed of the evaluation noise.
    """

    default_net = "softae"

    def __init__(
        self, *args: Any, noise_std: float = 25 / 255, noise_seed: int = 1234, **kwargs: Any
    ) -> None:
        kwargs.setdefault("monitor", "val/psnr")
        kwargs.setdefault("monitor_mode", "max")
        super().__init__(*args, **kwargs)
        from torchmetrics.image import PeakSignalNoiseRatio

        self.noise_std = noise_std
        self.noise_seed = noise_seed
        for stage in ("train", "val", "test"):
            setattr(self, f"{stage}_psnr", PeakSignalNoiseRatio(data_range=1.0))
            setattr(self, f"{stage}_loss", MeanMetric())

    def add_noise(self, x: torch.Tensor, index: torch.Tensor | None, stage: str) -> torch.Tensor:
        if stage == "train" or index is None:
            return x + self.noise_std * torch.randn_like(x)
        noise = torch.empty_like(x)
        for i, idx in enumerate(index.tolist()):
            g = torch.Generator().manual_seed(self.noise_seed * 1_000_003 + int(idx))
            noise[i] = torch.randn(x.shape[1:], generator=g).to(x)
        return x + self.noise_std * noise

    def compute_losses(
        self, out: NetworkOutput, batch: dict[str, Any], clean: torch.Tensor, stage: str
    ) -> dict[str, torch.Tensor]:
        return {"mse": F.mse_loss(out.reconstruction, clean)}

    def update_eval_metrics(
        self, out: NetworkOutput, batch: dict[str, Any], noisy: torch.Tensor, stage: str
    ) -> None:
        """Hook for sparsity and other metrics on validation/test batches."""

    def _step(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        clean = batch_input(batch)
        noisy = self.add_noise(clean, batch.get("index"), stage)
        out = self(noisy)
        losses = self.compute_losses(out, batch, clean, stage)
        loss = torch.stack(list(losses.values())).sum()
        if stage == "train":
            self.check_finite_loss(loss, losses, batch)
        psnr, mean_loss = getattr(self, f"{stage}_psnr"), getattr(self, f"{stage}_loss")
        psnr(out.reconstruction.detach().clamp(0, 1), clean)
        mean_loss(
            loss.detach(), weight=float(clean.shape[0])
        )  # the mean over samples (see ClassificationModule)
        self.log(f"{stage}/loss", mean_loss, on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/psnr", psnr, on_step=False, on_epoch=True, prog_bar=True)
        if stage != "train":
            self.update_eval_metrics(out, batch, noisy, stage)
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._step(batch, "test")
