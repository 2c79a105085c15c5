"""The soft autoencoder on the scorecard: do its thresholds track the noise? (Fan, Li, Teng & Wang, IEEE TCI 2020).

Fan et al. read the soft autoencoder as "a learned cascaded wavelet shrinkage system": each encoder unit is an
analysis filter followed by a soft threshold that should remove the noise and keep the signal. For the first
stage this is checkable exactly: unit ``k`` filters the normalised image with a bias-free ``w_k``, so white
pixel noise of std ``sigma`` reaches it as Gaussian code noise of std ``sigma_k = sigma ||w_k / s||_2``
(:func:`~interpzoo.metrics.soft_autoencoder.code_noise_std`), and PartShapes tells us which code energy is the
parts' (re-render the same image without its parts). Rows, on the varied-pose held-out split, stage 1:

* ``noise_rejection``: on background-only images (no parts, no distractors) plus noise, the share of the code
  entries that the clean background leaves silent and that the noise does not switch on
  (:func:`~interpzoo.metrics.soft_autoencoder.noise_rejection`).
* ``signal_retention``: on the noisy full images, the share of the parts' code energy on entries that the
  threshold keeps (:func:`~interpzoo.metrics.soft_autoencoder.signal_retention`). The two trade off: a huge
  threshold rejects all noise and keeps no signal, a zero threshold the reverse.
* ``threshold_tracking``: the correlation over units of ``b_k`` with ``sigma_k``
  (:func:`~interpzoo.metrics.soft_autoencoder.threshold_tracking`).

Ceiling: the **oracle thresholds** ``b_k = sigma_k sqrt(2 log n)`` (the universal threshold of Donoho & Johnstone,
Biometrika 1994, ``n = H_1 W_1`` code entries per unit and image), on the same filters, images and noise: its
rejection of noise on a silent code is ``erf(sqrt(log n))`` (0.9998 at 32 x 32), its tracking exactly 1, its
retention what the universal rule keeps of these parts. Random baseline: the model's own thresholds **permuted
across units** (``draws`` seeded permutations, averaged): the same thresholds with the link to each unit's noise
cut. Noise: additive white Gaussian noise of the std the model was trained to remove (``noise_std`` in ``[0, 1]``
pixel units, read from the network or the bundle, else the training default 25/255); the "clean" images have the
renderer's own pixel noise switched off, so the noise is exactly that. No retraining.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from interpzoo.datamodules.partshapes import image_to_tensor
from interpzoo.metrics.calibration import Score
from interpzoo.metrics.soft_autoencoder import (
    code_noise_std,
    noise_rejection,
    signal_retention,
    threshold_tracking,
    universal_factor,
)
from interpzoo.scorecard.common import NoGroundTruth, ground_truth_dataset, renderer_of

__all__ = [
    "DEFAULT_NOISE_STD",
    "METRICS",
    "clean_renders",
    "noise_std_of",
    "score",
    "stage1_codes",
    "stage1_scores",
]

METRICS = ("noise_rejection", "signal_retention", "threshold_tracking")
DEFAULT_NOISE_STD = 25 / 255  # SoftAutoencoderModule's default training noise


def noise_std_of(net: nn.Module) -> float:
    """The pixel noise std (``[0, 1]`` units) ``net`` was trained to remove.

    Read from ``net.training_noise_std`` (set by :class:`~interpzoo.models.lit_soft_autoencoder.SoftAutoencoderModule`),
    else the bundle's recorded ``noise_std`` hyperparameter, else :data:`DEFAULT_NOISE_STD`.
    """
    value = getattr(net, "training_noise_std", None)
    if value is None:
        hparams = (getattr(net, "bundle_config", None) or {}).get("lightning", {}).get("hparams", {})
        value = hparams.get("noise_std")
    return float(DEFAULT_NOISE_STD if value is None else value)


def clean_renders(dataset: Any, indices: range | list[int]) -> dict[str, Tensor]:
    """Noise-free renders of each sample: ``full``, ``no_parts`` (distractors kept) and ``background`` (nothing).

    The renderer's pixel noise is switched off (``spec.noise = None``), the layout is the sample's own.

    Returns:
        ``{name: (n, C, H, W)}`` in ``[0, 1]``.
    """
    r = dataset.renderer
    slots = list(range(r.num_slots))
    out: dict[str, list[Tensor]] = {"full": [], "no_parts": [], "background": []}
    for i in indices:
        spec = r.draw(dataset.split, int(i))
        spec.noise = None
        variants = {
            "full": spec,
            "no_parts": r.intervene(spec, remove_parts=slots),
            "background": r.intervene(spec, remove_parts=slots, remove_distractors=True),
        }
        for name, s in variants.items():
            out[name].append(image_to_tensor(r.sample_from_spec(s).image, dataset.grayscale))
    return {k: torch.stack(v) for k, v in out.items()}


@torch.no_grad()
def stage1_codes(net: nn.Module, x: Tensor) -> Tensor:
    """Stage-1 pre-activation codes ``conv_1(normalise(x))`` ``(B, C_1, H_1, W_1)``, padded as the forward pass."""
    h = net.normalize(x)
    height, width = h.shape[-2:]
    ph, pw = (-height) % net.total_stride, (-width) % net.total_stride
    if ph or pw:
        h = F.pad(h, (0, pw, 0, ph), mode="replicate")
    return net.backbone.stages[0].conv(h)


def stage1_scores(
    u_background: Tensor,
    u_background_noisy: Tensor,
    u_noisy: Tensor,
    signal: Tensor,
    threshold: Tensor,
    sigma_k: Tensor,
) -> dict[str, float]:
    """The three metrics for one set of thresholds ``(C,)`` (codes ``(B, C, H, W)``, see the module docstring)."""
    return {
        "noise_rejection": noise_rejection(u_background_noisy, u_background, threshold),
        "signal_retention": signal_retention(u_noisy, signal, threshold),
        "threshold_tracking": threshold_tracking(threshold, sigma_k),
    }


def _permutations(c: int, draws: int, seed: int) -> list[Tensor]:
    """``draws`` seeded permutations of ``range(c)``, avoiding the identity when ``c > 1``."""
    g = torch.Generator().manual_seed(int(seed))
    out = []
    for _ in range(max(1, int(draws))):
        p = torch.randperm(c, generator=g)
        while c > 1 and bool((p == torch.arange(c)).all()):
            p = torch.randperm(c, generator=g)
        out.append(p)
    return out


@torch.no_grad()
def score(
    net: nn.Module,
    datamodule: Any,
    num_samples: int = 500,
    seed: int = 0,
    noise_std: float | None = None,
    draws: int = 8,
) -> list[Score]:
    """Score the stage-1 soft thresholds of a :class:`~interpzoo.models.soft_autoencoder.SoftAutoencoder`.

    Args:
        net: the autoencoder (no retraining; its thresholds and filters are read as they are).
        datamodule: a PartShapes datamodule with the model's channels (``grayscale`` for 1-channel models);
            any other raises :class:`NoGroundTruth`.
        num_samples: images of the varied-pose held-out split.
        seed: seed of the noise and of the permutations.
        noise_std: pixel noise std in ``[0, 1]`` units (default: :func:`noise_std_of`).
        draws: permutations averaged for the random baseline.

    Returns:
        :class:`~interpzoo.metrics.calibration.Score` rows ``METRICS``.
    """
    renderer_of(datamodule)
    stage = net.backbone.stages[0]
    if getattr(stage.act, "threshold", None) is None:
        raise NoGroundTruth(
            f"this autoencoder's first stage has no soft threshold (activation={getattr(net, 'activation', '?')!r}): "
            "there is no threshold to compare with the noise level"
        )
    sigma = noise_std_of(net) if noise_std is None else float(noise_std)
    if not 0 < sigma <= 1:
        raise ValueError(f"noise_std is a std in [0, 1] pixel units, got {sigma}")
    dataset = ground_truth_dataset(datamodule, num_samples)
    renders = clean_renders(dataset, range(len(dataset)))
    if renders["full"].shape[1] != net.in_chans:
        raise ValueError(
            f"the autoencoder takes {net.in_chans}-channel images but {type(datamodule).__name__} gives "
            f"{renders['full'].shape[1]}; use grayscale={net.in_chans == 1} as in training"
        )
    device = next(net.parameters()).device
    dtype = next(net.parameters()).dtype
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(renders["full"].shape, generator=g) * sigma  # one field per image, reused below

    def codes(x: Tensor) -> Tensor:
        return torch.cat([stage1_codes(net, x[i : i + 256].to(device, dtype)) for i in range(0, len(x), 256)])

    was = net.training
    net.eval()
    try:
        u_bg = codes(renders["background"])
        u_bg_noisy = codes(renders["background"] + noise)
        u_full = codes(renders["full"])
        u_noisy = codes(renders["full"] + noise)
        signal = u_full - codes(renders["no_parts"])
    finally:
        net.train(was)
    b = stage.act.threshold.detach().to(u_bg)
    sigma_k = code_noise_std(stage.conv.weight.to(u_bg), sigma, net.normalize.std.to(u_bg))
    factor = universal_factor(u_bg.shape[-2] * u_bg.shape[-1])
    args = (u_bg, u_bg_noisy, u_noisy, signal)
    model = stage1_scores(*args, b, sigma_k)
    oracle = stage1_scores(*args, factor * sigma_k, sigma_k)
    randoms = [
        stage1_scores(*args, b[p.to(b.device)], sigma_k) for p in _permutations(b.numel(), draws, seed)
    ]
    ratio = float((b / sigma_k.clamp_min(1e-12)).median())
    note = (
        f"stage 1; pixel noise std {sigma:.4f}; median threshold = {ratio:.2f} code-noise stds "
        f"(oracle sqrt(2 log n) = {factor:.2f})"
    )
    baseline = f"the model's thresholds permuted across units (mean of {len(randoms)} permutations)"
    return [
        Score(
            method="soft_autoencoder",
            metric=metric,
            raw=model[metric],
            ceiling=oracle[metric],
            random=float(np.nanmean([r[metric] for r in randoms])),
            baseline=baseline,
            note=note,
        )
        for metric in METRICS
    ]
