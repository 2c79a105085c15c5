"""Lightning DDP plugins of the framework.

:class:`SyncBatchNormAndConceptWhitening` is the one ``LayerSync`` that the trainer configs
``conf/trainer/ddp.yaml`` and ``conf/trainer/ddp_sim.yaml`` install: ``SyncBatchNorm`` for BatchNorms and
global statistics for the concept-whitening layers of :mod:`interpzoo.layers.concept_whitening` (Chen, Bei &
Rudin, *Nature Machine Intelligence* 2020).
"""

from __future__ import annotations

import warnings

from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import nn

from interpzoo.layers.concept_whitening import SyncConceptWhitening2d

__all__ = ["SyncBatchNormAndConceptWhitening"]


class SyncBatchNormAndConceptWhitening(TorchSyncBatchNorm):
    """Lightning ``LayerSync``: ``SyncBatchNorm`` for BatchNorms and global statistics for concept whitening.

    Lightning allows one ``LayerSync``; this one subclasses its ``TorchSyncBatchNorm`` so it may be
    given together with ``Trainer(sync_batchnorm=True)`` and replaces it. ``apply``
    converts every :class:`~interpzoo.layers.concept_whitening.ConceptWhitening2d` to
    :class:`~interpzoo.layers.concept_whitening.SyncConceptWhitening2d` and, unless disabled, every BatchNorm
    to ``nn.SyncBatchNorm``; ``revert`` undoes both.

    Args:
        enabled: ``False`` makes the plugin a no-op (the config switch ``trainer.sync_batchnorm`` feeds it).
        batchnorm: convert ordinary BatchNorms too. ``None``: yes, except with the CPU ``gloo`` backend,
            where ``nn.SyncBatchNorm`` cannot run (they stay per-rank, with a warning); concept whitening
            is synced on every backend.
    """

    def __init__(self, enabled: bool = True, batchnorm: bool | None = None) -> None:
        self.enabled = bool(enabled)
        self.batchnorm = batchnorm

    def _convert_batchnorm(self) -> bool:
        if self.batchnorm is not None:
            return bool(self.batchnorm)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
            warnings.warn(
                "SyncBatchNorm needs GPUs; on the CPU gloo backend ordinary BatchNorms stay per-rank "
                "(concept-whitening layers are synced)",
                stacklevel=2,
            )
            return False
        return True

    def apply(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        if self._convert_batchnorm():
            model = super().apply(model)
        return SyncConceptWhitening2d.convert_sync(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if not self.enabled:
            return model
        model = SyncConceptWhitening2d.revert(model)
        if any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            model = super().revert(model)
        return model
