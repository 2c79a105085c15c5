"""Lightning DDP plugins of the framework.

:class:`SyncBatchNormAndConceptWhitening` is the one ``LayerSync`` that the trainer configs
``conf/trainer/ddp.yaml`` and ``conf/trainer/ddp_sim.yaml`` install: ``SyncBatchNorm`` for BatchNorms and
global statistics for the concept-whitening layers of :mod:`interpzoo.layers.concept_whitening` (Chen, Bei &
Rudin, *Nature Machine Intelligence* 2020).
"""

from __future__ import annotations

from typing import Any

import torch
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from interpzoo.layers.concept_whitening import SyncConceptWhitening2d

__all__ = ["GlobalBatchNorm", "SyncBatchNormAndConceptWhitening"]


def _take_state(new: Any, module: nn.Module) -> nn.Module:
    """``new`` with ``module``'s state, train/eval mode, trainable flags and device (BatchNorm swaps)."""
    new.load_state_dict(module.state_dict())
    new.train(module.training)
    if module.affine:
        new.weight.requires_grad_(module.weight.requires_grad)
        new.bias.requires_grad_(module.bias.requires_grad)
    return new.to(_device(module))


def _device(module: nn.Module) -> torch.device:
    return next((t.device for t in module.state_dict().values()), torch.device("cpu"))


class GlobalBatchNorm(_BatchNorm):
    """BatchNorm over the global batch of every rank, on any backend (``nn.SyncBatchNorm`` needs GPUs).

    In training mode under an initialised process group, the batch mean and variance are those of the union
    of all ranks' batches (two differentiable ``all_reduce`` calls: the mean, then the centred sum of squares),
    so forward, backward (the all-reduce's backward sums each rank's gradient of the shared statistics) and
    the running statistics equal one process with the whole batch, up to float reduction order. Otherwise
    (evaluation, one process) it is the ordinary BatchNorm. Same parameters and buffers as the BatchNorm it
    replaces, so checkpoints do not change. Used by :class:`SyncBatchNormAndConceptWhitening` on ``gloo``.
    """

    _original: type[_BatchNorm] = nn.BatchNorm2d

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (
            self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        ):
            return super().forward(input)
        from torch.distributed.nn.functional import all_reduce

        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = all_reduce(input.new_tensor([input.numel() // input.shape[1]], dtype=torch.float64))
        n = count.to(input.dtype)
        mean = all_reduce(input.sum(dims)) / n
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                unbiased = var.detach() * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Replace every BatchNorm of ``module`` (not already synced) by a :class:`GlobalBatchNorm`."""
        if isinstance(module, _BatchNorm) and not isinstance(module, cls | nn.SyncBatchNorm):
            new = cls(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            new._original = type(module)
            return _take_state(new, module)
        for name, child in module.named_children():
            module.add_module(name, cls.convert(child))
        return module

    @classmethod
    def revert(cls, module: nn.Module) -> nn.Module:
        """Undo :meth:`convert`: the original BatchNorm classes, same state."""
        if isinstance(module, cls):
            new: Any = module._original(
                module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats
            )
            return _take_state(new, module)
        for name, child in module.named_children():
            module.add_module(name, cls.revert(child))
        return module


class SyncBatchNormAndConceptWhitening(TorchSyncBatchNorm):
    """Lightning ``LayerSync``: ``SyncBatchNorm`` for BatchNorms and global statistics for concept whitening.

    Lightning allows one ``LayerSync``; this one subclasses its ``TorchSyncBatchNorm`` so it may be
    given together with ``Trainer(sync_batchnorm=True)`` and replaces it. ``apply``
    converts every :class:`~interpzoo.layers.concept_whitening.ConceptWhitening2d` to
    :class:`~interpzoo.layers.concept_whitening.SyncConceptWhitening2d` and, unless disabled, every BatchNorm
    to ``nn.SyncBatchNorm``; ``revert`` undoes both.

    Args:
        enabled: ``False`` makes the plugin a no-op (the config switch ``trainer.sync_batchnorm`` feeds it).
        batchnorm: convert ordinary BatchNorms too (default). On the CPU ``gloo`` backend, where
            ``nn.SyncBatchNorm`` cannot run, they become :class:`GlobalBatchNorm` (the same global statistics
            through differentiable all-reduces). Concept whitening is synced on every backend.
    """

    def __init__(self, enabled: bool = True, batchnorm: bool | None = None) -> None:
        self.enabled = bool(enabled)
        self.batchnorm = batchnorm

    @staticmethod
    def _gloo() -> bool:
        import torch.distributed as dist

        return dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo"

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        if self.batchnorm is None or self.batchnorm:
            model = GlobalBatchNorm.convert(model) if self._gloo() else super().apply(model)
        return SyncConceptWhitening2d.convert_sync(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        model = SyncConceptWhitening2d.revert(model)
        model = GlobalBatchNorm.revert(model)
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            model = super().revert(model)
        return model
