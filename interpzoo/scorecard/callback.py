"""Lightning callback that logs the ground-truth scorecard (:func:`interpzoo.scorecard.evaluate`) after testing."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from interpzoo.scorecard import NoGroundTruth, evaluate

__all__ = ["GroundTruthScorecard"]


class GroundTruthScorecard(pl.Callback):
    """Log ``test/gt/<metric>`` with ``_ceiling``, ``_random`` and ``_norm`` for the run's network.

    Every rank scores the same fixed held-out images with the same weights, so the values agree without a
    collective. On data without ground truth (CIFAR-10, CUB without the PartShapes renderer, tabular data)
    it says so once and logs nothing: a number without a ceiling would look comparable and is not.

    Args:
        num_samples: size of the varied-pose held-out split, at most the size of the run's test split (a
            quick run with 40 test images gets a 40-image scorecard, not a 200-image one).
        seed: seed of the random baselines.
        enabled: switch (``callbacks.scorecard.enabled=false``).
    """

    def __init__(self, num_samples: int = 200, seed: int = 0, enabled: bool = True) -> None:
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.enabled = bool(enabled)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled or trainer.datamodule is None:
            return
        net = getattr(pl_module, "net", pl_module)
        details: dict = {}
        num = self.num_samples
        n_test = getattr(trainer.datamodule, "n_test", None)
        if isinstance(n_test, int) and n_test > 0:
            num = min(num, n_test)
        try:
            with torch.inference_mode(False), torch.enable_grad():
                rows = evaluate(net, trainer.datamodule, num, self.seed, details)
        except NoGroundTruth as e:
            rank_zero_info(f"scorecard: {e}")
            return
        for row in rows:
            for key, value in row.logged("test/gt/").items():
                pl_module.log(key, value, sync_dist=False)
        # per prototype/filter normalised part scores, printed in the report's panels
        pl_module.scorecard_unit_scores = details.get("unit_part_scores")
