"""The soft autoencoder LightningModule: denoising training with shrinkage metrics (Fan, Li, Teng & Wang,
"Soft Autoencoder and Its Wavelet Adaptation Interpretation", IEEE Trans. Computational Imaging 2020).

:class:`SoftAutoencoderModule` trains a :class:`~interpzoo.models.soft_autoencoder.SoftAutoencoder` (or its
ReLU/linear counterparts) to denoise additive white Gaussian noise; its report figures are drawn by
:mod:`interpzoo.reports.soft_autoencoder`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from interpzoo.metrics.soft_autoencoder import CodeStatistics
from interpzoo.models.lit_base import ReconstructionModule, batch_input
from interpzoo.models.outputs import NetworkOutput

__all__ = ["SoftAutoencoderModule"]


class SoftAutoencoderModule(ReconstructionModule):
    """Denoising training of a soft (or ReLU/linear) autoencoder with shrinkage metrics.

    Extends :class:`interpzoo.models.lit_base.ReconstructionModule` (seeded evaluation noise, MSE,
    ``*/psnr``) with ``*/ssim``, ``*/psnr_noisy`` (the noisy input, for reference), and per code stage
    ``*/code_sparsity/<stage>``, ``*/hoyer_sparsity/<stage>``, ``*/hoyer_population/<stage>``,
    ``*/dead_units/<stage>``, ``*/all_zero_codes/<stage>``
    (:class:`interpzoo.metrics.soft_autoencoder.CodeStatistics`), and for soft stages
    ``*/threshold_mean/<stage>`` (mean ``b``, code units) and ``*/threshold_pixel/stage1`` (stage-1
    thresholds in pixel-noise units,
    :meth:`~interpzoo.models.soft_autoencoder.SoftAutoencoder.pixel_thresholds`). Labels are ignored.
    The ground-truth scorecard (thresholds against the noise level, :mod:`interpzoo.scorecard.soft_autoencoder`) is
    not logged here: the ``GroundTruthScorecard`` callback scores the network after testing on PartShapes, reading
    ``net.training_noise_std`` (set here to ``noise_std``).

    Args:
        noise_std: σ of the additive white Gaussian noise in ``[0, 1]`` pixel units (``25 / 255``).
        noise_seed: seed of the validation/test noise (per sample index: every evaluation sees the
            same noisy images, on any number of ranks).
        clip_noisy: clip the noisy input to ``[0, 1]`` (what a saved noisy image would be); off keeps
            pure AWGN, the model under which shrinkage is derived.
        sparsity_eps: ``|z| ≤ eps`` counts as zero (0 for the exact zeros of a soft threshold).
        report_examples: number of test images in the report's noisy/denoised/clean figure.
        **kwargs: the network config ``net`` (default ``softae``; a ``backbone`` entry is ignored: the soft
            autoencoder has its own encoder), ``data_info``, ``monitor`` (default ``val/psnr``) and the other
            arguments of :class:`interpzoo.models.lit_base.InterpModule`.
    """

    default_net = "softae"

    def __init__(
        self,
        *,
        noise_std: float = 25 / 255,
        noise_seed: int = 1234,
        clip_noisy: bool = False,
        sparsity_eps: float = 0.0,
        report_examples: int = 8,
        **kwargs: Any,
    ) -> None:
        if noise_std < 0:
            raise ValueError(f"noise_std is a standard deviation in [0, 1] pixel units, got {noise_std}")
        if noise_std > 1:
            raise ValueError(
                f"noise_std={noise_std} looks like 0..255 units; use noise_std={noise_std}/255 "
                f"= {noise_std / 255:.4f} (images are in [0, 1])"
            )
        super().__init__(noise_std=noise_std, noise_seed=noise_seed, **kwargs)
        channels = getattr(self.net, "code_channels", None)
        if not isinstance(channels, dict):
            raise TypeError(
                f"SoftAutoencoderModule needs an autoencoder exposing code_channels (e.g. net.name=softae), "
                f"got {type(self.net).__name__} from net.name={self.net_config()['name']!r}"
            )
        self.clip_noisy = bool(clip_noisy)
        # The ground-truth scorecard (interpzoo.scorecard.soft_autoencoder) compares the stage-1 thresholds with
        # the noise they should remove; the network alone does not know that noise level, so tell it (a plain
        # attribute: not in the state dict, nothing changes in checkpoints or bundles).
        self.net.training_noise_std = float(noise_std)
        self.report_examples = int(report_examples)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_ssim", StructuralSimilarityIndexMeasure(data_range=1.0))
            setattr(self, f"{stage}_psnr_noisy", PeakSignalNoiseRatio(data_range=1.0))
        self.code_stats = nn.ModuleDict(
            {
                stage: nn.ModuleDict({n: CodeStatistics(c, eps=sparsity_eps) for n, c in channels.items()})
                for stage in ("val", "test")
            }
        )

    def add_noise(self, x: torch.Tensor, index: torch.Tensor | None, stage: str) -> torch.Tensor:
        noisy = super().add_noise(x, index, stage)
        return noisy.clamp(0.0, 1.0) if self.clip_noisy else noisy

    def update_eval_metrics(
        self, out: NetworkOutput, batch: dict[str, Any], noisy: torch.Tensor, stage: str
    ) -> None:
        clean = batch_input(batch)
        ssim, psnr_noisy = getattr(self, f"{stage}_ssim"), getattr(self, f"{stage}_psnr_noisy")
        # Same clamp as the base class's PSNR: a denoised image is shown/saved in [0, 1].
        ssim(out.reconstruction.detach().clamp(0, 1), clean)
        psnr_noisy(noisy, clean)
        self.log(f"{stage}/ssim", ssim, on_step=False, on_epoch=True)
        self.log(f"{stage}/psnr_noisy", psnr_noisy, on_step=False, on_epoch=True)
        for name, metric in self.code_stats[stage].items():
            metric.update(out.codes[name].detach())

    def _log_code_metrics(self, stage: str) -> None:
        # CodeStatistics.compute() all-reduces its sum states, so every rank must reach it.
        for name, metric in self.code_stats[stage].items():
            if metric.update_count == 0:
                continue
            values = metric.compute()
            metric.reset()
            if self.trainer.sanity_checking:
                continue
            for key, value in values.items():
                self.log(f"{stage}/{key}/{name}", value, sync_dist=True)
        if not self.trainer.sanity_checking:
            for name, b in self.net.thresholds().items():
                self.log(f"{stage}/threshold_mean/{name}", b.mean(), sync_dist=True)
            pixel = self.net.pixel_thresholds() if hasattr(self.net, "pixel_thresholds") else None
            if pixel is not None:
                self.log(f"{stage}/threshold_pixel/stage1", pixel.mean(), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        self._log_code_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_code_metrics("test")
