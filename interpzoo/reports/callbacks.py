"""Lightning callbacks for metrics that are not batch-decomposable (run on a fixed, seeded subset).

:class:`IntrinsicDimension` logs the TwoNN intrinsic dimension (Facco et al., *Scientific Reports* 2017;
Ansuini et al., "Intrinsic dimension of data representations in deep neural networks", NeurIPS 2019) of
chosen layers; ``conf/callbacks/intrinsic_dim.yaml`` adds it to a run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from rich.progress import track

from interpzoo.datamodules.base import fixed_subset_indices
from interpzoo.metrics.intrinsic_dim import twonn_dimension
from interpzoo.models.lit_base import batch_input
from interpzoo.models.surgery import get_submodule

__all__ = ["IntrinsicDimension"]


class IntrinsicDimension(pl.Callback):
    """Log ``test/intrinsic_dim/<layer>`` (TwoNN, :func:`interpzoo.metrics.intrinsic_dim.twonn_dimension`).

    Every rank computes the estimate on the same fixed subset with the same weights, so the value is
    identical everywhere without a collective (the estimator needs all points in one place).

    Args:
        layers: dotted names of submodules of the LightningModule (e.g. ``net.backbone``).
        num_samples: size of the fixed subset of the test split.
        seed: seed of the subset.
        pool: ``"flatten"`` the whole map (as Ansuini et al.) or ``"avg"`` global-average-pool it.
        stages: ``("test",)`` and/or ``"val"`` (at every validation epoch end).
    """

    def __init__(
        self,
        layers: Sequence[str] = ("net.backbone",),
        num_samples: int = 1000,
        seed: int = 0,
        pool: str = "flatten",
        stages: Sequence[str] = ("test",),
    ) -> None:
        if pool not in ("flatten", "avg"):
            raise ValueError(f"pool must be 'flatten' or 'avg', got {pool!r}")
        self.layers = list(layers)
        self.num_samples = num_samples
        self.seed = seed
        self.pool = pool
        self.stages = tuple(stages)

    @torch.no_grad()
    def compute(self, pl_module: pl.LightningModule, datamodule: Any, split: str) -> dict[str, float]:
        """``{layer: intrinsic dimension}`` on the fixed subset of ``datamodule``'s ``split``."""
        layers = []
        for name in self.layers:
            try:
                get_submodule(pl_module, name)
                layers.append(name)
            except KeyError as e:
                rank_zero_warn(f"intrinsic dimension: skipping layer {name!r}: {e.args[0]}")
        feats: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
        hooks = []
        for name in layers:
            module = get_submodule(pl_module, name)

            def hook(_m, _i, out, name=name):
                t = out if isinstance(out, torch.Tensor) else getattr(out, "features", out[0])
                if self.pool == "avg" and t.dim() == 4:
                    t = t.mean(dim=(2, 3))
                feats[name].append(t.flatten(1).float().cpu().clone())  # an in-place ReLU may follow

            hooks.append(module.register_forward_hook(hook))
        was_training = pl_module.training
        pl_module.eval()
        try:
            n = len(getattr(datamodule, f"{split}_set"))
            idx = fixed_subset_indices(n, self.num_samples, self.seed)
            loader = datamodule.subset_dataloader(split, idx, batch_size=128)
            for batch in track(loader, description="intrinsic dimension", disable=not _is_main(pl_module)):
                pl_module(batch_input(batch).to(pl_module.device))
        finally:
            for h in hooks:
                h.remove()
            pl_module.train(was_training)
        return {name: twonn_dimension(torch.cat(v)) for name, v in feats.items()}

    def _run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        dataset = getattr(dm, f"{stage}_set", None) if dm is not None else None
        if dataset is None:
            return
        for name, value in self.compute(pl_module, dm, stage).items():
            pl_module.log(f"{stage}/intrinsic_dim/{name}", value, sync_dist=False)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "test" in self.stages:
            self._run(trainer, pl_module, "test")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.stages and not trainer.sanity_checking:
            self._run(trainer, pl_module, "val")


def _is_main(pl_module: pl.LightningModule) -> bool:
    return pl_module.trainer is None or pl_module.trainer.is_global_zero
